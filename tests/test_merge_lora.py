"""The merge_lora job in process (JobManager): equivalence, QLoRA, sequential merges, cancel, refusals."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from finetune_worker.errors import ConfigError
from test_merge_helpers import (
    logits_of,
    make_lora_adapter,
    make_qlora_adapter,
    merged_logits,
    run_job,
    staging_leftovers,
    terminal,
)


@pytest.fixture(scope="module")
def adapter(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_lora_adapter(tiny_model_dir, tmp_path_factory.mktemp("lora") / "adapter", seed=1)


@pytest.fixture(scope="module")
def other_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Llama like the tiny one but narrower (hidden 64) and with a larger vocabulary."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=1100, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(3)
    out = tmp_path_factory.mktemp("other") / "base"
    LlamaForCausalLM(cfg).save_pretrained(str(out))
    return out


def merge_cfg(base: Path, adapter: Path, out: Path, **extra: object) -> dict[str, object]:
    return {"base_model_path": str(base), "adapter_path": str(adapter), "output_path": str(out), **extra}


def test_merged_logits_equal_base_plus_adapter_fp32(
    tiny_model_dir: Path, adapter: Path, tmp_path: Path
) -> None:
    out = tmp_path / "merged"
    events = run_job(merge_cfg(tiny_model_dir, adapter, out, use_fp16=False))
    done = terminal(events)
    assert done.type == "completed", done.payload

    phases = [e.payload["phase"] for e in events if e.type == "phase"]
    assert phases == ["loading", "merging", "saving"]
    progress = [e.payload for e in events if e.type == "progress"]
    assert [p["done"] for p in progress] == list(range(1, 15))  # 7 linear layers x 2 decoder layers
    assert {p["total"] for p in progress} == {14} and progress[-1]["percent"] == 100.0
    assert done.payload["outputs"]["output_path"] == str(out)
    summary = done.payload["summary"]
    assert summary["dtype"] == "fp32" and summary["tensors"] == 21 and summary["merged_modules"] == 14
    assert summary["size_bytes"] == sum(p.stat().st_size for p in out.iterdir())
    assert summary["runtime_s"] > 0

    files = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= files
    assert "adapter_config.json" not in files and staging_leftovers(out) == []

    reference = logits_of(tiny_model_dir, adapter)
    base_only = logits_of(tiny_model_dir)
    assert (reference - base_only).abs().max() > 0.05  # the adapter really changes the outputs
    diff = (merged_logits(out) - reference).abs().max().item()
    assert diff < 1e-4, diff


def test_fp16_merge_is_close_to_fp32_reference(tiny_model_dir: Path, adapter: Path, tmp_path: Path) -> None:
    """fp16 weights carry ~3 significant digits: the bound is 2e-2 absolute on logits of magnitude ~5."""
    out = tmp_path / "merged16"
    done = terminal(run_job(merge_cfg(tiny_model_dir, adapter, out, use_fp16=True)))
    assert done.type == "completed", done.payload
    assert done.payload["summary"]["dtype"] == "fp16"
    assert json.loads((out / "config.json").read_text())["dtype"] == "float16"
    reference = logits_of(tiny_model_dir, adapter)
    diff = (merged_logits(out) - reference).abs().max().item()
    assert diff < 2e-2, diff


def test_qlora_trained_adapter_merges_into_the_unquantized_base(tiny_model_dir: Path, tmp_path: Path) -> None:
    qlora = make_qlora_adapter(tiny_model_dir, tmp_path / "qlora")
    out = tmp_path / "merged"
    done = terminal(run_job(merge_cfg(tiny_model_dir, qlora, out, dtype="fp32")))
    assert done.type == "completed", done.payload
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"
    reference = logits_of(tiny_model_dir, qlora)  # unquantized base + adapter, unmerged
    assert (reference - logits_of(tiny_model_dir)).abs().max() > 1e-3
    diff = (merged_logits(out) - reference).abs().max().item()
    assert diff < 1e-4, diff


def test_two_stage_sequential_merge(tiny_model_dir: Path, adapter: Path, tmp_path: Path) -> None:
    merged_1 = tmp_path / "merged_1"
    assert terminal(run_job(merge_cfg(tiny_model_dir, adapter, merged_1))).type == "completed"
    adapter_2 = make_lora_adapter(merged_1, tmp_path / "adapter_2", seed=2, r=2)
    merged_2 = tmp_path / "merged_2"
    done = terminal(run_job(merge_cfg(merged_1, adapter_2, merged_2)))
    assert done.type == "completed", done.payload
    reference = logits_of(tiny_model_dir, adapter, adapter_2)
    assert (reference - logits_of(tiny_model_dir, adapter)).abs().max() > 0.05
    diff = (merged_logits(merged_2) - reference).abs().max().item()
    assert diff < 1e-4, diff


def test_cancel_leaves_nothing_at_output_path(tiny_model_dir: Path, adapter: Path, tmp_path: Path) -> None:
    out = tmp_path / "merged"
    events = run_job(merge_cfg(tiny_model_dir, adapter, out), cancel_after="progress")
    done = terminal(events)
    assert done.type == "cancelled", done.payload
    assert done.payload["step"] == 1  # stopped before merging the second module
    assert not out.exists() and staging_leftovers(out) == []


def test_overwrite_replaces_only_a_complete_model(
    tiny_model_dir: Path, adapter: Path, tmp_path: Path
) -> None:
    out = tmp_path / "merged"
    out.mkdir()
    (out / "old.txt").write_text("previous model")
    with pytest.raises(ConfigError, match="output_path: is a non-empty directory"):
        run_job(merge_cfg(tiny_model_dir, adapter, out))
    cancelled = terminal(
        run_job(merge_cfg(tiny_model_dir, adapter, out, overwrite=True), cancel_after="progress")
    )
    assert cancelled.type == "cancelled" and (out / "old.txt").is_file()  # untouched by a cancelled merge
    done = terminal(run_job(merge_cfg(tiny_model_dir, adapter, out, overwrite=True)))
    assert done.type == "completed" and not (out / "old.txt").exists()
    assert (out / "model.safetensors").is_file() and staging_leftovers(out) == []


def test_config_errors_name_the_field(tiny_model_dir: Path, adapter: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match='dtype: conflicts with "use_fp16": true'):
        run_job(merge_cfg(tiny_model_dir, adapter, tmp_path / "o", use_fp16=True, dtype="bf16"))
    with pytest.raises(ConfigError, match="adapter_path: no adapter directory there"):
        run_job(merge_cfg(tiny_model_dir, tmp_path / "missing", tmp_path / "o", use_fp16=True))
    with pytest.raises(ConfigError, match=r"adapter_path: has no adapter_config\.json"):
        run_job(merge_cfg(tiny_model_dir, tiny_model_dir, tmp_path / "o"))
    with pytest.raises(ConfigError, match="base_model_path: no local model directory"):
        run_job(merge_cfg(tmp_path / "nobase", adapter, tmp_path / "o"))


def test_adapter_for_another_base_is_refused(tiny_model_dir: Path, other_base: Path, tmp_path: Path) -> None:
    foreign = make_lora_adapter(other_base, tmp_path / "foreign", seed=4)
    done = terminal(run_job(merge_cfg(tiny_model_dir, foreign, tmp_path / "o")))
    assert done.type == "failed" and done.payload["error"] == "adapter_mismatch"
    message = done.payload["message"]
    assert "hidden_size 64 vs 128" in message and "vocab_size 1100 vs 1017" in message, message
    assert done.payload["hint"] and not (tmp_path / "o").exists()

    # The recorded base moved away: the tensor shapes still name what differs.
    cfg_file = foreign / "adapter_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["base_model_name_or_path"] = str(tmp_path / "moved-away")
    cfg_file.write_text(json.dumps(cfg))
    done = terminal(run_job(merge_cfg(tiny_model_dir, foreign, tmp_path / "o")))
    assert done.payload["error"] == "adapter_mismatch", done.payload
    assert "shape differs at 'model.layers.0.mlp.down_proj'" in done.payload["message"], done.payload[
        "message"
    ]


def test_vocabulary_and_target_mismatches_are_named(
    tiny_model_dir: Path, other_base: Path, tmp_path: Path
) -> None:
    # lm_head LoRA of a 1100-token model: the vocabulary differs, nothing else.
    from transformers import LlamaConfig, LlamaForCausalLM

    base_cfg = json.loads((tiny_model_dir / "config.json").read_text())
    wide = LlamaConfig(**{**base_cfg, "vocab_size": 1100})
    wide_dir = tmp_path / "wide"
    LlamaForCausalLM(wide).save_pretrained(str(wide_dir))
    head = make_lora_adapter(wide_dir, tmp_path / "head", seed=5, target_modules=["lm_head"])
    cfg = json.loads((head / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(tiny_model_dir)  # claims the right base: only shapes can tell
    (head / "adapter_config.json").write_text(json.dumps(cfg))
    done = terminal(run_job(merge_cfg(tiny_model_dir, head, tmp_path / "o")))
    assert done.payload["error"] == "adapter_mismatch"
    assert "vocabulary size differs at 'lm_head'" in done.payload["message"], done.payload["message"]
    assert "[1100, 128] vs the base's [1017, 128]" in done.payload["message"]

    # An adapter for a deeper model: a target module the base does not have.
    deep = LlamaConfig(**{**base_cfg, "num_hidden_layers": 3})
    deep_dir = tmp_path / "deep"
    LlamaForCausalLM(deep).save_pretrained(str(deep_dir))
    deep_adapter = make_lora_adapter(deep_dir, tmp_path / "deep_adapter", seed=6)
    cfg = json.loads((deep_adapter / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(tmp_path / "gone")
    (deep_adapter / "adapter_config.json").write_text(json.dumps(cfg))
    done = terminal(run_job(merge_cfg(tiny_model_dir, deep_adapter, tmp_path / "o")))
    assert done.payload["error"] == "adapter_mismatch"
    assert "target module 'model.layers.2." in done.payload["message"]
    assert "the base has 2 layers" in done.payload["message"]


def test_prequantized_base_is_dequantized_before_merging(
    tiny_model_dir: Path, adapter: Path, tmp_path: Path
) -> None:
    """A base saved in 4-bit: the merge runs on its dequantized weights and the result is a plain model."""
    import shutil

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from test_merge_helpers import BATCH

    quant = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    base4 = tmp_path / "base4"
    AutoModelForCausalLM.from_pretrained(
        str(tiny_model_dir), quantization_config=quant, device_map="cpu"
    ).save_pretrained(str(base4))
    shutil.copy(tiny_model_dir / "tokenizer.json", base4 / "tokenizer.json")
    shutil.copy(tiny_model_dir / "tokenizer_config.json", base4 / "tokenizer_config.json")
    assert "quantization_config" in json.loads((base4 / "config.json").read_text())

    out = tmp_path / "merged"
    events = run_job(merge_cfg(base4, adapter, out))
    assert terminal(events).type == "completed", terminal(events).payload
    assert any(e.type == "log" and "dequantizing" in e.payload["message"] for e in events)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())

    reference_base = AutoModelForCausalLM.from_pretrained(str(base4), device_map="cpu")
    reference_base.dequantize(dtype=torch.float32)
    reference = PeftModel.from_pretrained(reference_base, str(adapter)).eval()
    with torch.no_grad():
        expected = reference(input_ids=BATCH).logits
    diff = (merged_logits(out) - expected).abs().max().item()
    assert diff < 1e-4, diff


@pytest.mark.parametrize("variant", ["dora", "modules_to_save"])
def test_dora_and_modules_to_save_merge_exactly(tiny_model_dir: Path, tmp_path: Path, variant: str) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    torch.manual_seed(7)
    extra = {"use_dora": True} if variant == "dora" else {"modules_to_save": ["lm_head"]}
    cfg = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False, **extra
    )
    peft_model = get_peft_model(model, cfg)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_magnitude_vector" in name or "modules_to_save" in name:
                p.mul_(1.5)  # a trained magnitude / head, not the copy of the base's
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(str(adapter))

    out = tmp_path / "merged"
    done = terminal(run_job(merge_cfg(tiny_model_dir, adapter, out)))
    assert done.type == "completed", done.payload
    reference = logits_of(tiny_model_dir, adapter)
    diff = (merged_logits(out) - reference).abs().max().item()
    assert diff < 1e-4, diff


def test_staging_left_by_a_killed_merge_is_removed(
    tiny_model_dir: Path, adapter: Path, tmp_path: Path
) -> None:
    """A worker killed while saving leaves `.NAME.merging-PID-*` whose flock the kernel dropped: the
    next merge removes it, even when that PID is alive again (ours here: containers reuse PIDs).
    A staging folder whose merge is alive holds its lock: the second merge fails at once."""
    import subprocess
    import sys

    out = tmp_path / "merged"
    stale = tmp_path / f".merged.merging-{os.getpid()}-x1y2"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half a model")
    done = terminal(run_job(merge_cfg(tiny_model_dir, adapter, out)))
    assert done.type == "completed", done.payload
    assert not stale.exists()
    assert (out / "model.safetensors").stat().st_size > 1000
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".merged")) == []

    busy = tmp_path / f".merged.merging-{os.getpid()}-busy"
    busy.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", f"import fcntl, os, time; fd = os.open({str(busy)!r}, os.O_RDONLY); "
         "fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        second = terminal(run_job(dict(merge_cfg(tiny_model_dir, adapter, out), overwrite=True)))
        assert second.type == "failed" and second.payload["error"] == "output_dir_conflict", second.payload
        assert "another merge is writing" in second.payload["message"] and busy.exists()
    finally:
        holder.kill()
        holder.wait()


def test_output_filled_while_queued_fails_before_merging(
    tiny_model_dir: Path, adapter: Path, tmp_path: Path
) -> None:
    out = tmp_path / "merged"

    def someone_writes_there() -> None:
        out.mkdir()
        (out / "theirs.bin").write_bytes(b"x")

    events = run_job(merge_cfg(tiny_model_dir, adapter, out), after_submit_checks=someone_writes_there)
    done = terminal(events)
    assert done.type == "failed" and done.payload["error"] == "output_dir_conflict", done.payload
    assert "output_path" in done.payload["message"] and done.payload["hint"]
    assert "phase" not in [e.type for e in events]  # refused before loading anything
    assert [p.name for p in out.iterdir()] == ["theirs.bin"]


def test_vocabulary_extending_adapter_resizes_the_base(tiny_model_dir: Path, tmp_path: Path) -> None:
    """An adapter from a run that added tokens (resized embeddings saved whole, tokenizer of the new size)."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from test_merge_helpers import BATCH

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    tokenizer.add_tokens([f"<new{i}>" for i in range(5)])
    rows = len(tokenizer)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    model.resize_token_embeddings(rows)
    torch.manual_seed(8)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"], init_lora_weights=False,
                     modules_to_save=["embed_tokens", "lm_head"])  # fmt: skip
    peft_model = get_peft_model(model, cfg)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "modules_to_save" in name:
                p[-5:].normal_()  # the new tokens learned something
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(str(adapter))
    tokenizer.save_pretrained(str(adapter))

    out = tmp_path / "merged"
    events = run_job(merge_cfg(tiny_model_dir, adapter, out))
    assert terminal(events).type == "completed", terminal(events).payload
    assert any(e.type == "log" and f"from 1017 to {rows} rows" in e.payload["message"] for e in events)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == rows
    assert len(AutoTokenizer.from_pretrained(str(out))) == rows

    reference = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    reference.resize_token_embeddings(rows)
    reference = PeftModel.from_pretrained(reference, str(adapter)).eval()
    batch = torch.cat([BATCH, torch.full((2, 3), rows - 1)], dim=1)  # the new tokens too
    with torch.no_grad():
        expected = reference(input_ids=batch).logits
        got = AutoModelForCausalLM.from_pretrained(str(out)).eval()(input_ids=batch).logits
    assert (got - expected).abs().max().item() < 1e-4

    # The same tokenizer next to an adapter that does not bring the new rows: refused, naming the sizes.
    plain = make_lora_adapter(tiny_model_dir, tmp_path / "plain", seed=9)
    tokenizer.save_pretrained(str(plain))
    done = terminal(run_job(merge_cfg(tiny_model_dir, plain, tmp_path / "o")))
    assert done.payload["error"] == "adapter_mismatch"
    assert (
        f"the adapter's tokenizer has {rows} tokens, the base's embedding 1017 rows"
        in done.payload["message"]
    )
