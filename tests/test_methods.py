"""Issue 18's methods: AdaLoRA (a rank budget over the run's steps, an orthogonality regulariser
in the loss) and P-tuning (a prompt encoder), each checked for its effect, through the real job."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from finetune_worker.config import parse_job_config
from finetune_worker.errors import ConfigError
from test_train_helpers import run_job, tiny_config


def adalora(model: Path, out: Path, **peft: Any) -> dict[str, Any]:
    return tiny_config(
        model,
        out,
        "qa.jsonl",
        peft={"method": "adalora", "r": 4, "adalora_init_r": 8, "dropout": 0.0, **peft},
        max_steps=12,
        checkpoint={"every_steps": 100, "keep": 1},
    )


def test_adalora_schedules_its_budget_over_the_runs_steps(tiny_model_dir: Path, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "adalora"
    run = run_job(adalora(tiny_model_dir, out))
    assert run.terminal.type == "completed", run.terminal.payload
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["peft_type"] == "ADALORA" and saved["total_step"] == 12
    assert (saved["tinit"], saved["tfinal"]) == (1, 2)  # 10% and 20% of the run
    # The budget was allocated: ranks were pruned from 8 towards 4 on average, unevenly.
    pattern = saved["rank_pattern"]
    assert pattern, "update_and_allocate never ran"
    kept = [sum(bool(x) for x in mask) for mask in pattern.values()]
    assert sum(kept) / len(kept) <= 4.5 and min(kept) < 8
    # AdaLoRA starts as the base model (E = 0): its base held-out loss is the base model's, with no
    # regulariser in it (a LoRA run on the same rows measures the same).
    lora = run_job({**adalora(tiny_model_dir, tmp_path / "lora"), "peft": {"method": "lora"}, "max_steps": 1})
    base_loss = run.terminal.payload["summary"]["base_eval_loss"]
    assert base_loss == pytest.approx(lora.terminal.payload["summary"]["base_eval_loss"], abs=1e-5)
    # It loads with plain peft and changes the logits.
    import torch

    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval()
    ids = torch.tensor([[1, 5, 9, 13, 17]])
    with torch.no_grad():
        before = base(input_ids=ids).logits
        after = PeftModel.from_pretrained(base, str(out)).eval()(input_ids=ids).logits
    assert not torch.allclose(before, after, atol=1e-4)


def test_adalora_regulariser_reaches_the_loss(tiny_model_dir: Path, tmp_path: Path) -> None:
    def first_loss(weight: float) -> float:
        cfg = adalora(tiny_model_dir, tmp_path / f"w{weight}", orth_reg_weight=weight)
        cfg["max_steps"] = 1
        run = run_job(cfg)
        assert run.terminal.type == "completed", run.terminal.payload
        return float(run.of("metrics")[0]["metrics"]["loss"])

    # Same seed, same batch: the only difference is the regulariser's term (|AA^T - I| is large at init).
    assert first_loss(5.0) > first_loss(0.0) + 0.5


def test_adalora_and_p_tuning_configs_are_checked(tiny_model_dir: Path, tmp_path: Path) -> None:
    cfg = adalora(tiny_model_dir, tmp_path / "o", adalora_init_r=2, adalora_tinit=0.5, adalora_tfinal=0.6)
    cfg["training_parameters"]["chunked_loss"] = True
    with pytest.raises(ConfigError) as info:
        parse_job_config(cfg)
    text = str(info.value)
    assert "peft.adalora_init_r: the starting rank must be at least r (4)" in text
    assert "adalora_tinit + adalora_tfinal must leave steps between them" in text
    assert "training_parameters.chunked_loss: adalora adds its orthogonality regulariser" in text
    ptuning = tiny_config(
        tiny_model_dir, tmp_path / "p", peft={"method": "p_tuning", "num_virtual_tokens": 4}
    )
    parse_job_config(ptuning)


def test_p_tuning_trains_its_prompt_encoder(tiny_model_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    out = tmp_path / "ptuning"
    cfg = tiny_config(
        tiny_model_dir,
        out,
        "qa.jsonl",
        peft={"method": "p_tuning", "num_virtual_tokens": 4, "encoder_hidden_size": 32},
    )
    run = run_job(cfg)
    assert run.terminal.type == "completed", run.terminal.payload
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["peft_type"] == "P_TUNING" and saved["num_virtual_tokens"] == 4
    # peft saves the virtual tokens the encoder produces: trained, they differ from the initial ones.
    weights = load_file(str(out / "adapter_model.safetensors"))
    assert list(weights) == ["prompt_embeddings"] and weights["prompt_embeddings"].shape[0] == 4
    losses = [m["metrics"]["loss"] for m in run.of("metrics")]
    assert losses[-1] < losses[0]
