"""Smoke test of ``make bench``: every part runs in ``--quick`` mode and yields the rows it promises.

Quick mode measures nothing worth reading (tiny sizes, a loaded CI machine), so nothing here
looks at a timing. What is asserted is what must hold on any machine: each part's rows exist,
the event stream arrives complete and in order, the plain script and the worker train on the
same tokens from the same start, packing leaves per-example losses unchanged, and the results
land in the markdown file with the machine and versions.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

#: part -> substrings that must each name at least one row of that part.
EXPECTED = {
    "codec": [
        "encode event",
        "decode event",
        "encode status",
        "decode status",
        ": finetune_worker.wire",
        ": erlang_py",
        ": OTP term_to_binary",
        ": OTP binary_to_term",
    ],
    "framing": [
        "write_frame (worker -> BEAM), 1 MiB",
        "write_frame (worker -> BEAM), 8 MiB",
        "write_frame (worker -> BEAM), 64 MiB",
        "read_frame (BEAM -> worker), 1 MiB",
        "read_frame (BEAM -> worker), 64 MiB",
        "calibration",
    ],
    "startup": [
        "spawn -> first info reply",
        "submit -> first progress, tiny model, fresh worker, --no-warm",
        "warm-up on, submitted right after the first info",
        "warm-up on, submitted once info says ready",
        "same worker",
    ],
    "latency": ["status round trip, worker idle", "status round trip, while training"],
    "events": ["events delivered to a reader that keeps up", "slow reader"],
    "train": [
        "A plain HF Trainer + peft, padded",
        "B worker, padded",
        "C worker, packing",
        "B/A real tokens/s",
        "C/A real tokens/s",
        "same tokens from the same start",
        "per-example loss",
        "full fine-tuning, A",
        "full fine-tuning, C",
        "4-bit QLoRA (NF4, double quant), A",
        "4-bit QLoRA (NF4, double quant), C",
    ],
    "batching": [
        "measured fp32 matmul peak",
        "long chat: A plain HF Trainer",
        "long chat: W worker, packing auto",
        "long chat: W/A speed",
        "short Q&A: W/A speed",
        "short Q&A: issue 15's goal, whole process",
    ],
    "memory": [
        "LoRA r=8, chunked loss off: peak RSS",
        "4-bit QLoRA r=8: memory the chunked loss saves",
        "full fine-tuning: memory the chunked loss saves",
    ],
    "data": ["peak anonymous RSS, training on 1,000 rows", "peak anonymous RSS, training on 5,000 rows"],
    "gpu": ["lora, A plain script", "lora, B worker runner", "lora, C worker runner", "full, C", "qlora, C"],
}


@pytest.fixture(scope="module")
def work_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bench-work")


def run_bench(part: str, work_dir: Path, out: Path, record: Path) -> dict:
    cmd = [sys.executable, "-m", "bench.run", "--part", part, "--quick", "--work-dir", str(work_dir)]
    cmd += ["--json", str(out), "--record", str(record)]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")  # the gpu part's CPU dry run, even on a GPU box
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"bench.run --part {part} failed:\n{proc.stderr[-4000:]}"
    return json.loads(out.read_text())


# The gpu part's CPU dry run trains seven toy runs, and the train part trains A/B/C twice: each
# takes minutes on 2 cores, and the training tests cover the same code, so they wait for
# `make test-slow`.
SLOW_PARTS = {"gpu", "train", "batching", "memory", "peers"}
PARTS = [pytest.param(p, marks=pytest.mark.slow) if p in SLOW_PARTS else p for p in EXPECTED]


@pytest.mark.parametrize("part", PARTS)
def test_part_yields_its_rows(part: str, work_dir: Path, tmp_path: Path) -> None:
    record = tmp_path / "BENCHMARKS.md"
    result = run_bench(part, work_dir, tmp_path / "out.json", record)
    rows = result["rows"]
    assert rows and all(r["part"] == part for r in rows)
    assert not [r for r in rows if r["name"] == "ERROR"]
    names = [r["name"] for r in rows]
    for expected in EXPECTED[part]:
        assert any(expected in name for name in names), f"no {part} row names {expected!r}; rows: {names}"

    text = record.read_text()
    assert text.startswith("# Benchmarks")
    assert "quick mode" in text and "--part " + part in text
    assert "- Machine: " in text and "cores" in text and "transformers " in text
    for name in names:
        assert name.replace("|", "\\|") in text

    by_name = {r["name"]: r for r in rows}
    if part == "events":
        slow = next(r for n, r in by_name.items() if n.startswith("slow reader"))
        assert slow["value"] == "all in order, none lost"
        assert slow["data"]["progress"] == slow["data"]["metrics"] == 1000
        fast = next(r for n, r in by_name.items() if n.startswith("events delivered"))
        assert fast["compare"] == "all in order, none lost"
    if part == "train":
        same = next(r for n, r in by_name.items() if "same tokens from the same start" in n)
        assert same["met"], same  # same examples, same order, same first-step loss
        loss = next(r for n, r in by_name.items() if n.startswith("per-example loss"))
        assert loss["met"], loss  # packing leaves each example's loss unchanged
    if part == "framing":
        assert sum(1 for r in rows if r["met"] is not None) == 2  # one linearity verdict per direction


def test_unknown_part_is_refused() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bench.run", "--part", "codec,warp", "--no-record"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "unknown part(s) warp" in proc.stderr
