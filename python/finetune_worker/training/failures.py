"""Turn what goes wrong in a training job into a named failure with a hint.

``jobs.classify_exception`` knows the generic cases; training adds the messages torch,
transformers and bitsandbytes actually produce (CPU allocator failures do not say "out of
memory", a disk that fills mid-checkpoint surfaces as a torch stream-writer error, an unknown
architecture is a ``ValueError`` from the Auto classes).
"""

from __future__ import annotations

import errno

from finetune_worker.errors import JobFailed
from finetune_worker.jobs import classify_exception

OOM_HINT = (
    "Lower training_parameters.batch_size and raise training_parameters.gradient_accumulation_steps "
    "(same effective batch), set training_parameters.gradient_checkpointing to true, shorten "
    'data.max_seq_length, or load the base in 4-bit (quantization: {"bits": 4}) with a LoRA method.'
)
DISK_HINT = "Free disk space under output_dir, or lower checkpoint.keep / raise checkpoint.every_steps."

_OOM_MARKERS = (
    "out of memory",
    "can't allocate memory",
    "cannot allocate memory",
    "defaultcpuallocator",
    "std::bad_alloc",
)
_DISK_MARKERS = ("no space left on device", "disk quota exceeded")


def is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    oom_type = _torch_oom_type()
    if oom_type is not None and isinstance(exc, oom_type):
        return True
    text = str(exc).lower()
    return any(marker in text for marker in _OOM_MARKERS)


def classify_training_exception(exc: BaseException) -> JobFailed:
    """Name a failure raised while a training job runs."""
    if isinstance(exc, JobFailed):
        return exc
    text = f"{type(exc).__name__}: {exc}"
    if is_out_of_memory(exc):
        where = "GPU" if "cuda" in text.lower() else "CPU"
        return JobFailed("out_of_memory", f"{where} out of memory: {text}", hint=OOM_HINT)
    for cause in _chain(exc):
        if isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT):
            return JobFailed("disk_full", f"disk full while writing: {text}", hint=DISK_HINT)
        if any(marker in str(cause).lower() for marker in _DISK_MARKERS):
            return JobFailed("disk_full", f"disk full while writing: {text}", hint=DISK_HINT)
    return classify_exception(exc)


def unsupported_model(path: str, why: str) -> JobFailed:
    return JobFailed(
        "unsupported_model",
        f"model_name '{path}': {why}",
        hint="Point model_name at a local Hugging Face causal-LM directory (config.json with a model_type "
        "transformers knows, e.g. llama, mistral, qwen2, plus its weights and tokenizer).",
    )


def model_not_found(path: str) -> JobFailed:
    return JobFailed(
        "model_not_found",
        f"model_name: no local model at '{path}'; this worker loads models from local paths (no hub access)",
        hint="Download the model on a machine with hub access (huggingface-cli download) and copy the "
        "directory here, or build the demo model with `finetune-worker make-tiny-model DIR`.",
    )


def dataset_not_found(path: str) -> JobFailed:
    return JobFailed(
        "dataset_not_found",
        f"dataset.path: no dataset file at '{path}'",
        hint="Relative paths resolve against the worker's working directory; pass an absolute path.",
    )


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and cur not in seen:
        seen.append(cur)
        cur = cur.__cause__ or cur.__context__
    return seen


def _torch_oom_type() -> type[BaseException] | None:
    import sys

    torch = sys.modules.get("torch")  # never import torch just to classify an error
    return getattr(torch, "OutOfMemoryError", None) if torch is not None else None
