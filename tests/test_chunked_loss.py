"""training_parameters.chunked_loss: the LM head and cross-entropy on trained tokens only, a chunk at
a time. Same loss and same gradients as the model's own loss; the memory it saves is measured by
``make bench`` (part ``memory``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from finetune_worker.training import trainer as trainer_mod
from finetune_worker.training.trainer import chunked_head_loss
from test_train_helpers import tiny_config


def test_chunked_head_loss_equals_the_full_cross_entropy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(trainer_mod, "CHUNK_TOKENS", 7)  # several chunks and a short last one
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    hidden = torch.randn(3, 12, 16, requires_grad=True)
    labels = torch.randint(0, 50, (3, 12))
    labels[0, :5] = -100  # a prompt
    labels[2, 8:] = -100  # padding
    weights = torch.rand(3, 12)
    for w in (None, weights):
        total, count = chunked_head_loss(head, hidden, labels, w)
        logits = head(hidden)[:, :-1].reshape(-1, 50)
        targets = labels[:, 1:].reshape(-1)
        per_token = torch.nn.functional.cross_entropy(logits, targets, ignore_index=-100, reduction="none")
        scale = w[:, 1:].reshape(-1) if w is not None else torch.ones_like(per_token)
        expected = (per_token * scale).sum()
        assert int(count) == int((targets != -100).sum())
        torch.testing.assert_close(total, expected, rtol=1e-6, atol=1e-6)
        got = torch.autograd.grad(total, [hidden, head.weight])
        want = torch.autograd.grad(expected, [hidden, head.weight])
        for g, e in zip(got, want, strict=True):
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


def test_a_batch_with_nothing_to_train_gives_zero_and_a_graph() -> None:
    head = torch.nn.Linear(8, 10)
    hidden = torch.randn(2, 5, 8, requires_grad=True)
    total, count = chunked_head_loss(head, hidden, torch.full((2, 5), -100))
    assert float(total) == 0.0 and int(count) == 0
    total.backward()  # no error: the graph reaches the inputs


def test_the_trainer_loss_is_the_same_with_and_without_chunking(tiny_model_dir: Path, tmp_path: Path) -> None:
    from finetune_worker.config import parse_job_config
    from finetune_worker.hf import load_tokenizer
    from finetune_worker.training.data import build_datasets, make_collator
    from finetune_worker.training.model import load_model, plan_hardware
    from finetune_worker.training.trainer import build_trainer

    losses = {}
    for chunked in (False, True):
        raw = tiny_config(tiny_model_dir, tmp_path / f"o-{chunked}", max_steps=4)
        raw["training_parameters"] = {
            **raw["training_parameters"],
            "chunked_loss": chunked,
            "logging_steps": 1,
        }
        raw["peft"] = {"method": "full"}  # the head itself trains: its gradient goes through the chunks
        _, cfg = parse_job_config(json.dumps(raw))
        plan = plan_hardware(cfg, lambda m: None)
        tokenizer = load_tokenizer(tiny_model_dir, "model_name")
        model = load_model(cfg, plan, lambda m: None)
        train, held, _ = build_datasets(cfg.data, tokenizer, cfg.dataset.path, validation_split=0.2, seed=1)
        trainer = build_trainer(
            cfg,
            plan,
            model,
            tokenizer,
            train,
            held,
            make_collator(tokenizer, "group"),
            [],
            tmp_path / f"t{chunked}",
        )
        batch = next(iter(trainer.get_train_dataloader()))
        if chunked:  # the path is really taken
            assert trainer._chunked_head(model, batch) is not None
        else:  # and "auto" leaves a 1k-vocab batch (a few MiB of logits) to the model
            trainer._chunked_loss = "auto"
            assert trainer._chunked_head(model, batch) is None
            trainer._chunked_loss = False
        trainer.train()
        steps = [e["loss"] for e in trainer.state.log_history if "loss" in e]
        losses[chunked] = (steps, trainer.evaluate()["eval_loss"])
    torch.testing.assert_close(
        torch.tensor(losses[True][0]), torch.tensor(losses[False][0]), rtol=1e-4, atol=0
    )
    assert losses[True][1] == pytest.approx(losses[False][1], rel=1e-5)
