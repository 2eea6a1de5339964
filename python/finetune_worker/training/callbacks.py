"""The TrainerCallback that turns Trainer hooks into job events, and honours cancel.

``progress`` every step, ``metrics`` at logging steps, ``eval`` after each evaluation and
``checkpoint`` from ``on_save``, which the Trainer calls only after ``_save_checkpoint``
returned, i.e. after our trainer published the checkpoint with its atomic rename.

The same numbers go to the run's ``metrics.jsonl`` (:class:`MetricsHistory`): one JSON object
per logged step and per evaluation, kept across resumes, so the loss history outlives the
checkpoints that rotate away (the report and any plotting script read it).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from finetune_worker.context import CancelFlag
from finetune_worker.outputs import is_complete

METRICS_FILE = "metrics.jsonl"


class MetricsHistory:
    """``metrics.jsonl`` in the run folder: rows ``{"kind": "train"|"eval", "step", ...}``.

    A resumed run first drops the rows past its checkpoint's step (the interrupted session's
    steps are trained again) and all but the newest ``before_training`` evaluation; then it
    appends. Rows are written and flushed one at a time: a kill loses at most the row in flight,
    and a torn last line is dropped on the next read.
    """

    def __init__(self, path: Path):
        self.path = path

    def rows(self) -> list[dict[str, Any]]:
        try:
            text = self.path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            return []
        out = []
        for line in text.splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue  # a line torn by a kill
            if isinstance(row, dict):
                out.append(row)
        return out

    def resume_at(self, step: int) -> None:
        """Keep the history up to ``step`` (the step training continues from)."""
        from finetune_worker.outputs import write_text_atomic

        rows = self.rows()
        before = [r for r in rows if r.get("stage") == "before_training"]
        kept = [
            r
            for r in rows
            if (r.get("stage") != "before_training" or r is (before[-1] if before else None))
            and isinstance(r.get("step"), int)
            and r["step"] <= step
        ]
        if kept != rows:
            write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def append(self, row: dict[str, Any]) -> None:
        with self.path.open("a+b") as f:
            line = json.dumps({**row, "time": round(time.time(), 3)}) + "\n"
            if f.tell() > 0:
                f.seek(-1, 2)
                if f.read(1) != b"\n":
                    line = "\n" + line  # after a line torn by a kill: start a fresh one
            f.write(line.encode("utf-8"))
            f.flush()


#: The preference trainers' own numbers (TRL's names), passed on in metrics and eval events.
PREFERENCE_METRICS = (
    "rewards/accuracies",
    "rewards/margins",
    "rewards/chosen",
    "rewards/rejected",
    "logps/chosen",
    "logps/rejected",
    "kl",
    "nll_loss",
    "log_odds_ratio",
    # GRPO: the weighted reward of the sampled completions, each reward's mean, their length
    "reward",
    "reward_std",
    "completions/mean_length",
)


def preference_values(logs: dict[str, Any], prefix: str = "") -> dict[str, float | None]:
    """The trainer's preference numbers in ``logs`` (GRPO's per-reward ``rewards/<name>/mean`` too)."""
    out = {}
    for key, value in logs.items():
        name = key[len(prefix) :] if key.startswith(prefix) else None
        if name in PREFERENCE_METRICS or (name and name.startswith("rewards/") and name.endswith("/mean")):
            out[name] = _num(value)
    return out


class EventCallback(TrainerCallback):
    """``language_model`` False: the loss is not a language-modelling loss (preference training),
    so no perplexity is derived from it."""

    def __init__(
        self,
        emit: Any,
        cancel_event: CancelFlag,
        output_dir: Path,
        history: MetricsHistory | None = None,
        *,
        language_model: bool = True,
    ):
        self._emit = emit
        self._language_model = language_model
        self._history = history
        self._stage = "before_training"
        self._cancel = cancel_event
        self._output_dir = output_dir
        self._t0 = time.monotonic()
        self._start_step = 0
        self._last_log_t = self._t0
        self._last_log_tokens = 0
        self.cancel_requested = False
        self.last_checkpoint: Path | None = None
        self.last_eval: dict[str, float | None] = {}
        self.last_eval_step: int | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # Rates and ETA count this session only: a resumed run starts at its checkpoint's step.
        self._t0 = self._last_log_t = time.monotonic()
        self._start_step = state.global_step
        self._last_log_tokens = state.num_input_tokens_seen
        self._stage = "training"
        if self._history is not None and args.should_save:
            self._history.resume_at(state.global_step)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.training_done()

    def training_done(self) -> None:
        """Evaluations from now on are the fine-tuned model's (also when no training ran: a
        finished checkpoint restored)."""
        self._stage = "after_training"

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        step, total = state.global_step, state.max_steps
        elapsed = time.monotonic() - self._t0
        done = step - self._start_step
        eta = elapsed / done * (total - step) if done > 0 and total else None
        self._emit(
            "progress",
            step=step,
            total_steps=total,
            epoch=round(float(state.epoch or 0.0), 4),
            percent=round(100.0 * step / total, 2) if total else None,
            elapsed_s=round(elapsed, 3),
            eta_s=round(eta, 3) if eta is not None else None,
        )
        if self._cancel.is_set() and not self.cancel_requested:
            # Stop at this step boundary and leave a checkpoint to resume from.
            self.cancel_requested = True
            control.should_training_stop = True
            control.should_save = True

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        logs = logs or {}
        if "loss" not in logs:
            return  # eval and end-of-training summaries come through their own hooks
        now = time.monotonic()
        tokens = int(state.num_input_tokens_seen)
        dt = now - self._last_log_t
        rate = (tokens - self._last_log_tokens) / dt if dt > 0 and tokens else None  # 0: not counted
        self._last_log_t, self._last_log_tokens = now, tokens
        values: dict[str, Any] = {
            "loss": _num(logs.get("loss")),
            "learning_rate": _num(logs.get("learning_rate")),
            "grad_norm": _num(logs.get("grad_norm")),
            "tokens_per_second": round(rate, 2) if rate is not None else None,
            "tokens_seen": tokens,
            **preference_values(logs),
        }
        if "penalty" in logs:  # continual learning's, included in the loss
            values["penalty"] = _num(logs["penalty"])
        self._emit("metrics", step=state.global_step, epoch=_num(logs.get("epoch")), metrics=values)
        self._record(
            args, {"kind": "train", "step": state.global_step, "epoch": _num(logs.get("epoch")), **values}
        )

    def _record(self, args: Any, row: dict[str, Any]) -> None:
        if self._history is not None and args.should_save:  # rank 0 only
            self._history.append(row)

    def on_evaluate(
        self, args: Any, state: Any, control: Any, metrics: dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        metrics = metrics or {}
        loss = _num(metrics.get("eval_loss"))
        if loss is None:
            return
        self.last_eval = {"eval_loss": loss}
        if self._language_model:
            self.last_eval["perplexity"] = perplexity(loss)
        self.last_eval.update(preference_values(metrics, "eval_"))
        self.last_eval_step = state.global_step
        # Which model the numbers are of: the base before training, the fine-tuned one after it
        # (an eval during training is the step's).
        model = {"before_training": "base", "after_training": "fine_tuned"}.get(self._stage)
        self._emit(
            "eval",
            step=state.global_step,
            metrics=dict(self.last_eval),
            **({"model": model} if model else {}),
        )
        self._record(
            args, {"kind": "eval", "step": state.global_step, "stage": self._stage, **self.last_eval}
        )

    def section_evaluated(self, args: Any, step: int, scores: dict[str, Any]) -> dict[str, float | None]:
        """The evaluation section scored the held-out rows in place of the Trainer (its event is
        sent): record it in the history as the Trainer's evaluation would be; its loss and
        perplexity, for the summary."""
        values: dict[str, float | None] = {k: _num(scores.get(k)) for k in ("eval_loss", "perplexity")}
        row = {"kind": "eval", "step": step, "stage": self._stage, **values, "rows": scores.get("rows")}
        self._record(args, row)
        return values

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        path = self._output_dir / f"checkpoint-{state.global_step}"
        if is_complete(path):
            self.last_checkpoint = path
            self._emit("checkpoint", path=str(path), step=state.global_step)


def perplexity(loss: float) -> float | None:
    try:
        return math.exp(loss)
    except OverflowError:
        return None


def _num(value: Any) -> float | None:
    if value is None:
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None
