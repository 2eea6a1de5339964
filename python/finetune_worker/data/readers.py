"""Dataset files -> numbered raw rows, streamed: what a path holds and how to read it.

A source path is a file or a folder. Files: JSONL, JSON (an array of objects, or
``{"data": [...]}``), CSV, TSV, plain text, Parquet and Arrow (IPC file or stream), the text
formats optionally gzip/zstd/bz2-compressed (``rows.jsonl.gz``, ``rows.jsonl.zst``). Folders: one
written by ``datasets``' ``save_to_disk`` (a Dataset, or a DatasetDict whose split is chosen), or
a folder of such files, all of them or one split found by the Hugging Face naming conventions
(``data/train-00000-of-00002.parquet``, ``train/part.jsonl``, ``train.csv``).

The format comes from ``file_format``, else the extension, else the first bytes. Rows are read
one at a time (Parquet and Arrow a record batch at a time), so reading never holds a file in
memory, except JSON arrays, which are one document. Each row comes with the number a person
would count: JSONL line, CSV/TSV data row after the header, JSON array position, text
paragraph's first line, Parquet/Arrow row from 1. A row that cannot even be parsed comes as a
:class:`BadRow` in its place, so the caller reports it with the others.

Parsing goes through well-kept libraries: ``json`` and ``csv`` (whose per-line reading gives
row numbers that pyarrow's bulk JSON/CSV readers cannot), ``pyarrow`` for Parquet, Arrow and the
decompression of ``.zst``/``.gz``/``.bz2`` streams, and ``datasets``' own split patterns for
folders. Nothing here imports torch or transformers.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from finetune_worker.files import UnreadableFile, open_regular_file

FILE_FORMATS = ("jsonl", "json", "csv", "tsv", "txt", "parquet", "arrow")
TEXT_FORMATS = frozenset({"jsonl", "json", "csv", "tsv", "txt"})
EXTENSIONS = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".tsv": "tsv",
    ".tab": "tsv",
    ".txt": "txt",
    ".text": "txt",
    ".md": "txt",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".arrow": "arrow",
    ".feather": "arrow",
    ".ipc": "arrow",
}
#: Compressions of the text formats, by extension (pyarrow's codec names).
COMPRESSIONS = {".gz": "gzip", ".gzip": "gzip", ".zst": "zstd", ".zstd": "zstd", ".bz2": "bz2"}
#: Rows per Parquet/Arrow batch read: bounded memory whatever the file's size.
BATCH_ROWS = 1024
#: Files a folder may hold, at most (a dataset folder has tens; a wrong path might be /).
MAX_FOLDER_FILES = 10_000
#: Files of a dataset folder that describe the data rather than hold it: the hub's dataset card
#: (README.md, and any Markdown) and ``datasets``' metadata.
_NOT_DATA = frozenset({"dataset_info.json", "dataset_infos.json", "dataset_dict.json", "state.json"})


class SourceProblem(ValueError):
    """A whole file or folder cannot be read: ``code`` is the job error code, ``hint`` the fix."""

    def __init__(self, code: str, message: str, hint: str):
        super().__init__(message)
        self.code = code
        self.message = message
        self.hint = hint


@dataclass(frozen=True)
class BadRow:
    """A row that could not be parsed at all; ``message`` says why (without the row number)."""

    message: str


@dataclass(frozen=True)
class DataFile:
    """One file of a source: how to read it, and the ``label`` messages name it by."""

    path: Path
    format: str
    compression: str | None
    label: str
    split: str | None = None  # the split it belongs to, when the folder's layout says


def _split_suffixes(path: Path) -> tuple[str | None, str | None]:
    """``(format, compression)`` from the file name, either None when it does not say."""
    suffixes = [s.lower() for s in path.suffixes]
    compression = COMPRESSIONS.get(suffixes[-1]) if suffixes else None
    if compression is not None:
        suffixes = suffixes[:-1]
    return (EXTENSIONS.get(suffixes[-1]) if suffixes else None), compression


def _sniff(path: Path, compression: str | None) -> str | None:
    """The format from the first bytes, or None."""
    try:
        with _open_binary(path, compression) as f:
            head = f.read(64 * 1024)
    except (OSError, UnreadableFile, ValueError):
        return None
    if head.startswith(b"PAR1"):
        return "parquet"
    if head.startswith(b"ARROW1") or head.startswith(b"\xff\xff\xff\xff"):
        return "arrow"
    text = head.decode("utf-8", errors="ignore").lstrip("\ufeff \t\r\n")
    if text.startswith("["):
        return "json"
    if text.startswith("{"):
        first = text.split("\n", 1)[0]
        try:
            json.loads(first)
        except ValueError:
            return "json"  # a pretty-printed document, e.g. {"data": [...]}
        return "jsonl"
    return None


def describe_file(path: Path, file_format: str | None, label: str, split: str | None = None) -> DataFile:
    """A :class:`DataFile` for ``path``, or :class:`SourceProblem` when its format is unknown."""
    by_name, compression = _split_suffixes(path)
    fmt = file_format or by_name or _sniff(path, compression)
    if fmt is None:
        raise SourceProblem(
            "invalid_config",
            f"cannot tell the format of {label}: its extension {''.join(path.suffixes) or '(none)'!r} is "
            "not a dataset format and its content is not JSON, Parquet or Arrow",
            f"set the source's file_format (or data.file_format) to one of {', '.join(FILE_FORMATS)}",
        )
    if compression is not None and fmt not in TEXT_FORMATS:
        raise SourceProblem(
            "invalid_config",
            f"{label} is {compression}-compressed {fmt}; {fmt} files compress internally and are read "
            "as they are written",
            f"decompress {path.name}",
        )
    return DataFile(path=path, format=fmt, compression=compression, label=label, split=split)


# ---- what a path holds -------------------------------------------------------------------------


def resolve_files(path: Path, *, file_format: str | None = None, split: str | None = None) -> list[DataFile]:
    """The files of a source, in a fixed order; :class:`SourceProblem` when there are none.

    ``split`` picks one split of a ``save_to_disk`` DatasetDict or of a folder of files; without
    it a folder gives all its files (every split: see :func:`splits_read`).
    """
    try:
        is_dir = path.is_dir()
        exists = is_dir or path.exists()
    except OSError as exc:
        raise SourceProblem(
            "dataset_not_found", f"cannot look at {path}: {exc.strerror or exc}", _PATH_HINT
        ) from None
    if not exists:
        raise SourceProblem("dataset_not_found", f"no dataset file or folder at {path}", _PATH_HINT)
    if not is_dir:
        if split is not None:
            raise SourceProblem(
                "invalid_config",
                f"split {split!r} was asked for, but {path.name} is a single file (splits are folders' parts)",
                "remove split, or point path at the folder that holds the splits",
            )
        return [describe_file(path, file_format, path.name)]
    if (path / "dataset_dict.json").is_file():
        return _saved_dict(path, split)
    if (path / "state.json").is_file() and (path / "dataset_info.json").is_file():
        if split is not None:
            raise SourceProblem(
                "invalid_config",
                f"split {split!r} was asked for, but {path} holds a single saved Dataset (no splits)",
                "remove split",
            )
        return _saved_dataset(path, path.name)
    return _folder(path, file_format, split)


_PATH_HINT = "check the path; a relative path resolves against the worker's working directory"


def _read_json_file(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SourceProblem(
            "bad_dataset_row",
            f"{path} is not a readable save_to_disk file ({exc})",
            "save the dataset again with datasets' save_to_disk",
        ) from None


def _saved_dataset(folder: Path, label: str, split: str | None = None) -> list[DataFile]:
    state = _read_json_file(folder / "state.json")
    names = [f.get("filename") for f in state.get("_data_files", [])] if isinstance(state, dict) else []
    if not names or not all(isinstance(n, str) and "/" not in n and n not in ("", ".", "..") for n in names):
        raise SourceProblem(
            "bad_dataset_row",
            f"{folder}/state.json lists no data files",
            "save the dataset again with datasets' save_to_disk",
        )
    return [DataFile(folder / n, "arrow", None, f"{label}/{n}", split) for n in names]


def _saved_dict(folder: Path, split: str | None) -> list[DataFile]:
    info = _read_json_file(folder / "dataset_dict.json")
    splits = info.get("splits") if isinstance(info, dict) else None
    if not isinstance(splits, list) or not all(isinstance(s, str) for s in splits) or not splits:
        raise SourceProblem(
            "bad_dataset_row",
            f"{folder}/dataset_dict.json lists no splits",
            "save the dataset again with datasets' save_to_disk",
        )
    chosen = splits if split is None else [split]
    if split is not None and split not in splits:
        raise SourceProblem(
            "invalid_config",
            f"{folder} has no split {split!r}; it has {', '.join(splits)}",
            "set split to one of those",
        )
    files: list[DataFile] = []
    for name in chosen:
        if "/" in name or name in (".", ".."):
            raise SourceProblem(
                "bad_dataset_row", f"{folder}/dataset_dict.json names a bad split {name!r}", ""
            )
        files += _saved_dataset(folder / name, f"{folder.name}/{name}", name)
    return files


def _folder(folder: Path, file_format: str | None, split: str | None) -> list[DataFile]:
    found: list[Path] = []
    for item in sorted(folder.rglob("*")):
        relative = item.relative_to(folder)
        if any(part.startswith(".") for part in relative.parts) or not item.is_file():
            continue  # hidden files and folders (.git, .cache) are not data
        by_name, _ = _split_suffixes(item)
        if item.name in _NOT_DATA or item.suffix.lower() == ".md":
            continue
        if by_name is not None or file_format is not None:
            found.append(item)
        if len(found) > MAX_FOLDER_FILES:
            raise SourceProblem(
                "invalid_config",
                f"{folder} holds more than {MAX_FOLDER_FILES} data files",
                "point path at the dataset's own folder",
            )
    if not found:
        raise SourceProblem(
            "dataset_not_found",
            f"the folder {folder} holds no dataset files ({', '.join(sorted(set(EXTENSIONS)))})",
            "point path at a dataset file, a folder of them, or a save_to_disk folder",
        )
    by_split = _hub_splits(folder, found)
    if split is not None:
        chosen = [p for p in found if by_split.get(p) == split]
        if not chosen:
            have = sorted({s for s in by_split.values() if s})
            raise SourceProblem(
                "invalid_config",
                f"no file of split {split!r} in {folder}"
                + (
                    f"; its files are of the splits {', '.join(have)}"
                    if have
                    else "; its files name no splits"
                ),
                "name the files as the Hugging Face hub does (train.jsonl, data/train-00000-of-00001.parquet, "
                "train/part.csv), or remove split to read them all",
            )
        found = chosen
    return [describe_file(p, file_format, str(p.relative_to(folder.parent)), by_split.get(p)) for p in found]


def _hub_splits(folder: Path, files: list[Path]) -> dict[Path, str]:
    """Each file's split by ``datasets``' naming conventions (files that match none have none)."""
    from datasets.data_files import get_data_patterns, resolve_pattern

    try:
        patterns = get_data_patterns(str(folder))
    except Exception:  # datasets raises EmptyDatasetError and others when no convention matches
        return {}
    by_resolved = {p.resolve(): p for p in files}
    out: dict[Path, str] = {}
    for name, globs in patterns.items():
        for glob in globs:
            try:
                matched = resolve_pattern(glob, base_path=str(folder))
            except FileNotFoundError:
                continue
            for hit in matched:
                mine = by_resolved.get(Path(hit).resolve())
                if mine is not None:
                    out.setdefault(mine, str(name))
    return out


def splits_read(files: list[DataFile]) -> list[str]:
    """The distinct splits among ``files`` (named by the folder's layout), sorted."""
    return sorted({f.split for f in files if f.split})


# ---- reading rows ------------------------------------------------------------------------------


def _open_binary(path: Path, compression: str | None) -> IO[bytes]:
    raw = open_regular_file(path)
    if compression is None:
        return raw
    import pyarrow as pa

    # pyarrow decompresses the stream as it is read; our file object stays its source.
    stream = pa.CompressedInputStream(pa.PythonFile(raw, mode="r"), compression)
    return io.BufferedReader(stream)


def iter_rows(file: DataFile) -> Iterator[tuple[int, Any]]:
    """``(row number, raw row)`` of every row of ``file``; unparseable rows as :class:`BadRow`.

    Raises :class:`SourceProblem` for problems of the whole file (unreadable, not the format it
    claims to be, text that is not UTF-8 where rows cannot be told apart).
    """
    try:
        if file.format in ("parquet", "arrow"):
            yield from _columnar(file)
            return
        with _open_binary(file.path, file.compression) as f:
            yield from _TEXT_READERS[file.format](f, file)
    except UnreadableFile as exc:
        raise SourceProblem(
            "dataset_not_found", f"cannot read {file.label}: {exc.reason}", _PATH_HINT
        ) from None
    except OSError as exc:  # a corrupt compressed stream, an I/O error
        raise SourceProblem(
            "bad_dataset_row", f"cannot read {file.label}: {exc.strerror or exc}", f"check {file.path}"
        ) from None


def _decoded_lines(f: IO[bytes], file: DataFile) -> Iterator[tuple[int, str | BadRow]]:
    for number, raw in enumerate(f, start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            yield number, BadRow(f"not UTF-8 text (byte {exc.start} of the line)")
            continue
        if number == 1:
            line = line.removeprefix("\ufeff")  # spreadsheet exports start with a BOM
        yield number, line


def _read_jsonl(f: IO[bytes], file: DataFile) -> Iterator[tuple[int, Any]]:
    for number, line in _decoded_lines(f, file):
        if isinstance(line, BadRow):
            yield number, line
        elif line.strip():
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as exc:
                yield number, BadRow(f"invalid JSON at column {exc.colno}: {exc.msg}")
            except RecursionError:
                yield number, BadRow("JSON nested too deeply")


def _text(f: IO[bytes], file: DataFile) -> str:
    data = f.read()
    try:
        return data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise SourceProblem(
            "bad_dataset_row",
            f"{file.label} line {line}: not UTF-8 text (byte {exc.start})",
            "save the file as UTF-8",
        ) from None


def _read_json(f: IO[bytes], file: DataFile) -> Iterator[tuple[int, Any]]:
    text = _text(f, file)
    if not text.strip():
        return
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SourceProblem(
            "bad_dataset_row",
            f"{file.label} line {exc.lineno}: invalid JSON at column {exc.colno}: {exc.msg}",
            "a .json dataset is one JSON document (an array of rows); use .jsonl for one row per line",
        ) from None
    except RecursionError:
        raise SourceProblem("bad_dataset_row", f"{file.label}: JSON nested too deeply", "") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise SourceProblem(
            "bad_dataset_row",
            f'{file.label}: a JSON dataset must be an array of rows or {{"data": [...]}}, got {type(data).__name__}',
            "use an array of row objects, or JSONL with one object per line",
        )
    yield from enumerate(data, start=1)


def _read_delimited(f: IO[bytes], file: DataFile) -> Iterator[tuple[int, Any]]:
    # Conversation cells can be long JSON; the csv module's 128 KiB field default is for other files.
    csv.field_size_limit(max(csv.field_size_limit(), 1 << 30))
    text = io.TextIOWrapper(f, encoding="utf-8-sig", newline="")
    reader = csv.DictReader(text, delimiter="\t" if file.format == "tsv" else ",")
    try:
        header = reader.fieldnames or []
    except csv.Error as exc:
        raise SourceProblem("bad_dataset_row", f"{file.label} header: {exc}", "fix the header line") from None
    except UnicodeDecodeError as exc:
        raise _not_utf8(file, 1, exc) from None
    numbered = enumerate(reader, start=1)
    while True:
        try:
            number, row = next(numbered)
        except StopIteration:
            return
        except csv.Error as exc:
            # The reader cannot resynchronize after a malformed record: report it and stop.
            yield reader.line_num, BadRow(f"{exc} (counting file lines)")
            return
        except UnicodeDecodeError as exc:
            raise _not_utf8(file, reader.line_num + 1, exc) from None
        if None in row:
            yield (
                number,
                BadRow(f"{len(header) + len(row[None])} values but the header has {len(header)} columns"),
            )
            continue
        # Empty cells are absent values; short rows give None for the missing cells.
        cleaned: dict[str, Any] = {k: v for k, v in row.items() if v not in (None, "")}
        bad = None
        for key in ("messages", "conversations", "tools"):
            cell = cleaned.get(key)
            if isinstance(cell, str) and cell.lstrip().startswith("["):
                try:
                    cleaned[key] = json.loads(cell)
                except json.JSONDecodeError as exc:
                    bad = BadRow(f"column {key!r} holds invalid JSON: {exc.msg}")
        yield number, bad or cleaned


def _not_utf8(file: DataFile, line: int, exc: UnicodeDecodeError) -> SourceProblem:
    return SourceProblem(
        "bad_dataset_row",
        f"{file.label} near line {line}: not UTF-8 text ({exc.reason})",
        "save the file as UTF-8",
    )


def _read_paragraphs(f: IO[bytes], file: DataFile) -> Iterator[tuple[int, Any]]:
    """Blank-line separated documents, each as ``{"text": ...}`` numbered by the line it starts on."""
    current: list[str] = []
    start = 1
    for number, line in _decoded_lines(f, file):
        if isinstance(line, BadRow):
            raise SourceProblem(
                "bad_dataset_row", f"{file.label} line {number}: {line.message}", "save the file as UTF-8"
            )
        line = line.rstrip("\r\n")
        if line.strip():
            if not current:
                start = number
            current.append(line)
        elif current:
            yield start, {"text": "\n".join(current)}
            current = []
    if current:
        yield start, {"text": "\n".join(current)}


_TEXT_READERS = {
    "jsonl": _read_jsonl,
    "json": _read_json,
    "csv": _read_delimited,
    "tsv": _read_delimited,
    "txt": _read_paragraphs,
}


def _columnar(file: DataFile) -> Iterator[tuple[int, Any]]:
    import pyarrow as pa

    with open_regular_file(file.path) as raw:
        try:
            batches = _parquet_batches(raw) if file.format == "parquet" else _arrow_batches(raw)
            number = 0
            for batch in batches:
                for row in batch.to_pylist():
                    number += 1
                    yield number, row
        except (pa.ArrowException, ValueError) as exc:
            raise SourceProblem(
                "bad_dataset_row",
                f"{file.label} is not a readable {file.format} file: {exc}",
                f"write it again, or set file_format if it is not {file.format}",
            ) from None


def _parquet_batches(raw: IO[bytes]) -> Iterator[Any]:
    import pyarrow.parquet as pq

    yield from pq.ParquetFile(raw).iter_batches(batch_size=BATCH_ROWS)


def _arrow_batches(raw: IO[bytes]) -> Iterator[Any]:
    import pyarrow as pa

    source = pa.PythonFile(raw, mode="r")
    try:
        reader = pa.ipc.open_file(source)
    except pa.ArrowInvalid:
        raw.seek(0)  # not the random-access file format: the stream format datasets writes
        stream = pa.ipc.open_stream(pa.PythonFile(raw, mode="r"))
        for batch in stream:
            yield from _slices(batch)
        return
    for i in range(reader.num_record_batches):
        yield from _slices(reader.get_batch(i))


def _slices(batch: Any) -> Iterator[Any]:
    for offset in range(0, batch.num_rows, BATCH_ROWS):
        yield batch.slice(offset, BATCH_ROWS)
