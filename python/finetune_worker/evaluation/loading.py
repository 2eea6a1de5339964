"""Load a model for inference: a full model directory, or a base plus a peft adapter.

A training job's ``output_dir`` holds an adapter (``adapter_config.json``) and the tokenizer it
trained with, so ``model_path`` may point straight at it: the base is then the adapter's own
``base_model_name_or_path``. The tokenizer comes from the adapter directory when it has one
(training may have set a chat template there), else from the model directory.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from finetune_worker.config.evaluate import ModelSource
from finetune_worker.errors import JobFailed
from finetune_worker.hf import bnb_config, check_causal_lm, load_tokenizer, model_not_found

Warn = Callable[[str], None]

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    device: str
    description: str  # for log events: "base + adapter", quantization, device


def load_for_inference(
    src: ModelSource,
    warn: Warn,
    *,
    model_key: str = "model_path",
    adapter_key: str = "adapter_path",
    model_path: str | None = None,
    adapter_path: str | None = None,
) -> LoadedModel:
    """Load ``src``'s model (or the given paths, for the comparison model) in eval mode."""
    from transformers import AutoModelForCausalLM

    model_dir = src.resolved(model_path or src.model_path)
    adapter_value = adapter_path if model_path is not None else src.adapter_path
    adapter_dir = src.resolved(adapter_value) if adapter_value else None
    if not model_dir.is_dir():
        raise model_not_found(model_key, model_dir)
    if not (model_dir / "config.json").is_file() and (model_dir / "adapter_config.json").is_file():
        if adapter_dir is not None:
            raise JobFailed(
                "invalid_config",
                f"{model_key} '{model_dir}' is an adapter and {adapter_key} names another one",
                hint=f"Point {model_key} at the base model directory, or drop {adapter_key}.",
            )
        adapter_dir, model_dir = model_dir, _adapter_base(model_dir, model_key)
    if adapter_dir is not None and not (adapter_dir / "adapter_config.json").is_file():
        raise JobFailed(
            "model_not_found",
            f"{adapter_key}: no peft adapter at '{adapter_dir}' (adapter_config.json missing)",
            hint="Point it at a training job's output_dir or a directory saved by peft's save_pretrained.",
        )
    check_causal_lm(model_dir, model_key)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = _dtype(src.precision, device, warn)
    kwargs: dict[str, Any] = {"dtype": dtype}
    q = src.quantization
    if q is not None:
        kwargs["quantization_config"] = bnb_config(q, dtype)
        kwargs["device_map"] = {"": torch.cuda.current_device()} if device == "cuda" else "cpu"
    elif device == "cuda":
        kwargs["device_map"] = {"": torch.cuda.current_device()}
    try:
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), **kwargs)
    except OSError as exc:
        raise JobFailed(
            "unsupported_model", f"{model_key} '{model_dir}': cannot load its weights ({exc})"
        ) from exc
    if adapter_dir is not None:
        model = _attach_adapter(model, adapter_dir, adapter_key)
    model.eval()
    model.config.use_cache = True  # training turns the cache off; generation needs it to be fast
    tokenizer = load_tokenizer(
        adapter_dir if adapter_dir is not None and _has_tokenizer(adapter_dir) else model_dir, model_key
    )
    what = f"{model_dir.name} + adapter {adapter_dir.name}" if adapter_dir else model_dir.name
    bits = f", {q.bits}-bit" if q is not None else ""
    return LoadedModel(
        model, tokenizer, device, f"{what} on {device} ({str(dtype).removeprefix('torch.')}{bits})"
    )


def _adapter_base(adapter_dir: Path, key: str) -> Path:
    try:
        base = json.loads((adapter_dir / "adapter_config.json").read_text()).get("base_model_name_or_path")
    except ValueError as exc:
        raise JobFailed(
            "unsupported_model", f"{key}: adapter_config.json in '{adapter_dir}' is not JSON ({exc})"
        ) from exc
    if not base or not Path(base).is_dir():
        raise JobFailed(
            "model_not_found",
            f"{key} '{adapter_dir}' is an adapter whose base model '{base}' is not a local directory",
            hint=f"Set {key} to the base model directory and adapter_path to '{adapter_dir}'.",
        )
    return Path(base)


def _attach_adapter(model: Any, adapter_dir: Path, key: str) -> Any:
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
    except (RuntimeError, ValueError, KeyError) as exc:
        if not (adapter_dir / "adapter_config.json").is_file():  # removed since the checks ran
            raise JobFailed("model_not_found", f"{key}: no peft adapter at '{adapter_dir}' any more") from exc
        # A shape mismatch means the adapter was trained on another base model.
        raise JobFailed(
            "adapter_mismatch",
            f"{key} '{adapter_dir}' does not fit the base model: {type(exc).__name__}: {str(exc)[:300]}",
            hint="Use the base model the adapter was trained on (its adapter_config.json names it).",
        ) from exc


def _dtype(precision: str, device: str, warn: Warn) -> torch.dtype:
    if precision == "auto":
        if device == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if precision in ("fp16", "bf16") and device == "cpu":
        # Half-precision matmuls on CPU are slow or missing; fp32 is the only safe choice there.
        warn(f"precision {precision} needs CUDA; using fp32 on CPU")
        return torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def _has_tokenizer(path: Path | None) -> bool:
    return path is not None and any((path / name).is_file() for name in _TOKENIZER_FILES)
