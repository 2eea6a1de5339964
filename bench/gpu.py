"""GPU part: the throughput matrix on a ~1B-parameter Llama in bf16 with sdpa, plus 4-bit QLoRA.

The model is built from a config (TinyLlama-1.1B's shape, random weights: speed does not care)
and uses the tiny model's tokenizer, so the dataset is the CPU part's. A is the plain script
(``--precision bf16``) in its own process; B and C run the worker's job runner and training code
*in this process* (a ``JobManager`` with a sink instead of a port), because peak GPU memory,
``torch.cuda.max_memory_allocated``, can only be read from inside the process that trains; the
port's cost is what the CPU part's B/A measures. MFU counts 4N FLOPs per token for adapters on
a frozen base and 6N for full fine-tuning (N: parameters in matmuls, i.e. all but the input
embedding), plus 12·layers·hidden·T for attention with T = sum(len²)/sum(len) of the examples.

Without CUDA the part is skipped; in ``--quick`` mode it then runs the same code on the CPU with
a toy config, so the path stays tested.
"""

from __future__ import annotations

import gc
import os
import threading
import time
from pathlib import Path
from typing import Any

from bench.common import Options, Row, median
from bench.train import Result, run_script

PART = "gpu"

#: Dense bf16 tensor-core peaks (no sparsity), by device-name substring, most specific first.
PEAK_BF16_FLOPS = [
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
]

LLAMA_1B = dict(
    vocab_size=32000,
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=22,
    num_attention_heads=32,
    num_key_value_heads=4,
    max_position_embeddings=2048,
)
TOY = dict(
    vocab_size=1024,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=2048,
)


def peak_flops(device_name: str) -> float | None:
    override = os.environ.get("BENCH_GPU_PEAK_TFLOPS")
    if override:
        return float(override) * 1e12
    for key, flops in PEAK_BF16_FLOPS:
        if key in device_name:
            return flops
    return None


def flops_per_token(n_matmul: int, layers: int, hidden: int, t_eff: float, full: bool) -> float:
    return (6 if full else 4) * n_matmul + 12 * layers * hidden * t_eff


def build_model(out: Path, shape: dict[str, int], tokenizer_dir: Path, cuda: bool) -> tuple[Path, int]:
    """A random-weight Llama of ``shape`` saved in bf16 with the tiny tokenizer; returns (path, N in matmuls)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    config = LlamaConfig(
        **shape,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if not (out / "config.json").is_file():
        torch.manual_seed(0)
        with torch.device("cuda" if cuda else "cpu"):
            model = LlamaForCausalLM(config).to(torch.bfloat16)
        model.save_pretrained(str(out))
        tokenizer.save_pretrained(str(out))
        del model
    with torch.device("meta"):
        meta = LlamaForCausalLM(config)
    n_matmul = sum(p.numel() for name, p in meta.named_parameters() if "embed_tokens" not in name)
    return out, n_matmul


def run_in_process(config: dict[str, Any], cuda: bool, timeout: float = 3600) -> Result:
    """One train job through the worker's JobManager and training code, in this process."""
    import torch

    from finetune_worker.config import parse_job_config
    from finetune_worker.server.jobs import JobManager

    events: list[tuple[float, Any]] = []
    done = threading.Event()

    def sink(record: Any, event: Any) -> None:
        events.append((time.perf_counter(), event))
        if event.terminal:
            done.set()

    kind, model = parse_job_config(config)
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    manager = JobManager(sink)
    try:
        manager.submit(kind, model)
        if not done.wait(timeout):
            raise TimeoutError(f"the in-process train job did not finish within {timeout} s")
    finally:
        manager.close(grace_s=30)
    last = events[-1][1]
    if last.type != "completed":
        raise RuntimeError(f"in-process train job ended {last.type}: {last.payload}")
    phase = {e.payload.get("phase"): t for t, e in events if e.type == "phase"}
    first = next((e for _, e in events if e.type == "metrics" and e.payload.get("step") == 1), None)
    summary = last.payload["summary"]
    return Result(
        variant="B" if config["data"]["packing"] == "pad" else "C",
        tokens=int(summary["tokens_seen"]),
        seconds=phase["saving"] - phase["training"],
        peak_rss=0,
        first_loss=(first.payload.get("metrics") or {}).get("loss") if first else None,
        steps=int(summary["steps"]),
        peak_gpu=torch.cuda.max_memory_allocated() if cuda else None,
    )


def run(opts: Options) -> list[Row]:
    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not opts.quick:
        return [
            Row(PART, "GPU matrix (1.1B Llama, bf16, sdpa; LoRA, full, QLoRA)", "skipped: no CUDA device")
        ]
    from transformers import AutoTokenizer

    from bench import jobs
    from bench.data import bench_model, build_dataset

    tokenizer_dir = bench_model(opts.work_dir, opts.quick)
    shape = LLAMA_1B if cuda else TOY
    model, n_matmul = build_model(
        opts.work_dir / ("llama-1b" if cuda else "gpu-toy"), shape, tokenizer_dir, cuda
    )
    info = build_dataset(
        opts.work_dir / "data" / f"instructions-{opts.examples}-{tokenizer_dir.name}.jsonl",
        AutoTokenizer.from_pretrained(str(tokenizer_dir)),
        n=opts.examples,
    )
    t_eff = sum(n * n for n in info.lengths) / info.total_tokens
    device = torch.cuda.get_device_name(0) if cuda else "CPU dry run (no CUDA)"
    peak = peak_flops(device) if cuda else None
    layers, hidden = shape["num_hidden_layers"], shape["hidden_size"]
    work = opts.work_dir / "gpu"
    precision = "bf16" if cuda else "fp32"
    rounds, steps = (opts.rounds, opts.steps) if cuda else (1, 2)

    def worker(method: str, packing: bool | str, bits: int | None, tag: str) -> Result:
        config = jobs.train_config(
            model, info.path, work / tag, steps=steps, packing=packing, method=method, bits=bits
        )
        config["training_parameters"]["precision"] = precision
        return run_in_process(config, cuda)

    matrix: list[tuple[str, str, Any]] = []
    for i in range(rounds):
        matrix.append(("A", "lora", lambda i=i: run_script(
            opts, model, info.path, work / f"a-{i}", steps=steps, extra_args=("--precision", precision))))  # fmt: skip
        matrix.append(("B", "lora", lambda i=i: worker("lora", False, None, f"b-{i}")))
        matrix.append(("C", "lora", lambda i=i: worker("lora", "auto", None, f"c-{i}")))
    for method in ("full", "qlora"):
        matrix.append(("A", method, lambda m=method: run_script(
            opts, model, info.path, work / f"a-{m}", steps=steps, method=m, extra_args=("--precision", precision))))  # fmt: skip
        matrix.append(("C", method, lambda m=method: worker(
            "full" if m == "full" else "lora", "auto", 4 if m == "qlora" else None, f"c-{m}")))  # fmt: skip

    if cuda:  # a peer on the same work (Unsloth is not in the bench: it needs its own install)
        matrix.append(("T", "lora", lambda: run_script(
            opts, model, info.path, work / "t-liger", steps=steps, script="bench.trl_baseline", variant="T",
            extra_args=("--precision", precision, "--liger"))))  # fmt: skip

    results: dict[tuple[str, str], list[Result]] = {}
    failed: list[Row] = []
    for variant, method, fn in matrix:
        if variant == "T":
            try:
                r = fn()
            except Exception as exc:  # a peer that does not install or run here: its row says why
                failed.append(Row(PART, "TRL SFTTrainer + Liger kernels", "failed", note=str(exc)[-300:]))
                continue
        else:
            r = fn()
        results.setdefault((variant, method), []).append(r)
        opts.log(f"gpu: {variant} {method}: {r.tokens_per_s:,.0f} tok/s, peak GPU {_gib(r.peak_gpu)}")

    rows = []
    names = {
        "A": "A plain script, padded",
        "B": "B worker runner, padded",
        "C": "C worker runner, packing auto",
        "T": "T TRL SFTTrainer + Liger kernels, its defaults",
    }
    for (variant, method), rs in results.items():
        rate = median([r.tokens_per_s for r in rs])
        fpt = flops_per_token(n_matmul, layers, hidden, t_eff, full=method == "full")
        mfu = rate * fpt / peak if peak else None
        rows.append(
            Row(
                PART,
                f"{method}, {names[variant]} ({device}, {precision}, {steps} steps x {len(rs)})",
                f"{rate:,.0f} tok/s",
                f"peak GPU memory {_gib(median([r.peak_gpu or 0 for r in rs]) if cuda else None)}, "
                f"MFU {f'{mfu:.1%}' if mfu is not None else 'n/a'}",
                data={"tokens_per_s": [r.tokens_per_s for r in rs], "mfu": mfu, "flops_per_token": fpt},
            )
        )
    base = median([r.tokens_per_s for r in results[("A", "lora")]])
    for variant in ("B", "C"):
        ratio = median([r.tokens_per_s for r in results[(variant, "lora")]]) / base
        goal = variant == "C" and cuda  # issue 15: >= 2x HF + peft LoRA (Unsloth's published claim)
        rows.append(
            Row(
                PART,
                f"{variant}/A real tokens/s, LoRA ({device})",
                f"{ratio:.3f}",
                target=">= 2.0" if goal else "",
                met=ratio >= 2.0 if goal else None,
            )
        )
    if cuda and peak:
        fpt = flops_per_token(n_matmul, layers, hidden, t_eff, full=False)
        mfu = median([r.tokens_per_s for r in results[("C", "lora")]]) * fpt / peak
        rows.append(
            Row(
                PART,
                f"MFU, LoRA, the worker ({device}, bf16)",
                f"{mfu:.1%}",
                target=">= 40%",
                met=mfu >= 0.40,
            )
        )
    if ("T", "lora") in results:
        ratio = median([r.tokens_per_s for r in results[("C", "lora")]]) / median(
            [r.tokens_per_s for r in results[("T", "lora")]]
        )
        rows.append(Row(PART, f"C/T real tokens/s, LoRA: worker / TRL + Liger ({device})", f"{ratio:.3f}"))
    rows.extend(failed)
    rows.append(
        Row(PART, "model", f"{n_matmul / 1e9:.2f} B parameters in matmuls", f"T_eff {t_eff:.0f} tokens")
    )
    return rows


def _gib(n: float | None) -> str:
    return f"{n / 2**30:.2f} GiB" if n else "n/a"
