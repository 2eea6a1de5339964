defmodule FineTuning.Pool.Member do
  @moduledoc """
  The workers one node lends to a `FineTuning.Pool`: a supervisor of `FineTuning.Worker`s, each
  joined to the pool (and joined again whenever the worker restarts or the pool comes back).

  On the pool's own node, `FineTuning.Pool`'s `:workers` option starts one. On every other node,
  put one in that node's supervision tree, naming the pool as a `GenServer.server()` that
  reaches it from there (`{MyApp.Pool, :"main@host"}`, or `{:global, MyApp.Pool}`):

      children = [
        {FineTuning.Pool.Member,
         pool: {MyApp.Pool, :"main@gpu-box-0"},
         labels: ["a100"],
         workers: [
           [env: %{"CUDA_VISIBLE_DEVICES" => "0"}],
           [env: %{"CUDA_VISIBLE_DEVICES" => "1"}]
         ]}
      ]

  Each entry of `:workers` is a keyword list of `FineTuning.Worker` options plus `:devices`
  (how many devices the worker holds, default 1: a job asking for more is placed elsewhere)
  and `:labels` (added to the member's `:labels`; a job asking for a label runs only on a
  worker that has it).
  """

  use Supervisor

  alias FineTuning.Pool.Joiner

  @spec start_link(keyword()) :: Supervisor.on_start()
  def start_link(opts) do
    Supervisor.start_link(__MODULE__, opts, Keyword.take(opts, [:name]))
  end

  @doc "Start a member not linked to the caller (for a remote call: `:erpc.call(node, FineTuning.Pool.Member, :start, [opts])`)."
  @spec start(keyword()) :: Supervisor.on_start()
  def start(opts) do
    with {:ok, pid} <- start_link(opts) do
      Process.unlink(pid)
      {:ok, pid}
    end
  end

  @spec child_spec(keyword()) :: Supervisor.child_spec()
  def child_spec(opts) do
    %{
      id: Keyword.get(opts, :id, {__MODULE__, Keyword.get(opts, :name, make_ref())}),
      start: {__MODULE__, :start_link, [opts]},
      type: :supervisor
    }
  end

  @impl true
  def init(opts) do
    pool = Keyword.fetch!(opts, :pool)
    labels = Keyword.get(opts, :labels, [])

    children =
      opts
      |> Keyword.get(:workers, [])
      |> Enum.with_index()
      |> Enum.map(fn {worker, index} ->
        {devices, worker} = Keyword.pop(worker, :devices, 1)
        {own_labels, worker} = Keyword.pop(worker, :labels, [])

        slot = [
          {FineTuning.Worker, Keyword.put(worker, :id, :worker)},
          {Joiner, pool: pool, devices: devices, labels: labels ++ own_labels}
        ]

        %{
          id: {:slot, index},
          start: {Supervisor, :start_link, [slot, [strategy: :rest_for_one]]},
          type: :supervisor
        }
      end)

    # A worker whose Python process dies is restarted (and joins again); the pool meanwhile
    # runs its job elsewhere.
    Supervisor.init(children, strategy: :one_for_one, max_restarts: 20, max_seconds: 60)
  end
end

defmodule FineTuning.Pool.Joiner do
  @moduledoc false
  # Registers one worker (its sibling under the slot's supervisor, child id :worker) with the
  # pool, and again whenever the pool goes down and comes back. Started after its worker
  # (rest_for_one), so a restarted worker joins again too.
  use GenServer

  @retry_ms 500

  def child_spec(opts), do: %{id: __MODULE__, start: {__MODULE__, :start_link, [opts]}}

  def start_link(opts), do: GenServer.start_link(__MODULE__, opts)

  @impl true
  def init(opts) do
    [slot | _] = Process.get(:"$ancestors")
    send(self(), :join)
    {:ok, %{opts: Map.new(opts), slot: slot, pool_ref: nil}}
  end

  @impl true
  def handle_info(:join, %{opts: opts} = state) do
    worker =
      Enum.find_value(Supervisor.which_children(state.slot), fn {id, pid, _, _} ->
        id == :worker and pid
      end)

    meta = %{devices: opts.devices, labels: opts.labels, node: node()}
    # Watch the scheduler before joining it: one that restarts in between is then noticed.
    ref = Process.monitor(GenServer.whereis(opts.pool) || opts.pool)

    try do
      :ok = GenServer.call(opts.pool, {:join, worker, meta}, 10_000)
      {:noreply, %{state | pool_ref: ref}}
    catch
      :exit, _ ->
        Process.demonitor(ref, [:flush])
        Process.send_after(self(), :join, @retry_ms)
        {:noreply, state}
    end
  end

  def handle_info({:DOWN, ref, :process, _, _}, %{pool_ref: ref} = state) do
    Process.send_after(self(), :join, @retry_ms)
    {:noreply, %{state | pool_ref: nil}}
  end

  def handle_info(_message, state), do: {:noreply, state}
end
