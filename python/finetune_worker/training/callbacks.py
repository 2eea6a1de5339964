"""The TrainerCallback that turns Trainer hooks into job events, and honours cancel.

``progress`` every step, ``metrics`` at logging steps, ``eval`` after each evaluation and
``checkpoint`` from ``on_save``, which the Trainer calls only after ``_save_checkpoint``
returned, i.e. after our trainer published the checkpoint with its atomic rename.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from finetune_worker.context import CancelFlag
from finetune_worker.outputs import is_complete


class EventCallback(TrainerCallback):
    def __init__(self, emit: Any, cancel_event: CancelFlag, output_dir: Path):
        self._emit = emit
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
        rate = (tokens - self._last_log_tokens) / dt if dt > 0 else None
        self._last_log_t, self._last_log_tokens = now, tokens
        values: dict[str, Any] = {
            "loss": _num(logs.get("loss")),
            "learning_rate": _num(logs.get("learning_rate")),
            "grad_norm": _num(logs.get("grad_norm")),
            "tokens_per_second": round(rate, 2) if rate is not None else None,
            "tokens_seen": tokens,
        }
        self._emit("metrics", step=state.global_step, epoch=_num(logs.get("epoch")), metrics=values)

    def on_evaluate(
        self, args: Any, state: Any, control: Any, metrics: dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        metrics = metrics or {}
        loss = _num(metrics.get("eval_loss"))
        if loss is None:
            return
        self.last_eval = {"eval_loss": loss, "perplexity": perplexity(loss)}
        self.last_eval_step = state.global_step
        self._emit("eval", step=state.global_step, metrics=dict(self.last_eval))

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
