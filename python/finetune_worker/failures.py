"""Name a failure a job did not name itself, with a hint of what to do about it.

Every job kind ends up here for exceptions it did not turn into a :class:`JobFailed`: the
messages torch, transformers, safetensors and bitsandbytes actually produce (a CPU allocator
failure does not say "out of memory", a full disk surfaces as a safetensors I/O error) map to
the codes of ``errors.ERROR_CODES``. A kind passes its own hints (training names its batch and
sequence settings; the generic ones fit a merge).
"""

from __future__ import annotations

import errno
import sys

from finetune_worker.errors import JobFailed

#: Generic hints; a job kind may pass its own (training names its batch and sequence settings).
OOM_HINT = (
    "The job ran out of memory: free memory (other jobs and processes), load in a smaller precision "
    "(fp16/bf16, or 4-bit for training), or use a machine with more RAM or VRAM."
)
DISK_HINT = "Free disk space where the job writes (or lower checkpoint.keep for training), then resubmit."

_OOM_MARKERS = (
    "out of memory",
    "can't allocate memory",
    "cannot allocate memory",
    "defaultcpuallocator",
    "std::bad_alloc",
)
# safetensors reports a full disk as SafetensorError("... IoError(Os { code: 28, kind: StorageFull ...").
_DISK_MARKERS = ("no space left on device", "disk quota exceeded", "storagefull")


def is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    torch = sys.modules.get("torch")  # never import torch just to classify an error
    oom_type = getattr(torch, "OutOfMemoryError", None) if torch is not None else None
    if oom_type is not None and isinstance(exc, oom_type):
        return True
    return any(marker in str(exc).lower() for marker in _OOM_MARKERS)


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and cur not in seen:
        seen.append(cur)
        cur = cur.__cause__ or cur.__context__
    return seen


def classify_exception(
    exc: BaseException, *, oom_hint: str = OOM_HINT, disk_hint: str = DISK_HINT
) -> JobFailed:
    """Name a failure we did not raise ourselves, with a hint of what to do about it."""
    if isinstance(exc, JobFailed):
        return exc
    text = f"{type(exc).__name__}: {exc}"
    lowered = text.lower()
    if is_out_of_memory(exc):
        where = "GPU" if "cuda" in lowered else "CPU"
        return JobFailed("out_of_memory", f"{where} out of memory: {text}", hint=oom_hint)
    for cause in _chain(exc):
        if (isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT)) or any(
            marker in str(cause).lower() for marker in _DISK_MARKERS
        ):
            return JobFailed("disk_full", f"disk full while writing: {text}", hint=disk_hint)
    if "unpickling" in lowered or "weights only load failed" in lowered:
        # transformers loads .bin weights with torch.load(weights_only=True): a pickle that wants
        # to run code, or anything else that is not plain tensors, is refused.
        return JobFailed(
            "unsupported_model",
            text,
            hint="The weights are pickle files that hold more than tensors (or are damaged); use a model "
            "saved as safetensors (model.save_pretrained(dir) writes them).",
        )
    if isinstance(exc, PermissionError):
        return JobFailed("output_dir_not_writable", text, hint="Choose an output_dir this user can write to.")
    return JobFailed("internal_error", text, hint="See the worker's stderr log for the traceback.")
