"""The event vocabulary and the one rule for the maps on the wire, in one place (like h11's ``_events.py``).

Every event a job emits is an :class:`Event`; :meth:`Event.to_term` turns it into the wire
term ``{fine_tuning, JobId, Type, Payload}``. ``Type`` is an atom from ``EVENT_TYPES``.

Every map the worker sends (event payloads and call results) is one of two kinds, never a mix:

- a **record**: its keys are part of the protocol (``step``, ``outputs``, ``summary``...). They
  go out as atoms, all from ``RECORD_KEYS``; a BEAM that decodes with ``[safe]`` has declared them.
- a **table**: its keys are names that grow without a protocol change (metric names, the user's
  config keys, data format names, tracking backends, failure details, the user's own prompts).
  They go out as binaries,
  and so do the keys of every map below a table. A map is a table when its key in the enclosing
  record is one of ``TABLE_KEYS``.

So ``%{summary: %{final_perplexity: p}}`` matches, and a new metric never needs a new atom:
``%{metrics: %{"loss" => loss}}``. The few payload *values* that are atoms (``phase``,
``level``, ``error``) come from fixed lists too; the Elixir bridge declares all of them, and
:func:`atom_vocabulary` lists every atom the worker can send.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any

from finetune_worker.errors import ERROR_CODES
from finetune_worker.wire import Atom

log = logging.getLogger("finetune_worker.wire.vocabulary")

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
        "reward_request",  # request, step, prompts, completions, references (answered by rewards/3)
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
        "exporting",
        "verifying",
    }
)

LOG_LEVELS: frozenset[str] = frozenset({"debug", "info", "warning", "error"})

#: Keys of records (every map that is not a table): sent as atoms.
RECORD_KEYS: frozenset[str] = frozenset(
    {
        # queued / started / phase / log
        "position", "kind", "phase", "level", "message", "run_name", "rank", "pid",
        # progress
        "step", "total_steps", "epoch", "percent", "elapsed_s", "eta_s", "done", "total", "unit",
        # metrics / eval (their numbers are in the `metrics` table)
        "metrics", "model",
        # checkpoint / cancelled
        "path", "checkpoint",
        # completed: outputs
        "outputs", "summary", "output_dir", "output_path", "adapter_path", "model_path",
        "summary_path", "metrics_path", "predictions_path", "completions_path", "last_checkpoint",
        # failed
        "error", "hint", "details",
        # token / generate summary
        "index", "text", "prompt_index", "completions", "finish_reason", "prompt", "tokens",
        "generated_tokens", "prompts", "seed",
        # train summary
        "method", "model_name", "base_eval_loss", "base_perplexity", "final_eval_loss",
        "final_perplexity", "improvement_pct", "train_loss", "steps", "epochs", "tokens_seen",
        "train_examples", "runtime_s", "resumed_from", "data", "config", "evaluation", "tracking",
        "best_step", "best_metric", "best_checkpoint", "already_complete", "preference", "labels",
        # reward_request
        "request", "references",
        # phase (progressive unfreezing) / train summary: continual learning
        "stage", "stages", "layers", "trainable_parameters", "learning_rate", "continual",
        "reference_rows", "reference_loss_before", "reference_loss_after", "forgetting", "l2_to_base",
        "ewc", "replay_share", "class_counts",
        # train summary: data
        "rows", "dropped", "eval_rows", "format_counts", "mask_method", "batching", "max_seq_length",
        "train_rows", "train_tokens", "trained_tokens", "truncated", "warnings",
        # train summary: data, per source
        "sources", "sequences", "weight", "repeat", "loss_weight", "share",
        # config issues: where in the file
        "line",
        # train summary: evaluation (samples are records)
        "rows_from", "improvement", "samples", "base", "fine_tuned", "reference", "row",
        # evaluate summary
        "dataset_path", "compare",
        # distributed: another node's summary
        "ranks",
        # sweep: every event of a trial carries its number; the summary's trials table and best trial
        "trial", "trials", "params", "eval_loss", "best_trial", "best_params", "best_eval_loss",
        "trials_path",
        # merge summaries
        "size_bytes", "dtype", "tensors", "base_model_path", "merged_modules", "tokenizer_from",
        "merge_method", "models", "tasks",
        # export summary: per format its file and its verification against the PyTorch model
        "formats", "onnx", "gguf", "onnx_path", "gguf_path", "opset", "verification", "passed",
        "max_abs_diff", "mean_abs_diff", "top1_agreement", "tolerance", "min_top1_agreement",
        "reference_max_abs",
        # replies: validate / status / jobs / info
        "value", "job_id", "state", "submitted_at", "started_at", "finished_at",
        "version", "python", "torch", "transformers", "peft", "devices", "queue_length", "running",
        "name", "memory_bytes", "type", "protocol", "uptime_s", "warm", "cores",
    }
)  # fmt: skip

#: Record keys whose value is a table (its keys, and those of every map below it, are binaries);
#: ``prompt`` echoes the user's own data (a chat prompt is a list of message maps).
TABLE_KEYS: frozenset[str] = frozenset(
    {
        "metrics", "improvement", "config", "format_counts", "tracking", "details", "prompt", "labels",
        "class_counts", "params", "best_params",
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
        """``{fine_tuning, JobId, Type, Payload}`` ready for :func:`finetune_worker.wire.encode`."""
        return (Atom("fine_tuning"), self.job_id, Atom(self.type), payload_term(self.payload))


def payload_term(value: Any) -> Any:
    """Convert a payload (recursively) to wire form: a record's keys (and its atom values) become
    atoms, a table's keys stay binaries (see the module docstring).

    A record key outside ``RECORD_KEYS`` is a bug of ours: it is dropped from the wire (the BEAM
    could not decode the map with ``[safe]``) and logged as an error; with
    ``FINETUNE_WORKER_STRICT_WIRE=1`` (set by the test suites) it raises instead.
    """
    return _record_value(value)


def _record(value: dict[Any, Any]) -> dict[Any, Any]:
    out: dict[Any, Any] = {}
    for k, v in value.items():
        key = str(k)
        if key not in RECORD_KEYS:
            if os.environ.get("FINETUNE_WORKER_STRICT_WIRE") == "1":
                raise ValueError(f"wire: record key {key[:80]!r} is not in events.RECORD_KEYS")
            log.error("wire: record key %r is not in events.RECORD_KEYS; dropped from the message", key[:80])
            continue
        if key in TABLE_KEYS:
            out[Atom(key)] = _table(v)
        elif key in ATOM_VALUES and isinstance(v, str):
            out[Atom(key)] = Atom(v)
        else:
            out[Atom(key)] = _record_value(v)
    return out


def _record_value(value: Any) -> Any:
    if isinstance(value, dict):
        return _record(value)
    if isinstance(value, (list, tuple)):
        return [_record_value(v) for v in value]
    return _scalar(value)


def _table(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _table(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_table(v) for v in value]
    return _scalar(value)


def _scalar(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        # ETF floats cannot carry NaN/inf; send nil so the BEAM still gets a well-formed map.
        return None
    if hasattr(value, "__fspath__"):
        return str(value)
    return value


#: Atoms of the message envelopes, replies and values outside the lists above.
WIRE_ATOMS: tuple[str, ...] = (
    "r", "e", "M", "python", "fine_tuning", "ok", "error", "not_found", "shutting_down", "pong",
    "nil", "true", "false",
)  # fmt: skip


def atom_vocabulary() -> list[str]:
    """Every atom the worker can send, sorted: what a BEAM decoding with ``[safe]`` must declare.

    ``finetune-worker atoms`` prints it as an Erlang term file for ``file:consult/1``.
    """
    from finetune_worker.errors import ERROR_CLASS_NAMES

    atoms = set(WIRE_ATOMS) | EVENT_TYPES | PHASES | LOG_LEVELS | ERROR_CODES | RECORD_KEYS
    atoms |= set(ERROR_CLASS_NAMES)
    return sorted(atoms)


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
