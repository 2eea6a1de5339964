defmodule FineTuning.LibraryTest do
  # The bridge as an OTP library must behave: no secret in any report, child specs that take
  # the usual keys, a clean stop that delivers the real `:cancelled` event, no job left running
  # that its caller cannot see, `:telemetry` events and job_id log metadata.
  #
  # `:telemetry` is a hex package and hex.pm is unreachable here, so `setup_all` compiles a
  # stand-in with telemetry's own API (attach/4, detach/1, execute/3) before any worker starts:
  # what is under test is that the bridge calls it, with the events and fields it documents.
  use ExUnit.Case, async: false

  @compile {:no_warn_undefined, :telemetry}

  import ExUnit.CaptureLog
  import FineTuning.TestHelpers

  alias FineTuning.Worker

  @moduletag timeout: 300_000

  @secret "hf_Sup3rS3cretT0ken"
  @password "pw-n0t-in-logs"

  defmodule LogProbe do
    @moduledoc false
    # An OTP logger handler that forwards every event, unformatted, to a test process: SASL
    # supervisor reports included, which Elixir's console does not print by default.
    def log(event, %{config: %{to: pid}}), do: send(pid, {:log_event, event})
  end

  setup_all do
    ensure_telemetry!()

    dir = tmp_dir!("ft-library")
    model = Path.join(dir, "model")
    run_worker_cli!(["make-tiny-model", model])
    %{dir: dir, model: model}
  end

  defp tiny_train(model, out, extra) do
    Map.merge(
      %{
        "job" => "train",
        "model_name" => model,
        "output_dir" => out,
        "dataset" => %{"path" => Path.join(repo(), "configs/data/conversations.jsonl")},
        "data" => %{"max_seq_length" => 64},
        "peft" => %{"method" => "lora", "r" => 4, "alpha" => 8},
        "training_parameters" => %{"batch_size" => 4, "learning_rate" => 1.0e-3},
        "overwrite" => true
      },
      extra
    )
  end

  defp steps(n, seconds, extra \\ %{}),
    do: Map.merge(%{"job" => "test_steps", "steps" => n, "step_seconds" => seconds}, extra)

  defp with_probe(fun) do
    id = :"probe_#{System.unique_integer([:positive])}"
    :ok = :logger.add_handler(id, LogProbe, %{config: %{to: self()}, level: :all})

    try do
      fun.()
    after
      :logger.remove_handler(id)
    end
  end

  defp log_events(acc \\ []) do
    receive do
      {:log_event, event} -> log_events([event | acc])
    after
      500 -> Enum.reverse(acc)
    end
  end

  defp secret_env do
    %{"HF_TOKEN" => @secret, "MLFLOW_TRACKING_URI" => "https://alice:#{@password}@mlflow.local"}
  end

  test "secrets in :env reach the worker but no report, state or child spec" do
    opts = worker_opts(env: secret_env())
    spec = Worker.child_spec([name: :secret_worker] ++ opts)
    refute inspect(spec, limit: :infinity) =~ @secret

    {:ok, sup} = Supervisor.start_link([spec], strategy: :one_for_one, max_restarts: 0)
    Process.unlink(sup)
    w = Process.whereis(:secret_worker)
    os_pid = FineTuning.os_pid(w)

    # The OS process got the real values.
    environ = File.read!("/proc/#{os_pid}/environ")
    assert environ =~ "HF_TOKEN=#{@secret}"
    assert environ =~ @password

    for shown <- [:sys.get_state(w), :sys.get_status(w)] do
      text = inspect(shown, limit: :infinity, printable_limit: :infinity)
      refute text =~ @secret
      refute text =~ @password
      assert text =~ "HF_TOKEN"
    end

    # Crash the worker: its GenServer stops with {:worker_exit, 137}, the supervisor reports it.
    ref = Process.monitor(sup)

    events =
      with_probe(fn ->
        capture_log(fn ->
          os_signal!(os_pid, "KILL")
          assert_receive {:DOWN, ^ref, :process, ^sup, _}, 20_000
        end)

        log_events()
      end)

    text = inspect(events, limit: :infinity, printable_limit: :infinity)

    assert text =~ "worker_exit",
           "expected the crash to be reported: #{String.slice(text, 0, 500)}"

    assert text =~ "start_link", "expected the supervisor's child report"
    refute text =~ @secret
    refute text =~ @password
  end

  test "child spec keys :id, :restart and :shutdown; a transient worker stays down after shutdown" do
    spec =
      Worker.child_spec(
        [id: :gpu0, name: :transient_worker, restart: :transient, shutdown: 21_000] ++
          worker_opts()
      )

    assert %{id: :gpu0, restart: :transient, shutdown: 21_000} = spec
    assert {Worker, :start_link, [start_opts]} = spec.start
    refute Keyword.has_key?(start_opts, :restart)

    {:ok, sup} =
      Supervisor.start_link(
        [{Worker, [name: :transient_worker, restart: :transient] ++ worker_opts()}],
        strategy: :one_for_one
      )

    assert [{:transient_worker, pid, :worker, [Worker]}] = Supervisor.which_children(sup)
    assert FineTuning.shutdown(:transient_worker) == :ok
    ref = Process.monitor(pid)
    assert_receive {:DOWN, ^ref, :process, ^pid, :normal}, 15_000
    Process.sleep(200)
    assert [{:transient_worker, :undefined, :worker, [Worker]}] = Supervisor.which_children(sup)
    Supervisor.stop(sup)
  end

  test "stopping the supervisor mid-job delivers :cancelled with the checkpoint", %{
    dir: dir,
    model: model
  } do
    {:ok, sup} =
      Supervisor.start_link([{Worker, worker_opts(shutdown_grace: 20_000)}],
        strategy: :one_for_one
      )

    Process.unlink(sup)
    [{Worker, w, _, _}] = Supervisor.which_children(sup)
    out = Path.join(dir, "stopped")

    config =
      tiny_train(model, out, %{"max_steps" => 500, "checkpoint" => %{"every_steps" => 1000}})

    {:ok, job_id} = FineTuning.submit(w, config)
    {:ok, queued} = FineTuning.submit(w, steps(3, 0))
    assert_receive {:fine_tuning, ^job_id, :progress, %{step: step}} when step >= 1, 120_000

    Supervisor.stop(sup, :shutdown)

    events = collect_events(job_id, 30_000)
    assert {:cancelled, %{checkpoint: checkpoint, step: stopped_at}} = List.last(events)
    assert is_binary(checkpoint) and File.dir?(checkpoint), inspect(List.last(events))
    assert stopped_at >= 1
    assert [{:cancelled, %{step: 0}}] = collect_events(queued, 5_000) |> Enum.take(-1)
  end

  test "a submit answered after the caller's timeout is cancelled, with job_id log metadata" do
    w = start_supervised!({Worker, worker_opts()})

    events =
      with_probe(fn ->
        capture_log(fn ->
          assert {:error, :timeout} = FineTuning.submit(w, steps(2_000, 0.05), timeout: 0)
          Process.sleep(1_500)
        end)

        log_events()
      end)

    assert [%{job_id: job_id, state: state}] = FineTuning.jobs(w)
    assert state in ["cancelled", "running"]

    wait = fn wait ->
      if FineTuning.status(w, job_id).state == "cancelled",
        do: :ok,
        else:
          (
            Process.sleep(100)
            wait.(wait)
          )
    end

    assert wait.(wait) == :ok

    assert Enum.any?(events, fn %{meta: meta} -> meta[:job_id] == job_id end),
           "the warning about the cancelled job should carry job_id metadata"

    # The caller never sees the job's events.
    refute_received {:fine_tuning, ^job_id, _, _}
  end

  test ":telemetry events for start, progress, checkpoint, stop and exception", %{
    dir: dir,
    model: model
  } do
    me = self()
    id = "telemetry-test-#{System.unique_integer([:positive])}"

    events =
      for e <- [:start, :progress, :checkpoint, :stop, :exception], do: [:fine_tuning, :job, e]

    for event <- events do
      :telemetry.attach(
        {id, event},
        event,
        fn name, m, meta, _ -> send(me, {:telemetry, name, m, meta}) end,
        nil
      )
    end

    on_exit(fn -> for event <- events, do: :telemetry.detach({id, event}) end)

    w = start_supervised!({Worker, worker_opts()})
    {:ok, ok_job} = FineTuning.submit(w, steps(3, 0))
    {:ok, bad_job} = FineTuning.submit(w, steps(3, 0, %{"fail_at_step" => 2}))
    _ = collect_events(ok_job, 30_000)
    _ = collect_events(bad_job, 30_000)

    assert_received {:telemetry, [:fine_tuning, :job, :start], %{system_time: _},
                     %{job_id: ^ok_job, kind: "test_steps", worker: ^w}}

    assert_received {:telemetry, [:fine_tuning, :job, :progress], %{step: 3, total_steps: 3},
                     %{job_id: ^ok_job}}

    assert_received {:telemetry, [:fine_tuning, :job, :stop], %{duration: d},
                     %{job_id: ^ok_job, result: :completed}}

    assert is_integer(d) and d > 0

    assert_received {:telemetry, [:fine_tuning, :job, :exception], %{duration: _},
                     %{job_id: ^bad_job, kind: :error, reason: :internal_error}}

    out = Path.join(dir, "telemetry-run")

    config =
      tiny_train(model, out, %{
        "max_steps" => 2,
        "checkpoint" => %{"every_steps" => 1, "keep" => 1}
      })

    {:ok, train_job} = FineTuning.submit(w, config)
    assert {:completed, _} = collect_events(train_job, 120_000) |> List.last()

    assert_received {:telemetry, [:fine_tuning, :job, :checkpoint], %{step: 1},
                     %{job_id: ^train_job, path: path}}

    assert is_binary(path)
  end
end
