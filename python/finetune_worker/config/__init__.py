"""Job configs: parse, infer the kind, validate everything at once.

``parse_job_config(raw)`` accepts a JSON text (str/bytes), a dict, or ``("file", path)``
(:mod:`finetune_worker.server.api` turns the wire forms into these, in one place)
and returns ``(kind, model)`` with ``model`` a validated pydantic model, or raises
:class:`~finetune_worker.errors.ConfigError` listing every problem with its JSON path.
Models may define ``environment_issues(self) -> list[ConfigIssue]`` for checks that look at
the file system (paths exist, output directory state); those run after the schema checks
and are reported together with them, before anything heavy loads.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from finetune_worker import kinds
from finetune_worker.config.mergekit_yaml import model_references
from finetune_worker.config.paths import json_path, split_path
from finetune_worker.config.yaml_doc import YamlProblem, load_bounded_yaml, value_lines
from finetune_worker.errors import ConfigError, ConfigIssue
from finetune_worker.files import UnreadableFile, read_regular_file
from finetune_worker.security import allowed_roots, outside_issue, path_fields, redact_issues, resolve

#: Largest config file or text accepted (a real one is a few KiB; MergeKit YAMLs are separate).
MAX_CONFIG_BYTES = 16 * 1024 * 1024

_BOM = "\ufeff"


def load_raw(raw: Any) -> dict[str, Any]:
    """Turn a config (a dict, a JSON or YAML document as str/bytes, or ``("file", path)``) into a dict.

    A str is always the document itself, never a file name: naming a file takes the explicit
    ``("file", path)`` form (``{file, Path}`` on the wire), which alone reads from disk and is
    confined to the allowed roots (:func:`read_config_file`). Raises ConfigError naming what is
    wrong, and never echoes the config's text (it may hold secrets).
    """
    return load_document(raw)[0]


def load_document(raw: Any) -> tuple[dict[str, Any], str | None]:
    """:func:`load_raw`, and the document's text when it came as text (for line numbers)."""
    source = "<config>"
    if isinstance(raw, tuple) and len(raw) == 2 and str(raw[0]) == "file":
        path = os.fsdecode(bytes(raw[1])) if isinstance(raw[1], (bytes, bytearray)) else str(raw[1])
        source = path
        raw = read_config_file(path)
    if isinstance(raw, (bytes, bytearray)):
        if len(raw) > MAX_CONFIG_BYTES:
            raise ConfigError(
                [ConfigIssue("", f"config is {len(raw)} bytes, over the {MAX_CONFIG_BYTES} limit")]
            )
        try:
            raw = bytes(raw).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError([ConfigIssue("", f"config is not UTF-8 text (byte {exc.start})")]) from None
    text = None
    if isinstance(raw, str):
        text = raw.removeprefix(_BOM)
        raw = _parse_text(text, source)
    if not isinstance(raw, dict):
        raise ConfigError(
            [
                ConfigIssue(
                    "", f"a job config must be a JSON object (a YAML mapping), got {type(raw).__name__}"
                )
            ]
        )
    return {str(k): v for k, v in raw.items()}, text


def _parse_text(text: str, source: str) -> Any:
    if len(text) > MAX_CONFIG_BYTES:
        raise ConfigError(
            [ConfigIssue("", f"config is {len(text)} characters, over the {MAX_CONFIG_BYTES} limit")]
        )
    stripped = text.strip()
    if source == "<config>" and stripped and stripped[0] not in "{[" and "\n" not in stripped:
        raise ConfigError(
            [
                ConfigIssue(
                    "",
                    "a config sent as text must be the JSON or YAML document itself, not a file name; to "
                    "name a file send {file, Path} (Elixir: {:file, path})",
                )
            ]
        )
    if source.lower().endswith((".yaml", ".yml")) or (stripped and stripped[0] not in "{["):
        try:
            return load_bounded_yaml(text)
        except YamlProblem as exc:
            raise ConfigError([ConfigIssue("", f"invalid YAML in {source}: {exc}")]) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            [ConfigIssue("", f"invalid JSON in {source} at line {exc.lineno}, column {exc.colno}: {exc.msg}")]
        ) from None
    except RecursionError:
        raise ConfigError([ConfigIssue("", f"JSON in {source} is nested too deeply")]) from None
    except ValueError as exc:  # an integer past Python's 4,300-digit conversion limit
        raise ConfigError(
            [ConfigIssue("", f"JSON in {source} holds a number that is too long: {exc}")]
        ) from None


def read_config_file(path: str) -> str:
    """The text of a config file: inside the allowed roots, a regular file, at most MAX_CONFIG_BYTES
    (:func:`finetune_worker.files.read_regular_file`: a FIFO named as a config must not hang the
    worker's main thread)."""
    outside = outside_issue("", path)
    if outside is not None:
        raise ConfigError([ConfigIssue("", f"config file: {outside.message}", path)])
    try:
        data = read_regular_file(path, MAX_CONFIG_BYTES)
    except UnreadableFile as exc:
        raise ConfigError([ConfigIssue("", f"cannot read config file {path}: {exc.reason}")]) from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            [ConfigIssue("", f"config file {path} is not UTF-8 text (byte {exc.start})")]
        ) from None


def infer_kind(data: dict[str, Any]) -> str:
    """The job kind: ``"job"`` if given, else from the keys (so the seed formats need no ``job``)."""
    names = sorted(kinds.production_kinds())
    if "job" in data:
        kind = data["job"]
        if not isinstance(kind, str) or kinds.get(kind) is None:
            raise ConfigError([ConfigIssue("job", f"unknown job kind; expected one of {names}", kind)])
        return kind
    found = kinds.recognise(set(data))
    if found is not None:
        return found.name
    raise ConfigError(
        [
            ConfigIssue(
                "job",
                f'cannot tell the job kind: set "job" to one of {names} (or use a seed format: '
                "model_name/training_parameters for training, base_model_path/adapter_path for a LoRA "
                "merge, yaml_config_path for MergeKit)",
            )
        ]
    )


def model_class(kind: str) -> type[BaseModel]:
    """The config schema of ``kind`` (a known one: see :func:`infer_kind`)."""
    found = kinds.get(kind)
    if found is None:
        raise KeyError(kind)
    cls: type[BaseModel] = found.config
    return cls


def issues_from_validation(exc: ValidationError, cls: type[BaseModel] | None = None) -> list[ConfigIssue]:
    """One issue per pydantic error; an unknown key of ``cls``'s config gets a "did you mean"."""
    from finetune_worker.config.suggest import suggestion

    out: list[ConfigIssue] = []
    for number, err in enumerate(exc.errors()):
        path = json_path(err.get("loc", ()))
        message = err.get("msg", "invalid value")
        # pydantic prefixes messages raised by our validators; the user needs only our words.
        for prefix in ("Value error, ", "Assertion failed, "):
            message = message.removeprefix(prefix)
        if err.get("type") == "extra_forbidden":
            # Only reported issues get a suggestion (18,000 unknown keys took 10 s of difflib).
            reported = number < MAX_ISSUES
            meant = suggestion(cls, tuple(err.get("loc", ()))) if cls is not None and reported else None
            message = (
                f"unknown key (did you mean {meant}?)"
                if meant
                else "unknown key (not part of this job's config; see `finetune-worker schema`)"
            )
        value = err.get("input") if err.get("type") != "missing" else None
        if isinstance(value, dict):
            value = None  # don't echo whole sub-documents back
        out.append(ConfigIssue(path, message, value))
    return out


#: A job config is a few hundred values; past this many the document is refused before the
#: schema sees it (10^6 unknown keys took pydantic two minutes on the main thread).
MAX_CONFIG_NODES = 100_000
#: Configs up to this size get line numbers on their problems (a real one is a few KiB).
MAX_LINED_CHARS = 256 * 1024
#: Issues reported at most; the rest are counted in the last one.
MAX_ISSUES = 100
#: Longest path value accepted (Linux PATH_MAX).
MAX_PATH_CHARS = 4096


def document_issues(data: Any) -> list[ConfigIssue]:
    """Size and path problems of a raw config document, found before schema validation."""
    from finetune_worker.security import path_fields

    nodes, stack = 0, [data]
    while stack:
        item = stack.pop()
        nodes += 1
        if nodes > MAX_CONFIG_NODES:
            return [
                ConfigIssue(
                    "",
                    f"the config holds more than {MAX_CONFIG_NODES} values; a job config has a few hundred",
                )
            ]
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    issues = []
    for where, value in path_fields(data):
        if "\0" in value:
            issues.append(ConfigIssue(where, "a path cannot contain a NUL character"))
        elif len(value) > MAX_PATH_CHARS:
            issues.append(
                ConfigIssue(where, f"a path of {len(value)} characters is longer than {MAX_PATH_CHARS}")
            )
    return issues


def _bounded(issues: list[ConfigIssue]) -> list[ConfigIssue]:
    if len(issues) <= MAX_ISSUES:
        return issues
    rest = len(issues) - MAX_ISSUES + 1
    return [*issues[: MAX_ISSUES - 1], ConfigIssue("", f"and {rest} more problem(s)")]


def parse_job_config(raw: Any, overrides: Sequence[str] = ()) -> tuple[str, BaseModel]:
    """Parse and fully validate a job config; raise ConfigError with every problem at once
    (each issue with its line when the config came as text or a file). ``overrides`` are
    ``KEY=VALUE`` strings applied first (``--set``, :mod:`finetune_worker.config.overrides`)."""
    data, text = load_document(raw)
    overridden: set[str] = set()
    if overrides:
        from finetune_worker.config.overrides import apply_overrides

        data = copy.deepcopy(data)  # the caller's nested dicts stay as they were
        overridden = apply_overrides(data, overrides)
    try:
        return _validate(data)
    except ConfigError as exc:
        if text is None and not overridden:
            raise
        issues = with_lines(exc.issues, text) if text is not None else exc.issues
        # A key set on the command line has no line in the file: say where it came from instead.
        raise ConfigError(
            [
                dataclasses.replace(i, line=None, message=i.message + " (set with --set)")
                if any(i.path == p or i.path.startswith((p + ".", p + "[")) for p in overridden)
                else i
                for i in issues
            ]
        ) from None


def with_lines(issues: list[ConfigIssue], text: str) -> list[ConfigIssue]:
    """``issues`` with the line of each one's path in ``text`` (the nearest enclosing key's
    when the path itself is not there, e.g. a missing key). Skipped for a one-line document and
    for one larger than any real config (composing YAML nodes costs ~30 us per value)."""
    if "\n" not in text.strip() or len(text) > MAX_LINED_CHARS:
        return issues
    lines = value_lines(text)
    if len(set(lines.values())) < 2:
        return issues  # a one-line document: every line number would be 1
    out = []
    for issue in issues:
        line = _line_of(split_path(issue.path), lines)
        out.append(dataclasses.replace(issue, line=line) if line is not None else issue)
    return out


def _line_of(parts: list[str | int], lines: dict[tuple[str | int, ...], int]) -> int | None:
    """The line of the deepest part of ``parts`` the document has. A level the document leaves
    out is stepped over (``dataset.sources[0]`` of a ``dataset`` written as a list)."""
    found, i = None, 0
    prefix: tuple[str | int, ...] = ()
    while i < len(parts):
        here = (*prefix, parts[i])
        if here in lines:
            prefix, found, i = here, lines[here], i + 1
        elif i + 1 < len(parts) and (*prefix, parts[i + 1]) in lines:
            i += 1
        else:
            break
    return found


def _validate(data: dict[str, Any]) -> tuple[str, BaseModel]:
    problems = document_issues(data)
    if problems:
        raise ConfigError(redact_issues(problems))
    kind = infer_kind(data)
    cls = model_class(kind)
    try:
        model = cls.model_validate(data)
    except ValidationError as exc:
        issues = redact_issues(issues_from_validation(exc, cls))
        raise ConfigError(_bounded(issues + _partial_issues(cls, data))) from None
    # Confinement first: no other check may probe (and report on) a path outside the roots.
    outside = confinement_issues(model)
    if outside:
        raise ConfigError(outside)
    check = getattr(model, "environment_issues", None)
    if check is not None:
        try:
            issues = list(check())
        except OSError as exc:  # a path this user may not look at: an answer, not a crash
            where = f" '{exc.filename}'" if exc.filename else ""
            raise ConfigError(
                [ConfigIssue("", f"cannot check the config's paths: {exc.strerror or exc}{where}")]
            ) from None
        if issues:
            raise ConfigError(issues)
    return kind, model


def _partial_issues(cls: type[BaseModel], data: dict[str, Any]) -> list[ConfigIssue]:
    """What a kind's ``partial_issues(raw)`` finds in the valid parts of an invalid config (paths
    that do not exist, unreadable data), so one pass reports everything; nothing is probed when a
    path lies outside the allowed roots."""
    check = getattr(cls, "partial_issues", None)
    if check is None:
        return []
    if allowed_roots() is not None and any(outside_issue(f, v) for f, v in path_fields(data)):
        return []
    try:
        return list(check(data))
    except OSError:
        return []


def confinement_issues(model: Any) -> list[ConfigIssue]:
    """Every path of a validated job config that escapes the allowed roots ([] when unconfined),
    the models a MergeKit YAML names included."""
    if allowed_roots() is None:
        return []
    data = model.model_dump(mode="python") if hasattr(model, "model_dump") else dict(model)
    issues = [i for field, value in path_fields(data) if (i := outside_issue(field, value))]
    yaml_path = data.get("yaml_config_path")
    if isinstance(yaml_path, str) and not any(i.path == "yaml_config_path" for i in issues):
        issues += _yaml_model_issues(resolve(yaml_path))
    return issues


def _yaml_model_issues(path: Path) -> list[ConfigIssue]:
    """MergeKit YAML model references resolve against the YAML's directory; each must stay inside."""
    if not path.is_file():
        return []  # reported as missing by the config's own checks

    issues = []
    for where, ref, _ in model_references(path):  # a broken YAML: the config's own checks say why
        issue = outside_issue(f"yaml_config_path: {where}", ref, path.parent)
        if issue is not None:
            issues.append(issue)
    return issues


def json_schema() -> dict[str, Any]:
    """The JSON Schema (2020-12) of every production job kind (``finetune-worker schema``).

    One ``$defs`` at the root for all kinds (pydantic's ``models_json_schema``), so every ``$ref``
    resolves in a standard validator and editors can complete keys. Numbers may be written as
    strings (``"learning_rate": "2e-4"``, and YAML reads ``1e-4`` as a string), as the configs'
    validation accepts them."""
    from pydantic.json_schema import GenerateJsonSchema, models_json_schema

    class Schema(GenerateJsonSchema):
        def float_schema(self, schema: Any) -> dict[str, Any]:
            number = super().float_schema(schema)
            return {"anyOf": [number, {"type": "string", "pattern": NUMBER_STRING}]}

        def int_schema(self, schema: Any) -> dict[str, Any]:
            number = super().int_schema(schema)
            return {"anyOf": [number, {"type": "string", "pattern": INTEGER_STRING}]}

    models = [k.config for k in kinds.production_kinds().values()]
    refs, defs = models_json_schema(
        [(m, "validation") for m in models], ref_template="#/$defs/{model}", schema_generator=Schema
    )
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "finetune-worker job config",
        "oneOf": [refs[(m, "validation")] for m in models],
        **defs,
    }


#: An integer written as a string, as the configs' (lax) validation reads it.
INTEGER_STRING = r"^\s*[+-]?\d+\s*$"
#: A number written as a string, as Python's float() reads it (no inf/nan: the configs refuse them).
NUMBER_STRING = r"^\s*[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?\s*$"
