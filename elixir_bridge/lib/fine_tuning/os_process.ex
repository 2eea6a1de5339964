defmodule FineTuning.OSProcess do
  @moduledoc false
  # OS process checks for the worker's cleanup. A closed port no longer reports the exit
  # status, so after closing it we can only watch the pid from outside.

  @poll_ms 50

  @doc "Whether an OS process with this pid exists (zombies included, until reaped)."
  @spec alive?(pos_integer()) :: boolean()
  def alive?(os_pid) when is_integer(os_pid) do
    {_, status} = System.cmd("kill", ["-0", Integer.to_string(os_pid)], stderr_to_stdout: true)
    status == 0
  end

  @doc "Send `signal` (e.g. `\"KILL\"`) to the pid; `:ok` even when it is already gone."
  @spec signal(pos_integer(), String.t()) :: :ok
  def signal(os_pid, signal) when is_integer(os_pid) do
    System.cmd("kill", ["-" <> signal, Integer.to_string(os_pid)], stderr_to_stdout: true)
    :ok
  end

  @doc "Wait up to `timeout` ms for the pid to disappear; true if it did."
  @spec wait_gone(pos_integer(), non_neg_integer()) :: boolean()
  def wait_gone(os_pid, timeout) do
    deadline = System.monotonic_time(:millisecond) + timeout
    wait_until(os_pid, deadline)
  end

  defp wait_until(os_pid, deadline) do
    cond do
      not alive?(os_pid) ->
        true

      System.monotonic_time(:millisecond) >= deadline ->
        false

      true ->
        Process.sleep(@poll_ms)
        wait_until(os_pid, deadline)
    end
  end

  @doc """
  Make sure the pid is gone: wait up to `grace` ms (the caller has already closed its stdin),
  then SIGKILL it and wait for the kernel to let it go.
  """
  @spec ensure_gone(pos_integer() | nil, non_neg_integer()) :: :exited | :killed | :unknown
  def ensure_gone(nil, _grace), do: :unknown

  def ensure_gone(os_pid, grace) do
    if wait_gone(os_pid, grace) do
      :exited
    else
      signal(os_pid, "KILL")
      wait_gone(os_pid, 5_000)
      :killed
    end
  end
end
