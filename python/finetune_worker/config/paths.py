"""Key paths of a config as problems print them: ``dataset.sources[2].weight``."""

from __future__ import annotations

import re
from collections.abc import Iterable


def json_path(loc: Iterable[object]) -> str:
    """``("dataset", "sources", 2, "weight")`` (a pydantic error location) -> ``dataset.sources[2].weight``."""
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        else:
            parts.append(("." if parts else "") + str(item))
    return "".join(parts)


def split_path(path: str) -> list[str | int]:
    """``"a.b[2].c"`` -> ``["a", "b", 2, "c"]`` (the inverse of :func:`json_path`)."""
    parts: list[str | int] = []
    for token in re.findall(r"[^.\[\]]+|\[\d+\]", path):
        parts.append(int(token[1:-1]) if token.startswith("[") else token)
    return parts
