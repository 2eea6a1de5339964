defmodule FineTuning.TrainingTest do
  # The real jobs from Elixir: a LoRA run on the tiny model (built once with
  # `finetune-worker make-tiny-model`), then a merge of the adapter it wrote.
  use ExUnit.Case, async: true

  import FineTuning.TestHelpers

  alias FineTuning.Worker

  @moduletag timeout: 300_000

  # The training run is shared: the merge test needs its adapter.
  setup_all do
    dir = tmp_dir!("ft-training")
    model = Path.join(dir, "model")
    run_worker_cli!(["make-tiny-model", model])
    worker = start_supervised!({Worker, worker_opts(call_timeout: 60_000)})

    out = Path.join(dir, "lora")
    {:ok, job_id} = FineTuning.submit(worker, lora_config(model, out))
    events = collect_events(job_id, 240_000)
    %{dir: dir, model: model, worker: worker, adapter: out, job_id: job_id, events: events}
  end

  defp lora_config(model, out) do
    %{
      "job" => "train",
      "model_name" => model,
      "output_dir" => out,
      "dataset" => %{
        "path" => Path.join(repo(), "configs/data/conversations.jsonl"),
        "validation_split" => 0.15
      },
      "data" => %{"max_seq_length" => 128},
      "peft" => %{"method" => "lora", "r" => 8, "alpha" => 16, "dropout" => 0.0},
      "training_parameters" => %{
        "epochs" => 1,
        "batch_size" => 8,
        "learning_rate" => 5.0e-3,
        "logging_steps" => 1
      },
      "max_steps" => 6,
      "checkpoint" => %{"every_steps" => 3, "keep" => 2},
      "seed" => 7
    }
  end

  test "tiny LoRA training streams started, progress, metrics, checkpoint, completed in order", %{
    adapter: out,
    worker: w,
    job_id: job_id,
    events: events
  } do
    types = Enum.map(events, &elem(&1, 0))
    assert {:completed, done} = List.last(events), "job ended with #{inspect(List.last(events))}"

    first = fn type -> Enum.find_index(types, &(&1 == type)) || flunk("no #{type} event") end
    assert first.(:started) < first.(:progress)
    assert first.(:progress) < first.(:checkpoint)
    assert first.(:metrics) < first.(:checkpoint)
    assert first.(:checkpoint) < first.(:completed)

    assert for({:progress, p} <- events, do: p.step) == Enum.to_list(1..6)

    assert Enum.all?(
             for({:metrics, m} <- events, do: m.metrics["loss"]),
             &(is_float(&1) and &1 > 0)
           )

    checkpoints = for {:checkpoint, c} <- events, do: c
    assert Enum.map(checkpoints, & &1.step) == [3, 6]
    assert Enum.all?(checkpoints, &File.dir?(&1.path))

    assert done.outputs.adapter_path == out
    assert File.regular?(Path.join(out, "adapter_model.safetensors"))
    assert File.regular?(Path.join(out, "adapter_config.json"))
    assert %{state: "completed", step: 6} = FineTuning.status(w, job_id)
  end

  test "a LoRA merge job from Elixir writes the merged model", %{
    dir: dir,
    model: model,
    adapter: adapter,
    worker: w
  } do
    merged = Path.join(dir, "merged")

    config = %{
      "base_model_path" => model,
      "adapter_path" => adapter,
      "output_path" => merged,
      "use_fp16" => false
    }

    assert FineTuning.validate(w, config) == :ok
    assert {:ok, job_id} = FineTuning.submit(w, config)
    events = collect_events(job_id, 120_000)

    assert {:completed, %{outputs: outputs}} = List.last(events),
           "merge ended with #{inspect(List.last(events))}"

    assert [{:queued, _}, {:started, _} | _] = events
    assert merged in Map.values(outputs)
    assert File.regular?(Path.join(merged, "config.json"))
    assert merged |> Path.join("*.safetensors") |> Path.wildcard() != []
  end

  test "a DPO run from Elixir reports its preference scores before and after", %{
    dir: dir,
    model: model,
    worker: w
  } do
    out = Path.join(dir, "dpo")

    config =
      lora_config(model, out)
      |> Map.put("dataset", %{
        "path" => Path.join(repo(), "configs/data/preference.jsonl"),
        "validation_split" => 0.1
      })
      |> Map.put("preference", %{"method" => "dpo", "beta" => 0.1})
      |> Map.put("max_steps", 12)

    assert FineTuning.validate(w, config) == :ok
    assert {:ok, job_id} = FineTuning.submit(w, config)
    events = collect_events(job_id, 240_000)
    assert {:completed, %{summary: summary}} = List.last(events), inspect(List.last(events))

    assert %{method: "dpo", metrics: %{"base" => base, "fine_tuned" => tuned}} =
             summary.preference

    assert tuned["margin"] > base["margin"]

    assert Enum.any?(
             for({:metrics, m} <- events, do: m.metrics),
             &Map.has_key?(&1, "rewards/margins")
           )

    assert ["base", "fine_tuned"] ==
             for({:eval, %{model: m, metrics: %{"accuracy" => _}}} <- events, do: m)
  end

  test "GRPO rewards computed by an Elixir process", %{dir: dir, model: model, worker: w} do
    out = Path.join(dir, "grpo")
    prompts = Path.join(dir, "prompts.jsonl")

    rows =
      for q <- ["What colour is the sky?", "What colour is the grass?"],
          do: ~s({"prompt": "#{q}"}\n)

    File.write!(prompts, String.duplicate(Enum.join(rows), 8))

    config =
      lora_config(model, out)
      |> Map.put("dataset", %{"path" => prompts, "validation_split" => 0})
      |> Map.put("preference", %{
        "method" => "grpo",
        "num_generations" => 4,
        "max_completion_length" => 8,
        "rewards" => [%{"type" => "beam", "timeout_s" => 60}]
      })
      |> Map.put("max_steps", 2)

    # The application's own scoring: the subscriber answers every reward request of the job.
    test_pid = self()

    scorer =
      spawn_link(fn ->
        score_loop = fn loop ->
          receive do
            {:fine_tuning, job_id, :reward_request, %{request: request, completions: completions}} ->
              scores = Enum.map(completions, &(String.length(&1) / 100))
              send(test_pid, {:scored, request, FineTuning.rewards(w, job_id, request, scores)})
              loop.(loop)

            {:fine_tuning, _job_id, type, payload}
            when type in [:completed, :failed, :cancelled] ->
              send(test_pid, {:done, type, payload})

            {:fine_tuning, _job_id, _type, _payload} ->
              loop.(loop)
          end
        end

        score_loop.(score_loop)
      end)

    assert {:ok, job_id} = FineTuning.submit(w, config, subscriber: scorer)
    assert_receive {:done, :completed, %{summary: _}}, 240_000
    assert_received {:scored, 1, :ok}
    assert_received {:scored, 2, :ok}
    assert FineTuning.rewards(w, job_id, 1, [0.0]) == {:error, :not_found}
  end
end
