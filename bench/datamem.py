"""Data memory: peak resident memory of a training run on 100k rows against 2M rows of JSONL.

The worker streams its data (``training/data.py``): rows are checked, then tokenized into Arrow
files that the Trainer memory-maps, so the memory the process owns should not grow with the
number of rows. That is its anonymous resident memory (``RssAnon``, sampled every 50 ms), the
target's measure. The total peak RSS (``ru_maxrss``) is reported beside it: it also counts the
pages of the memory-mapped cache that reading rows has mapped in, clean page cache the kernel
takes back under pressure; on this kernel (6.18, large page-cache folios) one random row maps
2-3 MiB of its file, so the total grows with the rows read, not with the file. Each
run is ``finetune-worker run`` in its own process, on the tiny model, a few steps, its peak RSS
(``ru_maxrss``) read from ``wait4`` when it exits. The rows are users' shape: mostly short Q&A,
with a long-tailed share of multi-turn conversations (the longest a few thousand characters),
and a small held-out split. Order A B A (100k, 2M, 100k): peak RSS is not noisy the way timings
are, but the repeat shows it is the row count and not the machine that moves it.
"""

from __future__ import annotations

import json
import math
import os
import random
from pathlib import Path

from bench.common import Options, Row, fmt_mib, run_cli_job

PART = "data"
#: Peak RSS of the 2M-row run over the 100k-row run's: 20 times the rows, at most 1.25 times the memory.
TARGET = 1.25
_WORDS = [
    "the",
    "village",
    "river",
    "morning",
    "bread",
    "market",
    "teacher",
    "garden",
    "winter",
    "story",
    "letter",
    "window",
    "road",
    "mountain",
    "lamp",
    "harvest",
    "friend",
    "evening",
    "table",
    "music",
    "school",
    "bridge",
    "forest",
    "ship",
    "light",
    "house",
]


def _sentence(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(words)).capitalize() + "."


def write_rows(path: Path, n: int, seed: int = 0) -> Path:
    """``n`` rows of JSONL (written once per size): 85% short Q&A, 15% conversations whose
    length is log-uniform between 2 and 24 turns of 5 to 60 words."""
    if path.is_file():
        return path
    rng = random.Random(seed)
    tmp = path.with_suffix(".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    with tmp.open("w", encoding="utf-8") as f:
        for i in range(n):
            if rng.random() < 0.85:
                row: dict[str, object] = {
                    "question": f"Question {i}: {_sentence(rng, rng.randint(4, 12))}",
                    "answer": _sentence(rng, rng.randint(3, 20)),
                }
            else:
                turns = int(math.exp(rng.uniform(math.log(2), math.log(24))))
                messages = []
                for t in range(turns):
                    messages.append(
                        {
                            "role": "user" if t % 2 == 0 else "assistant",
                            "content": _sentence(rng, rng.randint(5, 60)),
                        }
                    )
                if messages[-1]["role"] != "assistant":
                    messages.append({"role": "assistant", "content": _sentence(rng, 8)})
                row = {"messages": messages}
            f.write(json.dumps(row) + "\n")
    os.replace(tmp, path)
    return path


def run_once(model: Path, data: Path, out: Path, steps: int) -> tuple[int, int, float]:
    """``(peak anonymous RSS, peak total RSS, seconds)`` of one ``finetune-worker run`` on ``data``."""
    config = {
        "model_name": str(model),
        "output_dir": str(out),
        "overwrite": True,
        "resume": False,
        "dataset": {"path": str(data), "validation_split": 0.0005},
        "data": {"max_seq_length": 256},
        "training_parameters": {"batch_size": 8, "learning_rate": 1e-3, "logging_steps": 1},
        "max_steps": steps,
        "checkpoint": {"every_steps": 1000},
    }
    run = run_cli_job(config, out)
    return run.peak_anon, run.peak_rss, run.seconds


def run(opts: Options) -> list[Row]:
    from bench.data import bench_model

    model = bench_model(opts.work_dir, quick=True)  # the tiny model: data handling is what is measured
    small, large = (1_000, 5_000) if opts.quick else (100_000, 2_000_000)
    steps = 2 if opts.quick else 5
    opts.log(f"data: writing {small:,} and {large:,} rows of JSONL (once)")
    files = {n: write_rows(opts.work_dir / "data" / f"rows-{n}.jsonl", n) for n in (small, large)}
    results: dict[int, list[tuple[int, int, float]]] = {small: [], large: []}
    for i, n in enumerate((small, large, small)):
        opts.log(f"data: run {i + 1}/3 on {n:,} rows")
        results[n].append(run_once(model, files[n], opts.work_dir / "datamem" / f"run-{i}-{n}", steps))
    small_anon = max(r[0] for r in results[small])
    large_anon, large_total, large_s = results[large][0]
    small_total = max(r[1] for r in results[small])
    ratio = large_anon / small_anon
    size_mib = files[large].stat().st_size / 2**20
    return [
        Row(
            PART,
            f"peak anonymous RSS, training on {small:,} rows",
            fmt_mib(small_anon),
            note=f"runs {', '.join(fmt_mib(r[0]) for r in results[small])}; total RSS with the mapped "
            f"cache {fmt_mib(small_total)}; {results[small][0][2]:.0f} s each (tokenizing included), {steps} steps",
            data={
                "rows": small,
                "peak_anon": [r[0] for r in results[small]],
                "peak_rss": [r[1] for r in results[small]],
            },
        ),
        Row(
            PART,
            f"peak anonymous RSS, training on {large:,} rows",
            fmt_mib(large_anon),
            compare=f"{ratio:.2f}x the {small:,}-row run",
            target=f"<= {TARGET}x",
            met=ratio <= TARGET,
            note=f"JSONL of {size_mib:.0f} MiB; total RSS with the mapped cache {fmt_mib(large_total)} "
            f"({large_total / small_total:.2f}x); {large_s:.0f} s (tokenizing included)",
            data={
                "rows": large,
                "peak_anon": large_anon,
                "peak_rss": large_total,
                "ratio": ratio,
                "seconds": large_s,
            },
        ),
    ]
