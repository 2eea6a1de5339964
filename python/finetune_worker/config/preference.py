"""The ``preference`` section of a ``train`` job: DPO, ORPO and KTO through TRL.

A train job with this section learns from preferences instead of from demonstrations. Its data are
preference rows (``prompt``/``chosen``/``rejected``; KTO: ``prompt``/``completion``/``label``,
see ``data.rows.normalize_preference``), and everything else of a supervised run stays: the PEFT
method (LoRA, QLoRA, full...), checkpoints, resume, cancel, events, tracking and the summary.
Schemas only: nothing here imports TRL or torch.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from finetune_worker.config.base import StrictModel

#: DPO's losses as TRL 1.16 names them (``DPOConfig.loss_type``).
DpoLoss = Literal[
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sigmoid_norm",
]

#: Methods whose rows are pairs (a chosen and a rejected answer to one prompt).
PAIRED_METHODS = frozenset({"dpo", "orpo"})
#: Methods that compare the policy with a frozen reference model (a copy, or the adapter turned off).
REFERENCE_METHODS = frozenset({"dpo", "kto"})


class PreferenceSection(StrictModel):
    """Preference training: what is learned from which rows, and how strongly."""

    method: Literal["dpo", "orpo", "kto"] = Field(
        ...,
        description="dpo: chosen over rejected, against a frozen reference (the base model, or the "
        "adapter turned off); orpo: the same without a reference, an odds-ratio term added to the "
        "supervised loss of the chosen answer; kto: single answers labelled desirable or not "
        "(prompt/completion/label rows), against a reference.",
    )
    beta: float = Field(
        0.1,
        gt=0,
        description="dpo/kto: how far the policy may move from the reference (higher: less); "
        "orpo: the weight of the odds-ratio term (the paper's lambda).",
    )
    loss_type: DpoLoss = Field(
        "sigmoid", description="dpo only: TRL's DPO loss (sigmoid is the paper's; ipo, hinge, robust...)."
    )
    label_smoothing: float = Field(
        0.0,
        ge=0,
        lt=0.5,
        description="dpo only: the probability that a pair's labels are flipped (robust/cDPO), or EXO's epsilon.",
    )
    desirable_weight: float = Field(
        1.0, gt=0, description="kto only: the weight of desirable rows' losses (balance unequal counts)."
    )
    undesirable_weight: float = Field(
        1.0, gt=0, description="kto only: the weight of undesirable rows' losses."
    )
    eval_rows: int = Field(
        256,
        gt=0,
        le=100_000,
        description="Held-out rows scored before and after training (the summary's preference "
        "accuracy and log-probability margin).",
    )

    @property
    def paired(self) -> bool:
        """Whether rows are chosen/rejected pairs (DPO, ORPO) rather than labelled answers (KTO)."""
        return self.method in PAIRED_METHODS
