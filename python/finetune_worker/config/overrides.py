"""``--set KEY=VALUE``: override one key of a job config from the command line.

``KEY`` is a dotted path as issues print them (``training_parameters.learning_rate``,
``dataset.sources[1].weight``); missing mappings on the way are created. ``VALUE`` is read as
a YAML flow value, so ``3``, ``1e-4``, ``true``, ``null``, ``[q_proj, v_proj]`` and ``{r: 16}``
mean what they look like, and anything else is a string.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from finetune_worker.config.paths import json_path, split_path
from finetune_worker.errors import ConfigError, ConfigIssue

_PLAIN_SCALAR = re.compile(
    r"^(true|false|null|[+-]?(0|[1-9]\d*)(\.\d*)?([eE][+-]?\d+)?|[+-]?\.\d+([eE][+-]?\d+)?)$"
)
_KEY = re.compile(r"^[A-Za-z_][\w-]*(\.[A-Za-z_][\w-]*|\[\d+\])*$")


def parse_override(text: str) -> tuple[list[str | int], Any]:
    """``"a.b[0].c=value"`` -> ``(["a", "b", 0, "c"], value)``; a ConfigError names a bad one."""
    import yaml

    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not _KEY.match(key):
        raise ConfigError(
            [
                ConfigIssue(
                    "", f"--set {text!r}: expected KEY=VALUE, KEY a dotted path like data.max_seq_length"
                )
            ]
        )
    text_value = raw.strip()
    try:
        value = yaml.safe_load(raw) if text_value else ""
    except yaml.YAMLError:
        value = raw  # not a YAML value: the text itself
    # YAML 1.1 reads some plain text as other things: "no" as false, "0123" as octal, "1:30" as
    # 90, "# x" as a comment. A scalar counts as a number, boolean or null only when it is written
    # as one in JSON's spelling (plus YAML's 1e-4); anything else stays the text typed.
    if (not isinstance(value, (list, dict, str)) and not _PLAIN_SCALAR.match(text_value)) or (
        text_value.startswith("#") or " #" in text_value
    ):
        value = text_value
    return split_path(key), value


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> set[str]:
    """Apply ``overrides`` to ``data`` in place; the dotted paths set (for telling issues apart)."""
    done: set[str] = set()
    for text in overrides:
        parts, value = parse_override(text)
        if parts[:2] == ["dataset", "sources"] and isinstance(data.get("dataset"), list):
            data["dataset"] = {"sources": data["dataset"]}  # the list form, as validation reads it
        node: Any = data
        for i, part in enumerate(parts[:-1]):
            nxt = parts[i + 1]
            if isinstance(part, int):
                if not isinstance(node, list) or part >= len(node):
                    raise _bad(text, parts[: i + 1], "no such list item")
                node = node[part]
                continue
            if not isinstance(node, dict):
                raise _bad(text, parts[:i], "is not a mapping")
            if part not in node or node[part] is None:
                node[part] = [] if isinstance(nxt, int) else {}
            node = node[part]
        last = parts[-1]
        if isinstance(last, int):
            if not isinstance(node, list) or last > len(node):
                raise _bad(text, parts, "no such list item")
            if last == len(node):
                node.append(value)
            else:
                node[last] = value
        elif isinstance(node, dict):
            node[last] = value
        else:
            raise _bad(text, parts[:-1], "is not a mapping")
        done.add(json_path(parts))
    return done


def _bad(text: str, parts: list[str | int], why: str) -> ConfigError:
    return ConfigError(
        [ConfigIssue(json_path(parts), f"--set {text!r}: {json_path(parts) or 'the config'} {why}")]
    )
