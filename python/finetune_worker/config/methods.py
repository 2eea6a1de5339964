"""Train-config sections for methods beyond the choice of adapter: staged unfreezing of a full
fine-tune (``peft.unfreeze``), continual learning against forgetting (``continual``) and custom
loss weights (``loss_weights``). Schemas only (pydantic, no torch); the checks that need the whole
config live in ``TrainConfig.semantic_issues``.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from finetune_worker.config.base import StrictModel
from finetune_worker.config.generation import EvalDataset

#: A weight: a finite number, 0 or more.
Weight = Annotated[float, Field(ge=0, allow_inf_nan=False)]


class UnfreezePhase(StrictModel):
    """One phase of progressive unfreezing: from when, how many of the top layers train, at what rate."""

    epoch: float | None = Field(
        None,
        ge=0,
        allow_inf_nan=False,
        description="The phase starts at this epoch (fractions allowed: 1.5 is halfway through the "
        "second). Give epoch or step.",
    )
    step: int | None = Field(None, ge=0, description="The phase starts after this many optimizer steps.")
    layers: int | Literal["all"] = Field(
        ...,
        description="How many of the last decoder layers train in this phase (with the final norm and "
        "an untied LM head, which always train), or 'all': every layer and the embeddings.",
    )
    learning_rate: float | None = Field(
        None,
        gt=0,
        allow_inf_nan=False,
        description="This phase's peak learning rate (the schedule's shape continues); default "
        "training_parameters.learning_rate.",
    )

    @model_validator(mode="after")
    def _one_start(self) -> UnfreezePhase:
        if (self.epoch is None) == (self.step is None):
            raise ValueError("give the phase's start as epoch or step (one of them)")
        if isinstance(self.layers, int) and self.layers < 1:
            raise ValueError("layers must be at least 1, or 'all'")
        return self

    @property
    def start(self) -> tuple[str, float]:
        return ("epoch", float(self.epoch)) if self.epoch is not None else ("step", float(self.step or 0))


class ReplaySection(StrictModel):
    """Rows of general data mixed into the training rows, so the model keeps practising them."""

    share: float = Field(
        ...,
        gt=0,
        lt=1,
        description="The replayed rows' share of all training rows (0.2: one row in five, spread through "
        "the shuffled batches).",
    )
    dataset: EvalDataset | None = Field(
        None, description="Where replayed rows come from; default: continual.reference."
    )


class ContinualSection(StrictModel):
    """Continual learning: keep what the model knew while it learns the new data."""

    reference: EvalDataset | None = Field(
        None,
        description="General data the model should not forget: its loss is measured before and after "
        "training (reference_loss_before/after in the summary), and EWC estimates its Fisher on it.",
    )
    reference_rows: int = Field(
        200, gt=0, le=100_000, description="Rows of the reference data used (the first ones)."
    )
    l2_to_base: Weight = Field(
        0.0,
        description="Strength of a penalty strength/2 x sum((w - w0)^2) over the trained weights w, "
        "w0 their values before training (the base model's, for a full fine-tune).",
    )
    ewc: Weight = Field(
        0.0,
        description="Strength of Elastic Weight Consolidation: strength/2 x sum(F x (w - w0)^2), F the "
        "diagonal Fisher of the reference data's loss before training, scaled to a mean of 1 (so this "
        "strength and l2_to_base are on one scale). Needs reference.",
    )
    replay: ReplaySection | None = Field(None, description="Mix general rows into the training rows.")


class LossWeights(StrictModel):
    """Custom weights in the training loss: each trained token's cross-entropy is multiplied by
    its weights (and by its source's loss_weight); the loss stays normalized by the number of
    trained tokens, so weights of 1 are the usual loss. The held-out loss is never weighted."""

    tokens: dict[str, Weight] = Field(
        default_factory=dict,
        description="Per target token: a token of the tokenizer's vocabulary (as the vocabulary spells it, "
        "or text that is exactly one token) -> its weight.",
    )
    classes: dict[str, Weight] = Field(
        default_factory=dict,
        description="Per class: an answer text (the example's last assistant turn, stripped of surrounding "
        "spaces, compared exactly) -> the weight of every trained token of the examples with that answer; "
        "for down-weighting a frequent label.",
    )

    @model_validator(mode="after")
    def _keys(self) -> LossWeights:
        for name, table in (("tokens", self.tokens), ("classes", self.classes)):
            if any(not key for key in table):
                raise ValueError(f"{name} keys must not be empty")
        if any(key != key.strip() for key in self.classes):
            raise ValueError(
                "classes keys are compared with stripped answers: remove their surrounding spaces"
            )
        return self

    @property
    def active(self) -> bool:
        return bool(self.tokens or self.classes)
