defmodule FineTuning do
  @moduledoc ~S"""
  Fine-tune and merge LLMs from Elixir through a supervised Python worker.

      children = [
        {FineTuning.Worker, name: MyApp.FineTuner}
      ]

      Supervisor.start_link(children, strategy: :one_for_one)

      {:ok, job_id} = FineTuning.submit(MyApp.FineTuner, %{
        "job" => "train",
        "model_name" => "/models/tiny",
        "dataset" => %{"path" => "/data/train.jsonl"},
        "output_dir" => "/runs/tiny-lora"
      })

      receive do
        {:fine_tuning, ^job_id, :progress, %{percent: percent}} -> IO.puts("#{percent}%")
      end

      {:fine_tuning, ^job_id, :completed, %{outputs: outputs}} =
        FineTuning.await(MyApp.FineTuner, job_id, :infinity)

  The subscriber of a job (the caller of `submit/3` unless `:subscriber` names another pid)
  receives every event as `{:fine_tuning, job_id, type, payload}`: `type` is one of
  `FineTuning.Protocol.event_types/0` and `payload` a map with atom keys (`:step`, `:path`,
  `:summary`, ...); the maps keyed by names (`metrics`, `improvement`, `config`, `details`)
  have binary keys: `%{metrics: %{"loss" => loss}}`. A job ends with exactly one
  `:completed`, `:failed` or `:cancelled` event.

  Every call returns `{:error, {:worker_exit, status}}` if the worker process dies before it
  answers, `{:error, :timeout}` after the worker's `:call_timeout` (or the `:timeout` given
  here), `{:error, {:python, class, message, trace}}` if the call raised in Python, and
  `{:error, {:undecodable_reply, reason}}` for a reply `binary_to_term(_, [:safe])` refused
  (an atom from a newer worker).
  """

  alias FineTuning.Protocol

  @type worker :: GenServer.server()
  @type job_id :: String.t()
  @type config :: map() | String.t() | {:file, Path.t()}
  @type issue :: %{
          required(:path) => String.t(),
          required(:message) => String.t(),
          optional(atom()) => term()
        }
  @type event :: Protocol.event()
  @type call_error ::
          {:error,
           :timeout
           | {:worker_exit, integer() | nil}
           | {:python, atom(), term(), term()}
           | {:undecodable_reply, term()}}

  @doc "Versions, devices and queue length of the worker."
  @spec info(worker(), keyword()) :: map() | call_error()
  def info(worker, opts \\ []), do: call(worker, :info, [], opts)

  @doc """
  Validate a config without running it: `:ok`, or `{:error, issues}` listing every problem,
  each with the JSON `:path` of the field at fault and a `:message`.
  """
  @spec validate(worker(), config(), keyword()) :: :ok | {:error, [issue()]} | call_error()
  def validate(worker, config, opts \\ []) do
    with {:ok, term} <- Protocol.config_term(config) do
      call(worker, :validate, [term], opts)
    end
  end

  @doc """
  Validate and queue a job; returns `{:ok, job_id}` at once (the job runs later) or
  `{:error, issues}`. Options: `:subscriber` (pid that receives the events, default: the
  caller), `:timeout`.
  """
  @spec submit(worker(), config(), keyword()) ::
          {:ok, job_id()} | {:error, [issue()]} | call_error()
  def submit(worker, config, opts \\ []) do
    subscriber = Keyword.get(opts, :subscriber, self())

    unless is_pid(subscriber),
      do: raise(ArgumentError, "option :subscriber must be a pid, got: #{inspect(subscriber)}")

    with {:ok, term} <- Protocol.config_term(config) do
      GenServer.call(worker, {:submit, term, subscriber, call_timeout(opts)}, :infinity)
    end
  end

  @doc "State, step, last metrics and outputs of a job, or `{:error, :not_found}`."
  @spec status(worker(), job_id(), keyword()) :: map() | {:error, :not_found} | call_error()
  def status(worker, job_id, opts \\ []) when is_binary(job_id),
    do: call(worker, :status, [job_id], opts)

  @doc "The status maps of every job the worker knows."
  @spec jobs(worker(), keyword()) :: [map()] | call_error()
  def jobs(worker, opts \\ []), do: call(worker, :jobs, [], opts)

  @doc """
  Ask a job to stop. It stops at the next step boundary, saves a checkpoint, and ends with a
  `:cancelled` event (a queued job is cancelled at once).
  """
  @spec cancel(worker(), job_id(), keyword()) :: :ok | {:error, :not_found} | call_error()
  def cancel(worker, job_id, opts \\ []) when is_binary(job_id),
    do: call(worker, :cancel, [job_id], opts)

  @doc """
  Answer a GRPO job's reward request: the job's subscribers receive
  `{:fine_tuning, job_id, :reward_request, %{request: n, step: s, prompts: [...], completions: [...],
  references: [...]}}` for a reward of type `"beam"`, and one of them answers with a number (or
  `nil`) per completion, in order. `:ok`, or `{:error, :not_found}` when no such request waits
  (answered already, or timed out: the job then failed). A wrong count or a value that is not a
  finite number is refused with `{:error, {:python, ...}}` and the request keeps waiting.
  """
  @spec rewards(worker(), job_id(), pos_integer(), [number() | nil], keyword()) ::
          :ok | {:error, :not_found} | call_error()
  def rewards(worker, job_id, request, rewards, opts \\ [])
      when is_binary(job_id) and is_integer(request) and is_list(rewards),
      do: call(worker, :rewards, [job_id, request, rewards], opts)

  @doc """
  Ask the worker to exit gracefully. The `FineTuning.Worker` then stops with reason
  `:normal` (a `:permanent` child is restarted by its supervisor all the same).
  """
  @spec shutdown(worker(), keyword()) :: :ok | call_error()
  def shutdown(worker, opts \\ []),
    do: GenServer.call(worker, {:shutdown, call_timeout(opts)}, :infinity)

  @doc "The OS pid of the worker process (for monitoring and ops tools)."
  @spec os_pid(worker()) :: pos_integer() | nil
  def os_pid(worker), do: GenServer.call(worker, :os_pid)

  @doc """
  Also send the events of `job_id` to `pid`. `{:ok, :added}` or `{:ok, :already}` while the
  job runs; `{:ok, {:finished, event}}` with its terminal event once it has ended.
  """
  @spec subscribe(worker(), job_id(), pid()) ::
          {:ok, :added | :already | {:finished, event()}} | {:error, :not_found}
  def subscribe(worker, job_id, pid \\ self()) when is_binary(job_id) and is_pid(pid),
    do: GenServer.call(worker, {:subscribe, job_id, pid})

  @doc "Stop sending the events of `job_id` to `pid`."
  @spec unsubscribe(worker(), job_id(), pid()) :: :ok
  def unsubscribe(worker, job_id, pid \\ self()) when is_binary(job_id) and is_pid(pid),
    do: GenServer.call(worker, {:unsubscribe, job_id, pid})

  @doc """
  Wait for the job's terminal event (`:completed`, `:failed` or `:cancelled`) and return it.
  The job's earlier events in the caller's mailbox are consumed. Returns
  `{:error, :timeout}` or `{:error, :not_found}` (a job this worker never ran).
  """
  @spec await(worker(), job_id(), timeout()) :: event() | {:error, :timeout | :not_found}
  def await(worker, job_id, timeout \\ :infinity) when is_binary(job_id) do
    ref = Process.monitor(GenServer.whereis(worker) || worker_not_running(worker))

    result =
      case subscribe(worker, job_id) do
        {:ok, {:finished, event}} ->
          drain(job_id)
          event

        {:ok, added} ->
          case next_terminal(job_id, ref, deadline(timeout)) do
            {:error, :timeout} = error ->
              if added == :added, do: unsubscribe(worker, job_id)
              error

            event ->
              event
          end

        {:error, :not_found} = error ->
          error
      end

    Process.demonitor(ref, [:flush])
    result
  end

  @doc """
  The job's events as a `Stream`; the process that runs the stream subscribes when it
  starts (events sent before that are not replayed) and the stream ends after the terminal
  event. Options: `:timeout` (ms to wait for each event, default `:infinity`; the
  stream raises on timeout). A stream over an ended job yields just its terminal event.
  """
  @spec stream(worker(), job_id(), keyword()) :: Enumerable.t()
  def stream(worker, job_id, opts \\ []) when is_binary(job_id) do
    timeout = Keyword.get(opts, :timeout, :infinity)

    Stream.resource(
      fn ->
        ref = Process.monitor(GenServer.whereis(worker) || worker_not_running(worker))

        case subscribe(worker, job_id) do
          {:ok, {:finished, event}} -> {:finished, event, ref}
          {:ok, added} -> {:live, added, ref}
          {:error, :not_found} -> raise ArgumentError, "unknown job #{inspect(job_id)}"
        end
      end,
      fn
        {:finished, event, ref} ->
          drain(job_id)
          {[event], {:done, :already, ref}}

        {:done, _added, _ref} = acc ->
          {:halt, acc}

        {:live, added, ref} = acc ->
          case next_event(job_id, ref, timeout) do
            {:fine_tuning, _, type, _} = event ->
              if Protocol.terminal?(type),
                do: {[event], {:done, :already, ref}},
                else: {[event], acc}

            {:error, :timeout} ->
              if added == :added, do: unsubscribe(worker, job_id)
              raise "no event of job #{job_id} within #{timeout} ms"
          end
      end,
      fn
        {_, :added, ref} ->
          unsubscribe(worker, job_id)
          Process.demonitor(ref, [:flush])

        {_, _, ref} ->
          Process.demonitor(ref, [:flush])
      end
    )
  end

  # ---- helpers --------------------------------------------------------------------------------

  defp call(worker, function, args, opts) do
    GenServer.call(worker, {:call, function, args, call_timeout(opts)}, :infinity)
  end

  # nil lets the worker's own :call_timeout apply.
  defp call_timeout(opts) do
    case Keyword.get(opts, :timeout) do
      nil -> :default
      timeout -> timeout
    end
  end

  defp worker_not_running(worker), do: exit({:noproc, {__MODULE__, :worker, [worker]}})

  defp deadline(:infinity), do: :infinity
  defp deadline(ms), do: System.monotonic_time(:millisecond) + ms

  defp remaining(:infinity), do: :infinity
  defp remaining(deadline), do: max(deadline - System.monotonic_time(:millisecond), 0)

  defp next_terminal(job_id, ref, deadline) do
    case next_event(job_id, ref, remaining(deadline)) do
      {:fine_tuning, _, type, _} = event ->
        if Protocol.terminal?(type), do: event, else: next_terminal(job_id, ref, deadline)

      error ->
        error
    end
  end

  # The worker sends a job's `:failed` event before it stops, so a :DOWN seen here means it
  # died without that chance (e.g. killed with :kill).
  defp next_event(job_id, ref, timeout) do
    receive do
      {:fine_tuning, ^job_id, _type, _payload} = event ->
        event

      {:DOWN, ^ref, :process, _, reason} ->
        {:fine_tuning, job_id, :failed,
         %{
           error: :worker_exit,
           status: nil,
           message: "the FineTuning.Worker went down: #{inspect(reason)}"
         }}
    after
      timeout -> {:error, :timeout}
    end
  end

  defp drain(job_id) do
    receive do
      {:fine_tuning, ^job_id, _type, _payload} -> drain(job_id)
    after
      0 -> :ok
    end
  end
end
