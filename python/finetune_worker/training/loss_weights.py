"""``loss_weights.tokens``: per-target-token weights in the training loss.

The config names tokens as text; :func:`token_weight_ids` finds each one's id in the run's
tokenizer (a job-start check: the tokenizer is not loaded at ``validate``), and
:func:`token_weight_table` lays them out as a vocabulary-sized tensor the trainer indexes with
the batch's labels. The per-class weights are applied earlier, in each row's ``loss_weight``
column (``training.data``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from finetune_worker.errors import JobFailed


def token_weight_ids(tokens: Mapping[str, float], tokenizer: Any) -> dict[int, float]:
    """``{token id: weight}`` for the configured tokens; a token that is not exactly one token of
    this tokenizer fails the job, naming it."""
    vocab = tokenizer.get_vocab()
    out: dict[int, float] = {}
    for text, weight in tokens.items():
        token_id = vocab.get(text)
        if token_id is None:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(ids) != 1:
                pieces = tokenizer.convert_ids_to_tokens(ids)
                raise JobFailed(
                    "invalid_config",
                    f"loss_weights.tokens[{text!r}]: not one token of this model's tokenizer (it is "
                    f"{len(ids)}: {pieces[:8]})",
                    hint="Name a single token, as the vocabulary spells it (see tokenizer.json) or as text "
                    "that encodes to one token.",
                    details={"field": f"loss_weights.tokens.{text}"},
                )
            token_id = ids[0]
        if token_id in out and out[token_id] != weight:
            raise JobFailed(
                "invalid_config",
                f"loss_weights.tokens[{text!r}]: the same token as another key, with another weight",
                details={"field": f"loss_weights.tokens.{text}"},
            )
        out[int(token_id)] = float(weight)
    return out


def token_weight_table(weights: Mapping[int, float], size: int) -> Any:
    """A float tensor of ``size`` ones with the weighted ids set (the trainer moves it to its device)."""
    import torch

    table = torch.ones(max(size, max(weights, default=-1) + 1), dtype=torch.float32)
    for token_id, weight in weights.items():
        table[token_id] = weight
    return table
