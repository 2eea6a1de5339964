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
  `:normal` after `FineTuning.shutdown/2`), so its supervisor restarts it. When this GenServer
  stops, it closes the worker's stdin and kills the process if it is still there after
  `:shutdown_grace` ms.
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
            shutdown_requested: false

  @doc """
  A child spec whose `:shutdown` leaves time for the worker's grace period. `:id` defaults
  to `:name` (then to this module), so several workers (one per GPU) can share a supervisor.
  """
  @spec child_spec(keyword()) :: Supervisor.child_spec()
  def child_spec(opts) do
    id = Keyword.get(opts, :id, Keyword.get(opts, :name, __MODULE__))

    %{
      id: id,
      start: {__MODULE__, :start_link, [opts]},
      shutdown: Options.shutdown_grace(opts) + 5_000,
      type: :worker
    }
  end

  @doc "Start the worker process and wait until it answers `info`. See `FineTuning.Options`."
  @spec start_link(keyword()) :: GenServer.on_start()
  def start_link(opts \\ []) do
    case Keyword.get(opts, :name) do
      nil -> GenServer.start_link(__MODULE__, opts)
      name -> GenServer.start_link(__MODULE__, opts, name: name)
    end
  end

  @impl true
  def init(opts) do
    opts = Options.validate!(opts)
    Process.flag(:trap_exit, true)

    with {:ok, port} <- OSProcess.open(opts) do
      state = %__MODULE__{port: port, os_pid: OSProcess.os_pid(port), opts: opts}

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
      # a caller) so the subscriber gets the job's events rather than nobody.
      {{{from, {:submit, _} = kind}, _timer}, pending} ->
        answer(from, {:error, :timeout})
        {:noreply, %{state | pending: Map.put(pending, id, {{nil, kind}, nil})}}

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
      fail_all(state, {:worker_exit, nil}, nil, "was stopped (#{inspect(reason)})")

      close_port(state)
    end

    :ok
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

  defp route_event({:fine_tuning, job_id, type, _} = event, state) do
    case Subscriptions.route(state.subs, event, submit_pending?(state)) do
      {:deliver, pids, subs} ->
        Enum.each(pids, &send(&1, event))
        %{state | subs: subs}

      {:held, subs} ->
        %{state | subs: subs}

      {:unknown, subs} ->
        Logger.warning("finetune-worker sent an event of unknown job #{job_id}: #{type}")
        %{state | subs: subs}
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
