defmodule FineTuning.Pool.Store do
  @moduledoc false
  # The pool's durable queue: one DETS file (OTP's own disk tables, no dependency) holding each
  # job's record (its config, priority, needs, state, last checkpoint, terminal event). Written
  # through on every change and synced, so a pool restarted after a crash (or started on another
  # node that sees the same folder) finds every job it had accepted.

  @file_name "fine_tuning_pool.dets"

  @type t :: :dets.tab_name() | nil

  @doc "Open (or create) the store in `dir`; nil keeps the queue in memory only."
  @spec open(Path.t() | nil, term()) :: {:ok, t()} | {:error, term()}
  def open(nil, _name), do: {:ok, nil}

  def open(dir, name) do
    File.mkdir_p!(dir)
    path = dir |> Path.join(@file_name) |> String.to_charlist()

    case :dets.open_file({__MODULE__, name, make_ref()}, file: path, type: :set, repair: true) do
      {:ok, table} -> {:ok, table}
      {:error, reason} -> {:error, {:pool_store, path, reason}}
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
    :ok = :dets.insert(table, {record.id, record})
    :dets.sync(table)
  end

  @spec close(t()) :: :ok
  def close(nil), do: :ok
  def close(table), do: :dets.close(table)
end
