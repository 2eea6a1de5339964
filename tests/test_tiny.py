"""The tiny model builder: deterministic, offline, loadable with the Auto* classes."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from finetune_worker.hf import CHATML_TEMPLATE as CHAT_TEMPLATE
from finetune_worker.testing.tiny import EOS, MARKER, PAD, build_tiny_model


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_same_inputs_give_byte_identical_weights_across_processes(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    # A separate interpreter: the tokenizer trainer's hash maps must not make merges run-dependent.
    other = tmp_path / "again"
    code = f"from finetune_worker.testing.tiny import build_tiny_model; build_tiny_model({str(other)!r})"
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert _digest(other / name) == _digest(tiny_model_dir / name), name


def test_other_seed_gives_other_weights_same_tokenizer(tiny_model_dir: Path, tmp_path: Path) -> None:
    other = build_tiny_model(tmp_path / "seed1", seed=1)
    assert _digest(other / "model.safetensors") != _digest(tiny_model_dir / "model.safetensors")
    assert _digest(other / "tokenizer.json") == _digest(tiny_model_dir / "tokenizer.json")


def test_loads_with_auto_classes_and_runs(tiny_model_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    assert model.config.model_type == "llama"
    assert tok.eos_token == EOS and tok.pad_token == PAD
    assert tok.pad_token_id != tok.eos_token_id
    assert model.config.pad_token_id == tok.pad_token_id and model.config.eos_token_id == tok.eos_token_id
    assert model.config.vocab_size == len(tok)
    text = "The apple is red. Ünïcode and emoji 🍎 survive byte-level BPE."
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text
    assert len(ids) < len(text.encode())  # merges were learned from the corpus
    with torch.no_grad():
        out = model(torch.tensor([ids]))
    assert out.logits.shape == (1, len(ids), len(tok))
    assert torch.isfinite(out.logits).all()
    n_params = sum(p.numel() for p in model.parameters())
    assert 100_000 < n_params < 2_000_000
    card = (tiny_model_dir / "README.md").read_text()
    assert "LlamaForCausalLM" in card and "deterministic" in card.lower()


def test_chat_template_renders_chatml_with_assistant_mask(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    assert tok.chat_template == CHAT_TEMPLATE
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What colour is the apple?"},
        {"role": "assistant", "content": "The apple is red."},
    ]
    text = tok.apply_chat_template(messages, tokenize=False)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat colour is the apple?<|im_end|>\n"
        "<|im_start|>assistant\nThe apple is red.<|im_end|>\n"
    )
    prompt = tok.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")
    enc = tok.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)
    kept = [i for i, m in zip(enc["input_ids"], enc["assistant_masks"], strict=True) if m]
    assert tok.decode(kept) == "The apple is red.<|im_end|>"


def test_small_size_is_bigger(tmp_path: Path) -> None:
    from transformers import AutoConfig

    path = build_tiny_model(tmp_path / "small", size="small")
    cfg = AutoConfig.from_pretrained(str(path))
    assert (cfg.num_hidden_layers, cfg.hidden_size) == (4, 256)
    assert json.loads((path / MARKER).read_text())["size"] == "small"


def test_existing_directory_rules(tiny_model_dir: Path, tmp_path: Path) -> None:
    # Same size and seed: reused as it is, nothing rewritten.
    before = (tiny_model_dir / "model.safetensors").stat().st_mtime_ns
    assert build_tiny_model(tiny_model_dir) == tiny_model_dir
    assert (tiny_model_dir / "model.safetensors").stat().st_mtime_ns == before
    with pytest.raises(FileExistsError, match="size='tiny'"):
        build_tiny_model(tiny_model_dir, size="small")
    with pytest.raises(FileExistsError, match="seed=0"):
        build_tiny_model(tiny_model_dir, seed=3)

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a complete tiny model"):
        build_tiny_model(foreign)
    assert (foreign / "notes.txt").read_text() == "mine"
    rebuilt = build_tiny_model(foreign, overwrite=True)
    assert not (rebuilt / "notes.txt").exists() and (rebuilt / MARKER).is_file()

    # A build by an older version of the builder is stale: replaced without asking.
    marker = json.loads((rebuilt / MARKER).read_text())
    (rebuilt / MARKER).write_text(json.dumps(marker | {"format_version": 1}))
    assert json.loads((build_tiny_model(rebuilt) / MARKER).read_text()) == marker

    empty = tmp_path / "empty"
    empty.mkdir()
    assert (build_tiny_model(empty) / "model.safetensors").is_file()
    # No staging directories left behind.
    assert not [p for p in tmp_path.iterdir() if ".building-" in p.name]


def test_unknown_size_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown tiny model size 'huge'"):
        build_tiny_model(tmp_path / "m", size="huge")  # type: ignore[arg-type]
