defmodule FineTuning.PoolTest do
  # FineTuning.Pool with real workers training the tiny model: placement, the durable queue,
  # idempotent resubmission, failover (kill -9 of a worker's OS process, and a whole Erlang
  # node stopped) with the uninterrupted run's adapter at the end, preemption, drain.
  use ExUnit.Case, async: false

  import FineTuning.TestHelpers

  alias FineTuning.Pool

  @moduletag timeout: 600_000

  @compile {:no_warn_undefined, :telemetry}

  setup_all do
    ensure_telemetry!()
    dir = tmp_dir!("ft-pool")
    model = Path.join(dir, "model")
    run_worker_cli!(["make-tiny-model", model])
    %{model: model}
  end

  setup do
    %{dir: tmp_dir!("ft-pool-test")}
  end

  defp train_config(model, out, steps \\ 24) do
    %{
      "job" => "train",
      "model_name" => model,
      "output_dir" => out,
      "dataset" => %{
        "path" => Path.join(repo(), "configs/data/conversations.jsonl"),
        "validation_split" => 0
      },
      "data" => %{"max_seq_length" => 96},
      "peft" => %{"method" => "lora", "r" => 4, "alpha" => 8, "dropout" => 0.0},
      "training_parameters" => %{
        "epochs" => 3,
        "batch_size" => 4,
        "learning_rate" => 5.0e-3,
        "logging_steps" => 1
      },
      "max_steps" => steps,
      "checkpoint" => %{"every_steps" => 2, "keep" => 2},
      "seed" => 11
    }
  end

  defp start_pool(name, dir, workers, extra \\ []) do
    opts = [name: name, data_dir: Path.join(dir, "queue"), workers: workers] ++ extra
    start_supervised!({Pool, opts}, id: name)
    wait_until(fn -> length(Pool.status(name).workers) == length(workers) end, 60_000)
    name
  end

  defp worker, do: worker_opts(call_timeout: 60_000)

  defp wait_until(fun, timeout) do
    deadline = System.monotonic_time(:millisecond) + timeout

    Stream.repeatedly(fn ->
      ok = fun.()
      unless ok, do: Process.sleep(50)
      ok
    end)
    |> Enum.find(fn ok -> ok or System.monotonic_time(:millisecond) > deadline end) ||
      flunk("condition not met within #{timeout} ms")
  end

  defp adapter(out), do: File.read!(Path.join(out, "adapter_model.safetensors"))

  defp wait_event(id, type, timeout \\ 120_000) do
    receive do
      {:fine_tuning, ^id, ^type, payload} -> payload
    after
      timeout -> flunk("no #{type} event of #{id} within #{timeout} ms")
    end
  end

  test "jobs run side by side on free workers, with the single worker's events", %{
    model: model,
    dir: dir
  } do
    pool = start_pool(:pool_place, dir, [worker(), worker()])
    {:ok, a} = Pool.submit(pool, train_config(model, Path.join(dir, "a"), 6))
    {:ok, b} = Pool.submit(pool, train_config(model, Path.join(dir, "b"), 6))
    wait_event(a, :started)
    wait_event(b, :started)
    running = Pool.status(pool).running
    assert Enum.sort(Enum.map(running, & &1.job_id)) == Enum.sort([a, b])
    assert length(Enum.uniq(Enum.map(running, & &1.worker))) == 2

    for id <- [a, b] do
      events = collect_events(id, 120_000)
      types = Enum.map(events, &elem(&1, 0))
      assert List.last(types) == :completed
      assert :checkpoint in types and :metrics in types
      assert Enum.count(types, &(&1 in [:completed, :failed, :cancelled])) == 1
    end

    assert %{state: "completed"} = FineTuning.status(pool, a)
    assert {:fine_tuning, ^a, :completed, _} = FineTuning.await(pool, a, 1_000)
    assert Pool.status(pool).running == []
  end

  test "a worker killed mid-job: the job resumes on another worker and ends with the uninterrupted run's adapter",
       %{model: model, dir: dir} do
    pool = start_pool(:pool_failover, dir, [worker(), worker()])
    whole = Path.join(dir, "whole")
    {:ok, ref} = Pool.submit(pool, train_config(model, whole))
    assert {:fine_tuning, ^ref, :completed, _} = FineTuning.await(pool, ref, 180_000)

    out = Path.join(dir, "killed")
    {:ok, id} = Pool.submit(pool, train_config(model, out))
    wait_event(id, :checkpoint)
    [%{worker: victim}] = Pool.status(pool).running
    os_signal!(FineTuning.os_pid(victim), "9")

    requeued = wait_event(id, :requeued)
    assert {:worker_exit, _} = requeued.reason

    assert {:fine_tuning, ^id, :completed, %{summary: summary}} =
             FineTuning.await(pool, id, 180_000)

    assert summary.resumed_from =~ "checkpoint-"
    assert adapter(out) == adapter(whole)
  end

  test "the queue survives the pool: a restarted pool runs it, and a key attaches instead of running twice",
       %{model: model, dir: dir} do
    {:ok, sup} = Pool.start_link(name: :pool_durable, data_dir: Path.join(dir, "queue"))
    out = Path.join(dir, "durable")

    {:ok, "support-v1"} =
      Pool.submit(:pool_durable, train_config(model, out, 4), key: "support-v1")

    assert Pool.status(:pool_durable).queue == ["support-v1"]
    Supervisor.stop(sup)

    pool = start_pool(:pool_durable2, dir, [worker()])
    assert {:ok, "support-v1"} = Pool.submit(pool, train_config(model, out, 4), key: "support-v1")

    assert {:fine_tuning, "support-v1", :completed, _} =
             FineTuning.await(pool, "support-v1", 120_000)

    assert File.exists?(Path.join(out, "adapter_model.safetensors"))

    # Once more: the terminal event at once, no second run.
    mtime = File.stat!(Path.join(out, "summary.json")).mtime
    assert {:ok, "support-v1"} = Pool.submit(pool, train_config(model, out, 4), key: "support-v1")
    assert_receive {:fine_tuning, "support-v1", :completed, _}, 1_000
    assert Pool.status(pool).queue == [] and Pool.status(pool).running == []
    assert File.stat!(Path.join(out, "summary.json")).mtime == mtime
  end

  test "a scheduler killed mid-job comes back from its store and adopts the job its worker still runs",
       %{model: model, dir: dir} do
    pool = start_pool(:pool_adopt, dir, [worker()])
    out = Path.join(dir, "adopted")
    {:ok, "adopt-me"} = Pool.submit(pool, train_config(model, out), key: "adopt-me")
    wait_event("adopt-me", :checkpoint)
    [%{worker: running_on}] = Pool.status(pool).running
    Process.exit(Process.whereis(pool), :kill)

    # The caller attaches again by its key once the pool is back.
    wait_until(
      fn -> match?({:ok, _}, safe_submit(pool, train_config(model, out), key: "adopt-me")) end,
      30_000
    )

    # Its worker joins the new scheduler, which takes the job back from it.
    wait_until(fn -> Pool.status(pool).running != [] end, 10_000)
    assert [%{job_id: "adopt-me", worker: ^running_on, restarts: 0}] = Pool.status(pool).running

    assert {:fine_tuning, "adopt-me", :completed, %{summary: summary}} =
             FineTuning.await(pool, "adopt-me", 180_000)

    assert summary.resumed_from == nil, "adopted, not restarted"
  end

  defp safe_submit(pool, config, opts) do
    Pool.submit(pool, config, opts)
  catch
    :exit, reason -> {:exit, reason}
  end

  test "a higher priority preempts a running job, which resumes from its checkpoint afterwards",
       %{
         model: model,
         dir: dir
       } do
    me = self()
    events = for e <- [:placement, :requeue, :preemption], do: [:fine_tuning, :pool, e]
    handler = "pool-test-#{System.unique_integer([:positive])}"

    for event <- events,
        do:
          :telemetry.attach(
            {handler, event},
            event,
            fn n, m, meta, _ -> send(me, {:telemetry, n, m, meta}) end,
            nil
          )

    on_exit(fn -> for event <- events, do: :telemetry.detach({handler, event}) end)

    pool = start_pool(:pool_preempt, dir, [worker()])
    {:ok, low} = Pool.submit(pool, train_config(model, Path.join(dir, "low")), priority: 0)
    wait_event(low, :checkpoint)
    {:ok, high} = Pool.submit(pool, train_config(model, Path.join(dir, "high"), 4), priority: 10)

    requeued = wait_event(low, :requeued)
    assert requeued.reason == :preempted
    assert requeued.checkpoint =~ "checkpoint-"
    assert {:fine_tuning, ^high, :completed, _} = FineTuning.await(pool, high, 120_000)

    assert {:fine_tuning, ^low, :completed, %{summary: summary}} =
             FineTuning.await(pool, low, 180_000)

    assert summary.resumed_from =~ "checkpoint-"
    assert summary.steps == 24

    assert_received {:telemetry, [:fine_tuning, :pool, :preemption], _,
                     %{job_id: ^low, for: ^high, priority: 10}}

    assert_received {:telemetry, [:fine_tuning, :pool, :requeue], _,
                     %{job_id: ^low, reason: :preempted}}

    assert_received {:telemetry, [:fine_tuning, :pool, :placement], %{queue_time_ms: _},
                     %{job_id: ^high, attempt: 1, pool: :pool_preempt}}

    assert_received {:telemetry, [:fine_tuning, :pool, :placement], _,
                     %{job_id: ^low, attempt: 2}}
  end

  test "drain: running jobs finish, no new job is accepted", %{model: model, dir: dir} do
    pool = start_pool(:pool_drain, dir, [worker()])
    {:ok, id} = Pool.submit(pool, train_config(model, Path.join(dir, "d"), 4))
    :ok = Pool.drain(pool)
    assert {:error, :draining} = Pool.submit(pool, train_config(model, Path.join(dir, "e"), 4))
    assert {:fine_tuning, ^id, :completed, _} = FineTuning.await(pool, id, 120_000)
    assert Pool.status(pool).draining
    :ok = Pool.undrain(pool)
    assert {:ok, _} = Pool.submit(pool, train_config(model, Path.join(dir, "e"), 4))
  end

  test "a job waits for a worker with its device count and labels; a queued job cancels at once",
       %{
         model: model,
         dir: dir
       } do
    pool = start_pool(:pool_needs, dir, [Keyword.merge(worker(), devices: 1, labels: ["cpu"])])
    {:ok, big} = Pool.submit(pool, train_config(model, Path.join(dir, "big"), 4), devices: 2)

    {:ok, gpu} =
      Pool.submit(pool, train_config(model, Path.join(dir, "gpu"), 4), labels: ["a100"])

    {:ok, fits} =
      Pool.submit(pool, train_config(model, Path.join(dir, "fits"), 4), labels: ["cpu"])

    assert {:fine_tuning, ^fits, :completed, _} = FineTuning.await(pool, fits, 120_000)
    status = Pool.status(pool)
    assert status.queue == [big, gpu] and status.running == []
    assert [%{devices: 1, labels: ["cpu"], job: nil}] = status.workers
    assert :ok = FineTuning.cancel(pool, big)
    assert_receive {:fine_tuning, ^big, :cancelled, %{step: 0}}
    assert Pool.status(pool).queue == [gpu]
  end

  test "a running job cancelled through the pool ends once, cancelled, and a repeated join keeps it",
       %{model: model, dir: dir} do
    pool = start_pool(:pool_cancel, dir, [worker()])
    {:ok, id} = Pool.submit(pool, train_config(model, Path.join(dir, "c")))
    wait_event(id, :checkpoint)
    [%{worker: w}] = Pool.status(pool).running
    # A join the worker retried (its first reply came late) must not lose the job it runs.
    :ok = GenServer.call(pool, {:join, w, %{devices: 1, labels: [], node: node()}})
    assert [%{job_id: ^id, worker: ^w}] = Pool.status(pool).running
    assert :ok = FineTuning.cancel(pool, id)
    events = collect_events(id, 120_000)
    assert {:cancelled, %{checkpoint: checkpoint}} = List.last(events)
    assert checkpoint =~ "checkpoint-"
    refute Enum.any?(events, &(elem(&1, 0) == :requeued))
    refute_receive {:fine_tuning, ^id, _, _}, 500
    assert {:error, {:not_supported_by_pool, :shutdown}} = FineTuning.shutdown(pool)
    assert Process.alive?(Process.whereis(pool))
  end

  test "a bad config is refused at submit, naming its field", %{dir: dir, model: model} do
    pool = start_pool(:pool_bad, dir, [worker()])
    config = Map.put(train_config(model, Path.join(dir, "bad")), "max_steps", -1)
    assert {:error, [%{path: "max_steps"} | _]} = Pool.submit(pool, config)
  end

  describe "across Erlang nodes" do
    setup do
      case ensure_distributed() do
        :ok -> :ok
        {:error, reason} -> raise "distributed Erlang could not start here: #{inspect(reason)}"
      end
    end

    test "jobs placed on two nodes; one node stopped mid-job, its job finishes on the other", %{
      model: model,
      dir: dir
    } do
      {:ok, _} = Pool.start_link(name: :pool_nodes, data_dir: Path.join(dir, "queue"))
      pool = {:pool_nodes, node()}
      peers = for label <- ["a", "b"], do: start_peer(label, pool)
      wait_until(fn -> length(Pool.status(:pool_nodes).workers) == 2 end, 60_000)

      whole = Path.join(dir, "whole")
      {:ok, ref} = Pool.submit(:pool_nodes, train_config(model, whole), labels: ["a"])
      assert {:fine_tuning, ^ref, :completed, _} = FineTuning.await(:pool_nodes, ref, 180_000)

      out = Path.join(dir, "moved")
      {:ok, x} = Pool.submit(:pool_nodes, train_config(model, out))
      {:ok, y} = Pool.submit(:pool_nodes, train_config(model, Path.join(dir, "other"), 6))
      wait_event(x, :checkpoint)
      running = Pool.status(:pool_nodes).running
      nodes = Enum.map(running, & &1.node)
      assert length(Enum.uniq(nodes)) == 2, "placed on #{inspect(nodes)}"
      %{node: doomed} = Enum.find(running, &(&1.job_id == x))
      {peer, _} = Enum.find(peers, fn {_, n} -> n == doomed end)
      :peer.stop(peer)

      requeued = wait_event(x, :requeued)

      assert requeued.reason in [:worker_stopped, {:node_down, doomed}] or
               match?({:worker_exit, _}, requeued.reason)

      assert {:fine_tuning, ^y, :completed, _} = FineTuning.await(:pool_nodes, y, 180_000)

      assert {:fine_tuning, ^x, :completed, %{summary: s}} =
               FineTuning.await(:pool_nodes, x, 240_000)

      assert s.resumed_from =~ "checkpoint-"
      assert adapter(out) == adapter(whole)
      assert Enum.all?(Pool.status(:pool_nodes).workers, &(&1.node != doomed))
    end
  end

  defp ensure_distributed do
    if Node.alive?() do
      :ok
    else
      System.cmd("epmd", ["-daemon"])
      name = :"pool_test_#{System.unique_integer([:positive])}@127.0.0.1"

      case :net_kernel.start([name, :longnames]) do
        {:ok, _} -> :ok
        {:error, reason} -> {:error, reason}
      end
    end
  end

  # A peer node with one worker of its own (labelled), joined to `pool`.
  defp start_peer(label, pool) do
    paths = Enum.flat_map(:code.get_path(), &[~c"-pa", &1])

    {:ok, peer, node} =
      :peer.start_link(%{
        name: :"pool_peer_#{label}_#{System.unique_integer([:positive])}",
        host: ~c"127.0.0.1",
        longnames: true,
        args: [~c"-setcookie", Atom.to_charlist(Node.get_cookie()) | paths]
      })

    {:ok, _} = :erpc.call(node, Application, :ensure_all_started, [:fine_tuning])

    {:ok, _} =
      :erpc.call(node, FineTuning.Pool.Member, :start, [
        [pool: pool, labels: [label], workers: [worker()]]
      ])

    {peer, node}
  end
end
