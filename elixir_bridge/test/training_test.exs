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
end
