"""Memory per token: LoRA, 4-bit QLoRA and full fine-tuning, and the chunked loss on a 32k vocabulary.

The model is the "medium" tiny Llama (8 layers, hidden 512, a 32,000-row LM head: ~58M
parameters), so the head's logits are what a real model's are: batch x length x 32k floats.
Each run is ``finetune-worker run`` in its own process, 3 steps of 8 long-chat rows padded
(``packing: pad``, so every run holds the same batch shapes), and its peak RSS read from
``wait4``. Per token: the run's peak RSS over the real tokens of its largest batch. Rows:
LoRA, QLoRA and full with ``chunked_loss`` off (the model's own loss), then LoRA and full with
it on; the saving is the difference of the two peaks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench.common import REPO, Options, Row, fmt_mib, worker_env

PART = "memory"


def run_once(
    model: Path, data: Path, out: Path, method: str, chunked: bool, steps: int
) -> tuple[int, float, int]:
    """``(peak RSS bytes, seconds, real tokens)`` of one run."""
    peft = {"method": "full"} if method == "full" else {"method": "lora", "r": 8, "alpha": 16}
    config: dict[str, object] = {
        "model_name": str(model),
        "output_dir": str(out),
        "overwrite": True,
        "resume": False,
        "dataset": {"path": str(data), "validation_split": 0},
        "data": {"format": "instruction", "max_seq_length": 1024, "packing": "pad"},
        "peft": peft,
        "training_parameters": {
            "batch_size": 8,
            "learning_rate": 1e-4,
            "logging_steps": 1,
            "chunked_loss": chunked,
        },
        "max_steps": steps,
        "checkpoint": {"every_steps": 1000},
    }
    if method == "qlora":
        config["quantization"] = {"bits": 4}
    cfg_path = out.with_suffix(".json")
    cfg_path.parent.mkdir(parents=True, exist_ok=True)
    cfg_path.write_text(json.dumps(config))
    started = time.monotonic()
    with out.with_suffix(".log").open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "finetune_worker", "run", str(cfg_path), "--json"],
            cwd=REPO,
            env=worker_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.monotonic() - started
    if os.waitstatus_to_exitcode(status) != 0:
        tail = out.with_suffix(".log").read_text(errors="replace")[-3000:]
        raise RuntimeError(f"the {method} run failed:\n{tail}")
    summary = json.loads((out / "summary.json").read_text())
    return usage.ru_maxrss * 1024, seconds, int(summary["tokens_seen"])


def run(opts: Options) -> list[Row]:
    from transformers import AutoTokenizer

    from bench import batching
    from bench.data import build_dataset
    from finetune_worker.testing.tiny import build_tiny_model

    size = "tiny" if opts.quick else "medium"
    model = build_tiny_model(opts.work_dir / f"{size}-model", size=size)  # type: ignore[arg-type]
    steps = 1 if opts.quick else 3
    data = build_dataset(
        opts.work_dir / "data" / f"memory-long-chat-{model.name}-{size}.jsonl",
        AutoTokenizer.from_pretrained(str(model)),
        n=64,
        **batching.DISTRIBUTIONS["long chat"],  # type: ignore[arg-type]
    )
    work = opts.work_dir / "memory"
    plan = [("lora", False), ("lora", True), ("qlora", False), ("full", False), ("full", True)]
    results: dict[tuple[str, bool], tuple[int, float, int]] = {}
    for method, chunked in plan:
        results[(method, chunked)] = run_once(
            model, data.path, work / f"{method}-{'chunked' if chunked else 'plain'}", method, chunked, steps
        )
        rss, seconds, tokens = results[(method, chunked)]
        opts.log(
            f"memory: {method} chunked={chunked}: peak RSS {fmt_mib(rss)}, {seconds:.0f} s, {tokens} tokens"
        )
    rows = []
    labels = {"lora": "LoRA r=8", "qlora": "4-bit QLoRA r=8", "full": "full fine-tuning"}
    for (method, chunked), (rss, _, tokens) in results.items():
        per_token = rss / max(tokens / steps, 1)  # tokens per step ~ the largest batch's
        rows.append(
            Row(
                PART,
                f"{labels[method]}, chunked loss {'on' if chunked else 'off'}: peak RSS",
                fmt_mib(rss),
                f"{per_token / 1024:.0f} KiB per real token of a batch",
                note=f"{size} model, batch 8 long-chat rows, {steps} steps",
                data={"peak_rss": rss, "tokens": tokens},
            )
        )
    for method in ("lora", "full"):
        plain, chunked = results[(method, False)][0], results[(method, True)][0]
        rows.append(
            Row(
                PART,
                f"{labels[method]}: memory the chunked loss saves",
                fmt_mib(plain - chunked),
                f"{chunked / plain:.2f}x the peak",
                target="< 1.0x" if not opts.quick else "",
                met=(chunked < plain) if not opts.quick else None,
                data={"plain": plain, "chunked": chunked},
            )
        )
    return rows
