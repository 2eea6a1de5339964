defmodule FineTuning.Pool do
  @moduledoc ~S"""
  A pool of `FineTuning.Worker`s, one per GPU (or CPU slot), on one node or across connected
  Erlang nodes, with a durable queue, placement, failover and preemption.

      children = [
        {FineTuning.Pool,
         name: MyApp.Pool,
         data_dir: "/shared/fine-tuning/pool",
         workers: [
           [env: %{"CUDA_VISIBLE_DEVICES" => "0"}],
           [env: %{"CUDA_VISIBLE_DEVICES" => "1"}]
         ]}
      ]

      {:ok, job_id} = FineTuning.Pool.submit(MyApp.Pool, config, priority: 5, key: "support-v3")
      {:fine_tuning, ^job_id, :completed, _} = FineTuning.await(MyApp.Pool, job_id, :infinity)

  Other nodes lend their workers with a `FineTuning.Pool.Member` in their own supervision tree.
  Distributed Erlang is the transport: nothing else is needed between the nodes but a folder
  they all see for the jobs' outputs (checkpoints are what a job resumes from elsewhere).

  **Placement.** A job runs on a free worker that fits it (`:devices`, `:labels`); otherwise it
  waits in the queue, highest `:priority` first, then first come. Its events reach the
  subscriber (the caller, or `:subscriber`) exactly as from a single worker, under the pool's job
  id, with the same event types and exactly one terminal event; `FineTuning.await/3`,
  `FineTuning.stream/3`, `FineTuning.cancel/3`, `FineTuning.status/3`, `FineTuning.subscribe/3`
  and `FineTuning.jobs/2` take a pool where they take a worker. The pool sends one event type of
  its own: `{:fine_tuning, job_id, :requeued, %{reason: reason, checkpoint: path, attempts: n}}`
  when a job goes back to the queue, after which its events continue from the next worker.

  **Durability.** With `:data_dir`, every accepted job (config, priority, needs, state, last
  checkpoint, terminal event) is written to a DETS file there before `submit/3` returns. A pool
  started again with the same `:data_dir` (after a crash, or on another node that sees the
  folder) runs what was queued or running, the running jobs resuming from their checkpoints.
  A job submitted with a `:key` is idempotent: submitting the same key again attaches the caller
  to the existing job (and sends it the terminal event at once if the job has ended).

  **Failover.** When a worker's OS process dies, or its node goes down or stops, its running
  job is requeued (`reason: {:worker_exit, status}`, `{:node_down, node}`, `{:worker_down,
  reason}` or `:worker_stopped`) and resumes on another worker from its last checkpoint: a train
  or sweep config given as a map is restarted with `"resume" => "auto"`. The output folder must
  be on storage every worker's node reads.

  **Preemption.** A job that fits no free worker makes the lowest-priority running job that has
  a lower priority than its own, on a worker it would fit, yield: that job saves a checkpoint,
  goes back to the queue (`reason: :preempted`) and resumes later.

  **Operations.** `status/1` lists the workers, the queue and the running jobs with their
  progress; `drain/1` stops accepting and starting jobs while the running ones finish
  (`undrain/1` ends it). When the `:telemetry` application is loaded the pool emits
  `[:fine_tuning, :pool, :placement]` (`%{queue_time_ms: ms}`; metadata `job_id`, `node`,
  `worker`, `attempt`, `pool`), `[:fine_tuning, :pool, :requeue]` (metadata `job_id`, `reason`,
  `checkpoint`) and `[:fine_tuning, :pool, :preemption]` (metadata `job_id` of the job that
  yields, `for`, `priority`).
  """

  alias FineTuning.Protocol

  @doc """
  A child spec: the pool's scheduler, registered as `:name`, and (with `:workers`) a
  `FineTuning.Pool.Member` of workers on this node. Options: `:name` (required), `:data_dir`
  (where the queue is kept; none: in memory only), `:workers` (see `FineTuning.Pool.Member`),
  `:labels` (of this node's workers).
  """
  @spec child_spec(keyword()) :: Supervisor.child_spec()
  def child_spec(opts) do
    %{
      id: Keyword.get(opts, :id, {__MODULE__, Keyword.fetch!(opts, :name)}),
      start: {__MODULE__, :start_link, [opts]},
      type: :supervisor
    }
  end

  @doc "Start the pool's supervisor (see `child_spec/1`)."
  @spec start_link(keyword()) :: Supervisor.on_start()
  def start_link(opts) do
    name = Keyword.fetch!(opts, :name)
    {workers, opts} = Keyword.pop(opts, :workers, [])
    {labels, opts} = Keyword.pop(opts, :labels, [])

    member =
      if workers == [],
        do: [],
        else: [
          {FineTuning.Pool.Member, pool: name, workers: workers, labels: labels}
        ]

    # The workers' members depend on the scheduler being up; a scheduler restart leaves them be
    # (they join it again).
    Supervisor.start_link([{FineTuning.Pool.Server, opts} | member],
      strategy: :one_for_one,
      max_restarts: 10,
      max_seconds: 60
    )
  end

  @doc """
  Queue a job; `{:ok, job_id}` at once, or `{:error, issues}` (the config checked by one of the
  pool's workers), or `{:error, :draining}`. Options: `:subscriber` (default: the caller),
  `:priority` (an integer, default 0; higher runs first and may preempt lower), `:devices`
  (default 1), `:labels` (the worker must have each), `:key` (idempotency: the job's id).
  """
  @spec submit(GenServer.server(), FineTuning.config(), keyword()) ::
          {:ok, String.t()} | {:error, [FineTuning.issue()] | :draining}
  def submit(pool, config, opts \\ []) do
    subscriber = Keyword.get(opts, :subscriber, self())

    unless is_pid(subscriber),
      do: raise(ArgumentError, "option :subscriber must be a pid, got: #{inspect(subscriber)}")

    check_option!(
      opts,
      :key,
      nil,
      &(is_nil(&1) or (is_binary(&1) and &1 != "")),
      "a non-empty binary"
    )

    check_option!(opts, :priority, 0, &is_integer/1, "an integer")
    check_option!(opts, :devices, 1, &(is_integer(&1) and &1 > 0), "a positive integer")

    check_option!(
      opts,
      :labels,
      [],
      &(is_list(&1) and Enum.all?(&1, fn l -> is_binary(l) end)),
      "a list of binaries"
    )

    with {:ok, term} <- Protocol.config_term(config) do
      GenServer.call(pool, {:pool_submit, term, subscriber, opts}, :infinity)
    end
  end

  defp check_option!(opts, key, default, valid?, what) do
    value = Keyword.get(opts, key, default)

    unless valid?.(value),
      do: raise(ArgumentError, "option #{inspect(key)} must be #{what}, got: #{inspect(value)}")
  end

  @doc "The workers (node, devices, labels, job), the queue (job ids in order) and the running jobs."
  @spec status(GenServer.server()) :: map()
  def status(pool), do: GenServer.call(pool, :status, 30_000)

  @doc "Accept and start no more jobs; the running ones finish."
  @spec drain(GenServer.server()) :: :ok
  def drain(pool), do: GenServer.call(pool, {:drain, true}, 30_000)

  @doc "End `drain/1`: accept jobs again and start the queued ones."
  @spec undrain(GenServer.server()) :: :ok
  def undrain(pool), do: GenServer.call(pool, {:drain, false}, 30_000)
end
