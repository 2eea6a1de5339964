defmodule FineTuning.FixtureWorkersTest do
  # Misbehaving workers (test/fixtures/): real OS processes that break the contract on purpose.
  use ExUnit.Case, async: true

  import ExUnit.CaptureLog
  import FineTuning.TestHelpers

  alias FineTuning.Worker

  @moduletag timeout: 60_000

  test "a missing executable fails start_link with a clear reason" do
    path = fixture("no_such_worker")

    assert {:error, {{:executable_not_found, ^path}, _}} =
             start_supervised({Worker, executable: path})
  end

  test "a worker that exits with status 3 fails start_link with {:worker_exit, 3}" do
    assert {:error, {{:worker_exit, 3}, _}} =
             start_supervised({Worker, executable: fixture("exit3_worker")})
  end

  test "a worker that never answers info fails start_link and is killed" do
    dir = tmp_dir!("silent")
    pidfile = Path.join(dir, "pid")

    opts = [
      executable: fixture("silent_worker"),
      env: %{"PIDFILE" => pidfile},
      startup_timeout: 1_000,
      shutdown_grace: 300
    ]

    log =
      capture_log(fn ->
        assert {:error, {{:startup_timeout, 1_000}, _}} = start_supervised({Worker, opts})
      end)

    os_pid = pidfile |> File.read!() |> String.trim() |> String.to_integer()
    # It ignores SIGTERM and EOF, so only the bridge's SIGKILL can have ended it.
    refute os_alive?(os_pid)
    assert log =~ "killed it"
  end

  test "malformed frames are logged and skipped; the worker stays usable" do
    log =
      capture_log(fn ->
        pid =
          start_supervised!(
            {Worker, executable: fixture("misbehaving_worker"), args: ["malformed"]}
          )

        assert %{version: "fixture"} = FineTuning.info(pid)

        assert {:error, {:python, :"finetune_worker.errors.CallError", _, _}} =
                 FineTuning.jobs(pid)

        # The reply cannot be decoded, but it names its call: the caller is told at once.
        assert {:error, {:undecodable_reply, {:undecodable, _}}} =
                 FineTuning.status(pid, "job-1", timeout: 60_000)

        assert Process.alive?(pid)
      end)

    assert log =~ "undecodable frame"
    assert log =~ "4 bytes"
    assert log =~ "no protocol message: {:unexpected, :frame}"
  end

  test "a worker exit fails pending calls and stops the GenServer with the status" do
    pid =
      start_supervised!(
        {Worker, executable: fixture("misbehaving_worker"), args: ["exit_on_call"]},
        restart: :temporary
      )

    ref = Process.monitor(pid)

    capture_log(fn ->
      assert FineTuning.status(pid, "job-1") == {:error, {:worker_exit, 3}}
      assert_receive {:DOWN, ^ref, :process, ^pid, {:worker_exit, 3}}, 5_000
    end)
  end

  test "events sent before the submit reply reach the subscriber, in order" do
    pid =
      start_supervised!(
        {Worker, executable: fixture("misbehaving_worker"), args: ["early_events"]}
      )

    assert {:ok, job_id} = FineTuning.submit(pid, %{"job" => "anything"})

    assert [queued: _, started: _, progress: %{step: 1}, completed: _] =
             collect_events(job_id, 5_000)

    # A finished job can still be awaited (its terminal event is remembered).
    assert {:fine_tuning, ^job_id, :completed, _} = FineTuning.await(pid, job_id, 1_000)
  end

  test "a late reply is a timeout; a late submit is cancelled and its events go nowhere" do
    pid = start_supervised!({Worker, executable: fixture("misbehaving_worker"), args: ["slow"]})
    assert FineTuning.status(pid, "job-1", timeout: 100) == {:error, :timeout}
    assert FineTuning.status(pid, "job-1", timeout: 5_000) == {:error, :not_found}

    # Call 4: the fixture names the job after the call id. The caller got no job id, so the
    # bridge must cancel the job when its reply comes, and deliver none of its events.
    log =
      capture_log(fn ->
        assert FineTuning.submit(pid, %{}, timeout: 100) == {:error, :timeout}
        refute_receive {:fine_tuning, _, _, _}, 1_500
      end)

    assert log =~ "cancelling the job"
    assert %{state: "cancelled"} = FineTuning.status(pid, "fixture-job-4", timeout: 5_000)
  end

  test "the subscriber can be another process" do
    pid =
      start_supervised!(
        {Worker, executable: fixture("misbehaving_worker"), args: ["early_events"]}
      )

    parent = self()

    listener =
      spawn_link(fn ->
        receive do
          {:job, job_id} -> send(parent, {:listened, collect_events(job_id, 5_000)})
        end
      end)

    assert {:ok, job_id} = FineTuning.submit(pid, %{}, subscriber: listener)
    send(listener, {:job, job_id})

    assert_receive {:listened, [{:queued, _}, {:started, _}, {:progress, _}, {:completed, _}]},
                   5_000

    refute_received {:fine_tuning, ^job_id, _, _}
  end

  test "stopping the GenServer ends the worker process" do
    pid =
      start_supervised!(
        {Worker, executable: fixture("misbehaving_worker"), args: ["early_events"]}
      )

    os_pid = FineTuning.os_pid(pid)
    assert os_alive?(os_pid)
    :ok = stop_supervised(Worker)
    assert wait_os_gone(os_pid, 2_000)
  end
end
