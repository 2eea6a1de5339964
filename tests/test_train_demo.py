"""`make run`'s path on a fresh checkout: build the tiny model, then `finetune-worker run configs/tiny-lora.json`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def finetune_worker(*args: str, cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "finetune_worker", *args],
        cwd=cwd,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_tiny_lora_demo_trains_end_to_end(tmp_path: Path) -> None:
    # The layout of a fresh clone, with the configs as shipped (relative paths and all).
    (tmp_path / "configs").symlink_to(REPO / "configs")
    built = finetune_worker("make-tiny-model", ".tiny/model", cwd=tmp_path, timeout=120)
    assert built.returncode == 0, built.stderr[-2000:]
    run = finetune_worker("run", "configs/tiny-lora.json", cwd=tmp_path, timeout=300)
    assert run.returncode == 0, (run.stdout[-2000:], run.stderr[-3000:])
    summary = json.loads((tmp_path / "runs" / "tiny-lora" / "summary.json").read_text())
    assert summary["steps"] == 60 and summary["final_eval_loss"] < summary["base_eval_loss"]
    assert (tmp_path / "runs" / "tiny-lora" / "adapter_model.safetensors").is_file()
    # `make run` again replaces the demo run (resume false + overwrite true) instead of refusing it
    again = finetune_worker("run", "configs/tiny-lora.json", cwd=tmp_path, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
