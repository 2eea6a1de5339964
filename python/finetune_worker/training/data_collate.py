"""Batch collators: padding-free (flattened rows + position_ids) or padded.

Padding-free is transformers' ``DataCollatorWithFlattening``: a batch becomes one row of all
examples back to back, ``position_ids`` restart at 0 for each, and the first label of each is
-100 so no example learns to predict across the seam. Attention then stays within each
example (the model derives per-example masks from the restarting positions), with no compute
spent on padding. The padded collator is the fallback for models or methods that need rows
(prefix/prompt tuning prepend virtual tokens per row).

Rows of a source with a ``loss_weight`` carry it as a column; :class:`LossWeights` turns it into
``token_weights`` laid out as the batch's tokens are, which the Trainer's loss multiplies in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

IGNORE_INDEX = -100


@dataclass
class PaddedCollator:
    """Right-pads ``input_ids`` with ``pad_token_id`` and ``labels`` with -100, plus ``attention_mask``."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        ids = [_as_list(f["input_ids"]) for f in features]
        labels = [
            _as_list(f["labels"]) if "labels" in f else list(i) for f, i in zip(features, ids, strict=True)
        ]
        width = max(len(i) for i in ids)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch_ids, batch_labels, batch_mask = [], [], []
        for i, lab in zip(ids, labels, strict=True):
            pad = width - len(i)
            batch_ids.append(i + [self.pad_token_id] * pad)
            batch_labels.append(lab + [IGNORE_INDEX] * pad)
            batch_mask.append([1] * len(i) + [0] * pad)
        return {
            "input_ids": torch.tensor(batch_ids, dtype=torch.long),
            "labels": torch.tensor(batch_labels, dtype=torch.long),
            "attention_mask": torch.tensor(batch_mask, dtype=torch.long),
        }


@dataclass
class LossWeights:
    """Wraps a collator: rows' ``loss_weight`` become a ``token_weights`` tensor shaped like the
    batch's ``input_ids`` (one flattened row when packing, padded rows otherwise, 0 on padding).
    Batches whose rows carry no weight are the inner collator's, unchanged."""

    inner: Any
    packing: bool

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        weights = [f.get("loss_weight") for f in features]
        batch: dict[str, Any] = self.inner(
            [{k: v for k, v in f.items() if k != "loss_weight"} for f in features]
        )
        if all(w is None for w in weights):
            return batch
        import torch

        lengths = [len(_as_list(f["input_ids"])) for f in features]
        per_row = [[1.0 if w is None else float(w)] * n for w, n in zip(weights, lengths, strict=True)]
        if self.packing:
            grid = [[w for row in per_row for w in row]]
        else:
            width = batch["input_ids"].shape[1]
            grid = [row + [0.0] * (width - len(row)) for row in per_row]
        batch["token_weights"] = torch.tensor(grid, dtype=torch.float32)
        return batch


def make_collator(tokenizer: Any, packing: bool) -> Any:
    """The collator for ``data.packing``: padding-free when True, padded otherwise."""
    inner: Any
    if packing:
        from transformers import DataCollatorWithFlattening

        inner = DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE_INDEX)
    else:
        pad = tokenizer.pad_token_id
        if pad is None:
            # Padded positions are masked out of attention and loss, so any id works; eos always exists.
            pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        inner = PaddedCollator(pad_token_id=int(pad))
    return LossWeights(inner, packing)


def _as_list(value: Any) -> list[int]:
    return value.tolist() if hasattr(value, "tolist") else list(value)
