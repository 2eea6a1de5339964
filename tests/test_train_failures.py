"""Each failure class of a training job, raised for real, with its code and a hint.

These run the job in process (JobManager + list sink), so the config passes validation at
submit and the fault appears afterwards, as it does when a queued job's inputs change while it
waits. ``test_train_worker.py`` repeats the important ones through the real worker process.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import rows_with_bad_row
from finetune_worker.config import parse_job_config
from finetune_worker.errors import ConfigError
from finetune_worker.training.failures import classify_training_exception
from test_train_helpers import DATA, Run, tiny_config


def fail_after_submit(config: dict, break_it: Callable[[], object] = lambda: None) -> dict:
    """Validate as submit does, break the inputs, run the job; return its ``failed`` payload."""
    parse_job_config(json.dumps(config))
    break_it()
    run = Run(config, env_checks=False)
    try:
        done = run.wait(120)
    finally:
        run.close()
    assert done.type == "failed", done.payload
    assert done.payload["hint"], done.payload
    return done.payload


@pytest.fixture
def model_copy(tiny_model_dir: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "model"
    shutil.copytree(tiny_model_dir, dst)
    return dst


def test_model_removed_after_submit(model_copy: Path, tmp_path: Path) -> None:
    p = fail_after_submit(tiny_config(model_copy, tmp_path / "o"), lambda: shutil.rmtree(model_copy))
    assert p["error"] == "model_not_found" and str(model_copy) in p["message"]


def test_dataset_removed_after_submit(tiny_model_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "d.jsonl"
    shutil.copy(DATA / "qa.jsonl", data)
    cfg = tiny_config(tiny_model_dir, tmp_path / "o")
    cfg["dataset"]["path"] = str(data)
    p = fail_after_submit(cfg, data.unlink)
    assert p["error"] == "dataset_not_found" and str(data) in p["message"]


def test_bad_dataset_row_names_the_row(tiny_model_dir: Path, tmp_path: Path) -> None:
    data = rows_with_bad_row(tmp_path / "bad.jsonl", {"question": "What is missing?"}, at=107)
    cfg = tiny_config(tiny_model_dir, tmp_path / "o")
    cfg["dataset"]["path"] = str(data)
    cfg["data"] = {"format": "qa"}
    p = fail_after_submit(cfg)
    assert p["error"] == "bad_dataset_row"
    assert "row 107" in p["message"] and "answer" in p["message"], p["message"]


@pytest.mark.parametrize(
    ("model_type", "why"), [("no_such_arch", "not an architecture"), ("vit", "no causal language-model head")]
)
def test_unsupported_model(model_copy: Path, tmp_path: Path, model_type: str, why: str) -> None:
    config = json.loads((model_copy / "config.json").read_text())
    config["model_type"] = model_type
    (model_copy / "config.json").write_text(json.dumps(config))
    p = fail_after_submit(tiny_config(model_copy, tmp_path / "o"))
    assert p["error"] == "unsupported_model" and why in p["message"], p


def test_not_a_model_directory(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    p = fail_after_submit(tiny_config(empty, tmp_path / "o"))
    assert p["error"] == "unsupported_model" and "no config.json" in p["message"]


def test_cpu_out_of_memory_is_classified(tiny_model_dir: Path, tmp_path: Path) -> None:
    """A model whose embedding needs ~32 TB: the CPU allocator refuses it at once (no RAM is touched)."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    huge = tmp_path / "huge"
    huge.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model_dir / name, huge / name)
    LlamaConfig(
        vocab_size=1_000_000_000,
        hidden_size=8192,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
    ).save_pretrained(huge)
    save_file({"model.norm.weight": torch.ones(8192)}, str(huge / "model.safetensors"))
    p = fail_after_submit(tiny_config(huge, tmp_path / "o"))
    assert p["error"] == "out_of_memory", p
    assert "CPU out of memory" in p["message"]
    assert "batch_size" in p["hint"] and "gradient_accumulation_steps" in p["hint"] and "4-bit" in p["hint"]


def test_output_dir_conflict_appearing_after_submit(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "o"

    def other_run_lands() -> None:
        out.mkdir()
        (out / ".finetune-worker-run.json").write_text(json.dumps({"fingerprint": "another-run"}))

    p = fail_after_submit(tiny_config(tiny_model_dir, out), other_run_lands)
    assert p["error"] == "output_dir_conflict" and "different config" in p["message"]
    assert "overwrite" in p["hint"]


def test_output_dir_not_writable(tiny_model_dir: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "blocker"

    def a_file_takes_its_place() -> None:
        blocker.write_text("not a directory")

    p = fail_after_submit(tiny_config(tiny_model_dir, blocker / "out"), a_file_takes_its_place)
    assert p["error"] == "output_dir_not_writable", p


def test_submit_time_checks_report_everything(tiny_model_dir: Path, tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path / "nope", tmp_path / "o")
    cfg["dataset"]["path"] = str(tmp_path / "missing.jsonl")
    with pytest.raises(ConfigError) as info:
        parse_job_config(json.dumps(cfg))
    paths = {i.path for i in info.value.issues}
    assert {"model_name", "dataset.path"} <= paths


def test_classification_of_library_errors() -> None:
    import errno

    import torch

    cuda = classify_training_exception(
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    )
    assert cuda.error == "out_of_memory" and cuda.message.startswith("GPU out of memory")
    disk = RuntimeError("[enforce fail at inline_container.cc] PytorchStreamWriter failed writing file")
    disk.__cause__ = OSError(errno.ENOSPC, "No space left on device")
    assert classify_training_exception(disk).error == "disk_full"
    assert classify_training_exception(ValueError("something else")).error == "internal_error"


@pytest.fixture
def small_disk(tmpfs):  # type: ignore[no-untyped-def]
    """A 880k tmpfs: room for the run's data cache (~150 KB) and one tiny checkpoint (~590 KB with
    its 4 KiB blocks), not two (grown later with a remount where needed)."""
    return tmpfs("880k")


def test_disk_full_while_checkpointing(tiny_model_dir: Path, small_disk: Path) -> None:
    from finetune_worker.training.checkpoints import complete_checkpoints

    out = small_disk / "out"
    cfg = tiny_config(tiny_model_dir, out, max_steps=40, checkpoint={"every_steps": 2, "keep": 5})
    p = fail_after_submit(cfg)
    assert p["error"] == "disk_full" and "No space left" in p["message"], p
    assert "checkpoint.keep" in p["hint"]
    # the checkpoint that did not fit was never published; the ones before it are intact
    assert [c.name for c in complete_checkpoints(out)] == ["checkpoint-2"]
    assert not (out / "checkpoint-4").exists()


def test_damaged_weights(model_copy: Path, tmp_path: Path) -> None:
    weights = model_copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # a copy that was cut short
    p = fail_after_submit(tiny_config(model_copy, tmp_path / "o"))
    assert p["error"] == "unsupported_model" and "damaged" in p["message"], p


@pytest.mark.parametrize("kernel", ["flex_attention", "flash_attention_3"])
def test_attention_kernels_that_need_cuda(tiny_model_dir: Path, tmp_path: Path, kernel: str) -> None:
    """flash_attention_3 is refused at submit without its package; on a CPU machine both fail the
    job before the model loads, naming the field."""
    cfg = tiny_config(tiny_model_dir, tmp_path / "o", attn_implementation=kernel)
    if kernel == "flash_attention_3":
        with pytest.raises(ConfigError) as caught:
            parse_job_config(json.dumps(cfg))
        assert "flash_attn_interface" in str(caught.value)
    run = Run(cfg, env_checks=False)  # as if its package were there
    try:
        p = run.wait(120).payload
    finally:
        run.close()
    assert p["error"] == "invalid_config", p
    assert f"attn_implementation {kernel!r} needs a CUDA GPU" in p["message"]
    assert "sdpa" in p["hint"]
