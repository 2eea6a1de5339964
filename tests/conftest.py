"""Shared fixtures: the tiny model (built once per session) and the repo paths."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Spinning OpenMP threads make torch on CPU 20-40x slower while other processes share the
# cores (as parallel test runs do); set before any test module imports torch, and inherited
# by the worker processes the harness spawns.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# A record key the wire vocabulary lacks (events.RECORD_KEYS) raises instead of being dropped with
# a log line, in every worker the tests start: a new summary field must be declared.
os.environ.setdefault("FINETUNE_WORKER_STRICT_WIRE", "1")
# Workers the tests spawn import the training stack only when a job needs it: most never train,
# and dozens of background imports would share the 2 cores with the tests. test_warmup.py turns
# the warm-up (the default for users) on.
os.environ.setdefault("FINETUNE_WORKER_WARM", "0")

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
DATA = CONFIGS / "data"
#: validate reads this many rows of each source (data/sources.py PREVIEW_ROWS): a bad row past
#: them is found while the job runs, and fails the job naming it.
PAST_PREVIEW = 150


def rows_with_bad_row(path: Path, bad: dict, at: int = PAST_PREVIEW, rows: int = 200) -> Path:
    """``rows`` Q&A rows of configs/data/qa.jsonl (cycled) in ``path``, row ``at`` (1-based)
    replaced by ``bad``."""
    import json

    good = (DATA / "qa.jsonl").read_text().splitlines()
    lines = [good[i % len(good)] for i in range(rows)]
    lines[at - 1] = json.dumps(bad)
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A freshly built tiny Llama model + tokenizer (deterministic, offline, seconds)."""
    from finetune_worker.testing.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(autouse=True)
def _offline_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    # No model hub is reachable here: fail fast instead of retrying the network.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture
def tmpfs(tmp_path: Path):
    """``tmpfs("600k")``: a mounted tmpfs of that size (a real full disk); skips without mount rights."""
    import subprocess

    mounted: list[Path] = []

    def make(size: str) -> Path:
        mnt = tmp_path / f"tmpfs-{len(mounted)}"
        mnt.mkdir()
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], capture_output=True
        )
        if done.returncode:
            pytest.skip(
                f"cannot mount a tmpfs here (needs root with mount rights): {done.stderr.decode().strip()}"
            )
        mounted.append(mnt)
        return mnt

    yield make
    for mnt in mounted:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
