defmodule FineTuning.TestHelpers do
  @moduledoc false
  # Paths and OS checks shared by the bridge's tests.

  @repo Path.expand("../../..", __DIR__)

  def repo, do: @repo
  def fixture(name), do: Path.join([@repo, "elixir_bridge", "test", "fixtures", name])
  def python, do: Path.join(@repo, ".venv/bin/python")
  def worker_executable, do: Path.join(@repo, ".venv/bin/finetune-worker")

  @doc "Options for a real worker: test job kinds on, no model hub, small grace, log to a file."
  def worker_opts(extra \\ []) do
    env = %{
      "FINETUNE_WORKER_TEST_JOBS" => "1",
      "HF_HUB_OFFLINE" => "1",
      "HF_DATASETS_OFFLINE" => "1",
      "TOKENIZERS_PARALLELISM" => "false",
      "OMP_NUM_THREADS" => "2",
      "FINETUNE_WORKER_LOG_LEVEL" => "WARNING",
      # A record key missing from the worker's atom vocabulary fails loudly (events.py).
      "FINETUNE_WORKER_STRICT_WIRE" => "1",
      # Spinning OpenMP threads slow CPU torch many times over when other tests share the cores.
      "OMP_WAIT_POLICY" => "PASSIVE"
    }

    {more_env, extra} = Keyword.pop(extra, :env, %{})

    Keyword.merge(
      [
        executable: worker_executable(),
        env: Map.merge(env, more_env),
        stderr: worker_log(),
        shutdown_grace: 5_000
      ],
      extra
    )
  end

  @doc "Where the real workers started by the tests write their stderr (appended)."
  def worker_log, do: Path.join(System.tmp_dir!(), "finetune-worker-elixir-tests.log")

  def os_alive?(os_pid), do: FineTuning.OSProcess.kill("0", os_pid) == 0

  @doc "Send a signal (\"STOP\", \"9\") to an OS process; fail if it cannot be sent."
  def os_signal!(os_pid, signal), do: 0 = FineTuning.OSProcess.kill(signal, os_pid)

  @doc "Poll until the OS pid is gone (true) or `timeout` ms pass (false)."
  def wait_os_gone(os_pid, timeout) do
    deadline = System.monotonic_time(:millisecond) + timeout

    Stream.repeatedly(fn ->
      gone = not os_alive?(os_pid)
      unless gone, do: Process.sleep(50)
      gone
    end)
    |> Enum.find(fn gone -> gone or System.monotonic_time(:millisecond) > deadline end)
  end

  @doc "Run `finetune-worker ARGS...` and fail the test on a non-zero exit."
  def run_worker_cli!(args) do
    {out, status} = System.cmd(worker_executable(), args, stderr_to_stdout: true, cd: @repo)

    if status != 0 do
      raise "finetune-worker #{Enum.join(args, " ")} exited #{status}:\n#{out}"
    end

    out
  end

  def tmp_dir!(prefix) do
    dir = Path.join(System.tmp_dir!(), "#{prefix}-#{System.unique_integer([:positive])}")
    File.rm_rf!(dir)
    File.mkdir_p!(dir)
    # Call from a test or setup_all: the directory goes when they end.
    ExUnit.Callbacks.on_exit(fn -> File.rm_rf(dir) end)
    dir
  end

  @doc """
  Make `:telemetry` loadable: it is a hex package and hex.pm is unreachable here, so a stand-in
  with telemetry's own API (attach/4, detach/1, execute/3) is compiled when it is missing; what
  the tests check is that the bridge calls it, with the events and fields it documents. Call it
  before the workers or pools under test start (they look for :telemetry once, at start).
  """
  def ensure_telemetry! do
    unless Code.ensure_loaded?(:telemetry) do
      Code.compile_string("""
      defmodule :telemetry do
        def attach(id, event, fun, config), do: put({id, event, fun, config})
        def detach(id), do: :persistent_term.put(__MODULE__, Enum.reject(handlers(), &(elem(&1, 0) == id)))
        def execute(event, measurements, metadata) do
          for {_id, ^event, fun, config} <- handlers(), do: fun.(event, measurements, metadata, config)
          :ok
        end
        defp handlers, do: :persistent_term.get(__MODULE__, [])
        defp put(h), do: :persistent_term.put(__MODULE__, [h | handlers()])
      end
      """)
    end

    :ok
  end

  @doc "Receive the events of `job_id` until its terminal event; returns them in order."
  def collect_events(job_id, timeout) do
    receive do
      {:fine_tuning, ^job_id, type, payload} ->
        if FineTuning.Protocol.terminal?(type),
          do: [{type, payload}],
          else: [{type, payload} | collect_events(job_id, timeout)]
    after
      timeout -> raise "no event of job #{job_id} within #{timeout} ms"
    end
  end
end
