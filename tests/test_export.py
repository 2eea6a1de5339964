"""The export job: ONNX and GGUF files that reproduce the PyTorch model, checked in their own runtimes.

The job verifies its exports itself; these tests check the files independently (onnxruntime and
llama.cpp loaded here, against peft's unmerged base + adapter), show that the job's verification
fails a wrong export (q/k rows in transformers' order, a damaged tensor), cancel one through the
real worker, and check that bad configs name their field. Tiny random Qwen2, Mistral and Llama 3
(RoPE scaling) models, and a Llama with biases, go through the same GGUF export and verification,
with a wrong file of each that the verification must fail.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from finetune_worker.config import parse_job_config
from finetune_worker.errors import ConfigError
from finetune_worker.testing import WorkerHarness
from test_merge_helpers import BATCH, logits_of, make_lora_adapter, run_job, staging_leftovers, terminal

pytest.importorskip("onnxruntime")
pytest.importorskip("gguf")
llama_cpp = pytest.importorskip("llama_cpp")

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture(scope="module")
def lora_run(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What a LoRA training run leaves: the adapter (naming its base) and the tokenizer."""
    from transformers import AutoTokenizer

    run = make_lora_adapter(tiny_model_dir, tmp_path_factory.mktemp("run") / "tiny-lora", seed=11)
    AutoTokenizer.from_pretrained(str(tiny_model_dir)).save_pretrained(str(run))
    return run


@pytest.fixture(scope="module")
def exported(lora_run: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Any]]:
    """The LoRA run exported to both formats (f16 GGUF), once for the tests that read the files."""
    out = tmp_path_factory.mktemp("export") / "tiny-lora-export"
    events = run_job({"job": "export", "model_path": str(lora_run), "output_dir": str(out)})
    return out, events


def ggml_logits(path: Path, rows: torch.Tensor) -> np.ndarray:
    """llama.cpp's logits for each row of ``rows`` (token ids), f32 KV cache."""
    llm = llama_cpp.Llama(
        str(path), n_ctx=64, logits_all=True, n_threads=2, type_k=0, type_v=0, verbose=False
    )
    try:
        out = []
        for row in rows.tolist():
            llm.reset()
            llm.eval(row)
            out.append(np.array(llm.scores[: len(row)]))
        return np.stack(out)
    finally:
        llm.close()


def test_lora_run_exports_to_onnx_and_gguf_that_reproduce_it(
    exported: tuple[Path, list[Any]], tiny_model_dir: Path, lora_run: Path
) -> None:
    import onnxruntime

    out, events = exported
    done = terminal(events)
    assert done.type == "completed", done.payload
    phases = [e.payload["phase"] for e in events if e.type == "phase"]
    assert phases == ["loading", "merging", "exporting", "verifying"]
    progress = [
        (e.payload["unit"], e.payload["done"], e.payload["total"]) for e in events if e.type == "progress"
    ]
    assert [p for p in progress if p[0] == "modules"][-1] == ("modules", 14, 14)
    assert ("graphs", 1, 1) in progress
    tensors = [p[1] for p in progress if p[0] == "tensors"]
    assert tensors == list(range(1, 22))  # 21 tensors, one event each

    summary = done.payload["summary"]
    assert summary["merged_modules"] == 14 and summary["adapter_path"] == str(lora_run)
    onnx_path, gguf_path = (
        Path(done.payload["outputs"]["onnx_path"]),
        Path(done.payload["outputs"]["gguf_path"]),
    )
    assert onnx_path == out / "onnx" / "model.onnx" and gguf_path == out / "model-f16.gguf"
    assert sorted(p.name for p in out.iterdir()) == ["export.json", "model-f16.gguf", "onnx"]
    assert {"config.json", "tokenizer.json", "model.onnx"} <= {p.name for p in (out / "onnx").iterdir()}
    assert json.loads((out / "export.json").read_text())["formats"] == summary["formats"]
    assert summary["formats"]["gguf"]["size_bytes"] == gguf_path.stat().st_size
    assert summary["formats"]["onnx"]["size_bytes"] == onnx_path.stat().st_size
    assert staging_leftovers(out) == []

    # The reference: base + adapter through peft, not merged. The adapter really moves the logits.
    reference = logits_of(tiny_model_dir, lora_run).numpy()
    assert np.abs(reference - logits_of(tiny_model_dir).numpy()).max() > 0.05

    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    (onnx_out,) = session.run(
        ["logits"], {"input_ids": BATCH.numpy(), "attention_mask": np.ones_like(BATCH.numpy())}
    )
    onnx_diff = float(np.abs(onnx_out - reference).max())
    assert onnx_diff < 1e-4, onnx_diff
    # A shorter batch of another size: the batch and sequence axes are dynamic.
    (short,) = session.run(
        ["logits"], {"input_ids": BATCH[:1, :5].numpy(), "attention_mask": np.ones((1, 5), dtype=np.int64)}
    )
    assert short.shape == (1, 5, 1017) and float(np.abs(short - reference[:1, :5]).max()) < 1e-4

    gguf_out = ggml_logits(gguf_path, BATCH)
    gguf_diff = float(np.abs(gguf_out - reference).max())
    assert gguf_diff < 5e-2, gguf_diff  # f16 weights
    assert (gguf_out.argmax(-1) == reference.argmax(-1)).mean() >= 0.9

    # The job's own verification measured the same thing on its prompts.
    for fmt, bound in (("onnx", 1e-4), ("gguf", 5e-2)):
        check = summary["formats"][fmt]["verification"]
        assert check["passed"] is True and check["max_abs_diff"] < bound, (fmt, check)
        assert check["tokens"] > 10 and check["prompts"] == 2 and check["top1_agreement"] >= 0.9


def test_gguf_metadata_and_tokenizer_are_llama_cpp_s(
    exported: tuple[Path, list[Any]], tiny_model_dir: Path
) -> None:
    from gguf import GGUFReader
    from transformers import AutoTokenizer

    out, _ = exported
    reader = GGUFReader(str(out / "model-f16.gguf"))

    def value(key: str) -> Any:
        return reader.fields[key].contents()

    assert value("general.architecture") == "llama"
    assert value("llama.block_count") == 2 and value("llama.attention.head_count_kv") == 2
    assert value("llama.rope.dimension_count") == 32 and value("tokenizer.ggml.model") == "gpt2"
    assert value("tokenizer.ggml.pre") == "gpt-2" and value("tokenizer.ggml.add_bos_token") is False
    assert value("tokenizer.ggml.eos_token_id") == 2 and len(value("tokenizer.ggml.merges")) > 700
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == "F16" and types["blk.0.attn_norm.weight"] == "F32"

    llm = llama_cpp.Llama(str(out / "model-f16.gguf"), n_ctx=64, vocab_only=True, verbose=False)
    hf = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    text = "Hello there, how are you? I'm fine: 42 apples.\n<|im_start|>"
    assert llm.tokenize(text.encode(), add_bos=True, special=True) == hf(text)["input_ids"]
    assert llm.detokenize(hf(text)["input_ids"], special=True).decode() == text
    llm.close()


@pytest.mark.parametrize(("gguf_type", "bound", "largest"), [("f32", 1e-4, "F32"), ("q8_0", 0.5, "Q8_0")])
def test_gguf_types(tiny_model_dir: Path, tmp_path: Path, gguf_type: str, bound: float, largest: str) -> None:
    from gguf import GGUFReader

    out = tmp_path / "out"
    events = run_job(
        {"job": "export", "model_path": str(tiny_model_dir), "output_dir": str(out), "formats": ["gguf"],
         "gguf_type": gguf_type}
    )  # fmt: skip
    done = terminal(events)
    assert done.type == "completed", done.payload
    assert [e.payload["phase"] for e in events if e.type == "phase"] == ["loading", "exporting", "verifying"]
    path = out / f"model-{gguf_type}.gguf"
    assert sorted(p.name for p in out.iterdir()) == ["export.json", path.name]
    types = {t.name: t.tensor_type.name for t in GGUFReader(str(path)).tensors}
    assert types["token_embd.weight"] == types["blk.1.ffn_down.weight"] == largest
    assert types["output_norm.weight"] == "F32"

    reference = logits_of(tiny_model_dir).numpy()
    diff = float(np.abs(ggml_logits(path, BATCH) - reference).max())
    assert diff < bound, diff
    check = done.payload["summary"]["formats"]["gguf"]["verification"]
    assert check["passed"] and check["max_abs_diff"] < bound
    assert done.payload["summary"]["formats"]["gguf"]["dtype"] == gguf_type


def test_qk_rows_in_transformers_order_fail_the_verification(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without llama.cpp's q/k row order the file loads and runs, and its logits are wrong: the job
    must fail it, naming the numbers, and publish nothing."""
    from finetune_worker.export import gguf_writer

    monkeypatch.setattr(gguf_writer, "ggml_rope_order", lambda weight, heads: weight)
    out = tmp_path / "out"
    cfg = {"job": "export", "model_path": str(tiny_model_dir), "output_dir": str(out), "formats": ["gguf"],
           "gguf_type": "f32"}  # fmt: skip
    done = terminal(run_job(cfg))
    assert done.type == "failed" and done.payload["error"] == "export_mismatch", done.payload
    assert done.payload["message"].startswith("gguf: the export does not reproduce the PyTorch model")
    details = done.payload["details"]
    assert details["max_abs_diff"] > 1.0 and details["top1_agreement"] < 0.6 and not details["passed"]
    assert not out.exists() and staging_leftovers(out) == []

    monkeypatch.undo()  # the right order passes, to 1e-4 in f32
    done = terminal(run_job(cfg))
    assert done.type == "completed", done.payload
    assert done.payload["summary"]["formats"]["gguf"]["verification"]["max_abs_diff"] < 1e-4


def test_a_damaged_onnx_tensor_fails_the_comparison(exported: tuple[Path, list[Any]], tmp_path: Path) -> None:
    """The ONNX side of the verification, on the exported file with one weight damaged."""
    import onnx
    from onnx import numpy_helper

    from finetune_worker.errors import JobFailed
    from finetune_worker.export.verify import compare, onnx_logits

    out, _ = exported
    ids = [BATCH[0].tolist(), BATCH[1, :10].tolist()]
    good = onnx_logits(out / "onnx" / "model.onnx", ids, pad_id=3)
    model = onnx.load(str(out / "onnx" / "model.onnx"))
    target = next(t for t in model.graph.initializer if t.name.endswith("embed_tokens.weight"))
    weights = numpy_helper.to_array(target).copy()
    weights[:, :8] *= 3.0
    target.CopyFrom(numpy_helper.from_array(weights, target.name))
    onnx.save(model, str(tmp_path / "damaged.onnx"))
    bad = onnx_logits(tmp_path / "damaged.onnx", ids, pad_id=3)

    assert compare(good, good, tolerance=1e-3, min_top1=0.95).passed
    comparison = compare(good, bad, tolerance=1e-3, min_top1=0.95)
    assert not comparison.passed and comparison.max_abs_diff > 1e-2
    with pytest.raises(JobFailed) as failed:
        comparison.check("onnx")
    assert failed.value.error == "export_mismatch" and "tolerance 0.001" in failed.value.message


def test_cancel_between_gguf_tensors_leaves_nothing(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    cfg = {"job": "export", "model_path": str(tiny_model_dir), "output_dir": str(out), "formats": ["gguf"]}
    events = run_job(cfg, cancel_after="progress")  # cancelled as the first tensor is written
    done = terminal(events)
    assert done.type == "cancelled", done.payload
    assert [e.payload["done"] for e in events if e.type == "progress"] == [1]
    assert not out.exists() and staging_leftovers(out) == []


def test_cancel_through_the_worker_leaves_nothing(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Cancelled while the ONNX graph is exported: the job stops at its next check (after the export
    returns, before GGUF), answers `cancelled`, and nothing is at output_dir nor beside it."""
    out = tmp_path / "exports"
    with WorkerHarness() as w:
        refused = w.call(
            "submit", json.dumps({"job": "export", "model_path": str(tmp_path / "none"), "output_dir": str(out)}),
            w.pid,
        )  # fmt: skip
        assert refused[0] == "error" and refused[1][0]["path"] == "model_path", refused
        ok, job_id = w.call(
            "submit", json.dumps({"job": "export", "model_path": str(tiny_model_dir), "output_dir": str(out)}),
            w.pid,
        )  # fmt: skip
        assert ok == "ok"
        seen = w.wait_for(str(job_id), "phase", timeout=120)
        while seen[-1].payload["phase"] != "exporting":
            seen += w.wait_for(str(job_id), "phase", timeout=120)
        assert w.call("cancel", job_id) == "ok"
        rest = w.wait_for(str(job_id), "terminal", timeout=180)
        assert rest[-1].type == "cancelled", rest[-1].payload
        assert "tensors" not in {e.payload.get("unit") for e in rest if e.type == "progress"}
        assert w.call("ping") == "pong"
        assert w.stray == []
    assert not out.exists() and staging_leftovers(out) == []


def _issues(config: dict[str, Any]) -> dict[str, str]:
    with pytest.raises(ConfigError) as caught:
        parse_job_config(config)
    return {i.path: i.message for i in caught.value.issues}


def test_bad_configs_name_their_field(
    tiny_model_dir: Path, lora_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = {"job": "export", "model_path": str(tiny_model_dir), "output_dir": str(tmp_path / "o")}
    assert "no local model" in _issues({**base, "model_path": str(tmp_path / "missing")})["model_path"]
    assert (
        "is the job's input model_path" in _issues({**base, "output_dir": str(tiny_model_dir)})["output_dir"]
    )
    inside = _issues({**base, "model_path": str(lora_run), "output_dir": str(lora_run / "export")})
    assert "lies inside the job's input model_path" in inside["output_dir"], inside
    assert "gguf_type" in _issues({**base, "gguf_type": "q4_k"})
    assert "names a format twice" in _issues({**base, "formats": ["gguf", "gguf"]})["formats"]
    assert "formats" in _issues({**base, "formats": []})
    assert "prompt 1 is empty" in _issues({**base, "verify_prompts": ["hi", " "]})["verify_prompts"]
    assert "tolerance" in _issues({**base, "tolerance": 0})

    # An architecture the GGUF writer does not cover: refused for gguf, fine for onnx alone.
    other = _variant(tiny_model_dir, tmp_path / "qwen3", architectures=["Qwen3ForCausalLM"])
    message = _issues({**base, "model_path": str(other)})["formats"]
    assert message.startswith(
        "gguf: the model is a Qwen3ForCausalLM; the GGUF export supports LlamaForCausalLM, MistralForCausalLM, "
        "Qwen2ForCausalLM only"
    )
    parse_job_config({**base, "model_path": str(other), "formats": ["onnx"]})

    # A tokenizer without a GGUF form here (WordPiece).
    wordpiece = tmp_path / "wordpiece"
    shutil.copytree(tiny_model_dir, wordpiece)
    tok = json.loads((wordpiece / "tokenizer.json").read_text())
    tok["model"] = {"type": "WordPiece", "vocab": tok["model"]["vocab"]}
    (wordpiece / "tokenizer.json").write_text(json.dumps(tok))
    assert "is a WordPiece tokenizer" in _issues({**base, "model_path": str(wordpiece)})["formats"]

    # A missing verifier names its extra, and verify: false does without it.
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    message = _issues(base)["job"]
    assert "pip install 'finetune-worker[llamacpp]'" in message and '"verify": false' in message
    parse_job_config({**base, "verify": False})


def test_the_example_config_validates(
    tiny_model_dir: Path, lora_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the layout `make run` leaves: .tiny/model, runs/tiny-lora next to configs/
    (tmp_path / ".tiny").mkdir()
    (tmp_path / ".tiny" / "model").symlink_to(tiny_model_dir)
    (tmp_path / "runs").mkdir()
    shutil.copytree(lora_run, tmp_path / "runs" / "tiny-lora")
    (tmp_path / "configs").symlink_to(CONFIGS)
    monkeypatch.chdir(tmp_path)
    kind, cfg = parse_job_config(("file", "configs/export-tiny.json"))
    assert kind == "export" and cfg.formats == ["onnx", "gguf"]  # type: ignore[attr-defined]


def test_tied_head_full_attention_and_a_wide_head_dim(tiny_model_dir: Path, tmp_path: Path) -> None:
    """A Llama with a tied LM head (no output.weight in the GGUF), as many k/v heads as q heads, and a
    head_dim that is not hidden/heads: the GGUF still reproduces it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = json.loads((tiny_model_dir / "config.json").read_text())
    config.update(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, head_dim=32,
                  tie_word_embeddings=True)  # fmt: skip
    model_dir = tmp_path / "tied"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        LlamaForCausalLM(LlamaConfig(**config)).save_pretrained(str(model_dir))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model_dir / name, model_dir / name)
    out = tmp_path / "out"
    cfg = {"job": "export", "model_path": str(model_dir), "output_dir": str(out), "formats": ["gguf"],
           "gguf_type": "f32"}  # fmt: skip
    done = terminal(run_job(cfg))
    assert done.type == "completed", done.payload
    assert done.payload["summary"]["formats"]["gguf"]["tensors"] == 20  # no separate output.weight
    diff = float(np.abs(ggml_logits(out / "model-f32.gguf", BATCH) - logits_of(model_dir).numpy()).max())
    assert diff < 1e-4, diff


# --- Qwen2, Mistral, Llama 3: each architecture the GGUF writer covers, checked in llama.cpp --------------------

#: The pre-tokenizer regexes as Llama 3's and Qwen2's tokenizer.json files hold them (Qwen2 splits digits one by one).
LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
QWEN2_REGEX = LLAMA3_REGEX.replace(r"\p{N}{1,3}", r"\p{N}")


def _tokenizer_json(tiny_model_dir: Path, style: str) -> dict[str, Any]:
    """The tiny byte-level BPE tokenizer with the pre-tokenizer (and the rest) of ``style``'s tokenizer.json:
    ``gpt2`` as is; ``llama3``: Llama 3's Split + ByteLevel, ignore_merges, a BOS added; ``qwen2``: Qwen2's
    Split + ByteLevel and its NFC normalizer."""
    tok = json.loads((tiny_model_dir / "tokenizer.json").read_text())
    if style == "gpt2":
        return tok
    regex = LLAMA3_REGEX if style == "llama3" else QWEN2_REGEX
    tok["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
    ]}  # fmt: skip
    if style == "qwen2":
        tok["normalizer"] = {"type": "NFC"}
    else:
        bos = {"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}}
        tok["model"]["ignore_merges"] = True
        tok["post_processor"] = {
            "type": "TemplateProcessing",
            "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {
                "<|endoftext|>": {"id": "<|endoftext|>", "ids": [0], "tokens": ["<|endoftext|>"]}
            },
        }
    return tok


#: kind -> (transformers model class, its config class, config beyond the shared sizes, tokenizer style)
ARCHS: dict[str, tuple[str, str, dict[str, Any], str]] = {
    # Qwen2.5-0.5B's shape: q/k/v biases, a tied LM head; llama.cpp's qwen2 rotates halves (no q/k reordering)
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", {"tie_word_embeddings": True}, "qwen2"),
    # Mistral Nemo's shape: head_dim wider than hidden / heads; no sliding window
    "mistral": ("MistralForCausalLM", "MistralConfig", {"head_dim": 48, "sliding_window": None}, "gpt2"),
    # Llama 3.1's RoPE scaling, its original context shrunk to 64 so that 20 positions feel it
    "llama3": ("LlamaForCausalLM", "LlamaConfig", {"rope_parameters": {
        "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}, "llama3"),
    # a Llama with every bias llama.cpp's llama architecture loads, and linear RoPE scaling
    "llama-bias": ("LlamaForCausalLM", "LlamaConfig", {"attention_bias": True, "mlp_bias": True,
        "rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}}, "gpt2"),
}  # fmt: skip


def make_arch_model(tiny_model_dir: Path, dest: Path, kind: str) -> Path:
    """A tiny random model of ``kind`` (random biases too: transformers initializes them to zero) with the
    tiny tokenizer in the matching style."""
    import transformers

    model_cls, config_cls, extra, style = ARCHS[kind]
    sizes = {"vocab_size": 1017, "hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 2048,
             "rms_norm_eps": 1e-6, "initializer_range": 0.1, "bos_token_id": 0, "eos_token_id": 2,
             "pad_token_id": 3}  # fmt: skip
    config = getattr(transformers, config_cls)(**sizes, **extra)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        model = getattr(transformers, model_cls)(config)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith(".bias"):
                    param.normal_(0.0, 0.5)
    model.save_pretrained(str(dest))
    (dest / "tokenizer.json").write_text(json.dumps(_tokenizer_json(tiny_model_dir, style)))
    for name in ("tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(tiny_model_dir / name, dest / name)
    return dest


@pytest.fixture(scope="module")
def arch_models(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("archs")
    return {kind: make_arch_model(tiny_model_dir, root / kind, kind) for kind in ARCHS}


def _run(cfg: dict[str, Any]) -> dict[str, Any]:
    done = terminal(run_job(cfg))
    return {"type": done.type, **done.payload}


@pytest.mark.parametrize("kind", list(ARCHS))
def test_each_architecture_reproduces_in_llama_cpp(
    arch_models: dict[str, Path], tmp_path: Path, kind: str
) -> None:
    """Through the real job, f32 to 1e-4 and the lossy types within their defaults; then the file checked
    here: llama.cpp's logits on BATCH against transformers', its metadata, its tokenizer."""
    from gguf import GGUFReader
    from transformers import AutoTokenizer

    model_dir = arch_models[kind]
    for gguf_type, bound, min_top1 in (("f32", 1e-4, 1.0), ("f16", 5e-2, 0.9), ("q8_0", 0.5, 0.8)):
        done = _run({"job": "export", "model_path": str(model_dir), "output_dir": str(tmp_path / gguf_type),
                     "formats": ["gguf"], "gguf_type": gguf_type})  # fmt: skip
        assert done["type"] == "completed", done
        check = done["summary"]["formats"]["gguf"]["verification"]
        assert check["passed"] and check["max_abs_diff"] < bound and check["top1_agreement"] >= min_top1, (
            check
        )

    path = tmp_path / "f32" / "model-f32.gguf"
    reference = logits_of(model_dir).numpy()
    got = ggml_logits(path, BATCH)
    assert float(np.abs(got - reference).max()) < 1e-4
    assert (got.argmax(-1) == reference.argmax(-1)).all()

    reader = GGUFReader(str(path))
    fields = {key: field.contents() for key, field in reader.fields.items() if not key.startswith("tokenizer.ggml.")
              or key in ("tokenizer.ggml.pre", "tokenizer.ggml.add_bos_token")}  # fmt: skip
    tensors = {t.name: t for t in reader.tensors}
    arch = "qwen2" if kind == "qwen2" else "llama"
    assert fields["general.architecture"] == arch
    assert fields[f"{arch}.rope.dimension_count"] == (48 if kind == "mistral" else 32)
    assert fields["tokenizer.ggml.pre"] == {"qwen2": "qwen2", "llama3": "llama-bpe"}.get(kind, "gpt-2")
    assert fields["tokenizer.ggml.add_bos_token"] is (kind == "llama3")
    if kind == "qwen2":
        assert "output.weight" not in tensors  # tied: llama.cpp reads token_embd
        assert {"blk.0.attn_q.bias", "blk.0.attn_k.bias", "blk.1.attn_v.bias"} <= set(tensors)
        assert "blk.0.attn_output.bias" not in tensors
    if kind == "llama3":
        freqs = np.asarray(tensors["rope_freqs.weight"].data)
        assert freqs.shape == (16,) and freqs[0] == 1.0 and abs(float(freqs[-1]) - 8.0) < 1e-5
        assert ((freqs > 1.0) & (freqs < 8.0)).sum() == 3  # the smoothed band between the two
    else:
        assert "rope_freqs.weight" not in tensors
    if kind == "llama-bias":
        assert fields["llama.rope.scaling.type"] == "linear" and fields["llama.rope.scaling.factor"] == 4.0
        assert {"blk.0.attn_output.bias", "blk.0.ffn_gate.bias", "blk.1.ffn_down.bias"} <= set(tensors)

    llm = llama_cpp.Llama(str(path), n_ctx=64, vocab_only=True, verbose=False)
    hf = AutoTokenizer.from_pretrained(str(model_dir))
    text = "Hello there, how are you? I'm fine: 12345 apples.\n\n<|im_start|>x"
    assert llm.tokenize(text.encode(), add_bos=True, special=True) == hf(text)["input_ids"]
    llm.close()


def _drop_biases(original: Any) -> Any:
    return lambda model: [(name, t) for name, t in original(model) if not name.endswith(".bias")]


def _qk_biases_unordered(original: Any) -> Any:
    return lambda weight, heads: weight if weight.ndim == 1 else original(weight, heads)


@pytest.mark.parametrize(
    ("kind", "wrong"),
    [("qwen2", "biases dropped"), ("qwen2", "q/k rows reordered as for Llama"), ("llama3", "rope_freqs omitted"),
     ("llama-bias", "q/k biases in transformers' order"), ("llama-bias", "linear RoPE scaling omitted"),
     ("mistral", "q/k rows in transformers' order")],
)  # fmt: skip
def test_a_wrong_file_of_each_architecture_fails_the_verification(
    arch_models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str, wrong: str
) -> None:
    """Each of these files loads and runs in llama.cpp, and its logits are wrong: the job must fail it."""
    from dataclasses import replace

    from finetune_worker.config import export as export_config
    from finetune_worker.export import gguf_writer

    if wrong == "biases dropped":
        monkeypatch.setattr(gguf_writer, "model_tensors", _drop_biases(gguf_writer.model_tensors))
    elif wrong == "q/k rows reordered as for Llama":
        qwen2 = export_config.GGUF_ARCHITECTURES["Qwen2ForCausalLM"]
        monkeypatch.setitem(
            export_config.GGUF_ARCHITECTURES, "Qwen2ForCausalLM", replace(qwen2, pair_rope=True)
        )
    elif wrong == "rope_freqs omitted":
        monkeypatch.setattr(gguf_writer, "extra_tensors", lambda *args: [])
    elif wrong == "q/k rows in transformers' order":
        monkeypatch.setattr(gguf_writer, "ggml_rope_order", lambda weight, heads: weight)
    elif wrong == "linear RoPE scaling omitted":
        monkeypatch.setattr(gguf_writer, "rope_layout", lambda model, arch: {})
    else:
        monkeypatch.setattr(gguf_writer, "ggml_rope_order", _qk_biases_unordered(gguf_writer.ggml_rope_order))
    out = tmp_path / "out"
    done = _run({"job": "export", "model_path": str(arch_models[kind]), "output_dir": str(out), "formats": ["gguf"],
                 "gguf_type": "f32"})  # fmt: skip
    assert done["type"] == "failed" and done["error"] == "export_mismatch", done
    details = done["details"]
    assert details["max_abs_diff"] > 1.0 and details["top1_agreement"] < 0.6 and not details["passed"], (
        details
    )
    assert not out.exists() and staging_leftovers(out) == []


def _variant(
    src: Path,
    dest: Path,
    *,
    tokenizer: dict[str, Any] | None = None,
    drop: tuple[str, ...] = (),
    **config: Any,
) -> Path:
    """A copy of the model at ``src`` with ``config`` merged into its config.json (``drop``: keys removed)."""
    shutil.copytree(src, dest)
    data = json.loads((dest / "config.json").read_text())
    data.update(config)
    for key in drop:
        data.pop(key, None)
    (dest / "config.json").write_text(json.dumps(data))
    if tokenizer is not None:
        (dest / "tokenizer.json").write_text(json.dumps(tokenizer))
    return dest


def test_what_gguf_still_refuses_is_named_at_validate(
    tiny_model_dir: Path, arch_models: dict[str, Path], tmp_path: Path
) -> None:
    """Sliding windows, RoPE llama.cpp would compute otherwise, other activations, mixtures of experts and
    tokenizers without an exact llama.cpp counterpart: each refused under `formats` before anything loads."""
    base = {"job": "export", "formats": ["gguf"], "output_dir": str(tmp_path / "out")}
    n = iter(range(100))

    def refused(src: Path, **changes: Any) -> str:
        model = _variant(src, tmp_path / f"m{next(n)}", **changes)
        return _issues({**base, "model_path": str(model)})["formats"]

    mistral, qwen2, llama3 = arch_models["mistral"], arch_models["qwen2"], arch_models["llama3"]
    # Mistral 7B v0.1's window (4096 of 32768 positions): llama.cpp's llama architecture attends to everything
    assert "sliding window of 4096 tokens, shorter than its 32768 positions" in refused(
        mistral, sliding_window=4096, max_position_embeddings=32768
    )
    parse_job_config({**base, "model_path": str(_variant(mistral, tmp_path / "wide", sliding_window=4096,
                                                         max_position_embeddings=4096))})  # fmt: skip
    # Qwen2 with use_sliding_window (a config of an older transformers: no layer_types)
    assert "sliding window of 64 tokens" in refused(
        qwen2, drop=("layer_types",), use_sliding_window=True, sliding_window=64, max_window_layers=1
    )
    assert "sliding window" in refused(
        qwen2, sliding_window=64, layer_types=["full_attention", "sliding_attention"]
    )
    yarn = {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0, "original_max_position_embeddings": 32768}
    assert "RoPE type 'yarn' (rope_parameters) is not supported for Qwen2ForCausalLM" in refused(
        qwen2, rope_parameters=yarn
    )
    assert "RoPE type 'llama3'" in refused(qwen2, rope_parameters={"rope_type": "llama3", "factor": 8.0})
    assert "RoPE type 'dynamic'" in refused(
        tiny_model_dir, rope_parameters=None, rope_scaling={"type": "dynamic", "factor": 2.0}
    )
    assert "head_dim 48 x 4 heads is not hidden_size 128" in refused(qwen2, head_dim=48)
    assert "hidden_act 'gelu'" in refused(tiny_model_dir, hidden_act="gelu")
    assert refused(tiny_model_dir, architectures=["MixtralForCausalLM"]).startswith(
        "gguf: the model is a MixtralForCausalLM; the GGUF export supports"
    )

    # Tokenizers: SentencePiece-style BPE (Llama 2, Mistral 7B), an unknown Split regex, ignore_merges at odds
    # with llama.cpp's pre-tokenizer of that name.
    spm = _tokenizer_json(tiny_model_dir, "gpt2")
    spm["model"]["byte_fallback"] = True
    assert "is a SentencePiece-style BPE (byte fallback) tokenizer" in refused(tiny_model_dir, tokenizer=spm)
    other = _tokenizer_json(tiny_model_dir, "llama3")
    other["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\p{L}+|\p{N}+|\s+|."
    assert "has a pre-tokenizer (Split+ByteLevel) this exporter cannot name" in refused(
        llama3, tokenizer=other
    )
    merging = _tokenizer_json(tiny_model_dir, "llama3")
    merging["model"]["ignore_merges"] = False
    assert "has ignore_merges False where llama.cpp's 'llama-bpe'" in refused(llama3, tokenizer=merging)
    lowercase = _tokenizer_json(tiny_model_dir, "qwen2")
    lowercase["normalizer"] = {"type": "Lowercase"}
    assert "has a Lowercase normalizer" in refused(qwen2, tokenizer=lowercase)
