"""Merges through the real worker process (WorkerHarness), as the BEAM sees them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from finetune_worker.testing import WorkerHarness
from test_merge_helpers import make_lora_adapter


@pytest.fixture(scope="module")
def worker():
    with WorkerHarness() as w:
        yield w
        assert w.stray == []


def submit(w: WorkerHarness, cfg: dict[str, Any]) -> Any:
    return w.call("submit", json.dumps(cfg), w.pid)


def run(w: WorkerHarness, cfg: dict[str, Any], timeout: float = 240) -> list[Any]:
    result = submit(w, cfg)
    assert isinstance(result, tuple) and result[0] == "ok", result
    return w.wait_for(str(result[1]), "terminal", timeout=timeout)


def assert_alive(w: WorkerHarness) -> None:
    assert w.call("ping") == "pong" and w.alive


def slerp_yaml(path: Path, a: Path, b: Path, method: str = "slerp") -> Path:
    doc = {
        "slices": [{"sources": [{"model": str(a), "layer_range": [0, 2]}, {"model": str(b), "layer_range": [0, 2]}]}],
        "merge_method": method,
        "base_model": str(a),
        "parameters": {"t": [{"filter": "self_attn", "value": [0, 1]}, {"value": 0.5}]},
        "dtype": "float32",
    }  # fmt: skip
    path.write_text(yaml.safe_dump(doc))
    return path


def test_lora_merge_and_refusals_through_the_worker(
    worker: WorkerHarness, tiny_model_dir: Path, tmp_path: Path
) -> None:
    adapter = make_lora_adapter(tiny_model_dir, tmp_path / "adapter", seed=1)
    out = tmp_path / "merged"
    events = run(
        worker,
        {
            "base_model_path": str(tiny_model_dir),
            "adapter_path": str(adapter),
            "output_path": str(out),
            "use_fp16": False,
        },
    )
    types = [e.type for e in events]
    assert types[:3] == ["queued", "started", "phase"] and types[-1] == "completed", types
    assert [e.payload["phase"] for e in events if e.type == "phase"] == ["loading", "merging", "saving"]
    progress = [e.payload for e in events if e.type == "progress"]
    assert progress[-1]["done"] == progress[-1]["total"] == 14 and progress[-1]["unit"] == "modules"
    done = events[-1].payload
    assert done["outputs"]["output_path"] == str(out)
    assert done["summary"]["size_bytes"] > 2_000_000 and done["summary"]["dtype"] == "fp32"
    assert (out / "model.safetensors").is_file()
    status = worker.call("status", events[-1].job_id)
    assert status["state"] == "completed" and status["outputs"]["output_path"] == str(out)

    # missing adapter: refused at submit, naming the field
    refused = submit(
        worker,
        {
            "base_model_path": str(tiny_model_dir),
            "adapter_path": str(tmp_path / "nope"),
            "output_path": str(tmp_path / "o"),
        },
    )
    assert refused[0] == "error" and refused[1][0]["path"] == "adapter_path", refused
    assert "no adapter directory" in refused[1][0]["message"]

    # adapter whose layers the base lacks: the job fails with adapter_mismatch and a hint
    from transformers import LlamaConfig, LlamaForCausalLM

    other = tmp_path / "other"
    LlamaForCausalLM(LlamaConfig(**{**json.loads((tiny_model_dir / "config.json").read_text()), "hidden_size": 64,
                                    "head_dim": 16})).save_pretrained(str(other))  # fmt: skip
    foreign = make_lora_adapter(other, tmp_path / "foreign", seed=2)
    events = run(
        worker,
        {
            "base_model_path": str(tiny_model_dir),
            "adapter_path": str(foreign),
            "output_path": str(tmp_path / "o"),
        },
    )
    failed = events[-1]
    assert failed.type == "failed" and failed.payload["error"] == "adapter_mismatch", failed.payload
    assert "hidden_size 64 vs 128" in failed.payload["message"] and failed.payload["hint"]
    assert not (tmp_path / "o").exists()
    assert_alive(worker)


def test_mergekit_merge_and_refusals_through_the_worker(
    worker: WorkerHarness, tiny_model_dir: Path, tmp_path: Path
) -> None:
    from finetune_worker.testing.tiny import build_tiny_model

    model_b = build_tiny_model(tmp_path / "b", seed=1)
    out = tmp_path / "slerp"
    events = run(
        worker, {"yaml_config_path": str(slerp_yaml(tmp_path / "m.yaml", tiny_model_dir, model_b)),
                 "output_dir": str(out), "cpu_offload": True},
    )  # fmt: skip
    assert events[-1].type == "completed", events[-1].payload
    assert [e.payload["phase"] for e in events if e.type == "phase"] == ["loading", "merging", "saving"]
    progress = [e.payload for e in events if e.type == "progress"]
    assert progress and progress[-1]["done"] == progress[-1]["total"] and progress[-1]["unit"] == "tasks"
    assert events[-1].payload["outputs"]["output_dir"] == str(out)
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()

    bad = tmp_path / "bad.yaml"
    bad.write_text("merge_method: slerp\n  dtype: float32\n")
    refused = submit(
        worker, {"yaml_config_path": str(bad), "output_dir": str(tmp_path / "o"), "cpu_offload": True}
    )
    assert refused[0] == "error" and refused[1][0]["path"] == "yaml_config_path", refused
    assert refused[1][0]["message"].startswith("malformed YAML at line 2")

    unknown = slerp_yaml(tmp_path / "unknown.yaml", tiny_model_dir, model_b, method="frankenmerge")
    refused = submit(
        worker, {"yaml_config_path": str(unknown), "output_dir": str(tmp_path / "o"), "cpu_offload": True}
    )
    assert (
        refused[0] == "error"
        and "merge_method: unknown merge method 'frankenmerge'" in refused[1][0]["message"]
    )
    assert_alive(worker)


def test_sigkill_mid_merge_leaves_nothing_that_looks_complete(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Kill -9 the worker at its first progress event; output_dir is absent (or, if the merge won the race,
    complete), and the next merge to the same place cleans up the dead worker's staging directory."""
    from finetune_worker.testing.tiny import build_tiny_model

    model_b = build_tiny_model(tmp_path / "b", seed=1)
    cfg = {"yaml_config_path": str(slerp_yaml(tmp_path / "m.yaml", tiny_model_dir, model_b)),
           "output_dir": str(tmp_path / "out"), "cpu_offload": True}  # fmt: skip
    out = tmp_path / "out"
    with WorkerHarness() as w:
        result = submit(w, cfg)
        w.wait_for(str(result[1]), "progress", timeout=120)
        w.kill()
        w.wait(timeout=10)
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".out.merging-")]
    if out.exists():  # the merge finished between the event and the kill
        assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    else:
        assert leftovers, "a killed merge leaves its (hidden) staging directory, nothing at output_dir"
    with WorkerHarness() as w:
        assert run(w, {**cfg, "overwrite": True})[-1].type == "completed"
    assert (out / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")] == []
