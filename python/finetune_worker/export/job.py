"""The ``export`` job (kind declared in ``config.export``), top to bottom.

Load the model in fp32 on the CPU (a base plus an adapter: merged first, by the ``merge_lora``
job's own code), compute the reference logits of the verify prompts, then write each format into
a staging folder beside ``output_dir`` (phase ``exporting``), load each back in its runtime and
compare (phase ``verifying``), and rename the staging folder onto ``output_dir`` only when every
format is written and within its tolerance. A cancel, a failure or a verification outside the
tolerance leaves nothing at ``output_dir``.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from finetune_worker.config.export import ExportConfig, tokenizer_dir
from finetune_worker.context import JobContext
from finetune_worker.errors import JobFailed
from finetune_worker.outputs import StagedOutput, check_destination

SUMMARY_FILE = "export.json"
_SCRATCH = ".tokenizer"  # the tokenizer as the GGUF writer reads it, when no onnx/ folder holds one


def run(ctx: JobContext) -> dict[str, Any]:
    cfg: ExportConfig = ctx.config
    started = time.monotonic()
    base_dir, adapter_dir = cfg.model_dirs()
    out = cfg.resolved(cfg.output_dir)
    if not (base_dir / "config.json").is_file():
        raise JobFailed(
            "model_not_found",
            f"model_path: no model (config.json) at '{base_dir}'",
            hint="Point model_path at a local transformers model directory or a training run's output_dir.",
        )
    inputs = cfg.inputs()
    check_destination(out, overwrite=cfg.overwrite, key="output_dir", inputs=inputs)

    model, merged_modules = _load(ctx, base_dir, adapter_dir)
    tokenizer = _tokenizer(tokenizer_dir(base_dir, adapter_dir))
    prompt_ids = [list(tokenizer(p)["input_ids"]) for p in cfg.verify_prompts]
    reference = None
    if cfg.verify:
        from finetune_worker.export.verify import reference_logits

        reference = reference_logits(model, prompt_ids)
    ctx.check_cancelled()

    ctx.phase("exporting")
    formats: dict[str, dict[str, Any]] = {}
    written: dict[str, Path] = {}  # format -> its file, relative to output_dir
    with StagedOutput(out, overwrite=cfg.overwrite, key="output_dir", inputs=inputs) as stage:
        assert stage.path is not None
        for fmt in cfg.formats:
            if fmt == "onnx":
                written[fmt], formats[fmt] = _export_onnx(ctx, cfg, model, tokenizer, stage.path)
            else:
                written[fmt], formats[fmt] = _export_gguf(
                    ctx, cfg, model, tokenizer, stage.path, base_dir.name
                )
            ctx.check_cancelled()
        shutil.rmtree(stage.path / _SCRATCH, ignore_errors=True)

        if reference is not None:
            ctx.phase("verifying")
            for fmt in cfg.formats:
                comparison = _verify(fmt, cfg, stage.path / written[fmt], reference, prompt_ids, tokenizer)
                formats[fmt]["verification"] = comparison.summary()
                ctx.log(
                    f"{fmt}: largest logit difference {comparison.max_abs_diff:.3g} (tolerance "
                    f"{comparison.tolerance:g}), top-1 agreement {comparison.top1_agreement:.1%} over "
                    f"{comparison.tokens} positions"
                )
                comparison.check(fmt)
                ctx.check_cancelled()

        for name, rel in written.items():
            formats[name]["path"] = str(out / rel)
        summary: dict[str, Any] = {
            "model_path": str(base_dir),
            "adapter_path": str(adapter_dir) if adapter_dir else None,
            "merged_modules": merged_modules,
            "formats": formats,
            "prompts": len(cfg.verify_prompts) if cfg.verify else 0,
            "runtime_s": round(time.monotonic() - started, 3),
        }
        (stage.path / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        ctx.check_cancelled()
        stage.publish()
    outputs: dict[str, Any] = {"output_dir": str(out), "summary_path": str(out / SUMMARY_FILE)}
    outputs.update({f"{fmt}_path": str(out / rel) for fmt, rel in written.items()})
    return {"outputs": outputs, "summary": summary}


def _load(ctx: JobContext, base_dir: Path, adapter_dir: Path | None) -> tuple[Any, int]:
    """The model in fp32 on the CPU, with the adapter (if any) merged into its weights."""
    if adapter_dir is not None:
        from finetune_worker.merging.lora import fold_adapter

        model, merged = fold_adapter(ctx, base_dir, adapter_dir, "fp32")
        ctx.log(f"merged the adapter '{adapter_dir}' into '{base_dir}' ({merged} modules)")
        return model.eval(), merged
    import torch
    from transformers import AutoModelForCausalLM

    ctx.phase("loading")
    try:
        model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32, device_map="cpu")
    except (OSError, ValueError) as exc:
        raise JobFailed(
            "model_not_found",
            f"model_path: cannot load a causal LM from '{base_dir}': {exc}",
            hint="Point model_path at a transformers model directory (config.json + weights).",
        ) from exc
    return model.eval(), 0


def _tokenizer(folder: Path) -> Any:
    """The tokenizer as saved (no pad token added: the exports carry it unchanged)."""
    from transformers import AutoTokenizer

    from finetune_worker.hf import unsupported_model

    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError, KeyError) as exc:
        raise unsupported_model(
            "model_path", folder, f"cannot load its tokenizer ({type(exc).__name__}: {exc})"
        ) from exc


def _save_model_files(model: Any, tokenizer: Any, folder: Path) -> None:
    """config.json, generation_config.json and the tokenizer: what a runtime needs beside the weights."""
    folder.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(str(folder))
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))


def _export_onnx(
    ctx: JobContext, cfg: ExportConfig, model: Any, tokenizer: Any, stage: Path
) -> tuple[Path, dict[str, Any]]:
    from finetune_worker.export.onnx_export import export_onnx

    started = time.monotonic()
    folder = stage / "onnx"
    _save_model_files(model, tokenizer, folder)
    ctx.log(f"onnx: exporting the graph with torch.onnx (opset {cfg.onnx_opset})")
    path = export_onnx(model, folder, cfg.onnx_opset)
    ctx.progress(1, 1, unit="graphs", started=started)
    size = sum(p.stat().st_size for p in folder.iterdir() if p.name.startswith(path.name))
    return path.relative_to(stage), {"size_bytes": size, "opset": cfg.onnx_opset, "dtype": "fp32"}


def _export_gguf(
    ctx: JobContext, cfg: ExportConfig, model: Any, tokenizer: Any, stage: Path, name: str
) -> tuple[Path, dict[str, Any]]:
    from finetune_worker.export.gguf_writer import gguf_file_name, write_gguf

    started = time.monotonic()
    files = stage / "onnx" if (stage / "onnx" / "tokenizer.json").is_file() else stage / _SCRATCH
    if files.name == _SCRATCH:
        _save_model_files(model, tokenizer, files)
    path = stage / gguf_file_name(cfg.gguf_type)
    info = write_gguf(
        model,
        tokenizer,
        files,
        path,
        cfg.gguf_type,
        name=name,
        progress=lambda done, total: ctx.progress(done, total, unit="tensors", started=started),
        check_cancelled=ctx.check_cancelled,
    )
    return path.relative_to(stage), {
        "size_bytes": path.stat().st_size,
        "dtype": cfg.gguf_type,
        "tensors": info["tensors"],
    }


def _verify(
    fmt: str,
    cfg: ExportConfig,
    path: Path,
    reference: list[Any],
    prompt_ids: list[list[int]],
    tokenizer: Any,
) -> Any:
    from finetune_worker.export.verify import compare, gguf_logits, onnx_logits

    if fmt == "onnx":
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        got = onnx_logits(path, prompt_ids, pad)
    else:
        got = gguf_logits(path, list(cfg.verify_prompts), prompt_ids)
    return compare(reference, got, tolerance=cfg.tolerance_for(fmt), min_top1=cfg.min_top1_for(fmt))
