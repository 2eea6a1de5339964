defmodule FineTuning.OSProcess do
  @moduledoc false
  # The worker's OS process: spawn it as a port, and make sure it is gone when we are done.
  # A closed port no longer reports an exit status, so after closing it we watch the pid
  # from outside (`kill -0`) and SIGKILL it when the grace period runs out.

  require Logger

  @poll_ms 50

  @doc "Spawn `executable port ARGS...` as a `{:packet, 4}` port, or say why it cannot start."
  @spec open(FineTuning.Options.t()) :: {:ok, port()} | {:error, term()}
  def open(opts) do
    path = opts.executable

    cond do
      not File.regular?(path) ->
        {:error, {:executable_not_found, path}}

      not executable?(path) ->
        {:error, {:executable_not_executable, path}}

      true ->
        {program, args, env} = command_line(opts)

        port_opts =
          [{:packet, 4}, :binary, :exit_status, :use_stdio, :hide]
          |> Kernel.++([{:args, args}, {:env, env}])
          |> Kernel.++(if opts.cd, do: [{:cd, opts.cd}], else: [])

        try do
          {:ok, Port.open({:spawn_executable, program}, port_opts)}
        rescue
          error in ErlangError -> {:error, {:spawn_failed, path, error.original}}
        end
    end
  end

  # A port cannot redirect stderr alone, so with :stderr a shell opens the file and then
  # execs the worker: same pid, nothing of the shell left behind.
  defp command_line(%{stderr: nil} = opts),
    do: {opts.executable, ["port" | opts.args], worker_env(opts)}

  defp command_line(opts) do
    script = ~S(exec "$0" "$@" 2>>"$FINETUNE_WORKER_STDERR")
    env = [{~c"FINETUNE_WORKER_STDERR", String.to_charlist(opts.stderr)} | worker_env(opts)]
    {"/bin/sh", ["-c", script, opts.executable, "port" | opts.args], env}
  end

  # The worker's own grace (how long a cancelled job may save after stdin closes) must end
  # before ours, or we kill it mid-save; 2 s covers its exit slack. An explicit
  # FINETUNE_WORKER_GRACE in :env wins.
  defp worker_env(opts) do
    if List.keymember?(opts.env, ~c"FINETUNE_WORKER_GRACE", 0) do
      opts.env
    else
      seconds = max(opts.shutdown_grace - 2_000, 0) / 1000
      [{~c"FINETUNE_WORKER_GRACE", ~c"#{seconds}"} | opts.env]
    end
  end

  defp executable?(path) do
    case File.stat(path) do
      {:ok, %File.Stat{mode: mode}} -> Bitwise.band(mode, 0o111) != 0
      _ -> false
    end
  end

  @doc "The OS pid behind a port (nil once the port is closed)."
  @spec os_pid(port()) :: pos_integer() | nil
  def os_pid(port) do
    case Port.info(port, :os_pid) do
      {:os_pid, pid} -> pid
      nil -> nil
    end
  end

  @doc """
  Close the port (the worker sees EOF on stdin and exits after saving its job), wait up to
  `grace` ms for the process to go, then SIGKILL it.
  """
  @spec close(port(), pos_integer() | nil, non_neg_integer()) :: :exited | :killed | :unknown
  def close(port, os_pid, grace) do
    try do
      Port.close(port)
    rescue
      ArgumentError -> :already_closed
    end

    result = ensure_gone(os_pid, grace)

    if result == :killed do
      Logger.warning(
        "finetune-worker (os pid #{os_pid}) was still running #{grace} ms after its stdin " <>
          "closed; killed it"
      )
    end

    result
  end

  @doc "Whether an OS process with this pid exists (zombies included, until reaped)."
  @spec alive?(pos_integer()) :: boolean()
  def alive?(os_pid) when is_integer(os_pid), do: kill("0", os_pid) == 0

  @doc "Send `signal` (e.g. `\"KILL\"`) to the pid; `:ok` even when it is already gone."
  @spec signal(pos_integer(), String.t()) :: :ok
  def signal(os_pid, signal) when is_integer(os_pid) do
    kill(signal, os_pid)
    :ok
  end

  # The shell's builtin kill: minimal images may lack /bin/kill (procps), never /bin/sh.
  @doc false
  @spec kill(String.t(), pos_integer()) :: non_neg_integer()
  def kill(signal, os_pid) do
    args = ["-c", ~S(kill -"$1" "$2"), "kill", signal, Integer.to_string(os_pid)]
    {_, status} = System.cmd("/bin/sh", args, stderr_to_stdout: true)
    status
  end

  @doc "Wait up to `timeout` ms for the pid to disappear; true if it did."
  @spec wait_gone(pos_integer(), non_neg_integer()) :: boolean()
  def wait_gone(os_pid, timeout) do
    wait_until(os_pid, System.monotonic_time(:millisecond) + timeout)
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

  @doc "Wait up to `grace` ms for the pid to go, then SIGKILL it and wait for the kernel."
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
