"""Issue 18, items 2-4: progressive unfreezing, continual learning, custom loss weights.

Each test checks the effect, against the saved tensors, a hand computation or the measured loss
on reference data, not only that a run completes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from finetune_worker.config import parse_job_config
from finetune_worker.errors import ConfigError
from test_train_helpers import Run, run_job, tiny_config

DATA = Path(__file__).resolve().parents[1] / "configs" / "data"


def jsonl(rows: list[Any]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def issues_of(config: dict[str, Any]) -> dict[str, str]:
    with pytest.raises(ConfigError) as err:
        parse_job_config(json.dumps(config))
    return {i.path: i.message for i in err.value.issues}


# ---- custom loss weights ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok(tiny_model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model_dir))


def test_loss_weights_match_a_hand_computation(tiny_model_dir: Path, tok: Any, tmp_path: Path) -> None:
    """Per-class weights (the row's answer) times per-token weights (the target token), summed over
    the trained tokens and divided by their count: the trainer's loss equals that, computed here
    with plain torch, padded and flattened."""
    import torch
    from transformers import AutoModelForCausalLM, TrainingArguments

    from finetune_worker.config.data import DataConfig
    from finetune_worker.training.data import make_collator, prepare_data
    from finetune_worker.training.loss_weights import token_weight_ids, token_weight_table
    from finetune_worker.training.trainer import AtomicCheckpointTrainer

    answers = ["red", "blue", "red", "green", "red", "blue", "green", "red"]
    rows = [{"question": f"What colour is thing {i}?", "answer": a} for i, a in enumerate(answers)]
    (tmp_path / "d.jsonl").write_text(jsonl(rows))
    data_cfg = DataConfig(max_seq_length=128)
    source = data_cfg.source(tmp_path / "d.jsonl", "dataset")
    classes = {"red": 0.25, "green": 2.0}
    data = prepare_data(data_cfg, tok, [source], seed=0, class_weights=classes)
    assert data.stats["class_counts"] == {"red": 4, "green": 2}
    ids = token_weight_ids({"<|im_end|>": 3.0, "d": 0.5}, tok)
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    assert ids[eos] == 3.0 and len(ids) == 2

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    trainer = AtomicCheckpointTrainer(
        model=model,
        args=TrainingArguments(output_dir=str(tmp_path / "t"), report_to="none", use_cpu=True),
        keep=1,
        token_weights=token_weight_table(ids, len(tok)),
    )
    batch_rows = [data.train[i] for i in range(len(answers))]  # one source: file order
    for packing in (False, True):
        batch = make_collator(tok, packing)(batch_rows)
        model.train()
        with torch.no_grad():
            labels = batch["labels"]
            inputs = {k: v for k, v in batch.items() if k not in ("labels", "token_weights")}
            logits = model(**inputs).logits
            nll = torch.nn.functional.cross_entropy(
                logits[..., :-1, :].reshape(-1, logits.shape[-1]),
                labels[..., 1:].reshape(-1),
                reduction="none",
                ignore_index=-100,
            )
            # The weights, by hand: each row's class weight on its positions, each target's token weight.
            row_weights = [classes.get(a, 1.0) for a in answers]
            lengths = [len(r["input_ids"]) for r in batch_rows]
            per_position = torch.zeros(labels.shape)
            if packing:
                flat = [w for w, n in zip(row_weights, lengths, strict=True) for _ in range(n)]
                per_position[0, : len(flat)] = torch.tensor(flat)
            else:
                for i, (w, n) in enumerate(zip(row_weights, lengths, strict=True)):
                    per_position[i, :n] = w
            token_w = torch.ones(labels.shape)
            token_w[labels == eos] = 3.0
            token_w[labels == ids_of(tok, "d")] = 0.5
            weights = (per_position * token_w)[..., 1:].reshape(-1)
            targets = labels[..., 1:].reshape(-1)
            expected = (nll * weights).sum() / (targets != -100).sum()
            plain = (nll.sum() / (targets != -100).sum()).item()
            got = trainer.compute_loss(model, dict(batch))
        assert float(got) == pytest.approx(float(expected), rel=1e-5)
        assert abs(float(got) - plain) > 1e-3  # the weights changed the loss


def ids_of(tok: Any, token: str) -> int:
    (token_id,) = tok(token, add_special_tokens=False)["input_ids"]
    return int(token_id)


def test_a_token_weight_that_is_several_tokens_is_refused_by_name(tok: Any) -> None:
    from finetune_worker.errors import JobFailed
    from finetune_worker.training.loss_weights import token_weight_ids

    with pytest.raises(JobFailed, match=r"loss_weights.tokens\['red orange'\]: not one token"):
        token_weight_ids({"red orange": 0.5}, tok)


def test_classes_no_training_answer_matches_fail_the_job(tiny_model_dir: Path, tmp_path: Path) -> None:
    cfg = tiny_config(
        tiny_model_dir, tmp_path / "out", "qa.jsonl", loss_weights={"classes": {"no such answer": 0.5}}
    )
    run = run_job(cfg)
    assert run.terminal.type == "failed"
    assert run.terminal.payload["error"] == "invalid_config"
    assert "loss_weights.classes" in run.terminal.payload["message"]


def test_loss_weights_train_and_report_their_classes(tiny_model_dir: Path, tmp_path: Path) -> None:
    cfg = tiny_config(
        tiny_model_dir,
        tmp_path / "out",
        "instruction.jsonl",
        loss_weights={"classes": {"red": 0.0, "purple": 2.0}, "tokens": {"<|im_end|>": 0.5}},
        max_steps=4,
    )
    run = run_job(cfg)
    assert run.terminal.type == "completed", run.terminal.payload
    counts = run.terminal.payload["summary"]["data"]["class_counts"]
    lines = [json.loads(line) for line in (DATA / "instruction.jsonl").read_text().splitlines()]
    assert counts["red"] > 0 and counts["purple"] > 0
    assert counts["red"] <= sum(1 for r in lines if r["output"] == "red")


# ---- schema checks ---------------------------------------------------------------------------


def test_the_new_sections_are_checked_where_they_are_wrong(tiny_model_dir: Path, tmp_path: Path) -> None:
    base = tiny_config(tiny_model_dir, tmp_path / "out", "qa.jsonl")
    lora_unfreeze = {**base, "peft": {"method": "lora", "unfreeze": [{"epoch": 0, "layers": 1}]}}
    assert "full fine-tuning" in issues_of(lora_unfreeze)["peft.unfreeze"]
    phases = [{"step": 2, "layers": 1}, {"epoch": 1, "layers": "all"}, {"epoch": 0.5, "layers": 1}]
    found = issues_of({**base, "peft": {"method": "full", "unfreeze": phases}})
    assert "one unit" in found["peft.unfreeze"]
    assert "starts at 0" in found["peft.unfreeze[0]"]
    assert "increasing" in found["peft.unfreeze[2]"]
    both = issues_of({**base, "peft": {"method": "full", "unfreeze": [{"layers": 1}]}})
    assert any("epoch or step" in m for m in both.values())
    too_many = issues_of({**base, "peft": {"method": "full", "unfreeze": [{"step": 0, "layers": 3}]}})
    assert "2 decoder layers" in too_many["peft.unfreeze[0].layers"]

    assert "reference" in issues_of({**base, "continual": {"ewc": 1.0}})["continual.ewc"]
    assert "sets nothing" in issues_of({**base, "continual": {}})["continual"]
    assert (
        "replay" in issues_of({**base, "continual": {"replay": {"share": 0.2}}})["continual.replay.dataset"]
    )
    missing = issues_of({**base, "continual": {"reference": {"path": str(tmp_path / "nope.jsonl")}}})
    assert "continual.reference.path" in missing
    assert "sets no weight" in issues_of({**base, "loss_weights": {}})["loss_weights"]
    negative = issues_of({**base, "loss_weights": {"tokens": {"a": -1}}})
    assert any(path.startswith("loss_weights.tokens") for path in negative)


# ---- progressive unfreezing ---------------------------------------------------------------------


def _tensors(checkpoint: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(checkpoint / "model.safetensors"))


def _unfreeze_config(model: Path, out: Path, max_steps: int = 12) -> dict[str, Any]:
    return tiny_config(
        model,
        out,
        "qa.jsonl",
        peft={
            "method": "full",
            "unfreeze": [
                {"step": 0, "layers": 1, "learning_rate": 3e-3},
                {"step": 4, "layers": 2, "learning_rate": 2e-3},
                {"step": 8, "layers": "all", "learning_rate": 1e-3},
            ],
        },
        training_parameters={
            "epochs": 3,
            "batch_size": 8,
            "learning_rate": 5e-3,
            "logging_steps": 1,
            "lr_scheduler": "constant",
            "weight_decay": 0.1,
        },
        dataset={"path": str(DATA / "qa.jsonl"), "validation_split": 0},
        checkpoint={"every_steps": 2, "keep": 10},
        max_steps=max_steps,
    )


def test_unfreezing_phases_train_only_their_layers(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    run = run_job(_unfreeze_config(tiny_model_dir, out))
    assert run.terminal.type == "completed", run.terminal.payload
    stages = [p for p in run.of("phase") if "stage" in p]
    assert [(p["stage"], p["step"], p["layers"], p["learning_rate"]) for p in stages] == [
        (1, 0, 1, 3e-3),
        (2, 4, 2, 2e-3),
        (3, 8, "all", 1e-3),
    ]
    assert (
        stages[0]["trainable_parameters"]
        < stages[1]["trainable_parameters"]
        < stages[2]["trainable_parameters"]
    )
    # Each phase's own learning rate (a constant schedule: exactly it).
    rates = {m["step"]: m["metrics"]["learning_rate"] for m in run.of("metrics")}
    assert (
        rates[1] == pytest.approx(3e-3)
        and rates[5] == pytest.approx(2e-3)
        and rates[9] == pytest.approx(1e-3)
    )

    base = _tensors_of_base(tiny_model_dir)
    ck = {step: _tensors(out / f"checkpoint-{step}") for step in (2, 4, 6, 8, 10, 12)}
    layer0 = [k for k in base if ".layers.0." in k]
    layer1 = [k for k in base if ".layers.1." in k]
    embed = [k for k in base if "embed_tokens" in k]
    assert layer0 and layer1 and embed

    def same(a: dict[str, Any], b: dict[str, Any], keys: list[str]) -> bool:
        return all(bool((a[k] == b[k]).all()) for k in keys)

    # Phase 1 (steps 1-4): layer 0 and the embeddings bit-identical to the base, layer 1 trained.
    assert same(base, ck[2], layer0 + embed) and same(base, ck[4], layer0 + embed)
    assert not same(base, ck[2], layer1)
    # Phase 2 (steps 5-8): both layers train, the embeddings are still the base's.
    assert same(base, ck[8], embed) and not same(ck[4], ck[6], layer0)
    # Phase 3: everything trains.
    assert not same(ck[8], ck[10], embed)


def _tensors_of_base(model_dir: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(model_dir / "model.safetensors"))


def test_a_resumed_run_continues_in_the_phase_of_its_step(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Cancelled in phase 2 and resumed: it goes on in phase 2 (not 1) and ends where an
    uninterrupted run ends."""
    whole = tmp_path / "whole"
    assert run_job(_unfreeze_config(tiny_model_dir, whole)).terminal.type == "completed"

    out = tmp_path / "split"
    cfg = _unfreeze_config(tiny_model_dir, out)
    first = Run(cfg)
    try:
        first.wait_for("checkpoint", lambda p: p["step"] == 6)
        first.manager.cancel(first.job_id)
        assert first.wait().type == "cancelled"
    finally:
        first.close()
    stopped = first.terminal.payload["step"]
    assert 6 <= stopped < 8, "the test needs the cancel to land in phase 2"
    second = run_job({**cfg, "resume": "auto"})
    assert second.terminal.type == "completed", second.terminal.payload
    stages = [p for p in second.of("phase") if "stage" in p]
    assert stages[0]["stage"] == 2 and stages[0]["step"] >= 6
    assert [p["stage"] for p in stages] == [2, 3]
    a, b = _tensors(whole), _tensors(out)
    import torch

    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-5), key


# ---- continual learning -------------------------------------------------------------------------


def _full_run(model: Path, out: Path, data_file: str, steps: int, **extra: Any) -> Any:
    """A full fine-tune of ``model`` on one demo file, all rows trained, no checkpoint on the way."""
    cfg = tiny_config(
        model,
        out,
        data_file,
        dataset={"path": str(DATA / data_file), "validation_split": 0},
        peft={"method": "full"},
        training_parameters={"epochs": 3, "batch_size": 8, "learning_rate": 3e-3, "logging_steps": 5},
        checkpoint={"every_steps": 1000, "keep": 1},
        max_steps=steps,
        **extra,
    )
    run = run_job(cfg)
    assert run.terminal.type == "completed", run.terminal.payload
    return run


@pytest.fixture(scope="module")
def pretrained(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model that knows the reference data (text.jsonl): forgetting can then be measured."""
    out = tmp_path_factory.mktemp("pretrained") / "model"
    _full_run(tiny_model_dir, out, "text.jsonl", 60)
    return out


def _forgetting(model: Path, out: Path, continual: dict[str, Any]) -> dict[str, Any]:
    reference = {"reference": {"path": str(DATA / "text.jsonl")}, "reference_rows": 48}
    run = _full_run(model, out, "instruction.jsonl", 30, continual={**reference, **continual})
    summary = run.terminal.payload["summary"]
    return {**summary["continual"], "metrics": run.of("metrics"), "sources": summary["data"]["sources"]}


def test_a_stronger_penalty_keeps_the_reference_loss_closer_to_the_base(
    pretrained: Path, tmp_path: Path
) -> None:
    free = _forgetting(pretrained, tmp_path / "free", {})
    base = free["reference_loss_before"]
    assert free["forgetting"] > 0.5, f"the test needs real forgetting to resist: {free}"
    for key in ("l2_to_base", "ewc"):
        weak = _forgetting(pretrained, tmp_path / f"{key}-weak", {key: 0.1})
        strong = _forgetting(pretrained, tmp_path / f"{key}-strong", {key: 1.0})
        assert weak["reference_loss_before"] == strong["reference_loss_before"] == base  # one base
        assert strong["forgetting"] < weak["forgetting"] / 2 < free["forgetting"] / 2, (
            key,
            strong,
            weak,
            free,
        )
        # The penalty is reported beside the loss it is part of.
        assert all("penalty" in m["metrics"] for m in strong["metrics"])
    assert all("penalty" not in m["metrics"] for m in free["metrics"])


def test_replay_mixes_its_share_of_general_rows_and_forgets_less(pretrained: Path, tmp_path: Path) -> None:
    free = _forgetting(pretrained, tmp_path / "free", {})
    replay = _forgetting(pretrained, tmp_path / "replay", {"replay": {"share": 0.3}})
    rows = {s["name"]: s["train_rows"] for s in replay["sources"]}
    assert set(rows) == {"instruction.jsonl", "replay: text.jsonl"}
    assert rows["replay: text.jsonl"] / sum(rows.values()) == pytest.approx(0.3, abs=0.01)
    assert replay["replay_share"] == 0.3
    assert replay["forgetting"] < free["forgetting"], (replay, free)


def test_the_penalty_is_its_formula(tiny_model_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from finetune_worker.training.continual import ContinualPenalty

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    model.model.embed_tokens.requires_grad_(False)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    fisher = {n: torch.full_like(p, 2.0) for n, p in model.named_parameters() if p.requires_grad}
    penalty = ContinualPenalty(model, 0.5, 3.0, fisher)
    assert float(penalty().detach()) == 0.0
    with torch.no_grad():
        model.model.norm.weight.add_(0.1)  # one trained tensor moves by 0.1 everywhere
        model.model.embed_tokens.weight.add_(1.0)  # a frozen one: not in the penalty
    n = model.model.norm.weight.numel()
    value = penalty()
    assert float(value) == pytest.approx(0.5 * (0.5 + 3.0 * 2.0) * n * 0.01, rel=1e-4)
    assert "model.embed_tokens.weight" not in names
    # Its gradient is coef x (w - w0), as autograd of the formula gives it.
    (2.0 * value).backward()
    expected = 2.0 * (0.5 + 3.0 * 2.0) * torch.full_like(model.model.norm.weight, 0.1)
    assert torch.allclose(model.model.norm.weight.grad, expected, atol=1e-5)
    assert model.model.embed_tokens.weight.grad is None
    assert float(model.model.layers[0].mlp.up_proj.weight.grad.abs().max()) == 0.0  # it did not move


def test_replayed_reference_rows_leave_out_the_measured_ones(tmp_path: Path) -> None:
    from finetune_worker.config.train import TrainConfig

    base = tiny_config(tmp_path, tmp_path / "out", "qa.jsonl")
    reference = {"path": str(DATA / "text.jsonl")}
    cfg = TrainConfig.model_validate(
        {**base, "continual": {"reference": reference, "reference_rows": 48, "replay": {"share": 0.2}}}
    )
    replay = cfg.sources[-1]
    assert replay.path == cfg.reference_source.path and replay.skip == 48 and replay.share == 0.2
    small = {**base, "continual": {"reference": reference, "reference_rows": 1000, "replay": {"share": 0.2}}}
    small["model_name"] = str(tmp_path)
    found = issues_of(small)
    assert any("no rows beyond its first 1000" in m for m in found.values()), found


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny-unfreeze", "tiny-continual", "tiny-loss-weights"])
def test_the_shipped_examples_run(name: str, tiny_model_dir: Path, tmp_path: Path) -> None:
    config = json.loads((DATA.parent / f"{name}.json").read_text())
    config["model_name"] = str(tiny_model_dir)
    config["output_dir"] = str(tmp_path / "out")
    for section in ("dataset", "continual"):
        _absolute(config.get(section))
    run = run_job(config)
    assert run.terminal.type == "completed", run.terminal.payload


def _absolute(section: Any) -> None:
    """The example's data paths (relative to the repository) made absolute, in place."""
    if isinstance(section, dict):
        for key, value in section.items():
            if key == "path" and isinstance(value, str):
                section[key] = str(DATA.parents[1] / value)
            else:
                _absolute(value)
