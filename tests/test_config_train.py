"""The train config: the seed format as written, the promised names, every error at once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from finetune_worker.config import parse_job_config
from finetune_worker.config.train import TrainConfig
from finetune_worker.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

SEED = """{"model_name": "mistralai/Mistral-7B-v0.1",
 "training_parameters": {"epochs": 3, "batch_size": 4, "learning_rate": 2e-4, "weight_decay": 0.01,
                         "warmup_steps": 100},
 "dataset": {"path": "data/train.jsonl", "validation_split": 0.1},
 "output_dir": "runs/mistral",
 "quantization": {"bits": 4, "use_double_quant": true}}"""


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A cwd holding a (placeholder) local model dir and a dataset, as the seed's relative paths expect."""
    (tmp_path / "mistralai" / "Mistral-7B-v0.1").mkdir(parents=True)
    (tmp_path / "data").mkdir()
    rows = [
        {"text": "hello"},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
    ]
    (tmp_path / "data" / "train.jsonl").write_text(json.dumps(rows[0]) + "\n")
    (tmp_path / "data" / "chat.jsonl").write_text(json.dumps(rows[1]) + "\n")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def issues_of(raw: object) -> dict[str, str]:
    with pytest.raises(ConfigError) as info:
        parse_job_config(raw)
    return {i.path: i.message for i in info.value.issues}


def test_seed_format_is_accepted_exactly_as_written(workdir: Path) -> None:
    kind, cfg = parse_job_config(SEED)
    assert kind == "train"
    assert isinstance(cfg, TrainConfig)
    tp = cfg.training_parameters
    assert (tp.epochs, tp.batch_size, tp.learning_rate, tp.weight_decay) == (3, 4, 2e-4, 0.01)
    assert cfg.warmup == 100
    assert cfg.quantization is not None and cfg.quantization.bits == 4 and cfg.quantization.use_double_quant
    assert cfg.dataset.validation_split == 0.1
    # relative paths resolve against the cwd
    assert cfg.resolved(cfg.model_name) == workdir / "mistralai" / "Mistral-7B-v0.1"
    assert cfg.peft.method == "lora" and cfg.resume == "auto"


def test_design_names_are_accepted(workdir: Path) -> None:
    raw = json.loads(SEED)
    raw.update(
        {
            "job": "train",
            "dataset": {"path": "data/chat.jsonl", "validation_split": 0.1},
            "max_steps": 50,
            "peft": {"method": "dora", "r": 8, "alpha": 16, "dropout": 0.05, "target_modules": "all-linear"},
            "data": {
                "format": "conversations",
                "train_on_responses_only": True,
                "max_seq_length": 1024,
                "packing": True,
            },
            "checkpoint": {"every_steps": 10, "keep": 3},
            "resume": False,
            "seed": 42,
        }
    )
    _, cfg = parse_job_config(raw)
    assert cfg.max_steps == 50 and cfg.peft.method == "dora" and cfg.checkpoint.keep == 3
    assert cfg.resume is False and cfg.seed == 42
    for method in ("lora", "rslora", "loftq", "pissa", "ia3", "prefix_tuning", "prompt_tuning"):
        raw["peft"] = {"method": method}
        raw["quantization"] = None
        assert parse_job_config(raw)[1].peft.method == method
    raw["peft"] = {"method": "full", "freeze_layers": 2, "freeze_embeddings": True}
    assert parse_job_config(raw)[1].peft.freeze_layers == 2


def test_every_error_at_once_with_json_paths(workdir: Path) -> None:
    raw = json.loads(SEED)
    raw["training_parameters"]["learning_rate"] = 0
    raw["training_parameters"]["nonsense"] = 1
    raw["dataset"]["validation_split"] = 1.5
    raw["quantization"]["bits"] = 3
    raw["peft"] = {"method": "lora", "r": 0, "target_modules": 7}
    raw["resume"] = True
    raw["tracking"] = {"tensorboard": True, "wandb": {"mode": "sometimes"}}
    found = issues_of(raw)
    for path in (
        "training_parameters.learning_rate",
        "training_parameters.nonsense",
        "dataset.validation_split",
        "quantization.bits",
        "peft.r",
        "tracking.wandb.mode",
    ):
        assert path in found, (path, found)
    assert any(p.startswith("peft.target_modules") for p in found)
    assert any(p.startswith("resume") for p in found)


def test_hub_id_without_local_dir_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    found = issues_of(SEED)
    assert "no local model at 'mistralai/Mistral-7B-v0.1'" in found["model_name"]
    assert "no hub access" in found["model_name"]
    assert "no dataset file" in found["dataset.path"]


def test_cross_field_checks(workdir: Path) -> None:
    raw = json.loads(SEED)
    raw["training_parameters"]["warmup_ratio"] = 0.1
    raw["peft"] = {"method": "full", "freeze_layers": 1}
    raw["attn_implementation"] = "flash_attention_2"  # flash_attn is not installed here
    raw["eval"] = {"early_stopping_patience": 2}
    found = issues_of(raw)
    assert "not both" in found["training_parameters.warmup_ratio"]
    assert "full fine-tuning cannot update quantized weights" in found["quantization"]
    assert "flash_attn" in found["attn_implementation"]
    assert "eval.every_steps" in found


def test_warmup_ratio_maps_onto_warmup_steps(workdir: Path) -> None:
    raw = json.loads(SEED)
    raw["training_parameters"]["warmup_steps"] = 0
    raw["training_parameters"]["warmup_ratio"] = 0.05
    assert parse_job_config(raw)[1].warmup == 0.05
    raw["training_parameters"] = {"warmup_steps": 0.1}
    assert parse_job_config(raw)[1].warmup == 0.1


def test_output_dir_holding_another_run_is_refused(workdir: Path) -> None:
    raw = json.loads(SEED)
    out = workdir / "runs" / "mistral"
    out.mkdir(parents=True)
    (out / ".finetune-worker-run.json").write_text(json.dumps({"fingerprint": "someone-else"}))
    assert "different config" in issues_of(raw)["output_dir"]
    raw["overwrite"] = True
    parse_job_config(raw)
    # the same run: resume auto continues it, resume false refuses to clobber it
    _, cfg = parse_job_config(raw)
    (out / ".finetune-worker-run.json").write_text(json.dumps({"fingerprint": cfg.run_fingerprint()}))
    raw["overwrite"] = False
    parse_job_config(raw)
    raw["resume"] = False
    assert "resume is false" in issues_of(raw)["output_dir"]


def test_output_dir_under_a_file_is_not_writable(workdir: Path) -> None:
    raw = json.loads(SEED)
    raw["output_dir"] = "data/train.jsonl/out"
    assert "is a file" in issues_of(raw)["output_dir"]


def test_resume_path_must_be_a_complete_checkpoint(workdir: Path) -> None:
    raw = json.loads(SEED)
    raw["resume"] = "runs/nowhere/checkpoint-5"
    assert "no checkpoint directory" in issues_of(raw)["resume"]
    half = workdir / "half" / "checkpoint-5"
    half.mkdir(parents=True)
    raw["resume"] = str(half)
    assert "not a complete checkpoint" in issues_of(raw)["resume"]


def test_fingerprint_ignores_length_and_resume(workdir: Path) -> None:
    raw = json.loads(SEED)
    _, a = parse_job_config(raw)
    raw.update({"max_steps": 7, "resume": False, "checkpoint": {"every_steps": 3}})
    raw["training_parameters"]["epochs"] = 9
    b = TrainConfig.model_validate(raw)
    assert a.run_fingerprint() == b.run_fingerprint()
    raw["output_dir"] = str(workdir / "runs" / "mistral")  # the same place, spelled absolute
    assert TrainConfig.model_validate(raw).run_fingerprint() == a.run_fingerprint()
    raw["training_parameters"]["learning_rate"] = 1e-3
    assert TrainConfig.model_validate(raw).run_fingerprint() != a.run_fingerprint()


def test_shipped_examples_validate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import yaml

    documents = {p: json.loads(p.read_text()) for p in CONFIGS.glob("*.json")}
    documents |= {p: yaml.safe_load(p.read_text()) for p in CONFIGS.glob("*.yaml")}  # MergeKit YAMLs too
    train_examples = {p: d for p, d in documents.items() if "model_name" in d}
    assert {
        "tiny-lora.json",
        "tiny-qlora.json",
        "tiny-full.json",
        "mistral-7b-qlora.json",
        "tiny-mixture.yaml",
    } <= {p.name for p in train_examples}
    for document in train_examples.values():
        TrainConfig.model_validate(document)  # schema-valid as shipped
    assert json.loads((CONFIGS / "mistral-7b-qlora.json").read_text()) == json.loads(SEED) | {
        "output_dir": "runs/mistral-7b-qlora"
    }


def test_tiny_examples_validate_fully(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the layout `make run` sees: .tiny/model next to configs/
    (tmp_path / ".tiny").mkdir()
    (tmp_path / ".tiny" / "model").symlink_to(tiny_model_dir)
    (tmp_path / "configs").symlink_to(CONFIGS)
    monkeypatch.chdir(tmp_path)
    shipped = ("tiny-lora.json", "tiny-qlora.json", "tiny-full.json", "tiny-mixture.yaml")
    for name in (
        *shipped,
        *(
            f"tiny-{m}.json"
            for m in (
                "dpo",
                "orpo",
                "kto",
                "grpo",
                "adalora",
                "ptuning",
                "unfreeze",
                "continual",
                "loss-weights",
            )
        ),
    ):
        kind, _ = parse_job_config(("file", f"configs/{name}"))
        assert kind == "train"
