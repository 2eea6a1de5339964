"""The ``preference`` section of a ``train`` job: DPO, ORPO and KTO through TRL.

A train job with this section learns from preferences instead of from demonstrations. Its data are
preference rows (``prompt``/``chosen``/``rejected``; KTO: ``prompt``/``completion``/``label``,
see ``data.rows.normalize_preference``), and everything else of a supervised run stays: the PEFT
method (LoRA, QLoRA, full...), checkpoints, resume, cancel, events, tracking and the summary.
Schemas only: nothing here imports TRL or torch.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import Field, field_validator

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
#: The row format each method reads (``data.rows``).
ROW_FORMAT = {"dpo": "preference", "orpo": "preference", "kto": "unpaired_preference", "grpo": "prompts"}


class _Reward(StrictModel):
    weight: float = Field(1.0, description="This reward's weight in the sum GRPO ranks completions by.")


class MatchReward(_Reward):
    """1 when the completion equals the row's reference answer, else 0 (exact_match); or the
    token F1 between them, 0 to 1 (f1)."""

    type: Literal["exact_match", "f1"]
    normalize: bool = Field(
        True,
        description="Compare as the SQuAD script does: lower case, no punctuation, no articles, single "
        "spaces (exact_match only; f1 always normalizes).",
    )


class RegexReward(_Reward):
    """1 when the completion matches a regular expression (a format check), else 0."""

    type: Literal["regex"]
    pattern: str = Field(..., min_length=1, max_length=1000, description="A Python regular expression.")
    full: bool = Field(False, description="The whole completion must match (re.fullmatch), not just a part.")

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"not a valid regular expression: {exc}") from None
        return value


class LengthReward(_Reward):
    """0 up to ``max_tokens`` completion tokens, then down to -1 at twice that: a length penalty."""

    type: Literal["length"]
    max_tokens: int = Field(..., gt=0, description="Completions up to this many tokens are not penalized.")


class BeamReward(_Reward):
    """Rewards computed by a BEAM process: the worker sends the job's subscriber a
    ``reward_request`` with each completion and waits for ``rewards/3`` (docs/protocol.md)."""

    type: Literal["beam"]
    timeout_s: float = Field(
        60.0, gt=0, le=3600, description="How long a step waits for the answer before the job fails."
    )


Reward = Annotated[MatchReward | RegexReward | LengthReward | BeamReward, Field(discriminator="type")]


class PreferenceSection(StrictModel):
    """Preference training: what is learned from which rows, and how strongly."""

    method: Literal["dpo", "orpo", "kto", "grpo"] = Field(
        ...,
        description="dpo: chosen over rejected, against a frozen reference (the base model, or the "
        "adapter turned off); orpo: the same without a reference, an odds-ratio term added to the "
        "supervised loss of the chosen answer; kto: single answers labelled desirable or not "
        "(prompt/completion/label rows), against a reference; grpo: the model's own completions to "
        "prompts, ranked by rewards (rows: a prompt and, for match rewards, a reference answer).",
    )
    beta: float | None = Field(
        None,
        ge=0,
        description="dpo/kto (default 0.1): how far the policy may move from the reference (higher: "
        "less); orpo (default 0.1): the weight of the odds-ratio term (the paper's lambda); grpo "
        "(default 0): the KL penalty to the reference (above 0 keeps a reference).",
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

    num_generations: int = Field(
        4, ge=2, le=256, description="grpo: completions sampled per prompt, ranked against each other."
    )
    max_completion_length: int = Field(64, gt=0, description="grpo: tokens per sampled completion at most.")
    temperature: float = Field(1.0, gt=0, description="grpo: sampling temperature of the completions.")
    rewards: list[Reward] = Field(
        default_factory=list,
        description="grpo: the rewards, summed with their weights: exact_match/f1 against the "
        "reference column, regex format checks, a length penalty, or beam (a BEAM process scores).",
    )
    reference_column: str = Field(
        "answer",
        min_length=1,
        description="grpo: the rows' column with the reference answer that exact_match and f1 compare with.",
    )

    @property
    def paired(self) -> bool:
        """Whether rows are chosen/rejected pairs (DPO, ORPO) rather than labelled answers (KTO)."""
        return self.method in PAIRED_METHODS

    @property
    def row_format(self) -> str:
        return ROW_FORMAT[self.method]

    @property
    def kl_beta(self) -> float:
        """``beta`` with the method's default."""
        return self.beta if self.beta is not None else (0.0 if self.method == "grpo" else 0.1)

    @property
    def needs_reference(self) -> bool:
        """Whether each row must carry a reference answer (a match reward compares with it)."""
        return any(r.type in ("exact_match", "f1") for r in self.rewards)
