"""What a user typing a config gets: a JSON Schema editors and validators take, "did you mean"
for a misspelt or foreign key, and ``--set`` overrides from the command line."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from cli_helpers import run_cli
from finetune_worker.config import json_schema, parse_job_config
from finetune_worker.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
#: Every job config among the examples (the MergeKit YAMLs they point at are MergeKit's format).
EXAMPLES = sorted(
    p
    for p in (REPO / "configs").glob("*.*")
    if p.suffix in (".json", ".yaml") and "yaml_config" not in p.name
)
JOB_EXAMPLES = [p for p in EXAMPLES if not (p.suffix == ".yaml" and p.stem.startswith("merge-"))]


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft202012Validator:
    schema = json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)  # the schema itself is valid 2020-12
    return jsonschema.Draft202012Validator(schema)


def _messages(v: jsonschema.Draft202012Validator, doc: dict[str, Any]) -> list[str]:
    return [e.message for e in v.iter_errors(doc)]


@pytest.mark.parametrize("path", JOB_EXAMPLES, ids=lambda p: p.name)
def test_the_schema_takes_every_example_config(path: Path, validator: Any) -> None:
    doc = yaml.safe_load(path.read_text())
    assert _messages(validator, doc) == []


def _tiny_lora(model: Path) -> dict[str, Any]:
    """The demo's config on a tiny model built for the test (a fresh clone has no ``.tiny/model``)."""
    doc = json.loads((REPO / "configs" / "tiny-lora.json").read_text())
    doc["model_name"] = str(model)
    return doc


@pytest.mark.parametrize(
    ("change", "valid"),
    [
        ({"dataset": [{"path": "configs/data/qa.jsonl", "weight": 2}]}, True),  # a mixture as a list
        ({"tracking": {"mlflow": True, "tensorboard": False}}, True),  # true: a backend's defaults
        ({"training_parameters": {"learning_rate": "2e-4", "batch_size": "4"}}, True),  # numbers as text
        ({"training_parameters": {"learnig_rate": 1e-4}}, False),  # a typo
        ({"training_parameters": {"batch_size": "four"}}, False),
        ({"peft": {"method": "lora", "r": 0}}, False),
        ({"seed": "1.5"}, False),
    ],
)
def test_the_schema_agrees_with_validation(
    change: dict[str, Any], valid: bool, validator: Any, tiny_model_dir: Path
) -> None:
    doc = _tiny_lora(tiny_model_dir)
    doc.update(change)
    try:
        parse_job_config(copy.deepcopy(doc))
        accepted = True
    except ConfigError:
        accepted = False
    assert accepted == valid
    assert (_messages(validator, doc) == []) == valid, _messages(validator, doc)


def _problems(doc: dict[str, Any], overrides: tuple[str, ...] = ()) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_job_config(doc, overrides)
    return [str(i) for i in caught.value.issues]


@pytest.mark.parametrize(
    ("where", "key", "meant"),
    [
        ((), "lr", "training_parameters.learning_rate"),  # another tool's name
        ((), "num_train_epochs", "training_parameters.epochs"),
        ((), "cutoff_len", "data.max_seq_length"),  # LLaMA-Factory
        ((), "micro_batch_size", "training_parameters.batch_size"),  # Axolotl
        ((), "learning_rate", "training_parameters.learning_rate"),  # the right key at the wrong level
        (("training_parameters",), "learnig_rate", "training_parameters.learning_rate"),  # a typo
        (("data",), "max_seq_lenght", "data.max_seq_length"),
        (("peft",), "rank", "peft.r"),
        (("dataset",), "valdation_split", "dataset.validation_split"),
    ],
)
def test_an_unknown_key_says_what_was_meant(
    where: tuple[str, ...], key: str, meant: str, tiny_model_dir: Path
) -> None:
    doc = _tiny_lora(tiny_model_dir)
    node = doc
    for part in where:
        node = node[part]
    node[key] = 1
    shown = ".".join((*where, key))
    assert _problems(doc) == [f"{shown}: unknown key (did you mean {meant}?) (got 1)"]


def test_another_tools_name_counts_only_where_the_setting_lives(tiny_model_dir: Path) -> None:
    from pydantic import BaseModel

    from finetune_worker.config.suggest import _nested_model

    class Inner(BaseModel):
        x: int = 0

    # Python 3.10 counts list[int] as a type: no issubclass() on it.
    assert _nested_model(list[int]) is None and _nested_model(list[Inner] | None) is Inner
    doc = _tiny_lora(tiny_model_dir)
    doc["peft"]["lora_alpha"] = 8  # peft's own name, in the peft section
    assert _problems(doc) == ["peft.lora_alpha: unknown key (did you mean peft.alpha?) (got 8)"]
    doc = _tiny_lora(tiny_model_dir)
    doc["checkpoint"]["rank"] = 1  # not peft's r: nothing near in the checkpoint section
    assert "did you mean peft.r" not in _problems(doc)[0]


def test_set_values_stay_the_text_typed_unless_they_are_plain_scalars() -> None:
    from finetune_worker.config.overrides import apply_overrides, parse_override

    assert parse_override("a=3")[1] == 3 and parse_override("a=1e-4")[1] == "1e-4"
    assert parse_override("a=true")[1] is True and parse_override("a=null")[1] is None
    for typed in ("no", "0123", "1:30", "#42", "Answer in C #fast", "~"):
        assert parse_override(f"a={typed}")[1] == typed, typed
    doc: dict = {"dataset": [{"path": "a.jsonl"}, {"path": "b.jsonl"}]}  # the list form
    apply_overrides(doc, ["dataset.sources[1].weight=2"])
    assert doc["dataset"] == {"sources": [{"path": "a.jsonl"}, {"path": "b.jsonl", "weight": 2}]}


def test_keys_of_a_mixture_source_and_of_other_jobs(tiny_model_dir: Path) -> None:
    doc = _tiny_lora(tiny_model_dir)
    doc["dataset"] = [{"path": "configs/data/qa.jsonl", "wieght": 2}]
    assert any("wieght: unknown key (did you mean dataset.sources[0].weight?)" in p for p in _problems(doc))
    generate = {"job": "generate", "model_path": str(tiny_model_dir), "prompts": ["hi"], "max_tokens": 3}
    assert _problems(generate) == ["max_tokens: unknown key (did you mean max_new_tokens?) (got 3)"]
    # Nothing near: the schema is named instead of a wild guess.
    doc = _tiny_lora(tiny_model_dir)
    doc["zzzz"] = 1
    assert _problems(doc) == [
        "zzzz: unknown key (not part of this job's config; see `finetune-worker schema`) (got 1)"
    ]


def test_set_overrides_keys_and_reads_values_as_yaml(tmp_path: Path, tiny_model_dir: Path) -> None:
    path = tmp_path / "job.json"
    path.write_text(json.dumps(_tiny_lora(tiny_model_dir), indent=2))
    _, model = parse_job_config(
        ("file", str(path)),
        (
            "training_parameters.learning_rate=1e-4",
            "peft.target_modules=[q_proj, v_proj]",
            "data.packing=pad",
            "max_steps=7",
            "tracking.tensorboard=true",
        ),
    )
    cfg: Any = model
    assert cfg.training_parameters.learning_rate == 1e-4 and cfg.max_steps == 7
    assert cfg.peft.target_modules == ["q_proj", "v_proj"] and cfg.data.packing == "pad"
    assert cfg.tracking.tensorboard is not None
    # A bad overridden value is reported as coming from --set, not from a line of the file.
    problems = _problems(("file", str(path)), ("training_parameters.batch_size=abc", "peft.rank=4"))  # type: ignore[arg-type]
    assert problems[0].startswith("training_parameters.batch_size: ") and problems[0].endswith(
        "(set with --set) (got 'abc')"
    )
    assert problems[1] == "peft.rank: unknown key (did you mean peft.r?) (set with --set) (got 4)"
    assert _problems(("file", str(path)), ("lr",)) == [  # type: ignore[arg-type]
        "<config>: --set 'lr': expected KEY=VALUE, KEY a dotted path like data.max_seq_length"
    ]
    assert _problems(("file", str(path)), ("peft.r.x=1",)) == [  # type: ignore[arg-type]
        "peft.r: --set 'peft.r.x=1': peft.r is not a mapping"
    ]


def test_the_command_line_takes_set_and_shows_examples(tmp_path: Path, tiny_model_dir: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(_tiny_lora(tiny_model_dir)))

    ok = run_cli("validate", str(path), "--set", "training_parameters.learning_rate=1e-4", cwd=REPO)
    assert ok.returncode == 0 and "valid train config" in ok.stdout, ok.stdout + ok.stderr
    bad = run_cli("validate", str(path), "--set", "training_parameters.lr=1e-4", cwd=REPO)
    assert bad.returncode == 2
    assert (
        "training_parameters.lr: unknown key (did you mean training_parameters.learning_rate?)" in bad.stdout
    )
    for args in (("--help",), ("run", "--help")):
        shown = run_cli(*args, cwd=REPO)
        assert shown.returncode == 0 and "examples:" in shown.stdout and "--set" in shown.stdout
    schema = run_cli("schema", cwd=REPO)
    jsonschema.Draft202012Validator.check_schema(json.loads(schema.stdout))
