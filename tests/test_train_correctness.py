"""Training correctness: no silently wrong run (issue "Training correctness").

Each test compares what the worker does with an independent computation (a second run that
differs only where it must not matter, the layer itself without the worker, plain
transformers loading the outputs) and fails on the bug it names.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from test_train_helpers import run_job, tiny_config


def _losses(run) -> list[float]:  # type: ignore[no-untyped-def]
    return [m["metrics"]["loss"] for m in run.of("metrics")]


def test_qlora_loss_curve_does_not_depend_on_an_evaluation_first(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """bitsandbytes 0.50.2 on AVX512-BF16 CPUs: an eval-mode forward of a 4-bit layer used to break
    every later gradient through it. With and without a base evaluation, the curves must agree."""
    common = {
        "quantization": {"bits": 4, "use_double_quant": True},
        "dataset": None,
        "max_steps": 8,
        "checkpoint": {"every_steps": 100, "keep": 1},
    }
    runs = []
    for name, extra in (
        ("plain", {}),
        ("evaluated", {"evaluation": {"max_rows": 2, "samples": 1, "generation": {"max_new_tokens": 2}}}),
    ):
        cfg = tiny_config(tiny_model_dir, tmp_path / name, "qa.jsonl")
        cfg.update({k: v for k, v in common.items() if v is not None})
        cfg["dataset"] = {"path": cfg["dataset"]["path"], "validation_split": 0}
        cfg.update(extra)
        run = run_job(cfg)
        assert run.terminal.type == "completed", run.terminal.payload
        runs.append(_losses(run))
    plain, evaluated = runs
    assert len(plain) == len(evaluated) == 8
    for step, (a, b) in enumerate(zip(plain, evaluated, strict=True), start=1):
        assert a == pytest.approx(b, abs=1e-4), f"step {step}: {a} without an evaluation, {b} after one"


def test_bitsandbytes_still_repacks_4bit_weights_in_eval_mode() -> None:
    """Tells when the workaround in hf.keep_4bit_layout_trainable can go.

    Rebuilds the bug with a bare ``Linear4bit``: one forward in eval mode, then gradients through
    it. While bitsandbytes repacks the weight for CPU inference, the input gradient after the
    eval forward is missing or differs from a twin layer's that never ran in eval mode (and with
    it the LoRA weights' gradients, which flow through the same matmul); once this test fails,
    the installed bitsandbytes is fixed and the workaround can be removed.
    """
    torch = pytest.importorskip("torch")
    bnb = pytest.importorskip("bitsandbytes")
    from bitsandbytes.functional import has_avx512bf16

    if not has_avx512bf16():
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes never repacks here")

    torch.manual_seed(0)
    dense = torch.nn.Linear(64, 64, bias=False)

    def layer():  # type: ignore[no-untyped-def]
        q = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=torch.float32, quant_type="nf4")
        q.weight = bnb.nn.Params4bit(dense.weight.data.clone(), requires_grad=False, quant_type="nf4")
        return q.to("cpu")  # quantizes the weight

    x = torch.randn(4, 64)
    grads = []
    for eval_first in (False, True):
        q = layer()
        if eval_first:
            q.eval()
            with torch.no_grad():
                q(x)
            q.train()
        inp = x.clone().requires_grad_(True)
        q(inp).sum().backward()
        grads.append(inp.grad)
    assert grads[0] is not None  # a layer that never ran in eval mode passes gradients back
    # After the eval forward, bitsandbytes 0.50.2 passes none at all (or wrong ones).
    bug_present = grads[1] is None or not torch.allclose(grads[0], grads[1], atol=1e-4)
    assert bug_present, (
        f"bitsandbytes {bnb.__version__} no longer breaks gradients after an eval forward: remove "
        "hf.keep_4bit_layout_trainable and this test"
    )


# ---- the chat template trained with is the one saved --------------------------------------

CUSTOM_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}### User: {{ m['content'] }}\n"
    "{% elif m['role'] == 'assistant' %}### Assistant: {{ m['content'] }}{{ eos_token }}\n"
    "{% else %}### System: {{ m['content'] }}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}### Assistant: {% endif %}"
)


def test_data_chat_template_is_saved_with_the_adapter(tiny_model_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from test_train_helpers import DATA

    out = tmp_path / "templated"
    cfg = tiny_config(tiny_model_dir, out, max_steps=2, checkpoint={"every_steps": 100, "keep": 1})
    cfg["data"] = {"max_seq_length": 128, "chat_template": CUSTOM_TEMPLATE}
    run = run_job(cfg)
    assert run.terminal.type == "completed", run.terminal.payload
    assert AutoTokenizer.from_pretrained(str(out)).chat_template == CUSTOM_TEMPLATE
    assert AutoTokenizer.from_pretrained(str(tiny_model_dir)).chat_template != CUSTOM_TEMPLATE

    # The evaluate job on the output renders prompts the way training did.
    ev = run_job(
        {
            "job": "evaluate",
            "model_path": str(out),
            "dataset": {"path": str(DATA / "qa.jsonl")},
            "max_rows": 1,
            "generation": {"max_new_tokens": 2},
            "output_dir": str(tmp_path / "eval"),
        }
    )
    assert ev.terminal.type == "completed", ev.terminal.payload
    row = (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()[0]
    assert "### User:" in row and "### Assistant: " in row


# ---- every scheduler the schema lists ------------------------------------------------------


def test_every_listed_scheduler_builds_and_steps(tiny_model_dir: Path, tmp_path: Path) -> None:
    import json
    import math
    import typing

    from finetune_worker.config import parse_job_config
    from finetune_worker.config.train import TrainingParameters
    from finetune_worker.hf import load_tokenizer
    from finetune_worker.training.data import build_datasets, make_collator
    from finetune_worker.training.model import load_model, plan_hardware
    from finetune_worker.training.trainer import build_trainer

    names = typing.get_args(TrainingParameters.model_fields["lr_scheduler"].annotation)
    assert "cosine_with_min_lr" in names and "warmup_stable_decay" in names
    base = tiny_config(tiny_model_dir, tmp_path / "sched", max_steps=20)
    _, cfg = parse_job_config(json.dumps(base))
    plan = plan_hardware(cfg, lambda m: None)
    tokenizer = load_tokenizer(tiny_model_dir, "model_name")
    model = load_model(cfg, plan, lambda m: None)
    rows, _, _ = build_datasets(cfg.data, tokenizer, cfg.dataset.path, validation_split=0, seed=1)
    for name in names:
        raw = dict(
            base, training_parameters={**base["training_parameters"], "lr_scheduler": name, "warmup_steps": 2}
        )
        _, variant = parse_job_config(json.dumps(raw))
        trainer = build_trainer(
            variant, plan, model, tokenizer, rows, None, make_collator(tokenizer, True), [], tmp_path
        )
        trainer.create_optimizer_and_scheduler(num_training_steps=20)
        lrs = []
        for _ in range(20):
            trainer.optimizer.step()
            trainer.lr_scheduler.step()
            lrs.append(trainer.lr_scheduler.get_last_lr()[0])
        assert all(math.isfinite(lr) and lr >= 0 for lr in lrs), (name, lrs)
        peak = base["training_parameters"]["learning_rate"]
        if name == "cosine_with_min_lr":  # default min_lr_rate 0.1
            assert lrs[-1] == pytest.approx(0.1 * peak, rel=1e-6), lrs
        if name == "warmup_stable_decay":  # default decay over the last 10% (2 steps)
            assert lrs[-4] == pytest.approx(peak) and lrs[-1] < 0.5 * peak, lrs


def test_scheduler_settings_are_checked_per_schedule(tmp_path: Path, tiny_model_dir: Path) -> None:
    import json

    from finetune_worker.config import parse_job_config
    from finetune_worker.errors import ConfigError

    def issues(tp: dict) -> dict[str, str]:  # type: ignore[type-arg]
        raw = tiny_config(tiny_model_dir, tmp_path / "o", training_parameters=tp)
        with pytest.raises(ConfigError) as err:
            parse_job_config(json.dumps(raw))
        return {i.path: i.message for i in err.value.issues}

    got = issues({"lr_scheduler": "linear", "lr_scheduler_kwargs": {"min_lr": 0.1}})
    assert "not a setting of lr_scheduler 'linear'" in got["training_parameters.lr_scheduler_kwargs.min_lr"]
    got = issues(
        {
            "lr_scheduler": "warmup_stable_decay",
            "lr_scheduler_kwargs": {"num_decay_steps": -1, "decay_type": "x"},
        }
    )
    assert set(got) == {
        "training_parameters.lr_scheduler_kwargs.num_decay_steps",
        "training_parameters.lr_scheduler_kwargs.decay_type",
    }
    got = issues(
        {"lr_scheduler": "cosine_with_min_lr", "lr_scheduler_kwargs": {"min_lr": 1e-5, "min_lr_rate": 0.1}}
    )
    assert "not both" in got["training_parameters.lr_scheduler_kwargs.min_lr"]


def test_warmup_stable_decay_trains_end_to_end(tiny_model_dir: Path, tmp_path: Path) -> None:
    cfg = tiny_config(
        tiny_model_dir, tmp_path / "wsd", max_steps=4, checkpoint={"every_steps": 100, "keep": 1}
    )
    cfg["training_parameters"] = {**cfg["training_parameters"], "lr_scheduler": "warmup_stable_decay"}
    run = run_job(cfg)
    assert run.terminal.type == "completed", run.terminal.payload


# ---- a finished run resubmitted, and train_loss after a resume ----------------------------


def test_a_finished_run_resubmitted_is_already_complete(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "done"
    cfg = tiny_config(
        tiny_model_dir, out, max_steps=4, checkpoint={"every_steps": 2, "keep": 1}, resume="auto"
    )
    first = run_job(cfg)
    assert first.terminal.type == "completed", first.terminal.payload
    adapter = (out / "adapter_model.safetensors").read_bytes()

    again = run_job(cfg)
    assert again.terminal.type == "completed", again.terminal.payload
    summary = again.terminal.payload["summary"]
    assert summary["already_complete"] is True and summary["steps"] == 4
    assert again.of("progress") == [], "no step may run past the total"
    assert any("already complete" in m["message"] for m in again.of("log"))
    assert (out / "adapter_model.safetensors").read_bytes() == adapter

    # Killed after its last checkpoint, before the outputs: finish from it without a step more.
    (out / "summary.json").unlink()
    finish = run_job(cfg)
    assert finish.terminal.type == "completed", finish.terminal.payload
    assert finish.terminal.payload["summary"]["steps"] == 4 and finish.of("progress") == []
    assert finish.terminal.payload["summary"]["train_loss"] == pytest.approx(
        first.terminal.payload["summary"]["train_loss"], abs=1e-6
    )


def test_train_loss_after_a_resume_covers_the_whole_run(tiny_model_dir: Path, tmp_path: Path) -> None:
    common = {"checkpoint": {"every_steps": 4, "keep": 2}, "resume": "auto"}
    tp = {"epochs": 1, "batch_size": 8, "learning_rate": 5e-3, "logging_steps": 3, "lr_scheduler": "constant"}
    whole = run_job(
        tiny_config(tiny_model_dir, tmp_path / "whole", max_steps=8, training_parameters=tp, **common)
    )
    assert whole.terminal.type == "completed", whole.terminal.payload
    out = tmp_path / "halves"
    first = run_job(tiny_config(tiny_model_dir, out, max_steps=4, training_parameters=tp, **common))
    assert first.terminal.type == "completed"
    second = run_job(tiny_config(tiny_model_dir, out, max_steps=8, training_parameters=tp, **common))
    assert second.terminal.type == "completed", second.terminal.payload
    resumed = second.terminal.payload["summary"]
    assert resumed["resumed_from"] and resumed["steps"] == 8
    assert resumed["train_loss"] == pytest.approx(whole.terminal.payload["summary"]["train_loss"], abs=1e-4)


# ---- eval_loss is a property of the model ---------------------------------------------------


@pytest.mark.parametrize("packing", [True, False])
def test_eval_loss_does_not_depend_on_the_eval_batch_size(
    tiny_model_dir: Path, tmp_path: Path, packing: bool
) -> None:
    import json

    from finetune_worker.config import parse_job_config
    from finetune_worker.hf import load_tokenizer
    from finetune_worker.training.data import build_datasets, make_collator
    from finetune_worker.training.model import load_model, plan_hardware
    from finetune_worker.training.trainer import build_trainer

    losses = []
    for batch in (1, 2, 8):
        raw = tiny_config(tiny_model_dir, tmp_path / "ev", eval={"batch_size": batch})
        raw["data"] = {"max_seq_length": 128, "packing": packing}
        _, cfg = parse_job_config(json.dumps(raw))
        plan = plan_hardware(cfg, lambda m: None)
        tokenizer = load_tokenizer(tiny_model_dir, "model_name")
        model = load_model(cfg, plan, lambda m: None)
        train, held, _ = build_datasets(
            cfg.data, tokenizer, cfg.dataset.path, validation_split=0.15, seed=cfg.seed
        )
        trainer = build_trainer(
            cfg, plan, model, tokenizer, train, held, make_collator(tokenizer, packing), [], tmp_path
        )
        losses.append(trainer.evaluate()["eval_loss"])
    assert losses[0] == pytest.approx(losses[1], abs=1e-5) and losses[0] == pytest.approx(
        losses[2], abs=1e-5
    ), losses


# ---- the best checkpoint, and the evaluation that ran twice -------------------------------


def test_load_best_model_at_end_saves_the_best_checkpoint(tiny_model_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    out = tmp_path / "best"
    cfg = tiny_config(
        tiny_model_dir,
        out,
        max_steps=10,
        checkpoint={"every_steps": 2, "keep": 1},
        # "Best" as the highest loss: it picks an early checkpoint for sure, so keeping it from
        # rotation (keep: 1) and restoring it at the end are both put to the test.
        eval={"every_steps": 2, "load_best_model_at_end": True, "greater_is_better": True},
        training_parameters={"epochs": 1, "batch_size": 8, "learning_rate": 0.08, "logging_steps": 1},
    )
    run = run_job(cfg)
    assert run.terminal.type == "completed", run.terminal.payload
    summary = run.terminal.payload["summary"]
    evals = {e["step"]: e["metrics"]["eval_loss"] for e in run.of("eval") if e.get("step")}
    best_step = max(evals, key=lambda s: evals[s])
    assert best_step < 10, evals
    assert summary["best_step"] == best_step, (summary.get("best_step"), evals)
    assert summary["best_metric"] == pytest.approx(evals[best_step])
    best = Path(summary["best_checkpoint"])
    assert best == out / f"checkpoint-{best_step}" and best.is_dir(), "rotation must keep the best checkpoint"
    saved = load_file(str(out / "adapter_model.safetensors"))
    kept = load_file(str(best / "adapter_model.safetensors"))
    assert saved.keys() == kept.keys() and all((saved[k] == kept[k]).all() for k in saved)
    assert summary["final_eval_loss"] == pytest.approx(evals[best_step], abs=1e-5)


def test_best_model_needs_checkpoints_on_evaluations(tiny_model_dir: Path, tmp_path: Path) -> None:
    import json

    from finetune_worker.config import parse_job_config
    from finetune_worker.errors import ConfigError

    raw = tiny_config(
        tiny_model_dir,
        tmp_path / "o",
        checkpoint={"every_steps": 3},
        eval={"every_steps": 2, "load_best_model_at_end": True},
    )
    with pytest.raises(ConfigError, match=r"multiple of eval\.every_steps"):
        parse_job_config(json.dumps(raw))


def test_the_final_evaluation_is_not_run_twice(tiny_model_dir: Path, tmp_path: Path) -> None:
    cfg = tiny_config(tiny_model_dir, tmp_path / "once", max_steps=4, eval={"every_steps": 2})
    run = run_job(cfg)
    assert run.terminal.type == "completed", run.terminal.payload
    steps = [e["step"] for e in run.of("eval")]
    assert steps == [0, 2, 4], steps


def test_freeze_layers_must_leave_a_layer_to_train(tiny_model_dir: Path, tmp_path: Path) -> None:
    import json

    from finetune_worker.config import parse_job_config
    from finetune_worker.errors import ConfigError

    layers = json.loads((tiny_model_dir / "config.json").read_text())["num_hidden_layers"]
    raw = tiny_config(tiny_model_dir, tmp_path / "o", peft={"method": "full", "freeze_layers": layers})
    with pytest.raises(ConfigError, match=f"has {layers} decoder layers"):
        parse_job_config(json.dumps(raw))
    raw["peft"]["freeze_layers"] = layers - 1
    assert parse_job_config(json.dumps(raw))[0] == "train"


def test_pissa_leaves_no_helper_folder_in_the_output(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "pissa"
    cfg = tiny_config(
        tiny_model_dir, out, max_steps=2, peft={"method": "pissa", "r": 4, "alpha": 8, "dropout": 0.0}
    )
    run = run_job(cfg)
    assert run.terminal.type == "completed", run.terminal.payload
    assert not (out / "initial_adapter").exists() and not (out / ".staging").exists()
    assert (out / "adapter_model.safetensors").is_file()


def test_run_stops_on_sigterm_with_a_checkpoint_and_exit_143(tiny_model_dir: Path, tmp_path: Path) -> None:
    import json
    import signal
    import subprocess
    import sys

    out = tmp_path / "slurm"
    cfg = tiny_config(
        tiny_model_dir, out, max_steps=400, checkpoint={"every_steps": 1000, "keep": 1}, resume="auto"
    )
    path = tmp_path / "job.json"
    path.write_text(json.dumps(cfg))
    proc = subprocess.Popen(
        [sys.executable, "-m", "finetune_worker", "run", str(path), "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    events = []
    for line in proc.stdout:
        events.append(json.loads(line))
        if events[-1]["type"] == "progress" and events[-1]["payload"]["step"] >= 1:
            break
    proc.send_signal(signal.SIGTERM)
    rest, err = proc.communicate(timeout=180)
    events += [json.loads(line) for line in rest.splitlines()]
    assert proc.returncode == 143, err[-2000:]
    last = events[-1]
    assert last["type"] == "cancelled" and last["payload"]["checkpoint"], last
    assert Path(last["payload"]["checkpoint"]).is_dir()
    assert "run the same command again to resume" in err
