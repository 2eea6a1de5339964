"""Secrets redaction and ``allowed_roots`` path confinement.

Secrets: a config key or environment variable named like ``*token*``, ``*secret*``,
``*password*``, ``*api_key*`` or ``*credential*`` holds a secret, and so does the user:password
part of a URL. :func:`redact` replaces them before anything is echoed (config issues, summaries,
tracking parameters), so a hub token or tracking key never reaches events, logs or files.

Confinement: with allowed roots set (``--allowed-root PATH``, repeatable, on ``port`` and
``run``; or ``FINETUNE_WORKER_ALLOWED_ROOTS=/a:/b``), every model, dataset, YAML, adapter,
resume and output path of a job config must resolve (symlinks and ``..`` followed, relative
paths against the worker's cwd) to a place inside one of them, and so must the model
references inside a MergeKit YAML. A violation is a config issue naming the field, raised at
``validate``/``submit`` before any other file system check looks at the outside path.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from finetune_worker.errors import ConfigIssue

ENV_ROOTS = "FINETUNE_WORKER_ALLOWED_ROOTS"
REDACTED = "<redacted>"

# A name part ending in "token" (hf_token, HUBTOKEN; not max_new_tokens), or holding secret,
# passw(or)d, credential, or an api key spelled any common way.
_SECRET_PART = re.compile(r"token$|secret|passw|credential|^auth(orization)?$")
_API_KEY = re.compile(r"api[_\-. ]?key", re.IGNORECASE)
_URL_CREDENTIALS = re.compile(r"(?<=://)[^/@\s]+@")  # https://user:pass@host -> https://<redacted>@host
# A credential-shaped query or fragment parameter: ?access_token=..., &api_key=..., #sig=...
_URL_SECRET_PARAM = re.compile(
    r"(?P<head>[?&#;](?P<name>[^=&#;\s]*(?:token|secret|passw|key|auth|sig|credential|session)[^=&#;\s]*)=)"
    r"[^&#;\s]*",
    re.IGNORECASE,
)

#: Config keys whose string value is a file system path (wherever they appear in a config).
PATH_KEYS = frozenset(
    {
        "model_name",
        "model_path",
        "base_model_path",
        "adapter_path",
        "compare_model_path",
        "compare_adapter_path",
        "yaml_config_path",
        "output_dir",
        "output_path",
        "path",
        "log_dir",
        "dir",
        "resume",
        "deepspeed_config",
    }
)
#: URI-valued keys whose ``file:`` / ``sqlite:`` forms name a local path (an MLflow store).
_URI_KEYS = frozenset({"tracking_uri"})
_LOCAL_URI = re.compile(r"^(?:file:(?://)?|sqlite:///)(?P<path>.+)$")
#: ``resume`` values that are not paths.
_NOT_PATHS = {"auto"}

_roots: list[Path] | None = None


# ---- secrets ------------------------------------------------------------------------------


def is_secret_name(name: object) -> bool:
    """Whether a key or variable name says it holds a secret (``hf_token``, ``WANDB_API_KEY``)."""
    text = str(name)
    parts = re.split(r"[_\-.\s]+", text.lower())
    return bool(_API_KEY.search(text)) or any(_SECRET_PART.search(p) for p in parts if p)


def redact(value: Any) -> Any:
    """A copy of ``value`` with secret-named keys' values and URL credentials replaced."""
    if isinstance(value, dict):
        return {k: (REDACTED if is_secret_name(k) else redact(v)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact(v) for v in value)
    if isinstance(value, str):
        return _URL_SECRET_PARAM.sub(
            lambda m: m["head"] + REDACTED, _URL_CREDENTIALS.sub(REDACTED + "@", value)
        )
    return value


def secret_values(environ: dict[str, str] | None = None) -> list[str]:
    """The values of secret-named environment variables (what tests grep outputs for)."""
    env = os.environ if environ is None else environ
    return [v for k, v in env.items() if is_secret_name(k) and len(v) >= 6]


def redact_issues(issues: Iterable[ConfigIssue]) -> list[ConfigIssue]:
    """Issues whose echoed value is redacted when the field's name (or its value) is secret."""
    out = []
    for issue in issues:
        last = re.split(r"[.\[]", issue.path)[-1] if issue.path else ""
        if issue.value is not None and is_secret_name(last):
            issue = ConfigIssue(issue.path, issue.message, REDACTED)
        elif issue.value is not None:
            issue = ConfigIssue(issue.path, issue.message, redact(issue.value))
        out.append(issue)
    return out


# ---- allowed roots ------------------------------------------------------------------------


def set_allowed_roots(paths: Iterable[str | os.PathLike[str]] | None) -> None:
    """Confine job paths to ``paths`` (None or empty: use the environment, else no confinement).

    The roots are also exported to the environment, so that processes the worker starts
    (distributed training ranks) enforce the same confinement.
    """
    global _roots
    roots = [Path(os.path.realpath(os.path.expanduser(os.fspath(p)))) for p in paths or ()]
    _roots = roots or None
    if roots:
        os.environ[ENV_ROOTS] = os.pathsep.join(str(r) for r in roots)


def allowed_roots() -> list[Path] | None:
    """The roots in force, or None when paths are not confined."""
    if _roots is not None:
        return list(_roots)
    raw = os.environ.get(ENV_ROOTS, "")
    roots = [Path(os.path.realpath(os.path.expanduser(p))) for p in raw.split(os.pathsep) if p.strip()]
    return roots or None


def resolve(value: str, base_dir: Path | None = None) -> Path:
    """Where a path really points: ``~`` expanded, relative to ``base_dir`` (default cwd), symlinks and ``..`` followed."""
    path = Path(os.path.expanduser(value))
    if not path.is_absolute():
        path = (base_dir or Path.cwd()) / path
    return Path(os.path.realpath(path))


def outside_issue(field: str, value: str, base_dir: Path | None = None) -> ConfigIssue | None:
    """A config issue when ``value`` resolves outside every allowed root; None when inside or unconfined."""
    roots = allowed_roots()
    if roots is None:
        return None
    real = resolve(value, base_dir)
    if any(real == root or real.is_relative_to(root) for root in roots):
        return None
    shown = ", ".join(str(r) for r in roots)
    where = f" (resolves to {real})" if str(real) != value else ""
    return ConfigIssue(
        field,
        f"path is outside the allowed roots{where}; allowed: {shown} (see --allowed-root)",
        value,
    )


def path_fields(data: Any, prefix: str = "") -> Iterator[tuple[str, str]]:
    """``(json path, value)`` of every path-valued key in a config document."""
    if isinstance(data, dict):
        for key, value in data.items():
            where = f"{prefix}.{key}" if prefix else str(key)
            if key in PATH_KEYS and isinstance(value, str) and value not in _NOT_PATHS:
                yield where, value
            elif key in _URI_KEYS and isinstance(value, str) and (local := _LOCAL_URI.match(value)):
                yield where, local.group("path")
            elif isinstance(value, (dict, list)):
                yield from path_fields(value, where)
    elif isinstance(data, list):
        for i, item in enumerate(data):
            yield from path_fields(item, f"{prefix}[{i}]")
