"""The ``merge`` job: a MergeKit YAML merge run in process, with progress and cancel.

MergeKit's ``run_merge`` iterates its ``Executor`` inside a progress bar and offers neither a
callback nor a way to stop. This module does what ``run_merge`` does (mergekit 0.1.5,
``mergekit/merge.py``) but drives the executor itself: one ``progress`` event per finished
target (an output tensor written, the model finalized, the tokenizer built), and a cancel check
between targets; a cancelled merge closes the executor's generator, so no further task runs.
The model is written into a staging directory renamed onto ``output_dir`` once complete.

``cpu_offload`` maps onto MergeOptions: true keeps weights and intermediate results in CPU RAM
(``low_cpu_memory=False``) and reads them lazily (``lazy_unpickle``), the GPU (if any) only does
the arithmetic; false keeps everything on the GPU (``low_cpu_memory``, ``read_to_gpu``), faster
when VRAM holds all the models. Without CUDA both run on the CPU and only ``lazy_unpickle`` differs.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from finetune_worker.config.merge import MergeKitConfig
from finetune_worker.config.mergekit_yaml import check_merge_yaml, merge_inputs, resolved_document
from finetune_worker.context import JobContext
from finetune_worker.errors import JobFailed
from finetune_worker.outputs import StagedOutput, check_destination, count_tensors, dir_size

_HINT = "Fix the MergeKit YAML at yaml_config_path (see docs/configs.md, Merging)."


def run(ctx: JobContext) -> dict[str, Any]:
    cfg: MergeKitConfig = ctx.config
    started = time.monotonic()
    yaml_path = cfg.resolved(cfg.yaml_config_path)
    out = cfg.resolved(cfg.output_dir)
    # The files may have changed while the job queued; check again before loading anything.
    issues = check_merge_yaml(yaml_path) if yaml_path.is_file() else [("", f"'{yaml_path}' does not exist")]
    if issues:
        raise invalid("; ".join(f"{w}: {m}" if w else m for w, m in issues), issues=issues)
    inputs = merge_inputs(yaml_path)
    check_destination(out, overwrite=cfg.overwrite, key="output_dir", inputs=inputs)

    ctx.phase("loading")
    document = resolved_document(yaml_path)
    merge_config = validate_with_mergekit(document)
    options = merge_options(cfg)
    source = f"# {yaml_path} with model paths made absolute\n" + yaml.safe_dump(document, sort_keys=False)

    from mergekit.io.tasks import LoaderCache

    cache = LoaderCache()
    # The loader cache is process-wide and keyed by path: a model rewritten at the same path
    # since the last merge must be read afresh, and a long-lived worker must not pin old files.
    cache.loaders.clear()
    try:
        with (
            StagedOutput(out, overwrite=cfg.overwrite, key="output_dir", inputs=inputs) as stage,
            tempfile.TemporaryDirectory(prefix="mergekit-lora-") as lora_cache,
        ):
            assert stage.path is not None
            options = options.model_copy(update={"lora_merge_cache": lora_cache})
            targets = drive_merge(ctx, merge_config, stage.path, options, source, name=out.name)
            stage.publish()
    finally:
        cache.loaders.clear()
    summary = {
        "size_bytes": dir_size(out),
        "dtype": merge_config.out_dtype or merge_config.dtype,
        "tensors": count_tensors(out),
        "merge_method": merge_config.merge_method,
        "models": sorted(str(m) for m in merge_config.referenced_models()),
        "tasks": targets,
        "runtime_s": round(time.monotonic() - started, 3),
    }
    return {"outputs": {"output_dir": str(out), "model_path": str(out)}, "summary": summary}


def invalid(message: str, **details: Any) -> JobFailed:
    return JobFailed("invalid_merge_config", f"yaml_config_path: {message}", hint=_HINT, details=details)


def validate_with_mergekit(document: dict[str, Any]) -> Any:
    """MergeKit's own ``MergeConfiguration`` and merge method lookup, errors with their YAML paths."""
    from mergekit import merge_methods
    from mergekit.config import MergeConfiguration
    from pydantic import ValidationError

    from finetune_worker.config.paths import json_path

    try:
        merge_config = MergeConfiguration.model_validate(document)
    except ValidationError as exc:
        issues = [(json_path(e.get("loc", ())), str(e.get("msg"))) for e in exc.errors()]
        raise invalid("; ".join(f"{w}: {m}" for w, m in issues), issues=issues) from None
    except (RuntimeError, ValueError) as exc:  # MergeKit's validators raise RuntimeError
        raise invalid(str(exc)) from None
    try:
        merge_methods.get(merge_config.merge_method)
    except RuntimeError as exc:
        raise invalid(f"merge_method: {exc}") from None
    return merge_config


def merge_options(cfg: MergeKitConfig) -> Any:
    import torch
    from mergekit.options import MergeOptions

    cuda = torch.cuda.is_available()
    return MergeOptions(
        device="cuda" if cuda else "cpu",
        low_cpu_memory=cuda and not cfg.cpu_offload,
        read_to_gpu=cuda and not cfg.cpu_offload,
        lazy_unpickle=cfg.cpu_offload,
        copy_tokenizer=True,
        random_seed=cfg.seed,
        quiet=True,
        write_model_card=True,
        safe_serialization=True,
    )


def drive_merge(
    ctx: JobContext, merge_config: Any, out_path: Path, options: Any, source: str, *, name: str
) -> int:
    """``mergekit.merge.run_merge``, step by step; returns the number of executor targets run."""
    import transformers
    from mergekit import merge as mk
    from mergekit.architecture import get_architecture_info
    from mergekit.graph import Executor
    from mergekit.io.tasks import LoaderCache
    from mergekit.plan import MergePlanner
    from mergekit.tokenizer import TokenizerInfo

    if options.random_seed is not None:
        transformers.trainer_utils.set_seed(options.random_seed)
    try:
        arch_info = get_architecture_info(merge_config, options)
    except (RuntimeError, ValueError) as exc:
        raise invalid(f"the models cannot be merged with each other: {exc}") from None
    if getattr(arch_info, "post_fill_parameters", False):
        raise invalid("this architecture needs MergeKit's post-fill step, which the worker does not run")
    cache = LoaderCache()
    cache.setup(options=options)
    cfg_out = mk._model_out_config(merge_config, arch_info, trust_remote_code=options.trust_remote_code)
    for model in merge_config.referenced_models():
        cache.get(model)
        ctx.check_cancelled()
    try:
        targets = MergePlanner(
            merge_config, arch_info, options=options, out_model_config=cfg_out
        ).plan_to_disk(out_path=str(out_path))
    except (RuntimeError, ValueError, KeyError) as exc:
        raise invalid(f"MergeKit cannot plan this merge: {exc}") from None
    executor = Executor(
        targets=targets,
        math_device=options.device,
        storage_device=options.device if options.low_cpu_memory else "cpu",
    )

    ctx.phase("merging")
    total = len(targets)
    started = time.monotonic()
    tokenizer = None
    steps = executor.run(quiet=True)
    try:
        for done, (_task, value) in enumerate(steps, start=1):
            if isinstance(value, TokenizerInfo):
                tokenizer = value.tokenizer
            ctx.progress(done, total, unit="tasks", started=started)
            ctx.check_cancelled(step=done)
    finally:
        steps.close()  # on cancel: runs no further task, drops the intermediate tensors

    ctx.phase("saving")
    if tokenizer is not None:
        pad = merge_config.tokenizer.pad_to_multiple_of if merge_config.tokenizer else None
        mk._update_config_vocab(cfg_out, arch_info, tokenizer, pad_to_multiple_of=pad)
    cfg_out.save_pretrained(str(out_path))
    if options.write_model_card:
        from mergekit.card import generate_card

        card = generate_card(config=merge_config, config_yaml=source, name=name)
        (out_path / "README.md").write_text(card, encoding="utf-8")
        (out_path / "mergekit_config.yml").write_text(source, encoding="utf-8")
    if tokenizer is not None:
        mk._set_chat_template(tokenizer, merge_config)
        tokenizer.save_pretrained(str(out_path))
    elif options.copy_tokenizer:
        try:
            mk._copy_tokenizer(merge_config, str(out_path), options=options)
        except (OSError, ValueError) as exc:  # as run_merge: a model without a tokenizer still merges
            ctx.log(f"no tokenizer copied to the merged model: {exc}", level="warning")
    mk._copy_tagalong_files(
        merge_config, str(out_path), files=arch_info.tagalong_files or [], options=options
    )
    ctx.check_cancelled(step=total)
    return total
