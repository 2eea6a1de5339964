"""The one base of every config model: strict about keys, defaults and numbers."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

#: Largest seed: numpy (which transformers' set_seed seeds too) takes 32-bit seeds only.
MAX_SEED = 2**32 - 1


class StrictModel(BaseModel):
    """Unknown keys are errors (a typo must not be ignored), defaults are validated too, and NaN
    and infinities are refused: ``"learning_rate": Infinity`` is valid JSON for Python and once
    trained to 100% NaN weights."""

    model_config = ConfigDict(extra="forbid", validate_default=True, allow_inf_nan=False)

    @staticmethod
    def resolved(value: str) -> Path:
        """The one path resolver of configs: ``~`` expanded, relative paths against the worker's
        working directory (symlinks are left alone; confinement follows them separately)."""
        return Path(os.path.abspath(os.path.expanduser(value)))


def schema_also(*alternatives: dict[str, Any]) -> Callable[[dict[str, Any]], None]:
    """A field's ``json_schema_extra``: its JSON Schema also accepts ``alternatives``, for the
    shapes a ``mode="before"`` validator turns into the field's type (the schema pydantic derives
    knows only the type)."""

    def extend(schema: dict[str, Any]) -> None:
        described = {k: schema.pop(k) for k in ("description", "default", "title") if k in schema}
        branches = schema.pop("anyOf", None) or [dict(schema)]
        schema.clear()
        schema.update(anyOf=[*branches, *alternatives], **described)

    return extend
