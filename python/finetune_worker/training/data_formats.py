"""Read a dataset file and turn every row into a checked, normalized example.

Files: JSONL, JSON (an array of objects, or ``{"data": [...]}``), CSV and plain text. Rows:
plain text, Q&A, instruction and conversations (``messages``/``conversations`` with
``role``/``content``, or ShareGPT's ``from``/``value``). Every row is checked before any
tokenization, and the first few bad ones fail the job together, each with the row number a
person would count (JSONL line, CSV data row, JSON array position, text paragraph's line).
Nothing here imports torch or transformers.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune_worker.config.data import DataConfig
from finetune_worker.errors import JobFailed

MAX_REPORTED = 5  # bad rows listed in one error; more are counted, not listed
#: Longest chat-like row, in characters of message content: far beyond any context length (rows
#: are cut to data.max_seq_length tokens), and a 32 MiB row once made the tokenizer abort the
#: whole worker. Raw text rows may be longer: they are tokenized in pieces and cut into blocks.
MAX_CHAT_ROW_CHARS = 1_000_000

EXTENSIONS = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".txt": "txt",
    ".text": "txt",
    ".md": "txt",
}

ROLE_MAP = {"system": "system", "user": "user", "assistant": "assistant", "human": "user", "gpt": "assistant"}

REQUIRED = {
    "text": ("text",),
    "qa": ("question", "answer"),
    "instruction": ("instruction", "output"),
}
NEEDS = {
    "text": "a text row needs text",
    "qa": "a Q&A row needs question and answer",
    "instruction": "an instruction row needs instruction and output (input is optional)",
}


@dataclass
class Example:
    """One validated row: ``text`` for plain text, ``messages`` for everything chat-like."""

    row: int
    kind: str  # text | qa | instruction | conversations
    text: str | None = None
    messages: list[dict[str, str]] = field(default_factory=list)


class RowError(ValueError):
    """A problem with one row; the message already starts with ``row N:``."""


def file_format(path: Path, cfg: DataConfig) -> str:
    if cfg.file_format:
        return cfg.file_format
    fmt = EXTENSIONS.get(path.suffix.lower())
    if fmt is None:
        raise JobFailed(
            "invalid_config",
            f"cannot tell the file format of {path.name} from its extension {path.suffix!r}",
            hint='set data.file_format to "jsonl", "json", "csv" or "txt"',
        )
    return fmt


def load_examples(path: Path, cfg: DataConfig) -> list[Example]:
    """Read ``path`` and return every row as an :class:`Example`, or fail naming the bad rows."""
    path = Path(path)
    if not path.is_file():
        what = "is a directory, not a file" if path.is_dir() else "does not exist"
        raise JobFailed(
            "dataset_not_found",
            f"dataset file {path} {what}",
            hint="check dataset.path; a relative path resolves against the worker's working directory",
            details={"path": str(path)},
        )
    fmt = file_format(path, cfg)
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: spreadsheet exports start with a BOM
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise _bad(path, [f"line {line}: not UTF-8 text (byte {exc.start})"], 1) from None
    if not text.strip():
        raise JobFailed(
            "bad_dataset_row",
            f"dataset file {path} is empty",
            hint="the file has no rows; point dataset.path at your data",
            details={"path": str(path)},
        )
    if fmt == "txt":
        if cfg.format not in ("auto", "text"):
            raise JobFailed(
                "invalid_config",
                f"data.format is {cfg.format!r} but {path.name} is a plain text file, which only holds text",
                hint='use data.format "auto" or "text", or a JSONL/JSON/CSV file for chat-like rows',
            )
        return [Example(row=n, kind="text", text=p) for n, p in _paragraphs(text)]

    raw_rows, errors = _READERS[fmt](text)
    renames = cfg.column_renames()
    examples: list[Example] = []
    for number, row in raw_rows:
        try:
            examples.append(_normalize(number, _rename(row, renames), cfg))
        except RowError as exc:
            errors.append(str(exc))
    if errors:
        hint_extra = f" (data.columns maps {renames})" if renames else ""
        raise _bad(path, errors, len(errors), hint_extra)
    if not examples:
        raise JobFailed("bad_dataset_row", f"dataset file {path} has no rows", hint="add rows to the file")
    return examples


def _bad(path: Path, errors: list[str], count: int, hint_extra: str = "") -> JobFailed:
    shown = errors[:MAX_REPORTED]
    message = "; ".join(shown)
    if count > len(shown):
        message += f"; and {count - len(shown)} more bad row(s)"
    return JobFailed(
        "bad_dataset_row",
        message,
        hint=f"fix the listed rows in {path}{hint_extra}; rows are numbered from 1 as an editor "
        "counts them (JSONL line, CSV data row after the header, JSON array position)",
        details={"path": str(path), "bad_rows": count, "errors": shown},
    )


# ---- readers: text -> ([(row number, dict)], [errors]) ----


def _read_jsonl(text: str) -> tuple[list[tuple[int, Any]], list[str]]:
    rows, errors = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append((number, json.loads(line)))
        except json.JSONDecodeError as exc:
            errors.append(f"row {number}: invalid JSON at column {exc.colno}: {exc.msg}")
    return rows, errors


def _read_json(text: str) -> tuple[list[tuple[int, Any]], list[str]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        return [], [f"line {exc.lineno}: invalid JSON at column {exc.colno}: {exc.msg}"]
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        return [], [
            f'a JSON dataset must be an array of rows or {{"data": [...]}}, got {type(data).__name__}'
        ]
    return list(enumerate(data, start=1)), []


def _read_csv(text: str) -> tuple[list[tuple[int, Any]], list[str]]:
    # Conversation cells can be long JSON; the csv module's 128 KiB field default is for other files.
    csv.field_size_limit(max(csv.field_size_limit(), 1 << 30))
    reader = csv.DictReader(io.StringIO(text))
    rows: list[tuple[int, Any]] = []
    errors: list[str] = []
    try:
        header = reader.fieldnames or []
    except csv.Error as exc:
        return rows, [f"header: {exc}"]
    numbered = enumerate(reader, start=1)
    while True:
        try:
            number, row = next(numbered)
        except StopIteration:
            break
        except csv.Error as exc:
            # The reader cannot resynchronize after a malformed record: report it and stop.
            errors.append(f"row {reader.line_num}: {exc} (counting file lines)")
            break
        if None in row:
            errors.append(
                f"row {number}: {len(header) + len(row[None])} values but the header has {len(header)} columns"
            )
            continue
        # Empty cells are absent values; short rows give None for the missing cells.
        cleaned = {k: v for k, v in row.items() if v not in (None, "")}
        for key in ("messages", "conversations"):
            if isinstance(cleaned.get(key), str) and cleaned[key].lstrip().startswith("["):
                try:
                    cleaned[key] = json.loads(cleaned[key])
                except json.JSONDecodeError as exc:
                    errors.append(f"row {number}: column {key!r} holds invalid JSON: {exc.msg}")
        rows.append((number, cleaned))
    return rows, errors


_READERS = {"jsonl": _read_jsonl, "json": _read_json, "csv": _read_csv}


def _paragraphs(text: str) -> list[tuple[int, str]]:
    """Blank-line separated documents with the line each starts on."""
    out: list[tuple[int, str]] = []
    current: list[str] = []
    start = 1
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            if not current:
                start = number
            current.append(line)
        elif current:
            out.append((start, "\n".join(current)))
            current = []
    if current:
        out.append((start, "\n".join(current)))
    return out


# ---- rows -> examples ----


def _rename(row: Any, renames: dict[str, str]) -> Any:
    if not renames or not isinstance(row, dict):
        return row
    return {renames.get(k, k): v for k, v in row.items()}


def detect_format(row: dict[str, Any]) -> str | None:
    if "messages" in row or "conversations" in row:
        return "conversations"
    if "question" in row or "answer" in row:
        return "qa"
    if "instruction" in row or "output" in row:
        return "instruction"
    if "text" in row:
        return "text"
    return None


def _normalize(number: int, row: Any, cfg: DataConfig) -> Example:
    where = f"row {number}"
    if not isinstance(row, dict):
        raise RowError(f"{where}: expected an object with named fields, got {_type(row)}")
    kind = cfg.format if cfg.format != "auto" else detect_format(row)
    if kind is None:
        keys = ", ".join(sorted(map(str, row))) or "none"
        raise RowError(
            f"{where}: cannot tell its format from its keys ({keys}); expected text, question+answer, "
            "instruction+output, or messages/conversations (data.columns can rename yours)"
        )
    if kind == "conversations":
        return _bounded(Example(number, kind, messages=_conversation(where, row, cfg)))
    for key in REQUIRED[kind]:
        if key not in row or row[key] is None:
            raise RowError(f"{where}: missing key {key!r} ({NEEDS[kind]})")
        _string(where, row, key, allow_empty=False)
    if kind == "text":
        return Example(number, kind, text=row["text"])
    system = _optional_string(where, row, "system") or cfg.system_prompt
    if kind == "qa":
        user, answer = row["question"], row["answer"]
    else:
        extra = _optional_string(where, row, "input")
        user = row["instruction"] + (f"\n\n{extra}" if extra else "")
        answer = row["output"]
    messages = [{"role": "system", "content": system}] if system else []
    messages += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    return _bounded(Example(number, kind, messages=messages))


def _bounded(example: Example) -> Example:
    size = sum(len(m["content"]) for m in example.messages)
    if size > MAX_CHAT_ROW_CHARS:
        raise RowError(
            f"row {example.row}: its messages hold {size:,} characters, over the {MAX_CHAT_ROW_CHARS:,} a "
            f"chat row may have (it would be cut to data.max_seq_length tokens anyway); split it, or put "
            "long documents in text rows"
        )
    return example


def _conversation(where: str, row: dict[str, Any], cfg: DataConfig) -> list[dict[str, str]]:
    key = "messages" if "messages" in row else "conversations"
    turns = row[key]
    if not isinstance(turns, list):
        raise RowError(f"{where}: key {key!r} must be a list of messages, got {_type(turns)}")
    if not turns:
        raise RowError(f"{where}: {key!r} is empty (a conversation needs at least one assistant message)")
    messages: list[dict[str, str]] = []
    for i, turn in enumerate(turns, start=1):
        at = f"{where}: {key}[{i}]"
        if not isinstance(turn, dict):
            raise RowError(f"{at} must be an object with role and content, got {_type(turn)}")
        role_key, content_key = ("role", "content") if "role" in turn else ("from", "value")
        missing = [k for k in (role_key, content_key) if k not in turn]
        if missing:
            raise RowError(
                f"{at}: missing key {missing[0]!r} (a message needs role and content, or ShareGPT's from and value)"
            )
        role = ROLE_MAP.get(turn[role_key]) if isinstance(turn[role_key], str) else None
        if role is None:
            raise RowError(
                f"{at}: unknown role {turn[role_key]!r} (expected system, user, assistant, or ShareGPT's human, gpt)"
            )
        if not isinstance(turn[content_key], str):
            raise RowError(f"{at}: key {content_key!r} must be a string, got {_type(turn[content_key])}")
        if role == "system" and i != 1:
            raise RowError(f"{at}: a system message must come first")
        messages.append({"role": role, "content": turn[content_key]})
    if not any(m["role"] == "assistant" for m in messages):
        raise RowError(f"{where}: the conversation has no assistant message, so there is nothing to train on")
    if messages[0]["role"] != "system":
        system = _optional_string(where, row, "system") or cfg.system_prompt
        if system:
            messages.insert(0, {"role": "system", "content": system})
    return messages


def _string(where: str, row: dict[str, Any], key: str, *, allow_empty: bool) -> str:
    value = row[key]
    if not isinstance(value, str):
        raise RowError(f"{where}: key {key!r} must be a string, got {_type(value)}")
    if not allow_empty and not value.strip():
        raise RowError(f"{where}: key {key!r} is empty")
    return value


def _optional_string(where: str, row: dict[str, Any], key: str) -> str | None:
    if row.get(key) is None:
        return None
    return _string(where, row, key, allow_empty=True)


def _type(value: Any) -> str:
    names = {
        dict: "an object",
        list: "a list",
        str: "a string",
        bool: "a boolean",
        int: "a number",
        float: "a number",
    }
    return "null" if value is None else names.get(type(value), type(value).__name__)
