defmodule FineTuning.Worker do
  @moduledoc """
  A GenServer that owns one `finetune-worker port` OS process.

      children = [
        {FineTuning.Worker, name: MyApp.FineTuner, env: %{"CUDA_VISIBLE_DEVICES" => "0"}}
      ]

      Supervisor.start_link(children, strategy: :one_for_one)

  Talk to it through `FineTuning` (`submit/3`, `await/3`, `stream/3`, ...). Options are listed
  in `FineTuning.Options`.

  `start_link/1` returns once the worker has answered `info`, or fails with
  `{:executable_not_found, path}`, `{:worker_exit, status}` or `{:startup_timeout, ms}`.

  Calls never block the GenServer: each is tagged with a request id and answered from
  `handle_info/2` when the worker replies (or with `{:error, :timeout}` after the call
  timeout). The worker sends job events to this process, which forwards them to each job's
  subscribers as `{:fine_tuning, job_id, type, payload}`.

  When the worker process exits, pending callers get `{:error, {:worker_exit, status}}`,
  subscribers of unfinished jobs get `{:fine_tuning, job_id, :failed, %{error: :worker_exit,
  status: status, message: ...}}`, and this GenServer stops with `{:worker_exit, status}` (or
  `:normal` after `FineTuning.shutdown/2`), so its supervisor restarts it.

  When this GenServer stops (its supervisor or the application stops) while jobs are
  unfinished, it asks the worker to shut down and keeps relaying its events for up to
  `:shutdown_grace` ms: the running job is cancelled, saves a checkpoint, and its subscribers
  get the real `:cancelled` event with the checkpoint path (queued jobs get `:cancelled` at
  step 0). Only jobs still unfinished after that get `:failed` with `error: :worker_exit`, and a
  worker still alive is killed.

  A `submit` whose reply comes after the caller's timeout is cancelled at once: the caller got
  `{:error, :timeout}` and no job id, so no job may run that it cannot see.

  When the `:telemetry` application is loaded, each job emits `[:fine_tuning, :job, :start]`,
  `[:fine_tuning, :job, :progress]`, `[:fine_tuning, :job, :checkpoint]`, and one of
  `[:fine_tuning, :job, :stop]` (completed or cancelled) or `[:fine_tuning, :job, :exception]`
  (failed); see `docs/elixir.md` for the measurements and metadata. Log messages about a job
  carry `job_id` metadata.

  Secrets given in `:env` never reach logs, crash reports or `:sys.get_state/1` (see
  `FineTuning.Options`).
  """

  use GenServer
  require Logger

  alias FineTuning.{Options, OSProcess, Protocol, Subscriptions}

  defstruct port: nil,
            os_pid: nil,
            opts: nil,
            info: nil,
            next_id: 1,
            pending: %{},
            subs: Subscriptions.new(),
            shutdown_requested: false,
            telemetry?: false,
            started: %{}

  @child_spec_keys [:id, :restart, :shutdown]

  @doc """
  A child spec, so that `{FineTuning.Worker, opts}` works in a supervisor's children.

  Besides the worker options (`FineTuning.Options`), `opts` may hold the child spec keys
  `:id` (default: `:name`, then this module, so several workers, one per GPU, can share a
  supervisor), `:restart` (default `:permanent`; `:transient` keeps a worker down after
  `FineTuning.shutdown/2`) and `:shutdown` (default: `:shutdown_grace` + 5 s, room for the
  running job to save a checkpoint).
  """
  @spec child_spec(keyword()) :: Supervisor.child_spec()
  def child_spec(opts) do
    {spec, opts} = Keyword.split(opts, @child_spec_keys)

    Supervisor.child_spec(
      %{
        id: Keyword.get(opts, :name, __MODULE__),
        start: {__MODULE__, :start_link, [Options.seal_secrets(opts)]},
        shutdown: Options.shutdown_grace(opts) + 5_000,
        type: :worker
      },
      spec
    )
  end

  @doc "Start the worker process and wait until it answers `info`. See `FineTuning.Options`."
  @spec start_link(keyword()) :: GenServer.on_start()
  def start_link(opts \\ []) do
    opts = opts |> Options.seal_secrets() |> Keyword.drop(@child_spec_keys)

    GenServer.start_link(__MODULE__, opts, Keyword.take(opts, [:name]))
  end

  @impl true
  def init(opts) do
    opts = Options.validate!(opts)
    Process.flag(:trap_exit, true)

    with {:ok, port} <- OSProcess.open(opts) do
      # The environment went to the OS process; the state keeps no secret of it.
      state = %__MODULE__{
        port: port,
        os_pid: OSProcess.os_pid(port),
        opts: %{opts | env: Options.redact_env(opts.env)},
        telemetry?: Code.ensure_loaded?(:telemetry)
      }

      case await_ready(state) do
        {:ok, state} ->
          {:ok, state}

        {:error, {:worker_exit, _} = reason} ->
          {:stop, reason}

        {:error, reason} ->
          close_port(state)
          {:stop, reason}
      end
    else
      {:error, reason} -> {:stop, reason}
    end
  end

  # Readiness is part of init on purpose: start_link must not return a worker that cannot
  # answer. Any other frame that arrives meanwhile is handled as usual.
  defp await_ready(%{port: port} = state) do
    id = state.next_id
    command(port, Protocol.encode_call(id, :info, []))
    deadline = System.monotonic_time(:millisecond) + state.opts.startup_timeout
    wait_ready(%{state | next_id: id + 1}, id, deadline)
  end

  defp wait_ready(%{port: port} = state, id, deadline) do
    remaining = max(deadline - System.monotonic_time(:millisecond), 0)

    receive do
      {^port, {:data, frame}} ->
        case Protocol.decode(frame) do
          {:ok, {:reply, ^id, info}} ->
            {:ok, %{state | info: info}}

          {:ok, {:error_reply, ^id, {class, message, _trace}}} ->
            {:error, {:info_failed, class, message}}

          decoded ->
            wait_ready(handle_frame(decoded, state), id, deadline)
        end

      {^port, {:exit_status, status}} ->
        {:error, {:worker_exit, status}}
    after
      remaining -> {:error, {:startup_timeout, state.opts.startup_timeout}}
    end
  end

  @impl true
  def handle_call({:call, function, args, timeout}, from, state) do
    {:noreply, send_call(state, function, args, {from, :call}, timeout)}
  end

  def handle_call({:submit, config, subscriber, timeout}, from, state) do
    {:noreply,
     send_call(state, :submit, [config, self()], {from, {:submit, subscriber}}, timeout)}
  end

  def handle_call({:shutdown, timeout}, from, state) do
    state = %{state | shutdown_requested: true}
    {:noreply, send_call(state, :shutdown, [], {from, :call}, timeout)}
  end

  def handle_call({:subscribe, job_id, pid}, _from, state) do
    {reply, subs} = Subscriptions.subscribe(state.subs, job_id, pid)
    {:reply, reply, %{state | subs: subs}}
  end

  def handle_call({:unsubscribe, job_id, pid}, _from, state) do
    {:reply, :ok, %{state | subs: Subscriptions.unsubscribe(state.subs, job_id, pid)}}
  end

  def handle_call(:os_pid, _from, state), do: {:reply, state.os_pid, state}

  defp send_call(state, function, args, waiter, timeout) do
    timeout = if timeout == :default, do: state.opts.call_timeout, else: timeout
    id = state.next_id
    command(state.port, Protocol.encode_call(id, function, args))
    timer = if timeout != :infinity, do: Process.send_after(self(), {:call_timeout, id}, timeout)
    %{state | next_id: id + 1, pending: Map.put(state.pending, id, {waiter, timer})}
  end

  # A port whose program just died may already be closed; the call then stays pending and
  # is failed with the exit status, which is on its way.
  defp command(port, frame) do
    Port.command(port, frame)
  rescue
    ArgumentError -> :closed
  end

  @impl true
  def handle_info({port, {:data, frame}}, %{port: port} = state) do
    {:noreply, handle_frame(Protocol.decode(frame), state, frame)}
  end

  def handle_info({port, {:exit_status, status}}, %{port: port} = state) do
    fail_all(state, {:worker_exit, status}, status, "exited with status #{status}")

    reason =
      if status == 0 and state.shutdown_requested, do: :normal, else: {:worker_exit, status}

    if reason != :normal, do: Logger.error("finetune-worker exited with status #{status}")
    {:stop, reason, %{state | port: nil, pending: %{}, subs: Subscriptions.new()}}
  end

  # Normally {:exit_status, _} comes first and we have stopped; this is a port that broke.
  def handle_info({:EXIT, port, reason}, %{port: port} = state) do
    fail_all(state, {:worker_exit, nil}, nil, "became unreachable (#{inspect(reason)})")
    {:stop, {:port_exit, reason}, %{state | port: nil, pending: %{}, subs: Subscriptions.new()}}
  end

  def handle_info({:call_timeout, id}, state) do
    case Map.pop(state.pending, id) do
      {nil, _} ->
        {:noreply, state}

      # A submit that timed out may still queue the job: keep waiting for its reply (without
      # a caller), and cancel the job it names (see reply/3): the caller has no job id.
      {{{from, {:submit, _}}, _timer}, pending} ->
        answer(from, {:error, :timeout})
        {:noreply, %{state | pending: Map.put(pending, id, {{nil, :orphan_submit}, nil})}}

      {{{from, _kind}, _timer}, pending} ->
        answer(from, {:error, :timeout})
        {:noreply, %{state | pending: pending}}
    end
  end

  def handle_info({:EXIT, _pid, _reason}, state), do: {:noreply, state}

  def handle_info(message, state) do
    Logger.debug("FineTuning.Worker ignored #{inspect(message)}")
    {:noreply, state}
  end

  @impl true
  def terminate(reason, state) do
    if state.port do
      state = stop_jobs(state)

      if state.port do
        fail_all(state, {:worker_exit, nil}, nil, "was stopped (#{inspect(reason)})")
        close_port(state)
      else
        fail_all(state, {:worker_exit, 0}, 0, "was stopped (#{inspect(reason)})")
      end
    end

    :ok
  end

  # Crash reports and :sys.get_status/1 show the state through this (OTP 25+). The state holds
  # no secret already (see init/1); the pending callers are only counted.
  # No @impl: Elixir 1.14's GenServer does not declare format_status/1 (OTP's gen_server does).
  @doc false
  def format_status(%{state: %__MODULE__{} = state} = status) do
    %{status | state: %{state | pending: map_size(state.pending)}}
  end

  def format_status(status), do: status

  # With jobs unfinished, ask the worker to shut down (it cancels them, the running one saves a
  # checkpoint) and relay its events until it exits or the grace runs out; nil port = exited.
  defp stop_jobs(state) do
    if Subscriptions.unfinished(state.subs) == [] do
      state
    else
      id = state.next_id
      command(state.port, Protocol.encode_call(id, :shutdown, []))
      state = %{state | next_id: id + 1, shutdown_requested: true}
      relay_until_exit(state, System.monotonic_time(:millisecond) + state.opts.shutdown_grace)
    end
  end

  defp relay_until_exit(%{port: port} = state, deadline) do
    remaining = max(deadline - System.monotonic_time(:millisecond), 0)

    receive do
      {^port, {:data, frame}} ->
        relay_until_exit(handle_frame(Protocol.decode(frame), state, frame), deadline)

      {^port, {:exit_status, _status}} ->
        %{state | port: nil}
    after
      remaining -> state
    end
  end

  defp close_port(state), do: OSProcess.close(state.port, state.os_pid, state.opts.shutdown_grace)

  # ---- frames -------------------------------------------------------------------------------

  @doc false
  def handle_frame({:ok, {:reply, id, result}}, state) do
    case Map.pop(state.pending, id) do
      {nil, _} ->
        Logger.debug("finetune-worker replied to unknown or timed-out call #{id}")
        state

      {{waiter, timer}, pending} ->
        if timer, do: Process.cancel_timer(timer)
        reply(waiter, result, %{state | pending: pending})
    end
  end

  def handle_frame({:ok, {:error_reply, id, {class, message, trace}}}, state) do
    handle_frame({:ok, {:reply, id, {:error, {:python, class, message, trace}}}}, state)
  end

  def handle_frame({:ok, {:message, _pid, {:fine_tuning, job_id, type, _} = event}}, state)
      when is_binary(job_id) and is_atom(type) do
    route_event(event, state)
  end

  # ErlPort semantics for anything else: `{'M', Pid, Message}` means Pid ! Message.
  def handle_frame({:ok, {:message, pid, message}}, state) when is_pid(pid) do
    send(pid, message)
    state
  end

  def handle_frame({:ok, {:print, text}}, state) do
    Logger.info("finetune-worker: #{IO.chardata_to_string(List.wrap(text))}")
    state
  rescue
    _ -> state
  end

  def handle_frame({:ok, other}, state) do
    Logger.warning("finetune-worker sent an unexpected message: #{inspect(other)}")
    state
  end

  def handle_frame({:error, {:unexpected, term}}, state) do
    Logger.warning("finetune-worker sent a term that is no protocol message: #{inspect(term)}")
    state
  end

  def handle_frame({:error, reason}, state) do
    Logger.warning("finetune-worker sent an undecodable frame, ignored: #{inspect(reason)}")
    state
  end

  # An undecodable reply (say, an atom from a newer worker) still names its call: answer the
  # caller now rather than after its timeout.
  defp handle_frame({:error, {:undecodable, _} = reason} = error, state, frame) do
    with {:ok, id} <- Protocol.reply_id(frame),
         {{waiter, timer}, pending} when waiter != nil <- Map.pop(state.pending, id) do
      Logger.warning("finetune-worker's reply to call #{id} is undecodable: #{inspect(reason)}")
      if timer, do: Process.cancel_timer(timer)
      reply(waiter, {:error, {:undecodable_reply, reason}}, %{state | pending: pending})
    else
      _ -> handle_frame(error, state)
    end
  end

  defp handle_frame(decoded, state, _frame), do: handle_frame(decoded, state)

  defp answer(nil, _result), do: :ok
  defp answer(from, result), do: GenServer.reply(from, result)

  defp reply({from, :call}, result, state) do
    answer(from, result)
    state
  end

  defp reply({from, {:submit, subscriber}}, {:ok, job_id} = result, state) do
    {held, subs} = Subscriptions.job_submitted(state.subs, job_id, subscriber)
    answer(from, result)
    state = Enum.reduce(held, %{state | subs: subs}, &route_event/2)
    drop_held(state)
  end

  defp reply({from, {:submit, _}}, result, state) do
    answer(from, result)
    drop_held(state)
  end

  defp reply({nil, :orphan_submit}, {:ok, job_id}, state) do
    Logger.warning(
      "submit of job #{job_id} was answered after the caller's timeout; cancelling the job, " <>
        "whose id the caller never got",
      job_id: job_id
    )

    command(state.port, Protocol.encode_cast({:cancel, job_id}))
    # Registered with no subscriber: its events (held ones too) go nowhere, without warnings.
    {_held, subs} = Subscriptions.job_submitted(state.subs, job_id, nil)
    drop_held(%{state | subs: subs})
  end

  defp reply({nil, :orphan_submit}, _result, state), do: drop_held(state)

  defp route_event({:fine_tuning, job_id, type, payload} = event, state) do
    state = telemetry(state, job_id, type, payload)

    case Subscriptions.route(state.subs, event, submit_pending?(state)) do
      {:deliver, pids, subs} ->
        Enum.each(pids, &send(&1, event))
        %{state | subs: subs}

      {:held, subs} ->
        %{state | subs: subs}

      {:unknown, subs} ->
        Logger.warning("finetune-worker sent an event of unknown job #{job_id}: #{type}",
          job_id: job_id
        )

        %{state | subs: subs}
    end
  end

  # ---- telemetry ----------------------------------------------------------------------------

  # :telemetry is no dependency (hex may be unreachable); it is used when the app has it.
  @compile {:no_warn_undefined, :telemetry}

  defp telemetry(%{telemetry?: false} = state, _job_id, _type, _payload), do: state

  defp telemetry(state, job_id, type, payload) do
    meta = %{job_id: job_id, worker: self(), name: state.opts.name}
    now = System.monotonic_time()

    case type do
      :started ->
        :telemetry.execute(
          [:fine_tuning, :job, :start],
          %{system_time: System.system_time(), monotonic_time: now},
          Map.put(meta, :kind, payload[:kind])
        )

        %{state | started: Map.put(state.started, job_id, now)}

      :progress ->
        measurements = Map.take(payload, [:step, :total_steps, :percent, :done, :total, :eta_s])
        :telemetry.execute([:fine_tuning, :job, :progress], measurements, meta)
        state

      :checkpoint ->
        :telemetry.execute(
          [:fine_tuning, :job, :checkpoint],
          %{step: payload[:step]},
          Map.put(meta, :path, payload[:path])
        )

        state

      type when type in [:completed, :cancelled, :failed] ->
        {started, rest} = Map.pop(state.started, job_id, now)
        measurements = %{duration: now - started, monotonic_time: now}

        if type == :failed do
          meta =
            Map.merge(meta, %{kind: :error, reason: payload[:error], message: payload[:message]})

          :telemetry.execute([:fine_tuning, :job, :exception], measurements, meta)
        else
          meta =
            Map.merge(meta, %{
              result: type,
              outputs: payload[:outputs],
              checkpoint: payload[:checkpoint]
            })

          :telemetry.execute([:fine_tuning, :job, :stop], measurements, meta)
        end

        %{state | started: rest}

      _ ->
        state
    end
  end

  defp submit_pending?(state) do
    Enum.any?(state.pending, fn {_id, {{_from, kind}, _timer}} -> kind != :call end)
  end

  defp drop_held(state) do
    if submit_pending?(state) do
      state
    else
      case Subscriptions.drop_held(state.subs) do
        {[], _} ->
          state

        {jobs, subs} ->
          Logger.warning("dropped events of jobs that no submit named: #{inspect(jobs)}")
          %{state | subs: subs}
      end
    end
  end

  defp fail_all(state, call_error, status, what) do
    Enum.each(state.pending, fn {_id, {{from, _kind}, _timer}} ->
      answer(from, {:error, call_error})
    end)

    message = "the finetune-worker process #{what} before the job finished"
    payload = %{error: :worker_exit, status: status, message: message}

    for {job_id, pids} <- Subscriptions.unfinished(state.subs), pid <- pids do
      send(pid, {:fine_tuning, job_id, :failed, payload})
    end
  end
end
