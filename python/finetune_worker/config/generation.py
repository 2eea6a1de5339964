"""Config pieces shared by the evaluate/generate jobs and the train job's ``evaluation`` section.

Kept apart from ``config/evaluate.py`` (which needs the train config's ``Quantization``) so that
``config/train.py`` can use them without an import cycle. Nothing here imports torch.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    AliasChoices,
    Field,
    ValidationError,
    WrapValidator,
    field_validator,
)

from finetune_worker.config.base import MAX_SEED, StrictModel
from finetune_worker.config.data import FileFormat


class StrictSection(StrictModel):
    pass


class Message(StrictSection):
    """One chat message of a prompt."""

    role: Literal["system", "user", "assistant"] = Field(..., description="Who says it.")
    content: str = Field(..., description="What is said.")


def _validate_prompt(value: Any, handler: Any) -> str | list[Message]:
    """One prompt, with errors that say which message of it is wrong (not which union arm failed)."""
    if isinstance(value, str):
        if not value.strip():
            raise ValueError("is an empty string")
        return value
    if not isinstance(value, list):
        raise ValueError(f"must be a string or a list of chat messages, got {type(value).__name__}")
    if not value:
        raise ValueError("is an empty message list")
    messages: list[Message] = []
    for j, item in enumerate(value):
        try:
            messages.append(Message.model_validate(item))
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(x) for x in first.get("loc", ()))
            raise ValueError(f"message [{j}]{'.' + where if where else ''}: {first.get('msg')}") from None
    if messages[-1].role == "assistant":
        raise ValueError("ends with an assistant message; end with a user message so the model answers it")
    return messages


#: A plain-text prompt, or chat messages rendered with the chat template.
Prompt = Annotated[str | list[Message], WrapValidator(_validate_prompt)]


class Sampling(StrictSection):
    """How completions are drawn; shared by ``generate`` and the answers ``evaluate`` scores."""

    max_new_tokens: int = Field(128, gt=0, le=32768, description="Most tokens generated per completion.")
    temperature: float = Field(
        0.0, ge=0, description="0 picks the most likely token (greedy, deterministic)."
    )
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass; 1 keeps every token.")
    top_k: int = Field(0, ge=0, description="Sample among the k likeliest tokens; 0 disables the cut.")
    repetition_penalty: float = Field(1.0, gt=0, description="Above 1 discourages repeating tokens.")
    stop: list[str] = Field(
        default_factory=list,
        validation_alias=AliasChoices("stop", "stop_strings"),
        description="Strings that end a completion; the completion stops before them.",
    )
    seed: int = Field(
        0, ge=0, le=MAX_SEED, description="Sampling seed: the same seed gives the same completion."
    )

    @field_validator("stop", mode="before")
    @classmethod
    def _one_stop_string(cls, value: object) -> object:
        return [value] if isinstance(value, str) else value

    @field_validator("stop")
    @classmethod
    def _no_empty_stop(cls, value: list[str]) -> list[str]:
        if any(not s for s in value):
            raise ValueError("stop strings must not be empty")
        return value


class EvalDataset(StrictSection):
    """The examples to score, in any training format (text, qa, instruction, conversations)."""

    path: str = Field(
        ...,
        description="A dataset file, folder or save_to_disk folder, as training reads them; relative to the cwd.",
    )
    split: str | None = Field(None, description="The split to read from a folder or a DatasetDict.")
    file_format: FileFormat | None = Field(
        None, description="File format (jsonl, json, csv, tsv, txt, parquet, arrow); default from the file."
    )


class TrainingEvaluation(StrictSection):
    """A train job's ``evaluation``: the evaluate job's scores on the model before and after training."""

    dataset: EvalDataset | None = Field(
        None, description="Rows to score; default: the held-out split, else the first training rows."
    )
    max_rows: int = Field(
        50, gt=0, description="Score at most this many rows (answers cost generation time)."
    )
    batch_size: int = Field(8, gt=0, description="Rows per forward pass and per generate call.")
    generate_answers: bool = Field(True, description="Generate and score answers for rows with a reference.")
    generation: Sampling = Field(
        default_factory=lambda: Sampling(max_new_tokens=64),
        description="How answers are generated; greedy by default so before and after compare fairly.",
    )
    samples: int = Field(
        3, ge=0, description="Answered rows shown side by side (base vs fine-tuned) in the summary."
    )
