"""Training jobs in process (JobManager + list sink): LoRA, QLoRA, full FT, events, cancel, resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from finetune_worker.training.checkpoints import complete_checkpoints, is_complete
from test_train_helpers import DATA, Run, reload_eval_loss, run_job, tiny_config

PHASES = ["preparing_data", "loading_model", "evaluating", "training", "evaluating", "saving"]


def test_lora_trains_streams_events_and_saves_a_reloadable_adapter(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "lora"
    cfg = tiny_config(tiny_model_dir, out)
    run = run_job(cfg)
    done = run.terminal
    assert done.type == "completed", done.payload
    assert [p["phase"] for p in run.of("phase")] == PHASES

    # progress every step, in order, with a total
    progress = run.of("progress")
    assert [p["step"] for p in progress] == list(range(1, 13))
    assert all(p["total_steps"] == 12 for p in progress) and progress[-1]["percent"] == 100.0
    # metrics at every logging step, counting real tokens
    assert [m["step"] for m in run.of("metrics")] == list(range(1, 13))
    metrics = [m["metrics"] for m in run.of("metrics")]
    seen = [m["tokens_seen"] for m in metrics]
    assert seen == sorted(seen) and seen[0] > 0
    assert all(m["loss"] > 0 and m["learning_rate"] >= 0 and m["grad_norm"] is not None for m in metrics)
    # checkpoints: announced only once complete, rotated to keep=2
    ckpts = run.of("checkpoint")
    assert [c["step"] for c in ckpts] == [4, 8, 12]
    assert [p.name for p in complete_checkpoints(out)] == ["checkpoint-8", "checkpoint-12"]
    assert not (out / ".staging").exists()

    summary = done.payload["summary"]
    assert summary == json.loads((out / "summary.json").read_text())
    assert done.payload["outputs"]["adapter_path"] == str(out)
    assert summary["final_eval_loss"] < summary["base_eval_loss"], summary
    assert summary["improvement_pct"] > 0
    assert math.isclose(summary["final_perplexity"], math.exp(summary["final_eval_loss"]), rel_tol=1e-6)
    assert summary["steps"] == 12 and summary["tokens_seen"] == seen[-1]
    assert summary["config"]["peft"]["method"] == "lora"
    evals = run.of("eval")
    assert (
        evals[0]["metrics"]["eval_loss"] == summary["base_eval_loss"]
        and evals[-1]["metrics"]["eval_loss"] == summary["final_eval_loss"]
    )

    # The saved adapter, loaded fresh with PeftModel.from_pretrained, is the model that was evaluated.
    assert reload_eval_loss(cfg, out) == pytest.approx(summary["final_eval_loss"], abs=1e-5)
    # and LoRA weights moved off their init (lora_B starts at zero)
    from safetensors.torch import load_file

    weights = load_file(str(out / "adapter_model.safetensors"))
    lora_b = [t for k, t in weights.items() if "lora_B" in k]
    assert lora_b and all(t.abs().sum() > 0 for t in lora_b)


def test_qlora_4bit_trains(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "qlora"
    cfg = tiny_config(
        tiny_model_dir, out, "qa.jsonl", quantization={"bits": 4, "use_double_quant": True}, max_steps=10
    )
    run = run_job(cfg)
    assert run.terminal.type == "completed", run.terminal.payload
    summary = run.terminal.payload["summary"]
    assert summary["final_eval_loss"] < summary["base_eval_loss"]
    assert any("4-bit base" in log["message"] for log in run.of("log"))
    # The reloaded 4-bit base skips prepare_model_for_kbit_training and lands ~1e-4 relative off;
    # a lost adapter would be off by the whole training gain (~1).
    assert reload_eval_loss(cfg, out, quantized=True) == pytest.approx(summary["final_eval_loss"], abs=2e-3)


def test_full_finetune_with_frozen_first_layer(tiny_model_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    out = tmp_path / "full"
    cfg = tiny_config(
        tiny_model_dir,
        out,
        "instruction.jsonl",
        peft={"method": "full", "freeze_layers": 1},
        training_parameters={"epochs": 1, "batch_size": 8, "learning_rate": 1e-3, "logging_steps": 4},
        max_steps=10,
    )
    run = run_job(cfg)
    assert run.terminal.type == "completed", run.terminal.payload
    summary = run.terminal.payload["summary"]
    assert run.terminal.payload["outputs"]["model_path"] == str(out)
    assert summary["final_eval_loss"] < summary["base_eval_loss"]
    before = load_file(str(tiny_model_dir / "model.safetensors"))
    after = load_file(str(out / "model.safetensors"))
    frozen = [k for k in before if k.startswith("model.layers.0.")]
    trained = [k for k in before if k.startswith("model.layers.1.") and k.endswith("proj.weight")]
    assert frozen and trained
    assert all(before[k].equal(after[k]) for k in frozen)
    assert all(not before[k].equal(after[k]) for k in trained)
    assert reload_eval_loss(cfg, out) == pytest.approx(summary["final_eval_loss"], abs=1e-5)


def test_cancel_stops_at_a_step_with_a_checkpoint_and_resume_continues(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "cancel"
    cfg = tiny_config(tiny_model_dir, out, max_steps=200, checkpoint={"every_steps": 1000, "keep": 1})
    run = Run(cfg)
    try:
        run.wait_for("progress", lambda p: p["step"] >= 3)
        run.manager.cancel(run.job_id)
        done = run.wait()
    finally:
        run.close()
    assert done.type == "cancelled", done.payload
    step, ckpt = done.payload["step"], Path(done.payload["checkpoint"])
    assert step >= 3 and ckpt == out / f"checkpoint-{step}" and is_complete(ckpt)
    assert run.of("checkpoint")[-1] == {"path": str(ckpt), "step": step}
    assert not (out / "summary.json").exists()

    # Submitted again (resume auto, same config), it continues from that checkpoint.
    cfg["max_steps"] = step + 2
    again = run_job(cfg)
    assert again.terminal.type == "completed", again.terminal.payload
    assert [p["step"] for p in again.of("progress")] == [step + 1, step + 2]
    assert again.terminal.payload["summary"]["resumed_from"] == str(ckpt)


def test_data_formats_each_train_with_lora(tiny_model_dir: Path, tmp_path: Path) -> None:
    # One short run per format (text file, text rows, Q&A CSV, instruction, ShareGPT).
    for name in ("text.txt", "text.jsonl", "qa.csv", "instruction.jsonl", "sharegpt.jsonl"):
        assert (DATA / name).exists(), name
        out = tmp_path / name.replace(".", "_")
        run = run_job(tiny_config(tiny_model_dir, out, name, max_steps=6, checkpoint={"every_steps": 100}))
        assert run.terminal.type == "completed", (name, run.terminal.payload)
        s = run.terminal.payload["summary"]
        assert s["final_eval_loss"] < s["base_eval_loss"], (name, s)


def test_step_evaluation_and_early_stopping(tiny_model_dir: Path, tmp_path: Path) -> None:
    # "Better" as a higher loss (greater_is_better): a loss that falls never improves, so patience 1
    # stops the run at the second evaluation for sure (a diverging run would now fail as it should).
    cfg = tiny_config(
        tiny_model_dir,
        tmp_path / "es",
        max_steps=40,
        eval={"every_steps": 2, "early_stopping_patience": 1, "greater_is_better": True},
        training_parameters={"epochs": 1, "batch_size": 8, "learning_rate": 5e-3, "logging_steps": 1},
    )
    run = run_job(cfg)
    assert run.terminal.type == "completed", run.terminal.payload
    steps = [e["step"] for e in run.of("eval")]
    assert steps[0] == 0 and steps[1:3] == [2, 4]  # base, then every 2 steps
    assert run.terminal.payload["summary"]["steps"] < 40


def test_overwrite_replaces_an_earlier_run(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "ow"
    first = tiny_config(tiny_model_dir, out, max_steps=4, checkpoint={"every_steps": 2, "keep": 5})
    assert run_job(first).terminal.type == "completed"
    assert [p.name for p in complete_checkpoints(out)] == ["checkpoint-2", "checkpoint-4"]
    second = dict(first, seed=8, overwrite=True, max_steps=3)  # a different run: fresh start
    run = run_job(second)
    assert run.terminal.type == "completed", run.terminal.payload
    assert run.terminal.payload["summary"]["resumed_from"] is None
    assert [p["step"] for p in run.of("progress")] == [1, 2, 3]
    assert [p.name for p in complete_checkpoints(out)] == ["checkpoint-2", "checkpoint-3"]


def test_resume_from_an_explicit_checkpoint(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "explicit"
    cfg = tiny_config(tiny_model_dir, out, max_steps=6, checkpoint={"every_steps": 2, "keep": 5})
    assert run_job(cfg).terminal.type == "completed"
    run = run_job(dict(cfg, resume=str(out / "checkpoint-2")))
    assert run.terminal.type == "completed", run.terminal.payload
    assert [p["step"] for p in run.of("progress")] == [3, 4, 5, 6]


def test_summary_config_echo_hides_secrets() -> None:
    # summary.json's config echo goes through the worker's one redaction rule.
    from finetune_worker.security import redact

    echoed = redact(
        {
            "tracking": {"mlflow": {"tracking_uri": "https://bob:s3cret@mlflow.example.com/x"}},
            "hf_token": "hf_abc",
            "api_key": "k",
            "peft": {"num_virtual_tokens": 20},
            "output_dir": "runs/a@b",
        }
    )
    assert "s3cret" not in json.dumps(echoed) and "hf_abc" not in json.dumps(echoed)
    assert echoed["peft"]["num_virtual_tokens"] == 20 and echoed["output_dir"] == "runs/a@b"


def test_cuda_only_settings_fall_back_on_cpu_with_a_warning(tiny_model_dir: Path, tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("checks the CPU fallback")
    cfg = tiny_config(
        tiny_model_dir,
        tmp_path / "fallback",
        max_steps=2,
        training_parameters={"batch_size": 4, "optimizer": "paged_adamw_8bit", "precision": "fp16"},
    )
    run = run_job(cfg)
    assert run.terminal.type == "completed", run.terminal.payload
    warnings = [e["message"] for e in run.of("log") if e["level"] == "warning"]
    assert any("paged_adamw_8bit needs CUDA" in w for w in warnings), warnings
    assert any("fp16 needs CUDA" in w for w in warnings), warnings


def test_without_a_validation_split_there_is_no_evaluation(tiny_model_dir: Path, tmp_path: Path) -> None:
    cfg = tiny_config(tiny_model_dir, tmp_path / "noeval", max_steps=2)
    cfg["dataset"]["validation_split"] = 0
    run = run_job(cfg)
    assert run.terminal.type == "completed", run.terminal.payload
    assert [p["phase"] for p in run.of("phase")] == ["preparing_data", "loading_model", "training", "saving"]
    summary = run.terminal.payload["summary"]
    assert summary["base_eval_loss"] is None and summary["final_perplexity"] is None
    assert summary["improvement_pct"] is None and summary["steps"] == 2
