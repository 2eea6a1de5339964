"""Peers side by side: LLaMA-Factory 0.9.5 (and, where CUDA is present, the GPU-only peers) against the worker.

LLaMA-Factory pins transformers <= 5.6 and peft 0.18, so it gets its own virtualenv under the
bench's work dir, built once with ``pip install llamafactory==0.9.5`` as a user would. Its
resolver picks its own torch (2.14.1 here: its torchaudio 2.11.1 does not load against the
worker's torch 2.13.0, so the two cannot share one); the row names the versions. It trains through its own
``llamafactory-cli train`` with a YAML made for the run: the same model (the small tiny Llama),
the same long-chat rows (alpaca columns, ChatML, loss on the answers only), LoRA r=8 alpha 16
dropout 0.05 on all linear layers, batch 8, the same learning rate, schedule and step count,
padded batches (its default). TRL's ``SFTTrainer`` (T, ``bench.trl_baseline``: its defaults, in
the worker's virtualenv) runs the same work. Order: L W T T W L (L LLaMA-Factory, W the worker
with its defaults), each run its own process. Reported: real tokens/s over ``train()`` (LLaMA-Factory's own
``train_runtime`` and ``num_input_tokens_seen``), whole-process time per real token (spawn to
exit), peak RSS (``wait4``), W/L against issue 15's goal of 1.2x, and W/T. Unsloth and TRL's ``SFTTrainer`` with Liger kernels need
CUDA: without it their rows say so.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from bench import batching
from bench.common import Options, Row, fmt_mib, median, worker_env

PART = "peers"
#: Issue 15's goal: at least this much faster than LLaMA-Factory on the same work, whole process.
GOAL = 1.2
LLAMAFACTORY = "llamafactory==0.9.5"


def llamafactory_venv(work_dir: Path, log: Callable[[str], None]) -> Path:
    """The LLaMA-Factory virtualenv (built on first use); returns its ``llamafactory-cli``."""
    venv = work_dir / "llamafactory-venv"
    cli = venv / "bin" / "llamafactory-cli"
    stamp = venv / ".bench-ready"
    if stamp.is_file() and cli.is_file():
        return cli
    log(f"peers: building {venv} ({LLAMAFACTORY}; a few minutes, once)")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, "--upgrade", "pip"], check=True)
    subprocess.run([*pip, LLAMAFACTORY], check=True)
    stamp.write_text(LLAMAFACTORY + "\n")
    return cli


def _versions(venv: Path) -> str:
    code = (
        "import importlib.metadata as m;"
        "print(', '.join(f'{p} {m.version(p)}' for p in ('llamafactory','torch','transformers','peft')))"
    )
    out = subprocess.run([str(venv / "bin" / "python"), "-c", code], capture_output=True, text=True)
    return out.stdout.strip()


def llamafactory_config(model: Path, data: Path, out: Path, steps: int) -> dict[str, object]:
    """The YAML LLaMA-Factory trains from: the worker's bench settings (``bench.jobs.train_config``)."""
    return {
        "model_name_or_path": str(model),
        "trust_remote_code": False,
        "stage": "sft",
        "do_train": True,
        "finetuning_type": "lora",
        # Its default turns gradient checkpointing on; the worker's is off: compare like with like.
        "disable_gradient_checkpointing": True,
        "lora_rank": 8,
        "lora_alpha": 16,
        "lora_dropout": 0.05,
        "lora_target": "all",
        "dataset": "bench",
        "dataset_dir": str(out.parent / f"{out.name}-data"),
        "template": "chatml",
        "cutoff_len": 1024,
        "overwrite_cache": True,
        "preprocessing_num_workers": 1,
        "dataloader_num_workers": 0,
        "output_dir": str(out),
        "overwrite_output_dir": True,
        "logging_steps": 1,
        "save_strategy": "no",
        "plot_loss": False,
        "report_to": "none",
        "per_device_train_batch_size": 8,
        "gradient_accumulation_steps": 1,
        "learning_rate": 1.0e-3,
        "lr_scheduler_type": "linear",
        "warmup_steps": 0,
        "max_steps": steps,
        "optim": "adamw_torch",
        "seed": 42,
        "disable_tqdm": True,
        "include_num_input_tokens_seen": "non_padding",  # real tokens, as the worker counts them
    }


def run_llamafactory(cli: Path, model: Path, data: Path, out: Path, steps: int) -> batching.Run:
    import yaml

    cfg = llamafactory_config(model, data, out, steps)
    data_dir = Path(str(cfg["dataset_dir"]))
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "dataset_info.json").write_text(json.dumps({"bench": {"file_name": str(data.resolve())}}))
    cfg_path = out.with_suffix(".yaml")
    cfg_path.write_text(yaml.safe_dump(cfg))
    env = worker_env()
    env.pop("PYTHONPATH", None)  # its own packages, not the worker's
    env.update(CUDA_VISIBLE_DEVICES=os.environ.get("CUDA_VISIBLE_DEVICES", ""), DISABLE_VERSION_CHECK="1")
    started = time.monotonic()
    with out.with_suffix(".log").open("w") as log:
        proc = subprocess.Popen(
            [str(cli), "train", str(cfg_path)], cwd=out.parent, env=env, stdout=log, stderr=subprocess.STDOUT
        )
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - started
    code = os.waitstatus_to_exitcode(status)
    results = out / "train_results.json"
    if code != 0 or not results.is_file():
        tail = out.with_suffix(".log").read_text(errors="replace")[-3000:]
        raise RuntimeError(f"llamafactory-cli train failed (exit {code}):\n{tail}")
    r = json.loads(results.read_text())
    tokens = r.get("num_input_tokens_seen")
    if tokens is None:  # where its Trainer keeps the count instead
        state = json.loads((out / "trainer_state.json").read_text())
        tokens = state.get("num_input_tokens_seen")
    return batching.Run("L", int(tokens), float(r["train_runtime"]), wall, usage.ru_maxrss * 1024)


def run(opts: Options) -> list[Row]:
    from transformers import AutoTokenizer

    from bench.data import bench_model, build_dataset

    model = bench_model(opts.work_dir, opts.quick)
    try:
        cli = llamafactory_venv(opts.work_dir, opts.log)
    except (subprocess.CalledProcessError, OSError) as exc:
        return [Row(PART, "LLaMA-Factory 0.9.5", "not run", note=f"its virtualenv could not be built: {exc}")]
    versions = _versions(cli.parent.parent)
    steps, n = (2, 64) if opts.quick else (40, 1200)
    shape = batching.DISTRIBUTIONS["long chat"]
    data = build_dataset(
        opts.work_dir / "data" / f"batching-long-chat-{n}-{model.name}.jsonl",
        AutoTokenizer.from_pretrained(str(model)),
        n=n,
        **shape,  # type: ignore[arg-type]
    )
    mean_len = data.total_tokens / len(data.lengths)
    work = opts.work_dir / "peers"
    runs: dict[str, list[batching.Run]] = {"L": [], "W": [], "T": []}
    for i, variant in enumerate(["L", "W", "T"] if opts.quick else ["L", "W", "T", "T", "W", "L"]):
        out = work / f"{variant.lower()}-{i}"
        if variant == "L":
            result = run_llamafactory(cli, model, data.path, out, steps)
        elif variant == "T":
            result = batching.run_plain(
                model, data.path, out, steps, script="bench.trl_baseline", variant="T"
            )
        else:
            result = batching.run_worker(model, data.path, out, steps, "auto", "W")
        runs[variant].append(result)
        opts.log(
            f"peers: {variant}: {result.tokens_per_s:,.0f} tok/s in train(), {result.wall_s:.1f} s whole "
            f"process, peak RSS {fmt_mib(result.peak_rss)}"
        )
    rows = []
    labels = (
        ("L", f"LLaMA-Factory ({versions})"),
        ("T", f"TRL SFTTrainer, its defaults (trl {_trl_version()}, no Liger kernels here)"),
        ("W", "the worker, packing auto"),
    )
    for variant, label in labels:
        results = runs[variant]
        rows.append(
            Row(
                PART,
                f"long chat: {label}",
                f"{median([r.tokens_per_s for r in results]):,.0f} tok/s",
                f"whole process {median([r.wall_s for r in results]):.1f} s; "
                f"peak RSS {fmt_mib(median([r.peak_rss for r in results]))}",
                note=f"{steps} steps of 8 rows, mean {mean_len:.0f} tokens, LoRA r=8 all-linear, same model",
                data={
                    "tokens_per_s": [r.tokens_per_s for r in results],
                    "wall_s": [r.wall_s for r in results],
                },
            )
        )
    train_ratio, wall_ratio = batching.speed_ratios(runs["L"], runs["W"])
    rows.append(
        Row(
            PART,
            "long chat: worker / LLaMA-Factory speed, train() and whole process",
            f"{train_ratio:.2f}x / {wall_ratio:.2f}x",
            "L W ... W L",
            target=f">= {GOAL}x both",
            met=None if opts.quick else train_ratio >= GOAL and wall_ratio >= GOAL,
            data={"train_ratio": train_ratio, "wall_ratio": wall_ratio},
        )
    )
    train_ratio, wall_ratio = batching.speed_ratios(runs["T"], runs["W"])
    rows.append(
        Row(
            PART,
            "long chat: worker / TRL SFTTrainer speed, train() and whole process",
            f"{train_ratio:.2f}x / {wall_ratio:.2f}x",
            "W T T W",
            target=">= 1.0x both",
            met=None if opts.quick else train_ratio >= 1.0 and wall_ratio >= 1.0,
            data={"train_ratio": train_ratio, "wall_ratio": wall_ratio},
        )
    )
    cuda = _cuda()
    for peer in ("Unsloth", "TRL SFTTrainer + Liger kernels"):
        rows.append(
            Row(
                PART,
                f"{peer}",
                "not run" if not cuda else "see the gpu part",
                note="needs CUDA (its kernels are Triton); this machine has none" if not cuda else "",
            )
        )
    return rows


def _trl_version() -> str:
    import importlib.metadata

    return importlib.metadata.version("trl")


def _cuda() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:
        return False
