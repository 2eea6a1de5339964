"""Continual learning (the train config's ``continual`` section): measure forgetting, and resist it.

- :func:`reference_rows` tokenizes the first ``reference_rows`` rows of the reference data the
  way training rows are; :func:`reference_loss` is their token-weighted LM loss, measured before
  and after training (``reference_loss_before``/``_after`` in the summary).
- :func:`diagonal_fisher` estimates EWC's diagonal Fisher on those rows before training: the mean
  over rows of each trained weight's squared gradient of the row's loss, scaled to a mean of 1.
- :class:`ContinualPenalty` is what the trainer adds to each training loss:
  ``1/2 x sum((l2_to_base + ewc x F) x (w - w0)^2)`` over the trained weights ``w``, ``w0`` their
  values before training. It keeps a copy of them (and of F): twice the trained weights' memory.

Replayed rows need nothing here: they are one more source of the mixture (``TrainConfig.sources``).
Written by hand because no maintained library offers these for a transformers Trainer (Avalanche
targets its own training loop); each is a few lines of torch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from finetune_worker.config.train import TrainConfig
from finetune_worker.data.sources import load_examples
from finetune_worker.errors import JobFailed
from finetune_worker.training.data_collate import make_collator


def reference_rows(cfg: TrainConfig, tokenizer: Any) -> list[dict[str, Any]]:
    """The reference data's first rows as token rows (``input_ids``, ``labels``)."""
    from finetune_worker.training.data import ChatEncoder

    source = cfg.reference_source
    assert source is not None and cfg.continual is not None
    examples = load_examples(source, cfg.continual.reference_rows)
    rows, _ = ChatEncoder(tokenizer, cfg.data).encode_all(examples)
    return [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows]


def _batches(rows: list[dict[str, Any]], tokenizer: Any, size: int, device: Any) -> Any:
    collate = make_collator(tokenizer, "pad")
    for start in range(0, len(rows), size):
        batch = collate(rows[start : start + size])
        yield {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}


def reference_loss(
    model: Any, rows: list[dict[str, Any]], tokenizer: Any, batch_size: int, check: Callable[[], None]
) -> float | None:
    """The mean LM loss per trained token of ``rows`` (None when they train no token)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        with torch.no_grad():
            for batch in _batches(rows, tokenizer, batch_size, device):
                targets = int((batch["labels"][:, 1:] != -100).sum())
                if targets:
                    loss = model(**batch, use_cache=False).loss
                    total += float(loss) * targets
                    count += targets
                check()
    finally:
        model.train(was_training)
    return total / count if count else None


def diagonal_fisher(
    model: Any, rows: list[dict[str, Any]], tokenizer: Any, check: Callable[[], None]
) -> dict[str, torch.Tensor]:
    """EWC's diagonal Fisher of the trained weights on ``rows`` (one row per backward pass), scaled
    so that its mean over all trained weights is 1; by parameter name."""
    device = next(model.parameters()).device
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    sums = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()}
    was_training = model.training
    model.eval()  # no dropout: the Fisher of the model as it is
    used = 0
    try:
        for batch in _batches(rows, tokenizer, 1, device):
            if not int((batch["labels"][:, 1:] != -100).sum()):
                continue
            model.zero_grad(set_to_none=True)
            model(**batch, use_cache=False).loss.backward()
            for name, p in params.items():
                if p.grad is not None:
                    sums[name] += p.grad.detach().float().pow(2)
            used += 1
            check()
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    if not used:
        raise JobFailed(
            "bad_dataset_row",
            "continual.reference: no reference row has a trained token to estimate EWC's Fisher on",
            hint="Give reference rows that train some tokens (plain text, or answers to train on).",
        )
    elements = sum(s.numel() for s in sums.values())
    mean = sum(float(s.sum()) for s in sums.values()) / max(elements, 1) / max(used, 1)
    scale = 1.0 / (max(used, 1) * mean) if mean > 0 else 0.0
    return {name: s.mul_(scale) for name, s in sums.items()}


class ContinualPenalty:
    """``1/2 x sum(coef x (w - w0)^2)`` over the trained weights (see the module doc).

    Its value comes from :class:`_PenaltyFunction`, which saves nothing for backward: the
    gradient ``coef x (w - w0)`` is computed one weight at a time when backward reaches it, so
    the penalty costs its anchors (and coefficients) and no activation memory."""

    def __init__(self, model: Any, l2: float, ewc: float, fisher: dict[str, torch.Tensor] | None):
        self.terms: list[tuple[torch.nn.Parameter, torch.Tensor, torch.Tensor | float]] = []
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            coef: torch.Tensor | float = l2
            if ewc and fisher is not None:
                coef = fisher.pop(name).to(device=p.device, dtype=p.dtype) * ewc + l2
            self.terms.append((p, p.detach().clone(), coef))

    def __call__(self) -> torch.Tensor:
        # Weights frozen in this phase of progressive unfreezing stay out (they do not move).
        live = [term for term in self.terms if term[0].requires_grad]
        if not live:
            return torch.zeros(())
        value: torch.Tensor = _PenaltyFunction.apply(live, *(p for p, _, _ in live))
        return value


class _PenaltyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, terms: list[Any], *params: torch.Tensor) -> torch.Tensor:
        ctx.terms = terms
        with torch.no_grad():
            total = sum(
                float((coef * (p.detach().float() - anchor.float()).pow(2)).sum())
                for p, anchor, coef in terms
            )
        return torch.tensor(total / 2, device=params[0].device, dtype=torch.float32)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        grads = []
        with torch.no_grad():
            for p, anchor, coef in ctx.terms:
                grads.append((p.detach() - anchor).mul_(coef).mul_(grad.to(p.dtype)))
        return (None, *grads)
