defmodule FineTuning.FaultsTest do
  # What happens to callers, subscribers and the OS process when the real worker dies or the
  # GenServer stops.
  use ExUnit.Case, async: true

  import ExUnit.CaptureLog
  import FineTuning.TestHelpers

  alias FineTuning.Worker

  @moduletag timeout: 120_000

  defp steps(n, seconds, extra \\ %{}),
    do: Map.merge(%{"job" => "test_steps", "steps" => n, "step_seconds" => seconds}, extra)

  test "kill -9 of the worker: errors for callers and subscribers, then a working restart" do
    name = :"ft_kill_#{System.unique_integer([:positive])}"
    w = start_supervised!({Worker, worker_opts(name: name)})
    os_pid = FineTuning.os_pid(w)

    assert {:ok, job_id} = FineTuning.submit(w, steps(1000, 0.05))
    assert_receive {:fine_tuning, ^job_id, :progress, _}, 30_000

    # A stopped process cannot answer, so this call is surely pending when the kill lands.
    os_signal!(os_pid, "STOP")
    caller = Task.async(fn -> FineTuning.status(w, job_id) end)
    ref = Process.monitor(w)

    capture_log(fn ->
      Process.sleep(200)
      os_signal!(os_pid, "9")

      assert Task.await(caller, 10_000) == {:error, {:worker_exit, 137}}

      assert_receive {:fine_tuning, ^job_id, :failed,
                      %{error: :worker_exit, status: 137, message: message}},
                     10_000

      assert message =~ "status 137"
      assert_receive {:DOWN, ^ref, :process, ^w, {:worker_exit, 137}}, 10_000
    end)

    # The test supervisor restarts it under the same name, with a new OS process.
    restarted = wait_for_restart(name, w, 30_000)
    assert %{version: _} = FineTuning.info(restarted)
    assert FineTuning.os_pid(restarted) != os_pid
    refute os_alive?(os_pid)
  end

  defp wait_for_restart(name, old, timeout) do
    case Process.whereis(name) do
      pid when is_pid(pid) and pid != old ->
        pid

      _ when timeout > 0 ->
        Process.sleep(50)
        wait_for_restart(name, old, timeout - 50)

      _ ->
        flunk("#{name} was not restarted")
    end
  end

  test "stopping the GenServer during a job cancels it, tells the subscriber, leaves no process" do
    w = start_supervised!({Worker, worker_opts(shutdown_grace: 4_000)})
    os_pid = FineTuning.os_pid(w)

    assert {:ok, job_id} = FineTuning.submit(w, steps(1000, 0.05))
    assert_receive {:fine_tuning, ^job_id, :progress, _}, 30_000

    assert :ok = stop_supervised(Worker)
    refute os_alive?(os_pid)

    # The subscriber gets the job's real end, not a guess.
    assert_receive {:fine_tuning, ^job_id, :cancelled, %{step: step}}, 1_000
    assert step >= 1
  end

  test "a job that ignores cancel cannot keep the worker alive past the grace period" do
    w = start_supervised!({Worker, worker_opts(shutdown_grace: 3_000)})
    os_pid = FineTuning.os_pid(w)

    assert {:ok, job_id} = FineTuning.submit(w, steps(1000, 0.05, %{"ignore_cancel" => true}))
    assert_receive {:fine_tuning, ^job_id, :progress, _}, 30_000

    # Whoever ends it (the worker's own shutdown deadline or our SIGKILL), it is gone by the
    # time stop returns.
    assert :ok = stop_supervised(Worker)
    refute os_alive?(os_pid)
  end

  test "a worker that ignores SIGTERM and stdin EOF is killed after the grace period" do
    # start_link succeeds (it answers info); then it stops reading entirely.
    w = start_supervised!({Worker, worker_opts(shutdown_grace: 500)})
    os_pid = FineTuning.os_pid(w)
    os_signal!(os_pid, "STOP")

    log = capture_log(fn -> assert :ok = stop_supervised(Worker) end)
    refute os_alive?(os_pid)
    assert log =~ "killed it"
  end
end
