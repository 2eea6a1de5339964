"""Turn what goes wrong in a training job into a named failure with a hint.

``jobs.classify_exception`` knows the cases (including the messages torch, transformers and
bitsandbytes actually produce: CPU allocator failures do not say "out of memory", a disk that
fills mid-checkpoint surfaces as a torch stream-writer error); training adds its own hints and
the model/dataset failures it names itself.
"""

from __future__ import annotations

from finetune_worker.errors import JobFailed
from finetune_worker.failures import classify_exception

OOM_HINT = (
    "Lower training_parameters.batch_size and raise training_parameters.gradient_accumulation_steps "
    "(same effective batch), set training_parameters.gradient_checkpointing to true, shorten "
    'data.max_seq_length, or load the base in 4-bit (quantization: {"bits": 4}) with a LoRA method.'
)
DISK_HINT = "Free disk space under output_dir, or lower checkpoint.keep / raise checkpoint.every_steps."


def classify_training_exception(exc: BaseException) -> JobFailed:
    """Name a failure raised while a training job runs (with training's own hints)."""
    return classify_exception(exc, oom_hint=OOM_HINT, disk_hint=DISK_HINT)


def dataset_not_found(where: str, path: str) -> JobFailed:
    return JobFailed(
        "dataset_not_found",
        f"{where}: no dataset file or folder at '{path}'",
        hint="Relative paths resolve against the worker's working directory; pass an absolute path.",
    )
