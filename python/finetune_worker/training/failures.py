"""Turn what goes wrong in a training job into a named failure with a hint.

``jobs.classify_exception`` knows the cases (including the messages torch, transformers and
bitsandbytes actually produce: CPU allocator failures do not say "out of memory", a disk that
fills mid-checkpoint surfaces as a torch stream-writer error); training adds its own hints and
the model/dataset failures it names itself.
"""

from __future__ import annotations

from finetune_worker.errors import JobFailed
from finetune_worker.jobs import classify_exception

OOM_HINT = (
    "Lower training_parameters.batch_size and raise training_parameters.gradient_accumulation_steps "
    "(same effective batch), set training_parameters.gradient_checkpointing to true, shorten "
    'data.max_seq_length, or load the base in 4-bit (quantization: {"bits": 4}) with a LoRA method.'
)
DISK_HINT = "Free disk space under output_dir, or lower checkpoint.keep / raise checkpoint.every_steps."


def classify_training_exception(exc: BaseException) -> JobFailed:
    """Name a failure raised while a training job runs (with training's own hints)."""
    return classify_exception(exc, oom_hint=OOM_HINT, disk_hint=DISK_HINT)


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
