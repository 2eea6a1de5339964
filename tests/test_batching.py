"""data.packing's modes (training/data_collate.py): what ``auto`` picks per attention kernel, the
length-grouped sampler's guarantees, and that the Trainer really batches that way."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from finetune_worker.training.data_collate import LengthGroupedBatches, choose_batching
from test_train_helpers import tiny_config


@pytest.mark.parametrize(
    ("requested", "attn", "virtual", "mode", "says"),
    [
        ("auto", "sdpa", False, "group", "dense mask"),
        ("auto", "eager", False, "group", "dense mask"),
        ("auto", "flash_attention_2", False, "flatten", "separate sequences"),
        ("auto", "flash_attention_3", False, "flatten", "separate sequences"),
        ("auto", "flex_attention", False, "flatten", "separate sequences"),
        ("auto", "kernels-community/flash-attn3", False, "flatten", "separate sequences"),
        ("flatten", "flex_attention", False, "flatten", "packing flatten"),
        ("auto", "flash_attention_2", True, "group", "virtual tokens"),
        (True, "sdpa", False, "group", "packing auto"),
        (False, "flash_attention_2", False, "pad", "packing pad"),
        ("flatten", "sdpa", False, "flatten", "(sum of lengths)^2"),
        ("flatten", "sdpa", True, "group", "not possible"),
        ("group", "flash_attention_2", False, "group", "packing group"),
        ("pad", "sdpa", False, "pad", "packing pad"),
    ],
)
def test_what_each_packing_value_resolves_to(
    requested: str | bool, attn: str, virtual: bool, mode: str, says: str
) -> None:
    got, why, warn = choose_batching(requested, attn, virtual)
    assert got == mode and says in why, (got, why)
    # The user is warned exactly when what they asked for is slow here or not possible.
    assert warn == (requested == "flatten" and (virtual or attn in ("sdpa", "eager"))), (got, why)


def test_auto_flattens_short_rows_whatever_the_kernel() -> None:
    """A flattened batch of short rows is short: its dense mask costs little, and flattening wastes
    no compute on padding (issue 15 measured it faster than grouping on 20-120-token rows)."""
    short = choose_batching("auto", "sdpa", False, flat_batch_tokens=8 * 110)
    assert short.mode == "flatten" and "short rows" in short.why and not short.warn
    assert choose_batching("auto", "sdpa", False, flat_batch_tokens=8 * 700).mode == "group"
    assert choose_batching("auto", "sdpa", True, flat_batch_tokens=100).mode == "group"  # virtual tokens
    assert choose_batching("group", "sdpa", False, flat_batch_tokens=100).mode == "group"  # asked for


def _lengths(n: int = 2000, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.exp(rng.uniform(np.log(30), np.log(800), n)).astype(int)


def test_grouped_order_is_a_seeded_permutation_with_little_padding() -> None:
    lengths = _lengths()
    sampler = LengthGroupedBatches(lengths, batch_size=8, seed=3)
    order = sampler.order()
    assert sorted(order.tolist()) == list(range(len(lengths)))  # every row once per epoch
    assert (order == LengthGroupedBatches(lengths, 8, seed=3).order()).all()  # seeded
    sampler.set_epoch(1)
    assert not (sampler.order() == order).all()  # a new order each epoch
    assert not (LengthGroupedBatches(lengths, 8, seed=4).order() == order).all()

    def padding(indices: np.ndarray) -> float:
        batches = [lengths[indices[i : i + 8]] for i in range(0, len(indices), 8)]
        slots = sum(len(b) * b.max() for b in batches)
        return 1 - lengths.sum() / slots

    random_order = np.random.default_rng(0).permutation(len(lengths))
    assert padding(random_order) > 0.35 and padding(order) < 0.05, (padding(random_order), padding(order))
    # The batches are shuffled, not left in length order: no length curriculum within a mega-batch.
    maxima = [int(lengths[order[i : i + 8]].max()) for i in range(0, len(order), 8)]
    assert maxima != sorted(maxima) and maxima != sorted(maxima, reverse=True)


def test_the_batch_with_the_longest_row_goes_first() -> None:
    """A batch too big for memory fails at step 1, and the first step shows a run's peak; also
    when the longest row falls in the last mega-batch's short remainder (3003 rows: 3 left over)."""
    lengths = _lengths(3003)
    longest = int(lengths.max())
    for seed in range(40):
        for epoch in range(2):
            sampler = LengthGroupedBatches(lengths, batch_size=8, seed=seed)
            sampler.set_epoch(epoch)
            order = sampler.order()
            assert int(lengths[order[:8]].max()) == longest, (seed, epoch)
            assert sorted(order.tolist()) == list(range(len(lengths)))
            assert len(order) == len(lengths)


def test_a_global_batch_holds_the_same_rows_however_it_is_dealt() -> None:
    """One process x batch 8 and two ranks x 4 (accelerate deals each rank its run of 4): the
    sampler groups by the global batch, so each optimizer step sees the same 8 rows."""
    lengths = _lengths(500)
    order = LengthGroupedBatches(lengths, batch_size=8, seed=1).order()
    steps = [set(order[i : i + 8].tolist()) for i in range(0, len(order), 8)]
    rank0 = [order[i : i + 4] for i in range(0, len(order), 8)]
    rank1 = [order[i + 4 : i + 8] for i in range(0, len(order), 8)]
    assert [set(a.tolist()) | set(b.tolist()) for a, b in zip(rank0, rank1, strict=True)] == steps


def test_the_trainer_batches_rows_of_similar_length(tiny_model_dir: Path, tmp_path: Path) -> None:
    from conftest import DATA
    from finetune_worker.config import parse_job_config
    from finetune_worker.hf import load_tokenizer
    from finetune_worker.training.data import build_datasets, make_collator
    from finetune_worker.training.model import load_model, plan_hardware
    from finetune_worker.training.trainer import build_trainer

    base = tiny_config(
        tiny_model_dir,
        tmp_path / "o",
        dataset={"path": str(DATA / "conversations.jsonl"), "validation_split": 0},
    )
    _, cfg = parse_job_config(json.dumps(base))
    plan = plan_hardware(cfg, lambda m: None)
    tokenizer = load_tokenizer(tiny_model_dir, "model_name")
    model = load_model(cfg, plan, lambda m: None)
    rows, _, _ = build_datasets(cfg.data, tokenizer, cfg.dataset.path, validation_split=0, seed=1)
    assert rows.column_names[:3] == ["input_ids", "labels", "length"]

    def epoch(mode: str) -> tuple[float, list[list[int]]]:
        trainer = build_trainer(
            cfg, plan, model, tokenizer, rows, None, make_collator(tokenizer, mode), [], tmp_path
        )
        real = slots = 0
        seen = []
        for batch in trainer.get_train_dataloader():
            mask = batch["attention_mask"]
            real, slots = real + int(mask.sum()), slots + mask.numel()
            seen += [ids[m.bool()].tolist() for ids, m in zip(batch["input_ids"], mask, strict=True)]
        return 1 - real / slots, seen

    pad_share, padded = epoch("pad")
    group_share, grouped = epoch("group")
    assert sorted(map(tuple, grouped)) == sorted(map(tuple, padded))  # the same rows, each once
    assert group_share < pad_share / 3, (group_share, pad_share)


def test_evaluation_keeps_no_logits(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The held-out loss is a per-token sum; the Trainer must not also keep every batch's logits
    (rows x length x vocab floats: memory that grows with the held-out split)."""
    from finetune_worker.config import parse_job_config
    from finetune_worker.hf import load_tokenizer
    from finetune_worker.training.data import build_datasets, make_collator
    from finetune_worker.training.model import load_model, plan_hardware
    from finetune_worker.training.trainer import build_trainer

    _, cfg = parse_job_config(json.dumps(tiny_config(tiny_model_dir, tmp_path / "o")))
    plan = plan_hardware(cfg, lambda m: None)
    tokenizer = load_tokenizer(tiny_model_dir, "model_name")
    model = load_model(cfg, plan, lambda m: None)
    train, held, _ = build_datasets(cfg.data, tokenizer, cfg.dataset.path, validation_split=0.2, seed=1)
    trainer = build_trainer(
        cfg, plan, model, tokenizer, train, held, make_collator(tokenizer, "group"), [], tmp_path
    )
    out = trainer.evaluation_loop(trainer.get_eval_dataloader(), "eval")
    assert out.predictions is None and out.label_ids is None
    assert out.metrics["eval_loss"] > 0
