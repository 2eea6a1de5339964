"""The MergeKit ``merge`` job in process: SLERP end points, linear weights, the seed's layered SLERP,
cancel, relative paths, and errors caught before and by MergeKit."""

from __future__ import annotations

import json
import math
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file

from finetune_worker.errors import ConfigError
from test_merge_helpers import run_job, staging_leftovers, terminal

REPO = Path(__file__).resolve().parents[1]
SEED_T = {"self_attn": [0, 0.5, 0.3, 0.7, 1], "mlp": [1, 0.5, 0.7, 0.3, 0]}


@pytest.fixture(scope="module")
def model_b(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from finetune_worker.testing.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny_b") / "model", seed=1)


@pytest.fixture(scope="module")
def deep_pair(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two 5-layer variants of the tiny model, so every point of the seed's t gradient is a layer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**{**json.loads((tiny_model_dir / "config.json").read_text()), "num_hidden_layers": 5})
    root = tmp_path_factory.mktemp("deep")
    out = []
    for seed in (10, 11):
        torch.manual_seed(seed)
        path = root / f"m{seed}"
        LlamaForCausalLM(cfg).save_pretrained(str(path))
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(tiny_model_dir / f, path / f)
        out.append(path)
    return out[0], out[1]


def write_yaml(path: Path, doc: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def slerp_doc(a: Path, b: Path, t: Any, layers: int = 2) -> dict[str, Any]:
    return {
        "slices": [{"sources": [{"model": str(a), "layer_range": [0, layers]}, {"model": str(b), "layer_range": [0, layers]}]}],
        "merge_method": "slerp",
        "base_model": str(a),
        "parameters": {"t": t},
        "dtype": "float32",
    }  # fmt: skip


def merge(yaml_path: Path, out: Path, *, cancel_after: str | None = None, **extra: Any) -> list[Any]:
    cfg = {"yaml_config_path": str(yaml_path), "output_dir": str(out), "cpu_offload": True, **extra}
    return run_job(cfg, cancel_after=cancel_after)


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(model_dir / "model.safetensors"))


@pytest.mark.parametrize("t", [0, 1])
def test_slerp_end_points_reproduce_the_inputs(
    tiny_model_dir: Path, model_b: Path, tmp_path: Path, t: int
) -> None:
    out = tmp_path / "out"
    events = merge(write_yaml(tmp_path / "m.yaml", slerp_doc(tiny_model_dir, model_b, t)), out)
    done = terminal(events)
    assert done.type == "completed", done.payload
    expected = weights(tiny_model_dir if t == 0 else model_b)
    got = weights(out)
    assert got.keys() == expected.keys()
    assert any(not torch.equal(weights(tiny_model_dir)[k], weights(model_b)[k]) for k in got)
    for name, tensor in got.items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=1e-6, msg=name)


def test_linear_is_the_weighted_average(tiny_model_dir: Path, model_b: Path, tmp_path: Path) -> None:
    doc = {
        "models": [
            {"model": str(tiny_model_dir), "parameters": {"weight": 0.3}},
            {"model": str(model_b), "parameters": {"weight": 0.7}},
        ],
        "merge_method": "linear",
        "dtype": "float32",
    }
    out = tmp_path / "out"
    done = terminal(merge(write_yaml(tmp_path / "linear.yaml", doc), out))
    assert done.type == "completed", done.payload
    a, b, got = weights(tiny_model_dir), weights(model_b), weights(out)
    assert got.keys() == a.keys()
    for name, tensor in got.items():
        torch.testing.assert_close(tensor, 0.3 * a[name] + 0.7 * b[name], rtol=0, atol=1e-6, msg=name)


def seed_t(name: str, layers: int) -> float:
    """The t the seed's YAML asks for: a gradient over depth for self_attn and mlp, 0.5 elsewhere."""
    kind = next((k for k in SEED_T if k in name), None)
    m = re.search(r"\.layers\.(\d+)\.", name)
    if kind is None:
        return 0.5
    values = SEED_T[kind]
    pos = (int(m.group(1)) / (layers - 1) if layers > 1 else 1.0) if m else 0.0
    scaled = pos * (len(values) - 1)
    i0 = int(scaled)
    i1 = min(len(values) - 1, i0 + 1)
    return (1 - (scaled - i0)) * values[i0] + (scaled - i0) * values[i1]


def assert_on_the_arc(name: str, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, t: float) -> None:
    """MergeKit's SLERP treats each tensor as one vector. The property checked, per tensor:
    ``out = ca*a + cb*b`` (it lies in the plane of a and b: least squares residual ~ 0) with ``ca, cb >= 0``
    (on the arc between a and b, not beyond either end), and (ca, cb) are the SLERP weights
    sin((1-t)θ)/sin θ, sin(tθ)/sin θ for the angle θ between a and b and the t the YAML gives this
    tensor. Nearly parallel tensors (|cos θ| > 0.9995, e.g. the all-ones norm weights of two fresh
    models) interpolate linearly, (1-t, t): there "between" is elementwise, checked as such."""
    va, vb, vo = (x.reshape(-1).double() for x in (a, b, out))
    cos = float(torch.dot(va / va.norm(), vb / vb.norm()).clamp(-1, 1))
    if abs(cos) > 0.9995:
        lo, hi = torch.minimum(va, vb), torch.maximum(va, vb)
        assert bool(((lo - 1e-6 <= vo) & (hi + 1e-6 >= vo)).all()), f"{name}: not between a and b"
        torch.testing.assert_close(vo, (1 - t) * va + t * vb, rtol=0, atol=1e-6, msg=name)
        return
    basis = torch.stack([va, vb], dim=1)
    coef = torch.linalg.lstsq(basis, vo.unsqueeze(1)).solution.squeeze(1)
    assert (basis @ coef - vo).norm() <= 1e-5 * vo.norm(), f"{name}: not in the plane of a and b"
    assert bool((coef >= -1e-6).all()), f"{name}: outside the arc from a to b ({coef.tolist()})"
    theta = math.acos(cos)
    want = (math.sin((1 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta))
    got = coef.tolist()
    assert abs(got[0] - want[0]) < 1e-5 and abs(got[1] - want[1]) < 1e-5, (name, t, got, want)


def check_seed_slerp(a_dir: Path, b_dir: Path, out: Path, layers: int) -> dict[str, float]:
    a, b, got = weights(a_dir), weights(b_dir), weights(out)
    assert got.keys() == a.keys()
    ts = {}
    for name, tensor in got.items():
        t = seed_t(name, layers)
        ts[name] = t
        if t == 0:
            assert torch.equal(tensor, a[name]), name
        elif t == 1:
            torch.testing.assert_close(tensor, b[name], rtol=0, atol=1e-6, msg=name)
        assert_on_the_arc(name, a[name], b[name], tensor, t)
    return ts


def test_shipped_seed_style_slerp_example_runs_as_written(
    tiny_model_dir: Path, model_b: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """configs/merge-slerp.{json,yaml} unchanged, in a tree laid out as the YAML's comments say."""
    (tmp_path / "configs").mkdir()
    for f in ("merge-slerp.json", "merge-slerp.yaml"):
        shutil.copy(REPO / "configs" / f, tmp_path / "configs" / f)
    (tmp_path / ".tiny").mkdir()
    (tmp_path / "runs").mkdir()
    (tmp_path / ".tiny" / "model").symlink_to(tiny_model_dir)
    (tmp_path / "runs" / "tiny-full").symlink_to(model_b)
    monkeypatch.chdir(tmp_path)
    events = run_job(("file", "configs/merge-slerp.json"))
    done = terminal(events)
    assert done.type == "completed", done.payload
    out = tmp_path / "runs" / "tiny-slerp"
    assert done.payload["outputs"]["output_dir"] == str(out)
    assert [e.payload["phase"] for e in events if e.type == "phase"] == ["loading", "merging", "saving"]
    progress = [e.payload for e in events if e.type == "progress"]
    assert [p["done"] for p in progress] == list(range(1, len(progress) + 1)) and progress[-1][
        "percent"
    ] == 100.0
    assert done.payload["summary"]["tensors"] == 21 and done.payload["summary"]["merge_method"] == "slerp"
    assert {"config.json", "model.safetensors", "tokenizer.json", "mergekit_config.yml"} <= {
        p.name for p in out.iterdir()
    }
    ts = check_seed_slerp(tiny_model_dir, model_b, out, layers=2)
    assert (
        ts["model.layers.0.self_attn.q_proj.weight"] == 0
        and ts["model.layers.1.self_attn.q_proj.weight"] == 1
    )
    assert ts["model.layers.0.mlp.up_proj.weight"] == 1 and ts["model.embed_tokens.weight"] == 0.5


def test_seed_slerp_gradient_over_five_layers(deep_pair: tuple[Path, Path], tmp_path: Path) -> None:
    a, b = deep_pair
    doc = slerp_doc(
        a, b, yaml.safe_load((REPO / "configs" / "merge-slerp.yaml").read_text())["parameters"]["t"], 5
    )
    out = tmp_path / "out"
    done = terminal(merge(write_yaml(tmp_path / "deep.yaml", doc), out))
    assert done.type == "completed", done.payload
    ts = check_seed_slerp(a, b, out, layers=5)
    assert [ts[f"model.layers.{i}.self_attn.o_proj.weight"] for i in range(5)] == [0, 0.5, 0.3, 0.7, 1]
    assert [ts[f"model.layers.{i}.mlp.down_proj.weight"] for i in range(5)] == [1, 0.5, 0.7, 0.3, 0]


def test_relative_model_paths_resolve_against_the_yaml(
    tiny_model_dir: Path, model_b: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "merges").mkdir()
    (tmp_path / "merges" / "a").symlink_to(tiny_model_dir)
    (tmp_path / "merges" / "b").symlink_to(model_b)
    yaml_path = write_yaml(tmp_path / "merges" / "rel.yaml", slerp_doc(Path("a"), Path("b"), 0))
    monkeypatch.chdir(REPO)  # a cwd where "a" and "b" mean nothing
    done = terminal(merge(yaml_path, tmp_path / "out"))
    assert done.type == "completed", done.payload
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_cancel_leaves_no_model_at_output_dir(tiny_model_dir: Path, model_b: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    events = merge(
        write_yaml(tmp_path / "m.yaml", slerp_doc(tiny_model_dir, model_b, 0.5)), out, cancel_after="progress"
    )
    done = terminal(events)
    assert done.type == "cancelled", done.payload
    assert done.payload["step"] == 1
    assert not out.exists() and staging_leftovers(out) == []


def test_bad_yaml_is_refused_up_front_with_paths(tiny_model_dir: Path, model_b: Path, tmp_path: Path) -> None:
    def refused(doc_or_text: Any) -> str:
        path = tmp_path / "bad.yaml"
        if isinstance(doc_or_text, str):
            path.write_text(doc_or_text)
        else:
            write_yaml(path, doc_or_text)
        with pytest.raises(ConfigError) as err:
            merge(path, tmp_path / "out")
        return str(err.value)

    text = refused("merge_method: slerp\n  dtype: float32\n")
    assert "yaml_config_path: malformed YAML at line 2, column 8: mapping values are not allowed here" in text
    assert "yaml_config_path: a MergeKit config must be a YAML mapping" in refused("- just\n- a list\n")
    doc = slerp_doc(tiny_model_dir, model_b, 0.5)
    assert "merge_method: unknown merge method 'slurp'" in refused({**doc, "merge_method": "slurp"})
    doc["slices"][0]["sources"][1]["layer_range"] = [0, 3]
    assert "slices[0].sources[1].layer_range: [0, 3] goes past the model's 2 layers" in refused(doc)
    doc["slices"][0]["sources"][1]["layer_range"] = "all"
    assert "yaml_config_path: slices[0].sources[1].layer_range: Input should be a valid tuple" in refused(doc)
    doc = slerp_doc(tiny_model_dir, tmp_path / "nowhere", 0.5)
    assert "slices[0].sources[1].model: model '" in refused(doc) and "nowhere" in refused(doc)
    doc = slerp_doc(tiny_model_dir, model_b, [{"filter": "mlp", "valu": 1}])
    assert "parameters.t[0].valu: unknown key" in refused(doc)
    with pytest.raises(ConfigError, match=r"yaml_config_path: '.*missing\.yaml' does not exist"):
        merge(tmp_path / "missing.yaml", tmp_path / "out")


def test_mergekit_own_checks_fail_the_job_with_a_clear_error(
    tiny_model_dir: Path, model_b: Path, tmp_path: Path
) -> None:
    doc = slerp_doc(tiny_model_dir, model_b, 0.5)
    del doc["base_model"]  # valid YAML schema; SLERP itself needs a base model
    done = terminal(merge(write_yaml(tmp_path / "nobase.yaml", doc), tmp_path / "out"))
    assert done.type == "failed" and done.payload["error"] == "invalid_merge_config", done.payload
    assert (
        done.payload["message"].startswith("yaml_config_path: ") and "base" in done.payload["message"].lower()
    )
    assert done.payload["hint"] and not (tmp_path / "out").exists()


def test_yaml_mirror_matches_installed_mergekit() -> None:
    from mergekit import config as mk
    from mergekit.merge_methods import registered_methods

    from finetune_worker.config import mergekit_yaml as ours

    assert {m.spec.name for m in registered_methods()} == ours.MERGE_METHODS
    pairs = [
        (mk.MergeConfiguration, ours.MergeYaml),
        (mk.OutputSliceDefinition, ours.OutputSlice),
        (mk.InputSliceDefinition, ours.InputSlice),
        (mk.InputModelDefinition, ours.InputModel),
        (mk.OutputModuleDefinition, ours.OutputModule),
    ]
    for theirs, mine in pairs:
        assert set(theirs.model_fields) == set(mine.model_fields), theirs.__name__


def test_model_plus_lora_reference_matches_the_lora_merge_job(tiny_model_dir: Path, tmp_path: Path) -> None:
    """`model+lora` in a YAML (relative to the YAML) gives the same weights as the merge_lora job."""
    from test_merge_helpers import make_lora_adapter

    (tmp_path / "base").symlink_to(tiny_model_dir)
    make_lora_adapter(tiny_model_dir, tmp_path / "adapter", seed=3)
    doc = {
        "models": [{"model": "base+adapter", "parameters": {"weight": 1.0}}],
        "merge_method": "linear",
        "dtype": "float32",
    }
    caches = set(Path(tempfile.gettempdir()).glob("mergekit-lora-*"))
    kit = terminal(merge(write_yaml(tmp_path / "lora.yaml", doc), tmp_path / "kit"))
    assert (
        set(Path(tempfile.gettempdir()).glob("mergekit-lora-*")) <= caches
    )  # MergeKit's LoRA cache was temporary
    assert kit.type == "completed", kit.payload
    cfg = {
        "base_model_path": str(tiny_model_dir),
        "adapter_path": str(tmp_path / "adapter"),
        "output_path": str(tmp_path / "job"),
    }
    assert terminal(run_job(cfg)).type == "completed"
    ours, theirs = weights(tmp_path / "job"), weights(tmp_path / "kit")
    assert ours.keys() == theirs.keys()
    for name in ours:
        torch.testing.assert_close(theirs[name], ours[name], rtol=0, atol=1e-6, msg=name)
