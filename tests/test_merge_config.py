"""Merge job configs: the seed formats as written, precision choice, output checks, shipped examples."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from finetune_worker.config import infer_kind, parse_job_config
from finetune_worker.config.merge import MergeKitConfig, MergeLoraConfig
from finetune_worker.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def test_seed_formats_validate_as_written(tiny_model_dir: Path, tmp_path: Path) -> None:
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    seed_lora = {
        "base_model_path": str(tiny_model_dir),
        "adapter_path": str(adapter),
        "output_path": str(tmp_path / "merged"),
        "use_fp16": True,
    }
    kind, cfg = parse_job_config(json.dumps(seed_lora))
    assert kind == "merge_lora" and isinstance(cfg, MergeLoraConfig) and cfg.precision == "fp16"

    yaml_path = tmp_path / "m.yaml"
    yaml_path.write_text(
        f"models:\n  - model: {tiny_model_dir}\n    parameters: {{weight: 1.0}}\nmerge_method: linear\ndtype: float32\n"
    )
    seed_kit = {"yaml_config_path": str(yaml_path), "output_dir": str(tmp_path / "out"), "cpu_offload": True}
    kind, cfg = parse_job_config(seed_kit)
    assert kind == "merge" and isinstance(cfg, MergeKitConfig) and cfg.cpu_offload is True


@pytest.mark.parametrize(
    ("extra", "precision"),
    [({}, "fp32"), ({"use_fp16": False}, "fp32"), ({"use_fp16": True}, "fp16"), ({"dtype": "bf16"}, "bf16"),
     ({"use_fp16": True, "dtype": "fp16"}, "fp16"), ({"use_fp16": False, "dtype": "fp32"}, "fp32")],
)  # fmt: skip
def test_precision(extra: dict[str, object], precision: str) -> None:
    cfg = MergeLoraConfig.model_validate(
        {"base_model_path": "b", "adapter_path": "a", "output_path": "o", **extra}
    )
    assert cfg.precision == precision


@pytest.mark.parametrize("extra", [{"use_fp16": True, "dtype": "bf16"}, {"use_fp16": False, "dtype": "fp16"}])
def test_conflicting_precision_is_refused(extra: dict[str, object]) -> None:
    with pytest.raises(ConfigError, match=r'dtype: .*conflicts with "use_fp16"'):
        parse_job_config({"base_model_path": "b", "adapter_path": "a", "output_path": "o", **extra})


def test_unknown_keys_and_output_checks(tiny_model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="use_fp32: unknown key"):
        parse_job_config({"base_model_path": "b", "adapter_path": "a", "output_path": "o", "use_fp32": True})
    afile = tmp_path / "file"
    afile.write_text("x")
    with pytest.raises(ConfigError) as err:
        parse_job_config(
            {"job": "merge_lora", "base_model_path": str(tmp_path / "nb"), "adapter_path": str(tmp_path),
             "output_path": str(afile)}
        )  # fmt: skip
    text = str(err.value)
    assert "base_model_path: no local model directory there" in text
    assert "adapter_path: has no adapter_config.json" in text
    assert "output_path: exists and is not a directory" in text


def test_shipped_examples_parse() -> None:
    for name, kind in [("merge-lora", "merge_lora"), ("merge-qlora", "merge_lora"), ("merge-slerp", "merge"),
                       ("merge-ties", "merge")]:  # fmt: skip
        data = json.loads((REPO / "configs" / f"{name}.json").read_text())
        assert infer_kind(data) == kind
        cls = MergeLoraConfig if kind == "merge_lora" else MergeKitConfig
        cls.model_validate(data)  # the paths need `make run` etc.; the schema must hold regardless


def test_validation_does_not_import_torch(tmp_path: Path) -> None:
    """submit validates on the worker's main thread, which must answer at once."""
    yaml_path = tmp_path / "m.yaml"
    yaml_path.write_text("merge_method: slerp\nmodels:\n  - model: nowhere\n")
    code = (
        "import sys\n"
        "from finetune_worker.config import parse_job_config\n"
        "try:\n"
        f"    parse_job_config({{'yaml_config_path': {str(yaml_path)!r}, 'output_dir': 'o', 'cpu_offload': True}})\n"
        "except Exception as e: print(e)\n"
        "print('torch' in sys.modules, 'mergekit' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "models[0].model: model 'nowhere' not found" in out
    assert out.strip().endswith("False False")
