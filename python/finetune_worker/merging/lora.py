"""The ``merge_lora`` job: fold a peft adapter into its base and save a standalone model.

Reads top to bottom: cheap checks, load the base *unquantized* in the chosen precision (a QLoRA
adapter included: merging into a 4-bit base would re-quantize the sum, FACTS.md), check that
the adapter fits, apply it, merge module by module (progress and cancel between modules), then
save model and tokenizer into a staging directory that is renamed onto ``output_path`` only
once complete. The result loads with ``AutoModelForCausalLM.from_pretrained`` and needs no peft.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any

from finetune_worker.config.merge import MergeLoraConfig
from finetune_worker.context import JobContext
from finetune_worker.errors import JobFailed
from finetune_worker.merging import compat
from finetune_worker.outputs import StagedOutput, check_destination, count_tensors, dir_size

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def run(ctx: JobContext) -> dict[str, Any]:
    cfg: MergeLoraConfig = ctx.config
    started = time.monotonic()
    base_dir = cfg.resolved(cfg.base_model_path)
    adapter_dir = cfg.resolved(cfg.adapter_path)
    out = cfg.resolved(cfg.output_path)
    if not (base_dir / "config.json").is_file():
        raise JobFailed(
            "model_not_found",
            f"base_model_path: no model (config.json) at '{base_dir}'",
            hint="Point base_model_path at a local transformers model directory.",
        )
    if not (adapter_dir / "adapter_config.json").is_file():
        raise JobFailed(
            "model_not_found",
            f"adapter_path: no peft adapter (adapter_config.json) at '{adapter_dir}'",
            hint="Point adapter_path at a training run's output_dir or another peft adapter directory.",
        )
    inputs = [("base_model_path", base_dir), ("adapter_path", adapter_dir)]
    check_destination(out, overwrite=cfg.overwrite, key="output_path", inputs=inputs)
    model, merged_modules = fold_adapter(ctx, base_dir, adapter_dir, cfg.precision)

    ctx.phase("saving")
    with StagedOutput(out, overwrite=cfg.overwrite, key="output_path", inputs=inputs) as stage:
        assert stage.path is not None
        model.save_pretrained(str(stage.path))
        tokenizer_from = save_tokenizer(adapter_dir, base_dir, stage.path)
        ctx.check_cancelled(step=merged_modules)
        stage.publish()
    summary = {
        "size_bytes": dir_size(out),
        "dtype": cfg.precision,
        "tensors": count_tensors(out),
        "merged_modules": merged_modules,
        "runtime_s": round(time.monotonic() - started, 3),
        "base_model_path": str(base_dir),
        "adapter_path": str(adapter_dir),
        "tokenizer_from": tokenizer_from,
    }
    return {"outputs": {"output_path": str(out), "model_path": str(out)}, "summary": summary}


def fold_adapter(ctx: JobContext, base_dir: Path, adapter_dir: Path, precision: str) -> tuple[Any, int]:
    """The base in ``precision`` with the adapter merged into its weights, in memory, and the number
    of modules merged: the checks, phases ``loading`` and ``merging``, progress and cancel of this
    job, for any job that needs a merged model (``export`` too)."""
    base_cfg = compat.read_json(base_dir / "config.json")
    adapter_cfg = compat.read_json(adapter_dir / "adapter_config.json")
    for warning in compat.check_config(adapter_cfg, base_cfg, base_dir):
        ctx.log(warning, level="warning")

    ctx.phase("loading")
    model = load_base(ctx, precision, base_dir, base_cfg, adapter_dir)
    ctx.check_cancelled()
    shapes = compat.adapter_shapes(adapter_dir)
    rows = int(model.get_input_embeddings().weight.shape[0])
    resize = compat.resized_vocab(adapter_dir, rows, shapes)
    if resize is not None:
        ctx.log(
            f"the adapter extends the vocabulary: resizing the base's embeddings from {rows} to {resize} rows"
        )
        model.resize_token_embeddings(resize)
        base_cfg = {**base_cfg, "vocab_size": resize}
        rows = resize
    compat.check_shapes(model, shapes, adapter_cfg, base_cfg)
    compat.check_vocab(adapter_dir, rows)
    model = apply_adapter(model, adapter_dir)

    ctx.phase("merging")
    merged_modules = merge_modules(ctx, model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "already merged" for every module merged above
        model = model.merge_and_unload(safe_merge=True)  # folds modules_to_save / trainable tokens too
    ctx.check_cancelled(step=merged_modules)
    return model, merged_modules


def load_base(
    ctx: JobContext, precision: str, base_dir: Path, base_cfg: dict[str, Any], adapter_dir: Path
) -> Any:
    """The base in ``precision`` on the CPU, never quantized (a pre-quantized base is dequantized)."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, DTYPES[precision])
    trained_cfg = (compat.read_json(adapter_dir / "summary.json").get("config") or {}).get("quantization")
    if trained_cfg:
        ctx.log(
            f"the adapter was trained on a {trained_cfg.get('bits', '?')}-bit base (QLoRA); merging it into the "
            f"unquantized base in {precision}"
        )
    try:
        if base_cfg.get("quantization_config"):
            ctx.log(
                "base_model_path holds a quantized checkpoint; dequantizing it to "
                f"{precision} before merging (the merged weights inherit its rounding)",
                level="warning",
            )
            model = dequantized_base(base_dir, dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=dtype, device_map="cpu")
    except (OSError, ValueError) as exc:
        raise JobFailed(
            "model_not_found",
            f"base_model_path: cannot load a causal LM from '{base_dir}': {exc}",
            hint="Point base_model_path at a transformers model directory (config.json + weights).",
        ) from exc
    model.eval()
    return model


def dequantized_base(base_dir: Path, dtype: Any) -> Any:
    """A pre-quantized checkpoint, dequantized into a plain model of the same architecture.

    The dequantized model itself cannot be saved (transformers tries to reverse its bitsandbytes
    load conversions), so its weights move into a fresh model built from the config minus
    ``quantization_config``.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    quantized = AutoModelForCausalLM.from_pretrained(str(base_dir), device_map="cpu")
    quantized.dequantize(dtype=dtype)
    state = quantized.state_dict()
    config = AutoConfig.from_pretrained(str(base_dir))
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True)
    model.generation_config = quantized.generation_config
    return model


def apply_adapter(model: Any, adapter_dir: Path) -> Any:
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
    except (RuntimeError, ValueError, KeyError) as exc:
        # The shape checks catch the usual cases; this names whatever slipped past them.
        raise compat.mismatch(
            f"peft cannot apply the adapter to this base: {str(exc).strip()[:600]}"
        ) from exc


def merge_modules(ctx: JobContext, model: Any) -> int:
    """Merge every adapter layer into its base layer, one module at a time, with progress and cancel."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, BaseTunerLayer) and hasattr(m, "base_layer")
    ]
    total = len(layers)
    started = time.monotonic()
    for done, (name, layer) in enumerate(layers, start=1):
        ctx.check_cancelled(step=done - 1)
        try:
            layer.merge(safe_merge=True)
        except ValueError as exc:  # safe_merge found NaN/inf in the merged weights
            raise JobFailed(
                "adapter_mismatch",
                f"merging '{name}' gives non-finite weights: {exc}",
                hint="The adapter or base holds NaN/inf; try dtype fp32 or check the adapter's training run.",
            ) from exc
        ctx.progress(done, total, unit="modules", started=started)
    return total


def save_tokenizer(adapter_dir: Path, base_dir: Path, dest: Path) -> str | None:
    """The adapter's tokenizer if it saved one (training may add tokens), else the base's."""
    from transformers import AutoTokenizer

    for source in (adapter_dir, base_dir):
        if any((source / f).is_file() for f in _TOKENIZER_FILES):
            AutoTokenizer.from_pretrained(str(source)).save_pretrained(str(dest))
            return str(source)
    return None
