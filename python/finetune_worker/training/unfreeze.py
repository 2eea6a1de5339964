"""Progressive unfreezing of a full fine-tune (``peft.unfreeze``): phases that train more and more
of the top of the model, each at its own learning rate.

The optimizer is built over every weight that any phase trains; a phase then sets
``requires_grad`` on its weights only. A frozen weight gets no gradient (the Trainer zeroes
gradients to None), and torch's optimizers skip a parameter without one, so it is not touched at
all: no update, no weight decay, its optimizer state kept for when it thaws. The schedule's shape
goes on across phases; a phase's learning rate replaces the schedule's peak (the scheduler's
``base_lrs``), which checkpoints save, so a resumed run continues in the phase its step is in
(applied again at ``on_train_begin``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from transformers import TrainerCallback

from finetune_worker.config.methods import UnfreezePhase
from finetune_worker.errors import JobFailed
from finetune_worker.training.model import decoder_layers

#: Epoch boundaries are compared with the Trainer's float epoch counter.
_EPSILON = 1e-9


class ProgressiveUnfreezing(TrainerCallback):
    """Applies the phase of the current step at the start of training and at each boundary, and
    reports it with a ``phase`` event (``stage`` of ``stages``, ``layers``, ``learning_rate``)."""

    def __init__(
        self,
        model: Any,
        phases: list[UnfreezePhase],
        learning_rate: float,
        emit: Callable[..., None],
    ):
        layers = decoder_layers(model)
        if layers is None:
            raise JobFailed(
                "unsupported_model",
                "progressive unfreezing (peft.unfreeze) cannot find this model's decoder layers",
            )
        #: Weights frozen for the whole run (peft.freeze_layers, freeze_embeddings) stay frozen.
        self._allowed = {id(p) for p in model.parameters() if p.requires_grad}
        in_layers = {id(p) for layer in layers for p in layer.parameters()}
        embedding = model.get_input_embeddings()
        embedded = {id(p) for p in embedding.parameters()} if embedding is not None else set()
        self._params = list(model.parameters())
        #: Trained in every phase: what follows the layers (the final norm, an untied LM head).
        self._top = {id(p) for p in self._params if id(p) not in in_layers and id(p) not in embedded}
        self._layers = [{id(p) for p in layer.parameters()} for layer in layers]
        self._phases = phases
        self._learning_rate = learning_rate
        self._emit = emit
        self.current: int | None = None

    def phase_at(self, state: Any) -> int:
        """The index of the phase the step after ``state``'s belongs to."""
        unit = self._phases[0].start[0]
        now = float(state.epoch or 0.0) if unit == "epoch" else float(state.global_step)
        return max(i for i, phase in enumerate(self._phases) if phase.start[1] <= now + _EPSILON)

    def trained(self, index: int) -> set[int]:
        """The ids of the weights phase ``index`` trains."""
        layers = self._phases[index].layers
        if layers == "all":
            return set(self._allowed)
        ids = set(self._top)
        for layer in self._layers[-layers:]:
            ids |= layer
        return ids & self._allowed

    def _apply(self, index: int, state: Any, optimizer: Any, lr_scheduler: Any) -> None:
        trained = self.trained(index)
        for p in self._params:
            p.requires_grad_(id(p) in trained)
        phase = self._phases[index]
        rate = phase.learning_rate or self._learning_rate
        scheduler = getattr(lr_scheduler, "scheduler", lr_scheduler)  # accelerate's wrapper
        if scheduler is not None and hasattr(scheduler, "base_lrs") and optimizer is not None:
            for i, group in enumerate(optimizer.param_groups):
                old = scheduler.base_lrs[i]
                scheduler.base_lrs[i] = rate
                group["lr"] = group["lr"] * rate / old if old else rate
            # What get_last_lr() (the logged rate) says until the scheduler's next step recomputes it.
            scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
        self.current = index
        self._emit(
            "phase",
            phase="training",
            stage=index + 1,
            stages=len(self._phases),
            layers=phase.layers,
            trainable_parameters=sum(p.numel() for p in self._params if id(p) in trained),
            learning_rate=rate,
            step=int(state.global_step),
            epoch=round(float(state.epoch or 0.0), 4),
        )

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._apply(self.phase_at(state), state, kwargs.get("optimizer"), kwargs.get("lr_scheduler"))

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        index = self.phase_at(state)
        if index != self.current:
            self._apply(index, state, kwargs.get("optimizer"), kwargs.get("lr_scheduler"))
