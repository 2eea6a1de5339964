"""A job's data sources: their files, their examples one at a time, and the quick check.

A :class:`Source` is one entry of a train config's ``dataset`` (the whole section when it names
one path, or each of ``dataset.sources``), resolved against the ``data`` section's defaults.
:func:`iter_examples` streams its examples with the bad rows in place; :func:`preview_issues`
is what ``validate`` (and ``submit``) can say without a tokenizer: the path exists and is
readable, its format is known, and its first rows parse into a known shape.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from finetune_worker.data.readers import BadRow, DataFile, SourceProblem, iter_rows, resolve_files
from finetune_worker.data.rows import AnyExample, Example, RowError, RowSpec, normalize, rename
from finetune_worker.errors import JobFailed

MAX_REPORTED = 5  # bad rows listed in one error; more are counted, not listed

#: Rows ``validate`` reads from a source (the first ones), and files it opens at most.
PREVIEW_ROWS = 100
PREVIEW_FILES = 20


@dataclass(frozen=True)
class Source:
    """One data source of a training job (see the module doc)."""

    index: int
    name: str
    path: Path
    where: str  # its config path: "dataset" or "dataset.sources[2]"
    spec: RowSpec
    file_format: str | None = None
    split: str | None = None
    weight: float | None = None
    repeat: float | None = None
    loss_weight: float = 1.0
    validation_split: float = 0.0
    #: A fixed share of all training rows (continual learning's replayed rows), whatever the others'.
    share: float | None = None
    #: Rows left out at the start (replayed reference rows skip the ones the reference loss measures).
    skip: int = 0

    def files(self) -> list[DataFile]:
        return resolve_files(self.path, file_format=self.file_format, split=self.split)


def iter_examples(source: Source, files: list[DataFile], *, label_files: bool) -> Iterator[AnyExample | str]:
    """Every row of ``files`` as an Example, or as the error message of a bad row (which names
    the file too when ``label_files``), after the source's first ``skip``. Raises
    :class:`SourceProblem` for a whole-file problem."""
    return itertools.islice(_examples(source, files, label_files=label_files), source.skip, None)


def _examples(source: Source, files: list[DataFile], *, label_files: bool) -> Iterator[AnyExample | str]:
    for file in files:
        if file.format == "txt" and source.spec.format not in ("auto", "text"):
            raise SourceProblem(
                "invalid_config",
                f"data.format is {source.spec.format!r} but {file.label} is a plain text file, which only "
                "holds text",
                'use format "auto" or "text" for it, or a JSONL/JSON/CSV/Parquet file for chat-like rows',
            )
        prefix = f"{file.label} " if label_files else ""
        for number, raw in iter_rows(file):
            if isinstance(raw, BadRow):
                yield f"{prefix}row {number}: {raw.message}"
                continue
            try:
                example = normalize(number, rename(raw, source.spec.renames), source.spec)
            except RowError as exc:
                yield prefix + str(exc)
                continue
            example.origin = file.label
            yield example


def preview_issues(source: Source) -> list[str]:
    """Problems found in the first rows of ``source``, each a message for ``source.where``."""
    try:
        files = source.files()
    except SourceProblem as exc:
        return [exc.message]
    shown = files[:PREVIEW_FILES]
    rows = 0
    try:
        for item in itertools.islice(iter_examples(source, shown, label_files=len(files) > 1), PREVIEW_ROWS):
            rows += 1
            if isinstance(item, str):
                return [f"{item} (the first bad row among the first {PREVIEW_ROWS})"]
    except SourceProblem as exc:
        return [exc.message]
    if rows == 0 and len(shown) == len(files):
        if source.skip:
            return [
                f"{source.path} has no rows beyond its first {source.skip}, which measure the reference loss "
                "and are never replayed: give continual.replay.dataset, or lower continual.reference_rows"
            ]
        return [f"{source.path} has no rows (it is empty)"]
    return []


def source_failure(source: Source, problem: SourceProblem) -> JobFailed:
    """A whole-source problem as the job's failure, naming the config field."""
    return JobFailed(
        problem.code,
        f"{source.where}.path: {problem.message}",
        hint=problem.hint,
        details={"path": str(source.path)},
    )


def bad_rows_failure(errors: list[str], count: int, paths: list[str], hint_extra: str = "") -> JobFailed:
    """The job's failure for ``count`` bad rows, listing the first few (``errors``)."""
    shown = errors[:MAX_REPORTED]
    message = "; ".join(shown)
    if count > len(shown):
        message += f"; and {count - len(shown)} more bad row(s)"
    return JobFailed(
        "bad_dataset_row",
        message,
        hint=f"fix the listed rows in {', '.join(paths)}{hint_extra}; rows are numbered from 1 as an editor "
        "counts them (JSONL line, CSV data row after the header, JSON array position, Parquet row)",
        details={"path": paths[0] if len(paths) == 1 else paths, "bad_rows": count, "errors": shown},
    )


def load_examples(source: Source, limit: int | None = None) -> list[Example]:
    """The examples of ``source`` as a list (the first ``limit``), or the job's failure naming
    the bad rows among them. For data that fits in memory (evaluation sets); training streams."""
    try:
        files = source.files()
        examples: list[Example] = []
        errors: list[str] = []
        count = 0
        for item in iter_examples(source, files, label_files=len(files) > 1):
            if isinstance(item, str):
                count += 1
                if len(errors) < MAX_REPORTED:
                    errors.append(item)
            elif limit is None or len(examples) < limit:
                assert isinstance(item, Example), "evaluation sets are never read as preference rows"
                examples.append(item)
            if limit is not None and len(examples) + count >= limit:
                break
    except SourceProblem as exc:
        raise source_failure(source, exc) from None
    if count:
        renames = dict(source.spec.renames)
        raise bad_rows_failure(
            errors, count, [str(source.path)], f" (columns map {renames})" if renames else ""
        )
    if not examples:
        raise empty_source_failure(source)
    return examples


def empty_source_failure(source: Source) -> JobFailed:
    """The failure of a source with no rows."""
    return JobFailed(
        "bad_dataset_row",
        f"{source.where}.path: {source.path} has no rows (it is empty)",
        hint="add rows, or point the path at your data",
        details={"path": str(source.path)},
    )
