"""Job configs: parse, infer the kind, validate everything at once.

``parse_job_config(raw)`` accepts a JSON text (str/bytes), a dict, or ``("file", path)``
(:mod:`finetune_worker.api` turns the wire forms into these, in one place)
and returns ``(kind, model)`` with ``model`` a validated pydantic model, or raises
:class:`~finetune_worker.errors.ConfigError` listing every problem with its JSON path.
Models may define ``environment_issues(self) -> list[ConfigIssue]`` for checks that look at
the file system (paths exist, output directory state); those run after the schema checks
and are reported together with them, before anything heavy loads.
"""

from __future__ import annotations

import importlib
import json
import os
from typing import Any

from pydantic import BaseModel, ValidationError

from finetune_worker.errors import ConfigError, ConfigIssue
from finetune_worker.files import UnreadableFile, read_regular_file
from finetune_worker.security import confinement_issues, outside_issue, redact_issues

#: kind -> "module:Class" of its pydantic model (imported lazily: pydantic models are cheap,
#: but each kind's module is owned by its feature).
KIND_MODELS: dict[str, str] = {
    "train": "finetune_worker.config.train:TrainConfig",
    "merge_lora": "finetune_worker.config.merge:MergeLoraConfig",
    "merge": "finetune_worker.config.merge:MergeKitConfig",
    "evaluate": "finetune_worker.config.evaluate:EvaluateConfig",
    "generate": "finetune_worker.config.evaluate:GenerateConfig",
}

TEST_KINDS: dict[str, str] = {"test_steps": "finetune_worker.testjobs:TestStepsConfig"}


def test_jobs_enabled() -> bool:
    """Test-only job kinds exist only when the worker was started with FINETUNE_WORKER_TEST_JOBS=1."""
    return os.environ.get("FINETUNE_WORKER_TEST_JOBS") == "1"


def known_kinds() -> dict[str, str]:
    kinds = dict(KIND_MODELS)
    if test_jobs_enabled():
        kinds.update(TEST_KINDS)
    return kinds


def model_class(kind: str) -> type[BaseModel]:
    module_name, cls_name = known_kinds()[kind].split(":")
    cls: type[BaseModel] = getattr(importlib.import_module(module_name), cls_name)
    return cls


#: Largest config file or text accepted (a real one is a few KiB; MergeKit YAMLs are separate).
MAX_CONFIG_BYTES = 16 * 1024 * 1024

_BOM = "\ufeff"


def load_raw(raw: Any) -> dict[str, Any]:
    """Turn a config (a dict, a JSON document as str/bytes, or ``("file", path)``) into a dict.

    A str is always the document itself, never a file name: naming a file takes the explicit
    ``("file", path)`` form (``{file, Path}`` on the wire), which alone reads from disk and is
    confined to the allowed roots (:func:`read_config_file`). Raises ConfigError naming what is
    wrong, and never echoes the config's text (it may hold secrets).
    """
    source = "<config>"
    if isinstance(raw, tuple) and len(raw) == 2 and str(raw[0]) == "file":
        path = os.fsdecode(raw[1]) if isinstance(raw[1], (bytes, bytearray)) else str(raw[1])
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
    if isinstance(raw, str):
        raw = _parse_text(raw.removeprefix(_BOM), source)
    if not isinstance(raw, dict):
        raise ConfigError([ConfigIssue("", f"a job config must be a JSON object, got {type(raw).__name__}")])
    return {str(k): v for k, v in raw.items()}


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
                    "a config sent as text must be the JSON document itself, not a file name; to name "
                    "a file send {file, Path} (Elixir: {:file, path})",
                )
            ]
        )
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
    if "job" in data:
        kind = data["job"]
        if not isinstance(kind, str) or kind not in known_kinds():
            raise ConfigError(
                [ConfigIssue("job", f"unknown job kind; expected one of {sorted(KIND_MODELS)}", kind)]
            )
        return kind
    keys = set(data)
    if "yaml_config_path" in keys:
        return "merge"
    if "adapter_path" in keys and "base_model_path" in keys:
        return "merge_lora"
    if keys & {"model_name", "training_parameters"}:
        return "train"
    if "prompts" in keys:
        return "generate"
    if "model_path" in keys and "dataset" in keys:
        return "evaluate"
    raise ConfigError(
        [
            ConfigIssue(
                "job",
                'cannot tell the job kind: set "job" to one of '
                f"{sorted(KIND_MODELS)} (or use a seed format: model_name/training_parameters for "
                "training, base_model_path/adapter_path for a LoRA merge, yaml_config_path for MergeKit)",
            )
        ]
    )


def issues_from_validation(exc: ValidationError) -> list[ConfigIssue]:
    out: list[ConfigIssue] = []
    for err in exc.errors():
        path = json_path(err.get("loc", ()))
        message = err.get("msg", "invalid value")
        # pydantic prefixes messages raised by our validators; the user needs only our words.
        for prefix in ("Value error, ", "Assertion failed, "):
            message = message.removeprefix(prefix)
        if err.get("type") == "extra_forbidden":
            message = "unknown key (not part of this job's config; see `finetune-worker schema`)"
        value = err.get("input") if err.get("type") != "missing" else None
        if isinstance(value, dict):
            value = None  # don't echo whole sub-documents back
        out.append(ConfigIssue(path, message, value))
    return out


def json_path(loc: Any) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        else:
            parts.append(("." if parts else "") + str(item))
    return "".join(parts)


#: A job config is a few hundred values; past this many the document is refused before the
#: schema sees it (10^6 unknown keys took pydantic two minutes on the main thread).
MAX_CONFIG_NODES = 100_000
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


def parse_job_config(raw: Any) -> tuple[str, BaseModel]:
    """Parse and fully validate a job config; raise ConfigError with every problem at once."""
    data = load_raw(raw)
    problems = document_issues(data)
    if problems:
        raise ConfigError(redact_issues(problems))
    kind = infer_kind(data)
    cls = model_class(kind)
    try:
        model = cls.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_bounded(redact_issues(issues_from_validation(exc)))) from None
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


def json_schema() -> dict[str, Any]:
    """The JSON schema of every production job kind (``finetune-worker schema``)."""
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "finetune-worker job config",
        "oneOf": [model_class(kind).model_json_schema() for kind in KIND_MODELS],
    }
