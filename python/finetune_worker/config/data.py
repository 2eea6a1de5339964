"""The ``data`` section of a train config: how dataset rows become token sequences.

Where the file is lives in the seed's ``dataset`` section; this section says how to read it.
The DESIGN's promised form ``{"format": "auto", "train_on_responses_only": true,
"max_seq_length": 1024, "packing": true}`` validates as written. Nothing here imports torch.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from finetune_worker.config.base import StrictModel

DataFormat = Literal["auto", "text", "qa", "instruction", "conversations"]
FileFormat = Literal["jsonl", "json", "csv", "txt"]

#: Column names the pipeline understands; a ``columns`` mapping must rename onto these.
KNOWN_COLUMNS = frozenset(
    {
        "text",
        "question",
        "answer",
        "system",
        "instruction",
        "input",
        "output",
        "conversations",
        "messages",
    }
)


class DataConfig(StrictModel):
    """Row format, chat template and sequence shaping for training data."""

    format: DataFormat = Field(
        "auto", description="Row format; auto detects it per row from the keys present."
    )
    columns: dict[str, str] | None = Field(
        None,
        description="Our column name -> the file's, e.g. {'question': 'prompt', 'answer': 'completion'}.",
    )
    chat_template: str | None = Field(
        None, description="Jinja chat template overriding the tokenizer's (ChatML when it has none)."
    )
    system_prompt: str | None = Field(
        None, description="System message added to chat-like rows that carry none."
    )
    max_seq_length: int = Field(
        1024, gt=0, description="Tokens per example; longer rows keep their start and are counted."
    )
    train_on_responses_only: bool = Field(
        True, description="Loss on assistant tokens only for chat-like rows (text rows train fully)."
    )
    packing: bool = Field(
        True, description="Padding-free batches (flattened rows + position_ids): no compute on padding."
    )
    text_block_size: int | None = Field(
        None, gt=0, description="Tokens per block for plain text; default (and cap) max_seq_length."
    )
    file_format: FileFormat | None = Field(
        None, description="File format; default from the extension (.jsonl, .json, .csv, .txt)."
    )

    @field_validator("columns")
    @classmethod
    def _columns_target_known_names(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is None:
            return value
        # Either direction is accepted ({ours: theirs} or {theirs: ours}) as long as one side is ours.
        bad = [f"{k!r}: {v!r}" for k, v in value.items() if k not in KNOWN_COLUMNS and v not in KNOWN_COLUMNS]
        if bad:
            raise ValueError(
                f"each mapping needs one of our column names ({', '.join(sorted(KNOWN_COLUMNS))}) "
                f"on one side; got {', '.join(bad)}"
            )
        return value

    def column_renames(self) -> dict[str, str]:
        """``{file column: our column}`` whichever direction the user wrote the mapping in."""
        renames: dict[str, str] = {}
        for key, value in (self.columns or {}).items():
            if value in KNOWN_COLUMNS and key not in KNOWN_COLUMNS:
                renames[key] = value
            elif key in KNOWN_COLUMNS and value not in KNOWN_COLUMNS:
                renames[value] = key
            elif key != value:
                # Both sides are our names ({"question": "instruction"}): the documented {ours: file} reading.
                renames[value] = key
        return renames
