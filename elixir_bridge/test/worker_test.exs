defmodule FineTuning.WorkerTest do
  # End to end against the real Python worker (.venv/bin/finetune-worker), with the test-only
  # `test_steps` job kind (FINETUNE_WORKER_TEST_JOBS=1): real steps, events and cancels, no model.
  use ExUnit.Case, async: true

  import FineTuning.TestHelpers

  alias FineTuning.Worker

  @moduletag timeout: 120_000

  setup do
    %{worker: start_supervised!({Worker, worker_opts()})}
  end

  defp steps(n, seconds, extra \\ %{}),
    do: Map.merge(%{"job" => "test_steps", "steps" => n, "step_seconds" => seconds}, extra)

  test "info describes the worker process", %{worker: w} do
    info = FineTuning.info(w)
    assert %{version: version, protocol: 2, torch: _, devices: [_ | _]} = info
    assert is_binary(version)
    assert info.pid == FineTuning.os_pid(w)
  end

  test "the worker's stderr can go to a file, and the pid is still the worker's" do
    log = Path.join(tmp_dir!("stderr"), "worker.log")
    opts = worker_opts(stderr: log, env: %{"FINETUNE_WORKER_LOG_LEVEL" => "INFO"})
    w = start_supervised!({Worker, opts}, id: :with_stderr)
    os_pid = FineTuning.os_pid(w)
    assert FineTuning.info(w).pid == os_pid
    :ok = stop_supervised(:with_stderr)
    assert File.read!(log) =~ "finetune-worker[#{os_pid}]"
  end

  test "an invalid config returns every problem, each naming its field", %{worker: w} do
    config = %{
      "job" => "train",
      "model_name" => "/no/such/model",
      "training_parameters" => %{"learning_rate" => -1, "epochs" => "many"},
      "bogus_key" => 1
    }

    assert {:error, issues} = FineTuning.validate(w, config)
    paths = Enum.map(issues, & &1.path)
    assert "training_parameters.learning_rate" in paths
    assert "training_parameters.epochs" in paths
    assert "bogus_key" in paths
    assert "output_dir" in paths
    assert Enum.all?(issues, &is_binary(&1.message))

    assert {:error, [%{path: "steps"} | _]} = FineTuning.submit(w, steps(-1, 0))
    assert FineTuning.jobs(w) == []
  end

  test "configs as maps with atoms, JSON binaries and files are all accepted", %{worker: w} do
    assert FineTuning.validate(w, %{job: :test_steps, steps: 1}) == :ok
    assert FineTuning.validate(w, ~s({"job": "test_steps", "steps": 1})) == :ok

    path = Path.join(tmp_dir!("config"), "job.json")
    File.write!(path, ~s({"job": "test_steps", "steps": 1}))
    assert FineTuning.validate(w, {:file, path}) == :ok

    assert {:error, [%{path: "", message: message}]} = FineTuning.validate(w, ~s({"job": ))
    assert message =~ "invalid JSON"
  end

  test "a job's events arrive in order, ending with completed", %{worker: w} do
    assert {:ok, job_id} = FineTuning.submit(w, steps(5, 0.02))
    events = collect_events(job_id, 30_000)
    types = Enum.map(events, &elem(&1, 0))

    assert [:queued, :started | _] = types
    assert List.last(types) == :completed
    assert :phase in types

    progress = for {:progress, p} <- events, do: p.step
    assert progress == [1, 2, 3, 4, 5]

    assert [%{total_steps: 5, percent: 100.0} | _] =
             Enum.reverse(for {:progress, p} <- events, do: p)

    assert Enum.count(events, &match?({:metrics, %{metrics: %{"loss" => _}}}, &1)) == 5

    # Every progress event comes before the terminal one, and metrics follow their step.
    assert Enum.find_index(types, &(&1 == :started)) < Enum.find_index(types, &(&1 == :progress))
    assert %{state: "completed", step: 5, kind: "test_steps"} = FineTuning.status(w, job_id)
  end

  test "cancel stops a running job with a cancelled event", %{worker: w} do
    assert {:ok, job_id} = FineTuning.submit(w, steps(500, 0.05))
    assert_receive {:fine_tuning, ^job_id, :progress, %{step: 1}}, 30_000
    assert FineTuning.cancel(w, job_id) == :ok

    assert {:fine_tuning, ^job_id, :cancelled, %{step: step}} =
             FineTuning.await(w, job_id, 30_000)

    assert step < 500
    assert %{state: "cancelled"} = FineTuning.status(w, job_id)
    assert FineTuning.cancel(w, "no-such-job") == {:error, :not_found}
    assert FineTuning.status(w, "no-such-job") == {:error, :not_found}
  end

  test "jobs wait in a queue and say so", %{worker: w} do
    assert {:ok, first} = FineTuning.submit(w, steps(3, 0.05))
    assert {:ok, second} = FineTuning.submit(w, steps(1, 0))
    assert_receive {:fine_tuning, ^second, :queued, %{position: position}}, 5_000
    assert position >= 1

    assert [%{job_id: ^first}, %{job_id: ^second}] = FineTuning.jobs(w)
    assert {:fine_tuning, ^first, :completed, _} = FineTuning.await(w, first, 30_000)
    assert {:fine_tuning, ^second, :completed, _} = FineTuning.await(w, second, 30_000)
  end

  test "stream yields the job's events and ends after the terminal one", %{worker: w} do
    assert {:ok, job_id} = FineTuning.submit(w, steps(3, 0.02))
    events = w |> FineTuning.stream(job_id) |> Enum.to_list()
    assert {:fine_tuning, ^job_id, :completed, _} = List.last(events)
    assert Enum.count(events, &match?({_, _, :progress, _}, &1)) == 3
    # The stream consumed the events from the caller's mailbox.
    refute_received {:fine_tuning, ^job_id, _, _}

    # Over a finished job, a stream yields just the terminal event.
    assert [{:fine_tuning, ^job_id, :completed, _}] = Enum.to_list(FineTuning.stream(w, job_id))
  end

  test "other processes can follow a job: a named subscriber and a stream", %{worker: w} do
    parent = self()

    streamer = fn job_id ->
      spawn_link(fn -> send(parent, {:streamed, Enum.to_list(FineTuning.stream(w, job_id))}) end)
    end

    listener =
      spawn_link(fn ->
        receive do
          {:go, job_id} -> send(parent, {:listened, collect_events(job_id, 30_000)})
        end
      end)

    assert {:ok, job_id} = FineTuning.submit(w, steps(20, 0.05), subscriber: listener)
    send(listener, {:go, job_id})
    streamer.(job_id)

    assert_receive {:listened, listened}, 30_000
    assert_receive {:streamed, streamed}, 30_000
    assert {:completed, _} = List.last(listened)
    assert {:fine_tuning, _, :completed, _} = List.last(streamed)
    # The streamer joined late, so it saw a suffix of what the subscriber saw.
    assert length(streamed) <= length(listened)
    refute_received {:fine_tuning, ^job_id, _, _}
  end

  test "await times out without losing the job", %{worker: w} do
    assert {:ok, job_id} = FineTuning.submit(w, steps(5, 0.1))
    assert FineTuning.await(w, job_id, 10) == {:error, :timeout}
    assert {:fine_tuning, ^job_id, :completed, _} = FineTuning.await(w, job_id, 30_000)
    assert FineTuning.await(w, "no-such-job", 10) == {:error, :not_found}
  end

  test "a job failure arrives as a failed event with its error code", %{worker: w} do
    assert {:ok, job_id} = FineTuning.submit(w, steps(5, 0, %{"fail_at_step" => 2}))

    assert {:fine_tuning, ^job_id, :failed, %{error: :internal_error, message: message}} =
             FineTuning.await(w, job_id, 30_000)

    assert message =~ "step 2"
  end

  test "shutdown ends the worker and the GenServer normally", %{worker: w} do
    ref = Process.monitor(w)
    os_pid = FineTuning.os_pid(w)
    assert FineTuning.shutdown(w) == :ok
    assert_receive {:DOWN, ^ref, :process, ^w, :normal}, 15_000
    assert wait_os_gone(os_pid, 5_000)
  end
end
