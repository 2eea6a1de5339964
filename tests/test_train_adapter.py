"""Every adapter method trains, saves, and reloads to the very logits it had in training.

Built from the job's own pieces (plan, load_model, data, build_trainer, save_outputs) so the
trained model is still in memory to compare against what ``PeftModel.from_pretrained`` (or
``AutoModelForCausalLM.from_pretrained`` for full fine-tuning) gives from the saved files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from finetune_worker.config.train import VIRTUAL_TOKEN_METHODS, TrainConfig
from finetune_worker.hf import load_tokenizer
from finetune_worker.training.data import build_datasets, make_collator
from finetune_worker.training.data_collate import choose_batching
from finetune_worker.training.job import save_initial_adapter, save_outputs
from finetune_worker.training.model import load_model, plan_hardware
from finetune_worker.training.trainer import build_trainer
from test_train_helpers import tiny_config

METHODS: dict[str, dict[str, Any]] = {
    "lora": {"peft": {"method": "lora", "dropout": 0.1}},
    "dora": {"peft": {"method": "dora"}},
    "rslora": {"peft": {"method": "rslora"}},
    "pissa": {"peft": {"method": "pissa"}},
    "ia3": {"peft": {"method": "ia3"}},
    "prompt_tuning": {"peft": {"method": "prompt_tuning", "num_virtual_tokens": 4}},
    "prefix_tuning": {"peft": {"method": "prefix_tuning", "num_virtual_tokens": 4}},
    "p_tuning": {"peft": {"method": "p_tuning", "num_virtual_tokens": 4, "encoder_hidden_size": 32}},
    "adalora": {"peft": {"method": "adalora", "r": 4, "adalora_init_r": 8}},
    "full": {"peft": {"method": "full", "freeze_embeddings": True}},
    "qlora-4bit": {"quantization": {"bits": 4, "use_double_quant": True}},
    "qlora-8bit": {"quantization": {"bits": 8}},
}


def train_in_memory(raw: dict[str, Any], out: Path) -> tuple[Any, Any, dict[str, torch.Tensor]]:
    from transformers import set_seed

    cfg = TrainConfig.model_validate(raw)
    set_seed(cfg.seed)
    plan = plan_hardware(cfg, print)
    tokenizer = load_tokenizer(Path(cfg.model_name), "model_name")
    model = load_model(cfg, plan, print, total_steps=cfg.max_steps)
    initial = save_initial_adapter(cfg, model, out)
    train_rows, eval_rows, _ = build_datasets(
        cfg.data, tokenizer, cfg.dataset.path, validation_split=cfg.dataset.validation_split, seed=cfg.seed
    )
    mode = choose_batching(
        cfg.data.packing, cfg.attn_implementation, cfg.peft.method in VIRTUAL_TOKEN_METHODS
    ).mode
    collator = make_collator(tokenizer, mode)
    trainer = build_trainer(cfg, plan, model, tokenizer, train_rows, eval_rows, collator, [], out)
    trainer.train()
    save_outputs(trainer, tokenizer, out, initial)
    # A fixed padded batch of held-out rows (padded so every method, virtual tokens included, takes it).
    batch = make_collator(tokenizer, "pad")(list(eval_rows.select(range(4))))
    batch.pop("labels")
    return cfg, trainer.model, batch


def reload(cfg: TrainConfig, out: Path) -> Any:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs: dict[str, Any] = {"dtype": torch.float32}
    if cfg.quantization is not None:
        q = cfg.quantization
        kwargs["device_map"] = "cpu"
        kwargs["quantization_config"] = (
            BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type=q.quant_type,
                bnb_4bit_use_double_quant=q.use_double_quant,
                bnb_4bit_compute_dtype=torch.float32,
            )
            if q.bits == 4
            else BitsAndBytesConfig(load_in_8bit=True)
        )
    if cfg.peft.method == "full":
        return AutoModelForCausalLM.from_pretrained(str(out), **kwargs)
    base = AutoModelForCausalLM.from_pretrained(cfg.model_name, **kwargs)
    if cfg.quantization is not None and cfg.quantization.bits == 4:
        # The trained model keeps bitsandbytes' trainable 4-bit layout (see keep_4bit_layout_trainable);
        # its CPU inference kernel computes in bf16, ~5e-2 off in logits: compare like with like.
        from finetune_worker.hf import keep_4bit_layout_trainable

        keep_4bit_layout_trainable(base)
    return PeftModel.from_pretrained(base, str(out))


@pytest.mark.parametrize("method", list(METHODS))
def test_saved_outputs_reload_to_the_trained_logits(
    method: str, tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    raw = tiny_config(tiny_model_dir, out, "qa.jsonl", max_steps=6, checkpoint={"every_steps": 100})
    raw.update(METHODS[method])
    cfg, trained, batch = train_in_memory(raw, out)
    trained.eval()
    with torch.no_grad():
        expected = trained(**batch).logits
        got = reload(cfg, out).eval()(**batch).logits
    assert expected.shape == got.shape
    # 8-bit matmuls re-quantize activations per call: equal up to int8 rounding, not bit for bit.
    tol = 2e-2 if method == "qlora-8bit" else 1e-5
    torch.testing.assert_close(got, expected, atol=tol, rtol=0)
    # and training changed the function (so the comparison is not between two untouched models)
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(cfg.model_name, dtype=torch.float32).eval()
    if method not in VIRTUAL_TOKEN_METHODS:  # those add positions; compare shapes only
        with torch.no_grad():
            assert not torch.allclose(base(**batch).logits, expected, atol=1e-4)
