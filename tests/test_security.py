"""Security: no pickle, a [safe] Elixir bridge, secrets never echoed, ``allowed_roots`` confinement.

Calls outside the API module are covered by ``test_worker.py::test_calls_outside_the_api_are_refused``.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from finetune_worker.config import parse_job_config
from finetune_worker.errors import ConfigError
from finetune_worker.security import ENV_ROOTS
from finetune_worker.testing import WorkerHarness
from test_train_helpers import DATA, tiny_config

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "python" / "finetune_worker"


# ---- no pickle ----------------------------------------------------------------------------

_UNSAFE_IMPORT = re.compile(
    r"^\s*(import|from)\s+(pickle|cPickle|_pickle|marshal|shelve|dill|cloudpickle|joblib)\b", re.MULTILINE
)
_UNSAFE_CALL = re.compile(r"\b(pickle|marshal|dill|cloudpickle|shelve)\.(loads?|dumps?|open|Unpickler)\b")


def test_no_pickle_in_our_code() -> None:
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        rel = path.relative_to(REPO)
        offenders += [f"{rel}: {m.group(0).strip()}" for m in _UNSAFE_IMPORT.finditer(text)]
        offenders += [f"{rel}: {m.group(0)}" for m in _UNSAFE_CALL.finditer(text)]
        for call in re.finditer(r"torch\.load\((?:[^()]|\([^()]*\))*\)", text):
            if "weights_only=True" not in call.group(0):
                offenders.append(f"{rel}: {call.group(0)} without weights_only=True")
    assert not offenders, "\n".join(offenders)


def test_the_grep_would_catch_pickle(tmp_path: Path) -> None:
    text = (
        "import pickle\nfrom marshal import loads\nx = torch.load(f)\ny = torch.load(f, weights_only=False)\n"
    )
    assert len(_UNSAFE_IMPORT.findall(text)) == 2
    loads = re.findall(r"torch\.load\((?:[^()]|\([^()]*\))*\)", text)
    assert [c for c in loads if "weights_only=True" not in c] == loads


def test_protocol_modules_never_fall_back_to_pickle() -> None:
    from finetune_worker.wire import encode

    class Custom:
        pass

    for value in (Custom(), {1, 2}, object(), lambda: 0):
        with pytest.raises(TypeError):
            encode(value)


# ---- the Elixir bridge decodes with [safe] and mints no atoms ---------------------------------


def test_elixir_bridge_never_turns_worker_strings_into_atoms() -> None:
    lib = REPO / "elixir_bridge" / "lib"
    sources = sorted(lib.rglob("*.ex"))
    assert sources
    offenders = []
    for path in sources:
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            code = line.split("#", 1)[0]
            if re.search(r"String\.to_atom\(|List\.to_atom\(|:erlang\.(binary|list)_to_atom\(", code):
                offenders.append(f"{path.name}:{n}: {line.strip()}")
            is_doc_example = code.strip().startswith(("iex>", "..."))
            for call in re.findall(r":erlang\.binary_to_term\(([^)]*)\)", code):
                if not is_doc_example and "[:safe]" not in call:
                    offenders.append(f"{path.name}:{n}: binary_to_term without [:safe]: {line.strip()}")
    assert not offenders, "\n".join(offenders)
    calls = [
        c for p in sources for c in re.findall(r":erlang\.binary_to_term\([^)]*\[:safe\]", p.read_text())
    ]
    assert calls, "the bridge decodes frames with [:safe] somewhere"


# ---- allowed_roots ----------------------------------------------------------------------------


@pytest.fixture
def roots(tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """An allowed root holding a model, a dataset and a YAML; an outside dir with the same things."""
    import shutil

    inside = tmp_path / "inside"
    outside = tmp_path / "outside"
    for base in (inside, outside):
        (base / "data").mkdir(parents=True)
        shutil.copytree(tiny_model_dir, base / "model")
        shutil.copy(DATA / "conversations.jsonl", base / "data" / "train.jsonl")
    monkeypatch.setenv(ENV_ROOTS, f"{inside}:{tmp_path / 'second-root'}")
    return {"inside": inside, "outside": outside}


def issues_of(config: dict[str, Any]) -> dict[str, str]:
    with pytest.raises(ConfigError) as err:
        parse_job_config(json.dumps(config))
    return {i.path: i.message for i in err.value.issues}


def train(inside: Path, **over: Any) -> dict[str, Any]:
    cfg = tiny_config(inside / "model", inside / "out")
    cfg["dataset"]["path"] = str(inside / "data" / "train.jsonl")
    cfg.update(over)
    return cfg


def test_paths_inside_the_roots_are_accepted(roots: dict[str, Path]) -> None:
    kind, _ = parse_job_config(json.dumps(train(roots["inside"])))
    assert kind == "train"


def test_every_escape_is_refused_naming_its_field(roots: dict[str, Path]) -> None:
    inside, outside = roots["inside"], roots["outside"]
    (inside / "link-to-model").symlink_to(outside / "model")
    (inside / "data" / "link.jsonl").symlink_to(outside / "data" / "train.jsonl")
    cfg = train(
        inside,
        model_name=str(inside / "link-to-model"),  # a symlink that leads out
        output_dir=str(inside / ".." / "outside" / "out"),  # `..` that leads out
        resume=str(outside / "checkpoint-4"),
    )
    cfg["dataset"]["path"] = str(inside / "data" / "link.jsonl")
    cfg["tracking"] = {
        "tensorboard": {"log_dir": "/tmp/tb-elsewhere"},
        "mlflow": {"tracking_uri": f"sqlite:///{outside}/mlflow.db"},
    }
    got = issues_of(cfg)
    assert set(got) == {
        "model_name",
        "output_dir",
        "resume",
        "dataset.path",
        "tracking.tensorboard.log_dir",
        "tracking.mlflow.tracking_uri",
    }
    assert all("outside the allowed roots" in m for m in got.values()), got
    assert f"resolves to {outside / 'model'}" in got["model_name"]


def test_remote_tracking_uris_are_not_paths(roots: dict[str, Path]) -> None:
    cfg = train(roots["inside"], tracking={"mlflow": {"tracking_uri": "http://mlflow.internal:5000"}})
    assert parse_job_config(json.dumps(cfg))[0] == "train"
    cfg["tracking"]["mlflow"]["tracking_uri"] = f"sqlite:///{roots['inside']}/mlflow.db"
    assert parse_job_config(json.dumps(cfg))[0] == "train"


def test_relative_paths_resolve_against_the_cwd(
    roots: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(roots["inside"])
    assert parse_job_config(json.dumps(train(Path("."))))[0] == "train"
    monkeypatch.chdir(roots["outside"])
    assert set(issues_of(train(Path(".")))) == {"model_name", "output_dir", "dataset.path"}


def test_confinement_comes_before_other_file_checks(roots: dict[str, Path]) -> None:
    """Outside paths are not probed: the answer never says whether something exists there."""
    got = issues_of(train(roots["inside"], model_name="/etc/does-not-exist"))
    assert list(got) == ["model_name"] and "outside the allowed roots" in got["model_name"]


def test_merge_and_evaluate_paths_are_confined(roots: dict[str, Path]) -> None:
    inside, outside = roots["inside"], roots["outside"]
    got = issues_of(
        {
            "base_model_path": str(inside / "model"),
            "adapter_path": str(outside / "adapter"),
            "output_path": str(outside / "merged"),
        }
    )
    assert set(got) == {"adapter_path", "output_path"}
    got = issues_of(
        {
            "job": "evaluate",
            "model_path": str(outside / "model"),
            "dataset": {"path": str(inside / "data" / "train.jsonl")},
            "output_dir": str(inside / "eval"),
        }
    )
    assert set(got) == {"model_path"}
    yaml_out = outside / "merge.yaml"
    yaml_out.write_text("merge_method: linear\nmodels: []\n")
    assert set(issues_of({"yaml_config_path": str(yaml_out), "output_dir": str(inside / "m")})) == {
        "yaml_config_path"
    }


def test_models_named_inside_a_mergekit_yaml_are_confined(roots: dict[str, Path]) -> None:
    inside, outside = roots["inside"], roots["outside"]
    yaml_in = inside / "merge.yaml"
    yaml_in.write_text(
        "merge_method: linear\ndtype: float32\nmodels:\n"
        "  - model: ./model\n    parameters: {weight: 0.5}\n"
        "  - model: ../outside/model\n    parameters: {weight: 0.5}\n"
    )
    got = issues_of({"yaml_config_path": str(yaml_in), "output_dir": str(inside / "m")})
    assert list(got) == ["yaml_config_path: models[1].model"], got
    assert str(outside / "model") in got["yaml_config_path: models[1].model"]


def test_config_file_form_is_confined(roots: dict[str, Path]) -> None:
    path = roots["outside"] / "job.json"
    path.write_text(json.dumps(train(roots["inside"])))
    with pytest.raises(ConfigError) as err:
        parse_job_config(("file", str(path)))
    assert "outside the allowed roots" in str(err.value)


def test_cli_flag_and_env_confine_validate_run_and_port(roots: dict[str, Path], tmp_path: Path) -> None:
    inside, outside = roots["inside"], roots["outside"]
    good = inside / "good.json"
    good.write_text(json.dumps(train(inside)))
    bad = inside / "bad.json"
    bad.write_text(json.dumps(train(inside, model_name=str(outside / "model"))))
    env_none = {k: v for k, v in __import__("os").environ.items() if k != ENV_ROOTS}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "finetune_worker", *args]
        return subprocess.run(cmd, capture_output=True, text=True, env=env_none, timeout=120)

    assert cli("validate", str(bad)).returncode == 0  # no roots: nothing confined
    refused = cli("validate", str(bad), "--allowed-root", str(inside))
    assert (
        refused.returncode == 2
        and "model_name: path is outside the allowed roots" in refused.stdout + refused.stderr
    )
    assert cli("validate", str(good), "--allowed-root", str(inside)).returncode == 0
    assert (
        cli("validate", str(bad), "--allowed-root", str(inside), "--allowed-root", str(outside)).returncode
        == 0
    )
    ran = cli("run", str(bad), "--allowed-root", str(inside))
    assert ran.returncode == 2 and "model_name" in ran.stdout + ran.stderr

    for how in ("flag", "env"):
        args = ["--allowed-root", str(inside)] if how == "flag" else []
        env = dict(env_none, **({ENV_ROOTS: str(inside)} if how == "env" else {}))
        with WorkerHarness(args, env=env) as w:
            ok, issues = w.call("validate", bad.read_text(), timeout=60)
            assert str(ok) == "error"
            assert [i["path"] for i in issues] == ["model_name"], issues
            assert str(w.call("submit", bad.read_text(), w.pid)[0]) == "error"
            assert w.call("validate", good.read_text(), timeout=60) == "ok"
