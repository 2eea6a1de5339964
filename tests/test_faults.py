"""Faults: SIGKILL mid-save then resume, SIGTERM saves and exits 0, stdin EOF during a long step.

Complements ``test_train_worker.py`` (SIGKILL between saves + exact resume; random kills while
saving), ``test_worker_shutdown.py`` (EOF/SIGTERM/shutdown deadlines, a job ignoring cancel)
and ``test_train_failures.py::test_disk_full_while_checkpointing`` (ENOSPC on a real tmpfs).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from finetune_worker.testing import WorkerHarness
from finetune_worker.training.checkpoints import CHECKPOINT_RE, complete_checkpoints, is_complete
from test_train_helpers import tiny_config

GRACE = 1.0


def submit(w: WorkerHarness, cfg: dict[str, Any]) -> str:
    ok, job_id = w.call("submit", json.dumps(cfg), w.pid, timeout=60)
    assert str(ok) == "ok", job_id
    return str(job_id)


def step_of(path: Path) -> int:
    match = CHECKPOINT_RE.match(path.name)
    assert match, path
    return int(match.group(1))


def resume_and_finish(cfg: dict[str, Any]) -> dict[str, Any]:
    with WorkerHarness() as w:
        job = submit(w, cfg)
        events = w.wait_for(job, "terminal", timeout=300)
    assert events[-1].type == "completed", events[-1].payload
    return {"summary": events[-1].payload["summary"], "events": events}


@pytest.mark.slow
def test_sigkill_while_a_checkpoint_is_written_then_resume_picks_the_newest_complete_one(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    cfg = tiny_config(tiny_model_dir, out, max_steps=40, checkpoint={"every_steps": 2, "keep": 3})
    staging = out / ".staging"
    in_flight: list[str] = []
    with WorkerHarness() as w:
        job = submit(w, cfg)
        w.wait_for(job, "checkpoint", timeout=300)  # one complete checkpoint exists
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            in_flight = [p.name for p in staging.iterdir()] if staging.is_dir() else []
            if any(name.startswith("checkpoint-") for name in in_flight):
                break
            time.sleep(0.001)
        w.kill()  # SIGKILL the moment the next checkpoint starts being written
        assert w.wait(10) == -9
    assert in_flight, "never caught a save in progress"
    survivors = complete_checkpoints(out)
    assert survivors and all(is_complete(p) for p in survivors)
    newest = max(step_of(p) for p in survivors)
    # nothing that looks like a checkpoint in output_dir is incomplete
    assert all(is_complete(p) for p in out.iterdir() if CHECKPOINT_RE.match(p.name))

    done = resume_and_finish(cfg)  # same config: resume "auto"
    assert done["summary"]["resumed_from"] == str(out / f"checkpoint-{newest}")
    progress = [e.payload["step"] for e in done["events"] if e.type == "progress"]
    assert progress == list(range(newest + 1, 41))
    assert not staging.exists() or not any(staging.iterdir()), "the dead save's staging was not cleaned"


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_0_then_resume_continues(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    cfg = tiny_config(tiny_model_dir, out, max_steps=200, checkpoint={"every_steps": 1000})
    with WorkerHarness(["--grace", "60"]) as w:
        job = submit(w, cfg)
        w.wait_for(job, "progress", timeout=300)
        w.terminate()
        assert w.wait(timeout=62) == 0, w.stderr_text()[-2000:]
        events = w.wait_for(job, "terminal", timeout=5)
    done = events[-1]
    assert done.type == "cancelled", done.payload
    ckpt = Path(done.payload["checkpoint"])
    assert is_complete(ckpt) and step_of(ckpt) == done.payload["step"] >= 1
    assert [e.payload["path"] for e in events if e.type == "checkpoint"][-1] == str(ckpt)

    finished = resume_and_finish(cfg)
    assert finished["summary"]["resumed_from"] == str(ckpt)
    assert finished["summary"]["steps"] == 200


@pytest.mark.parametrize("ignore_cancel", [False, True])
def test_stdin_closed_while_a_long_step_runs(ignore_cancel: bool) -> None:
    """The BEAM died in the middle of a 60 s step: the process is gone within grace + 2 s anyway."""
    with WorkerHarness(["--grace", str(GRACE)], test_jobs=True) as w:
        cfg = {"job": "test_steps", "steps": 3, "step_seconds": 60, "ignore_cancel": ignore_cancel}
        job = submit(w, cfg)
        w.wait_for(job, "started", timeout=30)
        time.sleep(0.2)  # inside the first step's sleep
        started = time.monotonic()
        w.close_stdin()
        assert w.wait(timeout=GRACE + 2.0) == 0, w.stderr_text()[-2000:]
        assert time.monotonic() - started < GRACE + 2.0
        with pytest.raises(ProcessLookupError):
            os.kill(w.proc.pid, 0)
        assert "did not stop within" in w.stderr_text()


@pytest.fixture
def small_disk(tmpfs):  # type: ignore[no-untyped-def]
    """A 880k tmpfs: room for the run's data cache (~150 KB) and one tiny checkpoint (~590 KB with
    its 4 KiB blocks), not two (grown later with a remount where needed)."""
    return tmpfs("880k")


@pytest.mark.slow
def test_disk_full_through_the_worker_then_resume_once_there_is_room(
    tiny_model_dir: Path, small_disk: Path
) -> None:
    import subprocess

    from safetensors.torch import load_file

    out = small_disk / "run"
    cfg = tiny_config(tiny_model_dir, out, max_steps=8, checkpoint={"every_steps": 2, "keep": 5})
    with WorkerHarness() as w:
        job = submit(w, cfg)
        events = w.wait_for(job, "terminal", timeout=300)
        failed = events[-1]
        assert failed.type == "failed", failed.payload
        assert str(failed.payload["error"]) == "disk_full" and "No space left" in failed.payload["message"]
        assert failed.payload["hint"]
        assert str(w.call("status", job)["state"]) == "failed"
        assert w.call("ping") == "pong" and w.alive  # the worker survives a full disk

    # the checkpoint published before the disk filled is intact and loads
    survivors = complete_checkpoints(out)
    assert [p.name for p in survivors] == ["checkpoint-2"]
    load_file(str(survivors[0] / "adapter_model.safetensors"))
    json.loads((survivors[0] / "trainer_state.json").read_text())

    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    done = resume_and_finish(cfg)
    assert done["summary"]["resumed_from"] == str(out / "checkpoint-2")
    assert [e.payload["step"] for e in done["events"] if e.type == "progress"] == list(range(3, 9))
