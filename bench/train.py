"""Training throughput: plain HF script (A) vs the worker padded (B) vs the worker packing (C).

Same model (the "small" tiny Llama), same data (``bench.data``), same seed, batch 8, LoRA r=8 on
all linear layers, the same number of steps. Each run is its own process, so peak RSS (VmHWM)
is that run's alone: A's script reports its own, B's and C's is read from the worker process
once the job is done. Runs are interleaved (A B C A B C ...) and ratios are taken within a
round, then the median over rounds, since neighbouring runs share the machine's mood.

Throughput counts real (non-pad) tokens, the Trainer's own ``num_input_tokens_seen`` with
``"non_padding"``, over the time ``trainer.train()`` took: A times the call itself; for the
worker it is the time between its ``phase: training`` and ``phase: saving`` events, which
bracket the same call. All three consume the same examples in the same order, so their token
counts must agree, and so must their first-step loss (LoRA's B matrices start at zero, so step
one sees the base model whatever the dropout does); ``bench.losscheck`` compares per-example
losses with trained weights.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from bench import jobs
from bench.common import Options, Row, median, run_baseline

PART = "train"
TARGET_B = 0.97
TARGET_C = 1.6
LOSS_RTOL = 1e-4


@dataclass
class Result:
    variant: str
    tokens: int
    seconds: float
    peak_rss: int
    first_loss: float | None
    steps: int
    peak_gpu: int | None = None

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


def run_script(
    opts: Options,
    model: Path,
    data: Path,
    out: Path,
    *,
    steps: int,
    method: str = "lora",
    extra_args: tuple[str, ...] = (),
    script: str = "bench.hf_baseline",
    variant: str = "A",
) -> Result:
    """Variant A: ``bench.hf_baseline`` in its own process (or a peer's ``script`` that takes the
    same arguments and prints the same result line)."""
    r, _ = run_baseline(script, model, data, out, steps, ("--method", method, *extra_args))
    return Result(
        variant=variant,
        tokens=int(r["tokens_seen"]),
        seconds=float(r["train_seconds"]),
        peak_rss=int(r["peak_rss_bytes"]),
        first_loss=r["losses"][0] if r["losses"] else None,
        steps=int(r["steps"]),
        peak_gpu=r.get("peak_gpu_bytes"),
    )


def run_worker(
    opts: Options,
    model: Path,
    data: Path,
    out: Path,
    *,
    steps: int,
    packing: bool,
    method: str = "lora",
    bits: int | None = None,
) -> Result:
    """Variants B and C: the same job through a freshly spawned worker."""
    config = jobs.train_config(model, data, out, steps=steps, packing=packing, method=method, bits=bits)
    run, rss = jobs.run_in_fresh_worker(config)
    begin, end = run.first("phase", phase="training"), run.first("phase", phase="saving")
    if begin is None or end is None:
        raise RuntimeError(
            f"job {run.job_id}: no training/saving phase events in {[e.type for e in run.events]}"
        )
    summary = run.terminal.payload.get("summary") or {}
    first = next((e for e in run.events if e.type == "metrics" and e.payload.get("step") == 1), None)
    return Result(
        variant="C" if packing else "B",
        tokens=int(summary["tokens_seen"]),
        seconds=end.at - begin.at,
        peak_rss=rss,
        first_loss=(first.payload.get("metrics") or {}).get("loss") if first else None,
        steps=int(summary.get("steps") or 0),
    )


def run(opts: Options) -> list[Row]:
    from transformers import AutoTokenizer

    from bench.data import bench_model, build_dataset, padding_share

    model = bench_model(opts.work_dir, opts.quick)
    dataset = build_dataset(
        opts.work_dir / "data" / f"instructions-{opts.examples}-{model.name}.jsonl",
        AutoTokenizer.from_pretrained(str(model)),
        n=opts.examples,
    )
    data = dataset.path
    opts.log(
        f"train: {opts.examples} examples, {min(dataset.lengths)}-{max(dataset.lengths)} tokens "
        f"(mean {dataset.total_tokens / len(dataset.lengths):.0f}); {opts.rounds} round(s) of "
        f"A B C x {opts.steps} steps"
    )
    runs: dict[str, list[Result]] = {"A": [], "B": [], "C": []}
    work = opts.work_dir / "train"
    for i in range(opts.rounds):
        for variant in ("A", "B", "C"):
            out = work / f"{variant.lower()}-{i}"
            if variant == "A":
                result = run_script(opts, model, data, out, steps=opts.steps)
            else:
                result = run_worker(opts, model, data, out, steps=opts.steps, packing=variant == "C")
            runs[variant].append(result)
            opts.log(
                f"train: round {i + 1} {variant}: {result.tokens_per_s:,.0f} tok/s, "
                f"{result.tokens:,} tokens in {result.seconds:.1f} s, peak RSS {result.peak_rss / 2**20:.0f} MiB"
            )

    rows = [_variant_row(v, runs[v]) for v in ("A", "B", "C")]
    for variant, target in (("B", TARGET_B), ("C", TARGET_C)):
        ratios = [b.tokens_per_s / a.tokens_per_s for a, b in zip(runs["A"], runs[variant], strict=True)]
        ratio = median(ratios)
        rows.append(
            Row(
                PART,
                f"{variant}/A real tokens/s ({'worker overhead' if variant == 'B' else 'packing gain'})",
                f"{ratio:.3f}",
                "per round: " + ", ".join(f"{r:.3f}" for r in ratios),
                target=f">= {target}",
                met=ratio >= target,
                data={"ratio": ratio, "per_round": ratios},
            )
        )
    rows.append(_consistency_row(runs))
    share = padding_share(dataset.lengths, 8)
    rows[0].note = f"padding is {share:.0%} of A's tokens with batches in file order"

    from bench.losscheck import per_example_rows

    rows.extend(per_example_rows(opts, model, data, work / "a-0"))
    rows.extend(_extra_rows(opts, model, data, work))
    return rows


def _variant_row(variant: str, results: list[Result]) -> Row:
    label = {"A": "A plain HF Trainer + peft, padded", "B": "B worker, padded", "C": "C worker, packing"}[
        variant
    ]
    rates = [r.tokens_per_s for r in results]
    return Row(
        PART,
        f"{label}: real tokens/s (median of {len(results)})",
        f"{median(rates):,.0f} tok/s",
        f"peak RSS {median([r.peak_rss for r in results]) / 2**20:,.0f} MiB",
        data={
            "tokens_per_s": rates,
            "peak_rss": [r.peak_rss for r in results],
            "tokens": [r.tokens for r in results],
            "seconds": [r.seconds for r in results],
        },
    )


def _consistency_row(runs: dict[str, list[Result]]) -> Row:
    """Same examples, same order, same start: token counts and first-step losses must agree."""
    tokens = {v: runs[v][0].tokens for v in runs}
    losses = {v: runs[v][0].first_loss for v in runs}
    same_tokens = len(set(tokens.values())) == 1
    base = losses["A"]
    same_loss = base is not None and all(
        loss is not None and abs(loss - base) <= LOSS_RTOL * abs(base) for loss in losses.values()
    )
    return Row(
        PART,
        "A, B, C trained on the same tokens from the same start",
        "first-step loss "
        + ", ".join(f"{v} {loss:.6f}" if loss is not None else f"{v} n/a" for v, loss in losses.items()),
        "real tokens " + ", ".join(f"{v} {t:,}" for v, t in tokens.items()),
        target=f"equal (loss rel. diff <= {LOSS_RTOL:g})",
        met=same_tokens and same_loss,
        data={"tokens": tokens, "first_loss": losses},
    )


def _extra_rows(opts: Options, model: Path, data: Path, work: Path) -> list[Row]:
    """Full fine-tuning and 4-bit QLoRA: the plain script vs the worker (packing), one round each."""
    rows = []
    for method, label in (("full", "full fine-tuning"), ("qlora", "4-bit QLoRA (NF4, double quant)")):
        t0 = time.monotonic()
        a = run_script(opts, model, data, work / f"a-{method}", steps=opts.extra_steps, method=method)
        c = run_worker(
            opts,
            model,
            data,
            work / f"c-{method}",
            steps=opts.extra_steps,
            packing=True,
            method="full" if method == "full" else "lora",
            bits=4 if method == "qlora" else None,
        )
        opts.log(
            f"train: {method} A {a.tokens_per_s:,.0f} / C {c.tokens_per_s:,.0f} tok/s ({time.monotonic() - t0:.0f} s)"
        )
        for r, who in ((a, "A plain script, padded"), (c, "C worker, packing")):
            rows.append(
                Row(
                    PART,
                    f"{label}, {who}: real tokens/s ({opts.extra_steps} steps, 1 run)",
                    f"{r.tokens_per_s:,.0f} tok/s",
                    f"peak RSS {r.peak_rss / 2**20:,.0f} MiB"
                    + (f"; C/A {c.tokens_per_s / a.tokens_per_s:.2f}" if r is c else ""),
                    data={"tokens_per_s": r.tokens_per_s, "peak_rss": r.peak_rss, "tokens": r.tokens},
                )
            )
    return rows
