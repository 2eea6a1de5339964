"""Memory per token: LoRA, 4-bit QLoRA and full fine-tuning, and the chunked loss on a 32k vocabulary.

The model is the "medium" tiny Llama (8 layers, hidden 512, a 32,000-row LM head: ~58M
parameters), so the head's logits are what a real model's are: batch x length x 32k floats.
Each run is ``finetune-worker run`` in its own process, 3 steps of 8 long-chat rows padded
(``packing: pad``, so every run holds the same batch shapes), and its peak RSS read from
``wait4``. Per token: the slope, (peak at batch 8 - peak at batch 2) / (tokens per step at 8 -
at 2), so what the libraries and weights cost is not counted as the batch's. Rows: LoRA, QLoRA
and full with ``chunked_loss`` off (the model's own loss) at both batch sizes, then each of the
three with it on at batch 8; the saving is the difference of the two peaks.
"""

from __future__ import annotations

import json
from pathlib import Path

from bench.common import Options, Row, fmt_mib, run_cli_job

PART = "memory"


def run_once(
    model: Path, data: Path, out: Path, method: str, chunked: bool, steps: int, batch: int = 8
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
            "batch_size": batch,
            "learning_rate": 1e-4,
            "logging_steps": 1,
            "chunked_loss": chunked,
        },
        "max_steps": steps,
        "checkpoint": {"every_steps": 1000},
    }
    if method == "qlora":
        config["quantization"] = {"bits": 4}
    run = run_cli_job(config, out)
    summary = json.loads((out / "summary.json").read_text())
    return run.peak_rss, run.seconds, int(summary["tokens_seen"])


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
    plan = [
        ("lora", False, 2),
        ("lora", False, 8),
        ("lora", True, 8),
        ("qlora", False, 2),
        ("qlora", False, 8),
        ("qlora", True, 8),
        ("full", False, 2),
        ("full", False, 8),
        ("full", True, 8),
    ]
    results: dict[tuple[str, bool, int], tuple[int, float, int]] = {}
    for method, chunked, batch in plan:
        out = work / f"{method}-{'chunked' if chunked else 'plain'}-{batch}"
        results[(method, chunked, batch)] = run_once(model, data.path, out, method, chunked, steps, batch)
        rss, seconds, _ = results[(method, chunked, batch)]
        opts.log(
            f"memory: {method} chunked={chunked} batch {batch}: peak RSS {fmt_mib(rss)}, {seconds:.0f} s"
        )
    rows = []
    labels = {"lora": "LoRA r=8", "qlora": "4-bit QLoRA r=8", "full": "full fine-tuning"}
    for method in ("lora", "qlora", "full"):
        small, big = results[(method, False, 2)], results[(method, False, 8)]
        slope = (big[0] - small[0]) / max((big[2] - small[2]) / steps, 1)
        rows.append(
            Row(
                PART,
                f"{labels[method]}, chunked loss off: peak RSS at batch 8",
                fmt_mib(big[0]),
                f"{slope / 1024:.0f} KiB per token of a batch",
                note=f"{size} model, long-chat rows, {steps} steps; batch 2: {fmt_mib(small[0])}",
                data={"peak_rss": big[0], "peak_rss_batch2": small[0], "bytes_per_token": slope},
            )
        )
    for method in ("lora", "qlora", "full"):
        plain, chunked = results[(method, False, 8)][0], results[(method, True, 8)][0]
        rows.append(
            Row(
                PART,
                f"{labels[method]}: memory the chunked loss saves at batch 8",
                fmt_mib(plain - chunked),
                f"{chunked / plain:.2f}x the peak ({fmt_mib(chunked)})",
                target="< 1.0x" if not opts.quick else "",
                met=(chunked < plain) if not opts.quick else None,
                data={"plain": plain, "chunked": chunked},
            )
        )
    return rows
