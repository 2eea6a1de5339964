"""The ``data`` section of a train config: how dataset rows become token sequences.

Where the file is lives in the seed's ``dataset`` section; this section says how to read it.
The DESIGN's promised form ``{"format": "auto", "train_on_responses_only": true,
"max_seq_length": 1024, "packing": true}`` validates as written. Nothing here imports torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import Field, field_validator, model_validator

from finetune_worker.config.base import StrictModel
from finetune_worker.data.readers import FILE_FORMATS
from finetune_worker.data.rows import KNOWN_COLUMNS, PREFERENCE_COLUMNS, ROW_FORMATS, RowSpec
from finetune_worker.data.sources import Source

DataFormat = Literal[
    "auto", "text", "qa", "instruction", "conversations", "preference", "unpaired_preference", "prompts"
]
FileFormat = Literal["jsonl", "json", "csv", "tsv", "txt", "parquet", "arrow"]
assert get_args(DataFormat) == ROW_FORMATS and get_args(FileFormat) == FILE_FORMATS


def columns_issue(value: dict[str, str] | None) -> str | None:
    """Why a ``columns`` mapping is wrong: each entry must name one of our columns on one side."""
    if not value:
        return None
    ours = KNOWN_COLUMNS | PREFERENCE_COLUMNS
    bad = [f"{k!r}: {v!r}" for k, v in value.items() if k not in ours and v not in ours]
    if not bad:
        return None
    return (
        f"each mapping needs one of our column names ({', '.join(sorted(ours))}) "
        f"on one side; got {', '.join(bad)}"
    )


def column_renames(columns: dict[str, str] | None) -> dict[str, str]:
    """``{file column: our column}`` whichever direction the user wrote the mapping in."""
    renames: dict[str, str] = {}
    for key, value in (columns or {}).items():
        # The supervised names decide first: {"completion": "answer"} (TRL's prompt/completion
        # columns as Q&A) reads as it did before preference rows had names of their own.
        for ours in (KNOWN_COLUMNS, PREFERENCE_COLUMNS):
            if value in ours and key not in ours:
                renames[key] = value
            elif key in ours and value not in ours:
                renames[value] = key
            elif key in ours and key != value:
                # Both sides are our names ({"question": "instruction"}): the documented {ours: file} reading.
                renames[value] = key
            else:
                continue
            break
    return renames


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
    packing: Literal["auto", "flatten", "group", "pad"] | bool = Field(
        "auto",
        description="How rows become batches: 'flatten' (rows back to back, position_ids restarting: "
        "varlen packing, fast with flash_attention_2/3), 'group' (padded rows of similar length, fast with "
        "any attention), 'pad' (padded rows in random order), 'auto' (flatten with a varlen attention "
        "kernel or short rows, else group). true means auto, false pad.",
    )
    text_block_size: int | None = Field(
        None, gt=0, description="Tokens per block for plain text; default (and cap) max_seq_length."
    )
    file_format: FileFormat | None = Field(
        None,
        description="File format; default from the extension (.jsonl, .json, .csv, .tsv, .txt, .parquet, "
        ".arrow, compressed .gz/.zst/.bz2 text), else from the content.",
    )

    @field_validator("columns")
    @classmethod
    def _columns_target_known_names(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        # Either direction is accepted ({ours: theirs} or {theirs: ours}) as long as one side is ours.
        problem = columns_issue(value)
        if problem:
            raise ValueError(problem)
        return value

    def column_renames(self) -> dict[str, str]:
        """``{file column: our column}`` whichever direction the user wrote the mapping in."""
        return column_renames(self.columns)

    def source(
        self,
        path: Path,
        where: str,
        *,
        split: str | None = None,
        file_format: str | None = None,
        validation_split: float = 0.0,
    ) -> Source:
        """A single data source read the way this section says (evaluation sets)."""
        return Source(
            index=0,
            name=path.name,
            path=path,
            where=where,
            spec=RowSpec(self.format, self.column_renames(), self.system_prompt),
            file_format=file_format or self.file_format,
            split=split,
            validation_split=validation_split,
        )


_SOURCE_KEYS = ("name", "split", "format", "columns", "file_format", "system_prompt", "weight", "repeat")


class DatasetSource(StrictModel):
    """One source of training rows; unset fields take the ``data`` section's values."""

    path: str = Field(
        ...,
        description="A dataset file (.jsonl, .json, .csv, .tsv, .txt, .parquet, .arrow; text formats may be "
        ".gz/.zst/.bz2), a folder of them, or a datasets save_to_disk folder; relative to the cwd.",
    )
    name: str | None = Field(
        None, description="Label in the summary's per-source counts; default: the file name."
    )
    split: str | None = Field(
        None,
        description="The split to read from a folder (hub file names such as data/train-00000-of-00001.parquet "
        "or train/) or a save_to_disk DatasetDict; default: every split.",
    )
    format: DataFormat | None = Field(None, description="Row format; default data.format.")
    columns: dict[str, str] | None = Field(
        None, description="Column renames for this source; default data.columns."
    )
    file_format: FileFormat | None = Field(
        None, description="File format; default data.file_format, else the extension, else the content."
    )
    system_prompt: str | None = Field(
        None, description="System message for this source's rows; default data.system_prompt."
    )
    weight: float | None = Field(
        None,
        gt=0,
        description="Sampling proportion in a mixture (normalized over the sources; set on all or none): a "
        "source gets weight/sum(weights) of the training rows, repeating or subsampling its own.",
    )
    repeat: float | None = Field(
        None,
        gt=0,
        le=1000,
        description="Use each training row this many times (0.5: a seeded half); default 1.",
    )
    loss_weight: float = Field(
        1.0,
        ge=0,
        le=1000,
        description="Multiplies this source's tokens in the training loss (1: as the others).",
    )
    validation_split: float | None = Field(
        None, ge=0, lt=1, description="Held-out fraction of this source; default dataset.validation_split."
    )

    @field_validator("columns")
    @classmethod
    def _columns_known(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        problem = columns_issue(value)
        if problem:
            raise ValueError(problem)
        return value


class DatasetSection(DatasetSource):
    """Where the examples are: one source (``path``) or a mixture (``sources``, or a list)."""

    path: str | None = Field(  # type: ignore[assignment]
        None, description="One source's path (see DatasetSource.path); or give sources instead."
    )
    sources: list[DatasetSource] | None = Field(
        None, min_length=1, max_length=256, description="Several sources mixed into one training set."
    )
    validation_split: float = Field(
        0.1,
        ge=0,
        lt=1,
        description="Fraction held out (of each source) for eval loss/perplexity; 0 disables it.",
    )

    @model_validator(mode="before")
    @classmethod
    def _list_is_sources(cls, value: Any) -> Any:
        return {"sources": value} if isinstance(value, list) else value

    @model_validator(mode="after")
    def _one_way(self) -> DatasetSection:
        if self.sources is None and self.path is None:
            raise ValueError("set path (one source) or sources (a list of them)")
        if self.sources is not None:
            doubled = [k for k in ("path", *_SOURCE_KEYS) if getattr(self, k) is not None]
            if self.loss_weight != 1.0:
                doubled.append("loss_weight")
            if doubled:
                raise ValueError(
                    f"with sources, set {', '.join(doubled)} on each source (the data section holds defaults "
                    "for all of them)"
                )
        return self

    def entries(self) -> list[DatasetSource]:
        """The sources, a single-path section being a list of one."""
        if self.sources is not None:
            return list(self.sources)
        return [DatasetSource.model_validate(self.model_dump(include={"path", *_SOURCE_KEYS, "loss_weight"}))]

    def mixture_issues(self) -> list[tuple[str, str]]:
        """``(field, problem)`` of weights and repeats that cannot go together."""
        entries = self.entries()
        where = "dataset.sources" if self.sources is not None else "dataset"
        weighted = [i for i, s in enumerate(entries) if s.weight is not None]
        issues = []
        if weighted and len(weighted) != len(entries):
            missing = [i for i in range(len(entries)) if i not in weighted]
            issues.append(
                (
                    f"{where}[{missing[0]}].weight",
                    "weights are proportions of the mixture: set weight on every source, or on none (and "
                    "use repeat)",
                )
            )
        for i, s in enumerate(entries):
            if s.weight is not None and s.repeat is not None:
                place = f"{where}[{i}]" if self.sources is not None else where
                issues.append((f"{place}.repeat", "set weight or repeat, not both"))
        return issues
