"""The event vocabulary, in one place (like h11's ``_events.py``).

Every event a job emits is an :class:`Event`; :meth:`Event.to_term` turns it into the wire
term ``{fine_tuning, JobId, Type, Payload}``. ``Type`` is an atom from ``EVENT_TYPES``.
Payload keys listed in ``KNOWN_KEYS`` become atoms; any other key (a custom metric, a
summary field we did not foresee) stays a binary, so a BEAM that decodes with ``[safe]``
never has to mint an atom. The few payload *values* that are atoms (``phase``, ``level``,
``error``) come from fixed lists too; the Elixir bridge declares all of them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from finetune_worker.errors import ERROR_CODES
from finetune_worker.etf import Atom

EVENT_TYPES: frozenset[str] = frozenset(
    {
        "queued",  # position in the FIFO (1 = next)
        "started",  # kind
        "phase",  # phase: one of PHASES
        "progress",  # step, total_steps, epoch, percent, elapsed_s, eta_s
        "metrics",  # loss, learning_rate, grad_norm, tokens_per_second, tokens_seen
        "eval",  # eval_loss, perplexity
        "checkpoint",  # path, step (sent only once the checkpoint is completely on disk)
        "log",  # level, message
        "token",  # index, text (generation streaming)
        "completed",  # outputs, summary
        "failed",  # error, message, hint
        "cancelled",  # step, checkpoint
    }
)

TERMINAL_TYPES: frozenset[str] = frozenset({"completed", "failed", "cancelled"})

PHASES: frozenset[str] = frozenset(
    {
        "loading_model",
        "preparing_data",
        "training",
        "evaluating",
        "saving",
        "loading",
        "merging",
        "generating",
        "launching",
    }
)

LOG_LEVELS: frozenset[str] = frozenset({"debug", "info", "warning", "error"})

#: Payload keys sent as atoms. Everything else is sent as a binary key.
KNOWN_KEYS: frozenset[str] = frozenset(
    {
        # queued / started / phase / log
        "position", "kind", "phase", "level", "message", "run_name",
        # progress
        "step", "total_steps", "epoch", "percent", "elapsed_s", "eta_s", "done", "total", "unit",
        # metrics / eval
        "loss", "learning_rate", "grad_norm", "tokens_per_second", "tokens_seen",
        "eval_loss", "perplexity", "samples_per_second",
        # checkpoint / completed / cancelled
        "path", "checkpoint", "outputs", "summary", "output_dir", "output_path", "adapter_path",
        "model_path", "size_bytes", "runtime_s", "metrics",
        # failed
        "error", "hint", "details",
        # token / generation
        "index", "text", "prompt_index", "completions",
        # replies: validate / status / jobs / info
        "value", "job_id", "state", "submitted_at", "started_at", "finished_at", "last_checkpoint",
        "version", "python", "torch", "transformers", "peft", "devices", "queue_length", "running",
        "name", "memory_bytes", "type", "pid", "protocol", "uptime_s", "cores",
        # evaluation / generation / merge summaries
        "model", "sequence", "dtype", "tensors",
    }
)  # fmt: skip

#: Payload keys whose (string) values are sent as atoms, each from a fixed list.
ATOM_VALUES: dict[str, frozenset[str]] = {
    "phase": PHASES,
    "level": LOG_LEVELS,
    "error": ERROR_CODES,
}


@dataclass(frozen=True)
class Event:
    """One event of one job. ``payload`` holds plain Python values (str keys)."""

    job_id: str
    type: str
    payload: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.type not in EVENT_TYPES:
            raise ValueError(f"unknown event type {self.type!r}")
        for key, allowed in ATOM_VALUES.items():
            value = self.payload.get(key)
            if value is not None and value not in allowed:
                raise ValueError(f"event {self.type}: {key}={value!r} is not one of {sorted(allowed)}")

    @property
    def terminal(self) -> bool:
        return self.type in TERMINAL_TYPES

    def to_term(self) -> tuple[Any, ...]:
        """``{fine_tuning, JobId, Type, Payload}`` ready for :func:`finetune_worker.etf.encode`."""
        return (Atom("fine_tuning"), self.job_id, Atom(self.type), payload_term(self.payload))


def payload_term(value: Any) -> Any:
    """Convert a payload (recursively) to wire form: known keys and their atom values become atoms."""
    if isinstance(value, dict):
        out: dict[Any, Any] = {}
        for k, v in value.items():
            key = str(k)
            if key in ATOM_VALUES and isinstance(v, str):
                out[Atom(key)] = Atom(v)
            else:
                out[Atom(key) if key in KNOWN_KEYS else key] = payload_term(v)
        return out
    if isinstance(value, (list, tuple)):
        return [payload_term(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        # ETF floats cannot carry NaN/inf; send nil so the BEAM still gets a well-formed map.
        return None
    if hasattr(value, "__fspath__"):
        return str(value)
    return value


def plain(value: Any) -> Any:
    """The JSON-friendly view of a payload (for the terminal renderer and summary files)."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "__fspath__"):
        return str(value)
    return value
