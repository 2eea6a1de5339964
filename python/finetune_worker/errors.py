"""Error types, one place.

Like h11's ``RemoteProtocolError`` / ``LocalProtocolError`` split, the classes tell the
BEAM side *who* is at fault: the peer sent something wrong (``ProtocolError``,
``CallError``, ``ConfigError``) or a job failed while running (``JobFailed``).
Every error crosses the wire as ``{python, Class, Message, Trace}`` with ``Class`` the
dotted class name, e.g. ``'finetune_worker.errors.ConfigError'``.
"""

from __future__ import annotations

import reprlib
from dataclasses import dataclass, field
from typing import Any


class FinetuneWorkerError(Exception):
    """Base class of every error the worker raises on purpose."""


class ProtocolError(FinetuneWorkerError):
    """The peer sent bytes or a term that break the wire contract (docs/protocol.md)."""


class CallError(FinetuneWorkerError):
    """A well-formed call that the worker refuses: unknown module or function, wrong arity or argument type."""


class InternalError(FinetuneWorkerError):
    """The worker itself failed while handling a call (a bug): the message names the original type."""


@dataclass(frozen=True)
class ConfigIssue:
    """One problem in a job config: ``path`` is the JSON path (``training_parameters.learning_rate``)."""

    path: str
    message: str
    value: Any = None
    line: int | None = None  # where ``path`` is in the config file or text, when known

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"path": self.path, "message": self.message}
        if self.value is not None:
            out["value"] = _short_repr(self.value)
        if self.line is not None:
            out["line"] = self.line
        return out

    def __str__(self) -> str:
        where = self.path or "<config>"
        if self.line is not None:
            where += f" (line {self.line})"
        if self.value is not None:
            return f"{where}: {self.message} (got {_short_repr(self.value)})"
        return f"{where}: {self.message}"


class ConfigError(FinetuneWorkerError):
    """A job config is invalid; ``issues`` lists every problem at once."""

    def __init__(self, issues: list[ConfigIssue]):
        self.issues = list(issues)
        lines = "\n".join(f"  - {i}" for i in self.issues)
        super().__init__(f"invalid job config ({len(self.issues)} problem(s)):\n{lines}")

    def to_terms(self) -> list[dict[str, Any]]:
        return [i.to_dict() for i in self.issues]


#: Error codes a ``failed`` event may carry. They cross the wire as atoms, so the list is fixed
#: (the Elixir bridge declares the same atoms and decodes with ``[safe]``).
ERROR_CODES = frozenset(
    {
        "out_of_memory",
        "model_not_found",
        "dataset_not_found",
        "bad_dataset_row",
        "unsupported_model",
        "output_dir_not_writable",
        "output_dir_conflict",
        "disk_full",
        "adapter_mismatch",
        "invalid_merge_config",
        "export_mismatch",
        "invalid_config",
        "distributed_failure",
        "training_diverged",
        "reward_failed",
        "worker_exit",
        "internal_error",
    }
)


@dataclass
class JobFailed(FinetuneWorkerError):
    """A job failed for a reason we can name; ``error`` is one of ``ERROR_CODES``."""

    error: str
    message: str
    hint: str | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.error not in ERROR_CODES:
            raise ValueError(f"unknown error code {self.error!r}; add it to ERROR_CODES")
        super().__init__(self.message)

    def __str__(self) -> str:
        return self.message


class JobCancelled(FinetuneWorkerError):
    """Raised by a job that stopped because it was asked to; carries where it stopped."""

    def __init__(self, step: int = 0, checkpoint: str | None = None):
        self.step = step
        self.checkpoint = checkpoint
        super().__init__(f"cancelled at step {step}")


#: The exception classes an ``'e'`` reply may name, in the order a reply picks them.
WIRE_ERROR_CLASSES: tuple[type[FinetuneWorkerError], ...] = (
    ConfigError,
    CallError,
    ProtocolError,
    InternalError,
)


def wire_class_name(cls: type[BaseException]) -> str:
    """``'finetune_worker.errors.CallError'``: the atom an ``'e'`` reply carries for ``cls``."""
    return f"{cls.__module__}.{cls.__qualname__}"


ERROR_CLASS_NAMES: tuple[str, ...] = tuple(wire_class_name(c) for c in WIRE_ERROR_CLASSES)


class _BriefRepr(reprlib.Repr):
    def repr_int(self, x: int, level: int) -> str:
        if x.bit_length() > 128:  # far below the str limit; such a number is never worth reading
            return f"<int of {x.bit_length()} bits>"
        return super().repr_int(x, level)


_brief_repr = _BriefRepr()
_brief_repr.maxlevel = 3
_brief_repr.maxstring = _brief_repr.maxother = 60
_brief_repr.maxlist = _brief_repr.maxtuple = _brief_repr.maxdict = _brief_repr.maxset = 6


def brief(value: Any, limit: int = 80) -> str:
    """A short rendering of any value (a peer's term, a config value) that never raises.

    Bounded in time and memory whatever the value: long strings and containers are cut before
    they are rendered (``reprlib``), and a value whose ``repr`` fails (an int past Python's
    4,300-digit str limit, a broken ``__repr__``) is named by its type.
    """
    try:
        text = _brief_repr.repr(value)
    except Exception:
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _short_repr(value: Any, limit: int = 120) -> str:
    return brief(value, limit)
