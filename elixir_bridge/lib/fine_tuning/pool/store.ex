defmodule FineTuning.Pool.Store do
  @moduledoc false
  # The pool's durable queue: one DETS file (OTP's own disk tables, no dependency) holding each
  # job's record (its config, priority, needs, state, last checkpoint, terminal event). Written
  # through on every change and synced, so a pool restarted after a crash (or started on another
  # node that sees the same folder) finds every job it had accepted.

  require Logger

  @file_name "fine_tuning_pool.dets"

  @type t :: :dets.tab_name() | nil

  @doc """
  Open (or create) the store in `dir`; nil keeps the queue in memory only. The table is named
  after its file, so a second pool on the same folder in this VM is refused instead of sharing
  (or repairing) the file under the first one. Pools on other nodes must not share it either:
  DETS has no lock across VMs (and does not belong on NFS).
  """
  @spec open(Path.t() | nil) :: {:ok, t()} | {:error, term()}
  def open(nil), do: {:ok, nil}

  def open(dir) do
    path = dir |> Path.join(@file_name) |> Path.expand()
    name = {__MODULE__, path}

    with :ok <- File.mkdir_p(dir),
         :undefined <- :dets.info(name, :owner) do
      case :dets.open_file(name, file: String.to_charlist(path), type: :set, repair: true) do
        {:ok, table} -> {:ok, table}
        {:error, reason} -> {:error, {:pool_store, path, reason}}
      end
    else
      {:error, reason} -> {:error, {:pool_store, path, reason}}
      _owner -> {:error, {:pool_store, path, :already_open}}
    end
  end

  @doc "Every stored job record."
  @spec load(t()) :: [map()]
  def load(nil), do: []

  def load(table) do
    :dets.foldl(fn {_id, record}, acc -> [record | acc] end, [], table)
    |> Enum.sort_by(& &1.seq)
  end

  @doc "Write one job's record and flush it to disk."
  @spec put(t(), map()) :: :ok
  def put(nil, _record), do: :ok

  def put(table, record) do
    with :ok <- :dets.insert(table, {record.id, record}),
         :ok <- :dets.sync(table) do
      :ok
    else
      {:error, reason} ->
        # The queue goes on in memory; what it could not write is lost only if the pool restarts.
        Logger.error(
          "FineTuning.Pool could not write job #{inspect(record.id)} to its store: #{inspect(reason)}"
        )

        :ok
    end
  end

  @spec close(t()) :: :ok
  def close(nil), do: :ok
  def close(table), do: :dets.close(table)
end
