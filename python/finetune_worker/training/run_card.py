"""What a finished training run leaves for the person who ran it: a filled model card
(``README.md``, replacing peft's blank template) and ready-made job configs for what comes next
(``next/generate.json``, ``next/evaluate.json``, ``next/merge.json`` for an adapter), which the
model card and the terminal's "next steps" both point at."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

from finetune_worker.config.train import LORA_FAMILY, TrainConfig
from finetune_worker.outputs import write_text_atomic
from finetune_worker.training.report import comparison

NEXT_DIR = "next"
CARD = "README.md"


def next_configs(cfg: TrainConfig, out: Path) -> dict[str, dict[str, Any]]:
    """The job configs for this run's next steps, keyed by file stem."""
    base = str(cfg.paths.model)
    adapter = cfg.peft.method != "full"
    model_key: dict[str, Any] = (
        {"model_path": base, "adapter_path": str(out)} if adapter else {"model_path": str(out)}
    )
    if cfg.quantization is not None and adapter:  # a QLoRA run's base loads quantized again
        model_key["quantization"] = cfg.quantization.model_dump(mode="json")
    source = cfg.sources[0]
    held = cfg.evaluation.dataset if cfg.evaluation is not None else None
    dataset: dict[str, Any] = (
        {**held.model_dump(mode="json", exclude_none=True), "path": str(cfg.resolved(held.path))}
        if held is not None
        else {
            "path": str(source.path),
            **({"split": source.split} if source.split else {}),
            **({"file_format": source.file_format} if source.file_format else {}),
        }
    )
    data = cfg.data.model_dump(mode="json", exclude_defaults=True)
    prompt: list[dict[str, str]] = [{"role": "user", "content": "Hello! What can you do?"}]
    configs: dict[str, dict[str, Any]] = {
        "generate": {
            "job": "generate",
            **model_key,
            "prompts": [prompt],
            "max_new_tokens": 128,
            **({"system_prompt": cfg.data.system_prompt} if cfg.data.system_prompt else {}),
            "output_dir": str(out / NEXT_DIR / "generated"),
        },
        "evaluate": {
            "job": "evaluate",
            **model_key,
            "dataset": dataset,
            **({"data": data} if data else {}),
            "max_rows": 50,
            "compare_model_path": base,  # the base model scored the same way: the improvement
            "output_dir": str(out / NEXT_DIR / "evaluated"),
        },
    }
    if cfg.peft.method in LORA_FAMILY | {"ia3"}:  # the adapters merge_lora folds into the base
        configs["merge"] = {
            "job": "merge_lora",
            "base_model_path": base,
            "adapter_path": str(out),
            "output_path": f"{out}-merged",
        }
    return configs


def write_next_configs(cfg: TrainConfig, out: Path) -> dict[str, Path]:
    written = {}
    for name, config in next_configs(cfg, out).items():
        path = out / NEXT_DIR / f"{name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps(config, indent=2) + "\n")
        written[name] = path
    return written


def next_steps(out: Path, weights_key: str) -> list[tuple[str, str]]:
    """``(what, command)`` for a finished run in ``out`` (what its ``next/`` folder holds)."""
    steps: list[tuple[str, str]] = []
    loader = (
        ("load it with peft", "peft", "AutoPeftModelForCausalLM")
        if weights_key == "adapter_path"
        else ("load it with transformers", "transformers", "AutoModelForCausalLM")
    )
    code = f"from {loader[1]} import {loader[2]}; m = {loader[2]}.from_pretrained({json.dumps(str(out))})"
    steps.append((loader[0], f"python -c {shlex.quote(code)}"))
    steps.append(("chat with it", f"finetune-worker chat {shlex.quote(str(out))}"))
    labels = {
        "generate": "generate with it",
        "evaluate": "evaluate it against the base model",
        "merge": "merge the adapter into a standalone model",
    }
    for name, label in labels.items():
        path = out / NEXT_DIR / f"{name}.json"
        if path.is_file():
            steps.append((label, f"finetune-worker run {shlex.quote(str(path))}"))
    return steps


def write_card(cfg: TrainConfig, out: Path, summary: dict[str, Any], weights_key: str) -> Path:
    """A model card filled from the run: base model, data, method, hyperparameters, results, use."""
    tp = cfg.training_parameters
    peft = cfg.peft
    data = summary.get("data") or {}
    adapter = weights_key == "adapter_path"
    tags = ["finetune-worker", peft.method, *(["qlora"] if cfg.quantization else [])]
    front = [
        "---",
        f"base_model: {json.dumps(str(cfg.paths.model))}",
        f"library_name: {'peft' if adapter else 'transformers'}",
        "pipeline_tag: text-generation",
        "tags:",
        *(f"- {t}" for t in tags),
        "---",
        "",
    ]
    lines = [
        f"# {out.name}",
        "",
        f"{'An adapter' if adapter else 'A model'} fine-tuned from `{cfg.model_name}` with "
        f"{_method(cfg)} by finetune-worker, {summary.get('steps')} steps "
        f"({summary.get('epochs')} epochs) on {data.get('train_rows', '?')} rows.",
        "",
        "## Training data",
        "",
        f"| source | rows trained | tokens | share of {'rows' if cfg.preference else 'trained tokens'} |",
        "| --- | ---: | ---: | ---: |",
    ]
    for s in data.get("sources") or []:
        share = s.get("share")
        lines.append(
            f"| `{s.get('name')}` | {s.get('sequences')} | {s.get('tokens', '-')} | "
            f"{'' if share is None else f'{100 * share:.1f}%'} |"
        )
    lines += [
        "",
        f"{data.get('eval_rows', 0)} rows held out; sequences up to {cfg.data.max_seq_length} tokens "
        f"({data.get('truncated', 0)} truncated); loss on {_trained(cfg)}.",
        "",
        "## Hyperparameters",
        "",
        "| setting | value |",
        "| --- | --- |",
    ]
    settings: list[tuple[str, Any]] = [
        ("method", _method(cfg)),
        ("learning rate", tp.learning_rate),
        ("schedule", f"{tp.lr_scheduler}, warmup {tp.warmup_steps}"),
        ("batch size", f"{tp.batch_size} x {tp.gradient_accumulation_steps} accumulation"),
        ("epochs / max steps", f"{tp.epochs} / {cfg.max_steps or '-'}"),
        ("optimizer", tp.optimizer),
        ("weight decay", tp.weight_decay),
        ("precision", tp.precision),
        ("seed", cfg.seed),
    ]
    lines += [f"| {k} | {v} |" for k, v in settings]
    lines += ["", "## Results", "", "| metric | base | fine-tuned |", "| --- | ---: | ---: |"]
    lines += [f"| {name} | {_num(base)} | {_num(tuned)} |" for name, base, tuned in comparison(summary)]
    lines += ["", f"Training loss over the run: {_num(summary.get('train_loss'))}.", "", "## Use", ""]
    for what, command in next_steps(out, weights_key):
        lines += [f"- {what}:", "", "  ```sh", f"  {command}", "  ```", ""]
    lines += ["Curves, sample answers and the resolved config: `report.html` in this folder.", ""]
    path = out / CARD
    write_text_atomic(path, "\n".join(front + lines))
    return path


def _method(cfg: TrainConfig) -> str:
    peft = cfg.peft
    if peft.method == "full":
        method = "full fine-tuning"
    else:
        detail = f"r={peft.r}, alpha={peft.alpha}" if peft.method in LORA_FAMILY else ""
        bits = f", {cfg.quantization.bits}-bit base" if cfg.quantization else ""
        method = f"{peft.method}{f' ({detail}{bits})' if detail or bits else ''}"
    if cfg.preference is not None:
        method += f", {cfg.preference.method.upper()} (beta {cfg.preference.kl_beta:g})"
    return method


def _trained(cfg: TrainConfig) -> str:
    if cfg.preference is not None:
        return {
            "preference": "the preferred vs the rejected answers",
            "unpaired_preference": "answers labelled desirable or not",
            "prompts": "its own sampled answers, ranked by their rewards",
        }[cfg.preference.row_format]
    return "the responses only" if cfg.data.train_on_responses_only else "every token"


def _num(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "-"
