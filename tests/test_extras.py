"""Jobs that need an optional extra say which one when it is missing, at validate time."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from finetune_worker.config import parse_job_config
from finetune_worker.errors import ConfigError
from finetune_worker.extras import installed

REPO = Path(__file__).resolve().parents[1]


def _issues(config: dict) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_job_config(config)
    return [str(i) for i in caught.value.issues]


def _config(name: str) -> dict:
    return json.loads((REPO / "configs" / name).read_text())


def test_a_missing_mergekit_names_the_merge_extra(
    monkeypatch: pytest.MonkeyPatch, tiny_model_dir: Path
) -> None:
    assert installed("mergekit")  # the test install has it
    monkeypatch.setitem(sys.modules, "mergekit", None)  # as if it were not installed
    assert not installed("mergekit")
    issues = _issues(_config("merge-slerp.json"))
    assert any(
        i.startswith("job: MergeKit merges need the mergekit package")
        and "pip install 'finetune-worker[merge]'" in i
        for i in issues
    ), issues


def test_a_missing_bitsandbytes_names_the_qlora_extra(
    monkeypatch: pytest.MonkeyPatch, tiny_model_dir: Path
) -> None:
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    issues = _issues(_config("tiny-qlora.json"))
    assert any(
        i.startswith("quantization: 4-bit and 8-bit loading") and "finetune-worker[qlora]" in i
        for i in issues
    ), issues
    generate = {
        "job": "generate",
        "model_path": str(tiny_model_dir),
        "prompts": ["hi"],
        "quantization": {"bits": 4},
    }
    assert any(i.startswith("quantization: ") and "[qlora]" in i for i in _issues(generate))
    # A job that does not quantize does not need it.
    parse_job_config({**_config("tiny-lora.json"), "model_name": str(tiny_model_dir)})
