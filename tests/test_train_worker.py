"""Training through the real worker process (WorkerHarness): SIGKILL + resume, cancel, failures.

Each test spawns real ``finetune-worker port`` processes and talks to them as the BEAM does.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import rows_with_bad_row
from finetune_worker.testing import HarnessEvent, WorkerHarness
from finetune_worker.training.checkpoints import CHECKPOINT_RE, complete_checkpoints, is_complete
from test_train_helpers import tiny_config


def submit(w: WorkerHarness, cfg: dict[str, Any]) -> str:
    result = w.call("submit", json.dumps(cfg), w.pid)
    assert isinstance(result, tuple) and str(result[0]) == "ok", result
    return str(result[1])


def losses(events: list[HarnessEvent]) -> dict[int, float]:
    return {e.payload["step"]: e.payload["metrics"]["loss"] for e in events if e.type == "metrics"}


def assert_alive(w: WorkerHarness) -> None:
    info = w.call("info")
    assert w.alive and info["queue_length"] == 0


def resume_config(model: Path, out: Path) -> dict[str, Any]:
    # dropout on, so the RNG state restored from the checkpoint matters too
    return tiny_config(
        model,
        out,
        peft={"method": "lora", "r": 8, "alpha": 16, "dropout": 0.1},
        max_steps=16,
        checkpoint={"every_steps": 3, "keep": 3},
        training_parameters={"epochs": 3, "batch_size": 4, "learning_rate": 3e-3, "logging_steps": 1},
    )


def test_resume_after_sigkill_equals_an_uninterrupted_run(tiny_model_dir: Path, tmp_path: Path) -> None:
    with WorkerHarness() as w:
        job = submit(w, resume_config(tiny_model_dir, tmp_path / "reference"))
        reference = w.wait_for(job, "terminal", timeout=300)
        assert reference[-1].type == "completed", reference[-1].payload
    expected = losses(reference)
    assert sorted(expected) == list(range(1, 17))

    out = tmp_path / "killed"
    cfg = resume_config(tiny_model_dir, out)
    with WorkerHarness() as w:
        job = submit(w, cfg)
        w.wait_for(job, "checkpoint", timeout=300)
        second = w.wait_for(job, "checkpoint", timeout=300)[-1]
        w.kill()  # SIGKILL: no grace, no cleanup
        assert w.wait(10) == -9
    killed_at = second.payload["step"]
    assert killed_at == 6
    survivors = complete_checkpoints(out)
    assert survivors and all(is_complete(p) for p in survivors)
    newest = max(int(CHECKPOINT_RE.match(p.name).group(1)) for p in survivors)

    with WorkerHarness() as w:
        job = submit(w, cfg)  # the same config, resume "auto" (the default)
        resumed = w.wait_for(job, "terminal", timeout=300)
        assert resumed[-1].type == "completed", resumed[-1].payload
        assert_alive(w)
    summary = resumed[-1].payload["summary"]
    assert summary["resumed_from"] == str(out / f"checkpoint-{newest}")
    progress = [e.payload["step"] for e in resumed if e.type == "progress"]
    assert progress == list(range(newest + 1, 17))
    got = losses(resumed)
    assert sorted(got) == list(range(newest + 1, 17))
    for step, loss in got.items():
        assert loss == pytest.approx(expected[step], abs=1e-4), (step, loss, expected[step])
    assert summary["steps"] == 16


def test_cancel_through_the_worker(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "cancel"
    cfg = tiny_config(tiny_model_dir, out, max_steps=500, checkpoint={"every_steps": 1000})
    with WorkerHarness() as w:
        job = submit(w, cfg)
        w.wait_for(job, "progress", timeout=300)
        assert w.call("cancel", job) == "ok"
        events = w.wait_for(job, "terminal", timeout=120)
        done = events[-1]
        assert done.type == "cancelled", done.payload
        ckpt = Path(done.payload["checkpoint"])
        assert is_complete(ckpt) and ckpt.name == f"checkpoint-{done.payload['step']}"
        checkpoint_events = [e for e in events if e.type == "checkpoint"]
        assert checkpoint_events[-1].payload["path"] == str(ckpt)
        status = w.call("status", job)
        assert str(status["state"]) == "cancelled"
        assert_alive(w)


def test_failures_leave_the_worker_alive(tiny_model_dir: Path, tmp_path: Path) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    vit = tmp_path / "vit"
    shutil.copytree(tiny_model_dir, vit)
    config = json.loads((vit / "config.json").read_text())
    config["model_type"] = "vit"
    (vit / "config.json").write_text(json.dumps(config))

    huge = tmp_path / "huge"
    shutil.copytree(tiny_model_dir, huge)
    LlamaConfig(
        vocab_size=1_000_000_000, hidden_size=8192, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=4,
    ).save_pretrained(huge)  # fmt: skip
    # weights for one small tensor: loading allocates the rest (~32 TB) and the allocator refuses
    save_file({"model.norm.weight": torch.ones(8192)}, str(huge / "model.safetensors"))

    bad = rows_with_bad_row(tmp_path / "bad.jsonl", {"question": 3, "answer": "three"}, at=112)

    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / ".finetune-worker-run.json").write_text(json.dumps({"fingerprint": "another run"}))

    with WorkerHarness() as w:
        failed = {}
        for name, cfg in {
            "unsupported_model": tiny_config(vit, tmp_path / "o1"),
            "out_of_memory": tiny_config(huge, tmp_path / "o2"),
            "bad_dataset_row": tiny_config(
                tiny_model_dir, tmp_path / "o3", dataset={"path": str(bad), "validation_split": 0.1}
            ),
        }.items():
            job = submit(w, cfg)
            done = w.wait_for(job, "terminal", timeout=300)[-1]
            assert done.type == "failed" and done.payload["error"] == name, done.payload
            assert done.payload["hint"]
            failed[name] = done.payload
            assert_alive(w)
        assert (
            "row 112" in failed["bad_dataset_row"]["message"]
            and "question" in failed["bad_dataset_row"]["message"]
        )

        # Problems visible at submit are refused there, every one with its JSON path.
        refused = w.call("submit", json.dumps(tiny_config(tmp_path / "no-such-model", taken, seed=1)), w.pid)
        assert str(refused[0]) == "error"
        issues = {i["path"]: i["message"] for i in refused[1]}
        assert "no local model" in issues["model_name"] and "different config" in issues["output_dir"]
        assert_alive(w)

        # and the same worker still trains
        job = submit(w, tiny_config(tiny_model_dir, tmp_path / "ok", max_steps=3))
        assert w.wait_for(job, "terminal", timeout=300)[-1].type == "completed"


@pytest.mark.slow
def test_kill_during_checkpoint_saves_never_leaves_an_incomplete_checkpoint(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """SIGKILL at random moments while a checkpoint is saved every step; every visible one must load."""
    import torch
    from safetensors.torch import load_file

    out = tmp_path / "kills"
    cfg = tiny_config(tiny_model_dir, out, max_steps=400, checkpoint={"every_steps": 1, "keep": 2})
    rng = random.Random(1)
    staging = out / ".staging"
    caught_mid_save = 0
    for round_ in range(6):
        with WorkerHarness() as w:
            job = submit(w, cfg)
            w.wait_for(job, "checkpoint", timeout=300)
            if round_ % 2:
                time.sleep(rng.uniform(0.0, 0.3))  # anywhere: a save runs every step
            else:
                # the moment a checkpoint starts being written, before it is published
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline and not (
                    staging.is_dir() and any(p.name.startswith("checkpoint-") for p in staging.iterdir())
                ):
                    time.sleep(0.001)
            w.kill()
            w.wait(10)
        if staging.is_dir() and any(p.name.startswith("checkpoint-") for p in staging.iterdir()):
            caught_mid_save += 1
        for child in out.iterdir():
            if CHECKPOINT_RE.match(child.name):
                assert is_complete(child), f"{child} looks like a checkpoint but is incomplete"
                json.loads((child / "trainer_state.json").read_text())
                load_file(str(child / "adapter_model.safetensors"))
                torch.load(child / "optimizer.pt", weights_only=True)
                torch.load(child / "scheduler.pt", weights_only=False)
        assert complete_checkpoints(out)
    assert caught_mid_save >= 3, "the kills never landed inside a save; the test proved nothing"
