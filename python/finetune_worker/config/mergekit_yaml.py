"""Read and check a MergeKit YAML without importing mergekit (or torch).

``submit`` answers on the worker's main thread, and importing ``mergekit.config`` pulls in torch
and transformers (5-20 s here). So the up-front check mirrors MergeKit 0.1.5's
``MergeConfiguration`` schema in plain pydantic, strictly: a misspelt key (``layer_ranges``) is an
error here, where MergeKit would silently ignore it. The job validates again with MergeKit's own
model before merging (``mergekit_job``); ``tests/test_merge_yaml.py`` keeps the mirror in step
with the installed MergeKit.

Relative model paths in the YAML resolve against the YAML file's directory (not the worker's
cwd, which the person writing the YAML cannot know). :func:`resolved_document` rewrites them to
absolute paths before MergeKit sees them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from finetune_worker.config.yaml_doc import YamlProblem, load_bounded_yaml
from finetune_worker.files import UnreadableFile, read_regular_file

#: MergeKit 0.1.5's registered merge methods (``mergekit.merge_methods.registered_methods()``).
MERGE_METHODS: frozenset[str] = frozenset(
    {
        "arcee_fusion", "breadcrumbs", "breadcrumbs_ties", "dare_linear", "dare_ties", "della",
        "della_linear", "karcher", "linear", "model_stock", "multislerp", "nearswap", "nuslerp",
        "passthrough", "ram", "ramplus_tl", "sce", "slerp", "task_arithmetic", "ties",
    }
)  # fmt: skip

#: Names ``mergekit.common.dtype_from_name`` accepts (optionally prefixed ``torch.``).
DTYPES: frozenset[str] = frozenset({"float32", "float16", "bfloat16", "float64", "int64"})

_SCALARS = (bool, int, float, str)


def _check_scalar_or_gradient(value: Any, where: str = "") -> None:
    if isinstance(value, _SCALARS):
        return
    if isinstance(value, list) and value and all(isinstance(v, _SCALARS) for v in value):
        return
    raise ValueError(
        f"{where}must be a scalar or a non-empty list of scalars (a gradient over the layers), "
        f"got {_short(value)}"
    )


def _check_setting(value: Any) -> Any:
    """A MergeKit ``ParameterSetting``: scalar, gradient, ``{filter, value}`` or a list of those."""
    if isinstance(value, _SCALARS):
        return value
    conditions = [value] if isinstance(value, dict) else value
    if isinstance(conditions, list) and conditions and all(isinstance(c, dict) for c in conditions):
        for i, cond in enumerate(conditions):
            where = f"[{i}]." if isinstance(value, list) else ""
            unknown = sorted(set(cond) - {"filter", "value"})
            if unknown:
                raise ValueError(f"{where}{unknown[0]}: unknown key (a condition has `filter` and `value`)")
            if "value" not in cond:
                raise ValueError(f"{where}value: missing (each condition needs a `value`)")
            if cond.get("filter") is not None and not isinstance(cond["filter"], str):
                raise ValueError(f"{where}filter: must be a string (a substring of tensor names)")
            _check_scalar_or_gradient(cond["value"], f"{where}value: ")
        return value
    _check_scalar_or_gradient(value)
    return value


def _check_model_ref(value: Any) -> Any:
    """A MergeKit ``ModelReference``: ``"path"``, ``"path+lora_path"``, or ``{model, lora}``."""
    if isinstance(value, str):
        if not value.strip():
            raise ValueError("model reference is an empty string")
        if value.count("+") > 1:
            raise ValueError(f"cannot parse model reference {value!r}: use 'model' or 'model+lora'")
        for part in value.split("+"):
            if part.count("@") > 1:
                raise ValueError(f"invalid model path {part!r}: more than one '@'")
        return value
    if isinstance(value, dict):
        unknown = sorted(set(value) - {"model", "lora", "override_architecture"})
        if unknown:
            raise ValueError(f"{unknown[0]}: unknown key in a model reference")
        if "model" not in value:
            raise ValueError("model: missing in a model reference")
        for field in ("model", "lora"):
            entry = value.get(field)
            if entry is None or isinstance(entry, str):
                continue
            if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
                raise ValueError(f"{field}: must be a path string or {{path, revision}}")
        return value
    raise ValueError(f"a model reference must be a path string or a mapping, got {_short(value)}")


def _check_dtype(value: str | None) -> str | None:
    if value is not None and value.removeprefix("torch.") not in DTYPES:
        raise ValueError(f"unknown dtype {value!r}; use one of {', '.join(sorted(DTYPES))}")
    return value


ModelRef = Annotated[Any, AfterValidator(_check_model_ref)]
Setting = Annotated[Any, AfterValidator(_check_setting)]
Parameters = dict[str, Setting]
DType = Annotated[str | None, AfterValidator(_check_dtype)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class InputSlice(_Strict):
    model: ModelRef
    layer_range: tuple[int, int]
    parameters: Parameters | None = None


class InputModel(_Strict):
    model: ModelRef
    parameters: Parameters | None = None


class OutputSlice(_Strict):
    sources: list[InputSlice] = Field(..., min_length=1)
    base_model: ModelRef | None = None
    residual_weight: float | None = None
    parameters: Parameters | None = None


class OutputModule(_Strict):
    slices: list[OutputSlice] | None = None
    models: list[InputModel] | None = None
    parameters: Parameters | None = None

    @model_validator(mode="after")
    def _one_input_form(self) -> OutputModule:
        if bool(self.slices) == bool(self.models):
            raise ValueError("give exactly one of `slices` or `models`")
        return self


class MergeYaml(_Strict):
    """MergeKit 0.1.5's ``MergeConfiguration``, field for field."""

    modules: dict[str, OutputModule] | None = None
    slices: list[OutputSlice] | None = None
    models: list[InputModel] | None = None
    merge_method: str
    base_model: ModelRef | None = None
    dtype: DType = None
    tokenizer_source: ModelRef | None = None
    tokenizer: dict[str, Any] | None = None
    chat_template: str | None = None
    out_dtype: DType = None
    parameters: Parameters | None = None

    @model_validator(mode="after")
    def _one_input_form(self) -> MergeYaml:
        if sum(bool(x) for x in (self.modules, self.slices, self.models)) != 1:
            raise ValueError("give exactly one of `models`, `slices` or `modules`")
        if self.tokenizer_source is not None and self.tokenizer is not None:
            raise ValueError("give `tokenizer_source` or `tokenizer`, not both")
        return self


#: Largest MergeKit YAML file read (real ones are a few KiB).
MAX_YAML_BYTES = 4 * 1024 * 1024


def read_yaml(path: Path) -> tuple[dict[str, Any] | None, list[tuple[str, str]]]:
    """The YAML document as a dict, or ``(None, issues)``; each issue is ``(where, message)``."""
    try:
        text = read_regular_file(path, MAX_YAML_BYTES).decode("utf-8")
    except UnreadableFile as exc:
        return None, [("", f"cannot read '{path}': {exc.reason}")]
    except UnicodeDecodeError as exc:
        return None, [("", f"'{path}' is not UTF-8 text (byte {exc.start})")]
    try:
        data = load_bounded_yaml(text)
    except YamlProblem as exc:
        return None, [("", str(exc))]
    if not isinstance(data, dict):
        return None, [("", f"a MergeKit config must be a YAML mapping, got {type(data).__name__}")]
    return data, []


def check_merge_yaml(path: Path) -> list[tuple[str, str]]:
    """Every problem with the MergeKit YAML at ``path`` as ``(yaml path, message)``, schema and models."""
    data, issues = read_yaml(path)
    if data is None:
        return issues
    try:
        MergeYaml.model_validate(data)
    except ValidationError as exc:
        for err in exc.errors():
            loc = _yaml_path(err.get("loc", ()))
            msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
            if err.get("type") == "extra_forbidden":
                msg = "unknown key (not part of MergeKit's config format)"
            if msg.startswith("[") and loc:  # a nested spot inside a parameter setting
                loc, msg = loc + msg.split(":", 1)[0], msg.split(":", 1)[1].strip()
            issues.append((loc, msg))
    method = data.get("merge_method")
    if isinstance(method, str) and method not in MERGE_METHODS:
        issues.append(
            (
                "merge_method",
                f"unknown merge method {method!r}; MergeKit has {', '.join(sorted(MERGE_METHODS))}",
            )
        )
    if issues:
        return issues
    return _model_issues(data, path.parent)


def resolved_document(path: Path) -> dict[str, Any]:
    """The YAML document with every local model path made absolute (relative to the YAML's dir)."""
    data, issues = read_yaml(path)
    if data is None:
        raise ValueError(issues[0][1])
    base_dir = path.parent
    for _, container, key in _model_refs(data):
        container[key] = _map_ref(container[key], lambda p: str(resolve_model_path(p, base_dir)))
    return data


def resolve_model_path(path: str, base_dir: Path) -> Path:
    expanded = Path(os.path.expanduser(path))
    return expanded if expanded.is_absolute() else (base_dir / expanded).resolve()


def num_layers(model_dir: Path) -> int | None:
    """``num_hidden_layers`` from a model's config.json (or its ``text_config``), if it says."""
    try:
        cfg = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    for section in (cfg, cfg.get("text_config") or {}):
        n = section.get("num_hidden_layers") if isinstance(section, dict) else None
        if isinstance(n, int):
            return n
    return None


def _model_issues(data: dict[str, Any], base_dir: Path) -> list[tuple[str, str]]:
    issues: list[tuple[str, str]] = []
    layers: dict[str, int | None] = {}
    for where, container, key in _model_refs(data):
        model, lora = _ref_paths(container[key])
        path = resolve_model_path(model, base_dir)
        if not (path / "config.json").is_file():
            what = "has no config.json" if path.is_dir() else "does not exist"
            issues.append(
                (
                    where,
                    f"model '{model}' not found: '{path}' {what} (relative paths resolve against the "
                    "YAML file's directory; this worker has no model hub access)",
                )
            )
        else:
            layers[where] = num_layers(path)
        if lora is not None:
            lpath = resolve_model_path(lora, base_dir)
            if not (lpath / "adapter_config.json").is_file():
                issues.append((where, f"LoRA '{lora}' not found: '{lpath}' has no adapter_config.json"))
    for prefix, slices in _slice_lists(data):
        for i, sl in enumerate(slices):
            lengths = set()
            for j, src in enumerate(sl.get("sources") or []):
                start, end = src["layer_range"]
                where = f"{prefix}slices[{i}].sources[{j}].layer_range"
                n = layers.get(f"{prefix}slices[{i}].sources[{j}].model")
                if not 0 <= start < end:
                    issues.append(
                        (where, f"[{start}, {end}] is empty or negative; write [start, end) with start < end")
                    )
                elif n is not None and end > n:
                    issues.append((where, f"[{start}, {end}] goes past the model's {n} layers"))
                lengths.add(end - start)
            if len(lengths) > 1:
                issues.append(
                    (
                        f"{prefix}slices[{i}].sources",
                        f"sources cover different numbers of layers {sorted(lengths)}",
                    )
                )
    return issues


def model_references(path: Path) -> list[tuple[str, str, Path]]:
    """``(yaml path, reference as written, resolved local path)`` of every model and LoRA the YAML
    at ``path`` names; empty when it cannot be read or is not schema-valid (its checks say why)."""
    data, problems = read_yaml(path)
    if data is None or problems:
        return []
    out: list[tuple[str, str, Path]] = []
    try:
        for where, container, key in _model_refs(data):
            for ref in _ref_paths(container[key]):
                if ref is not None:
                    out.append((where, ref, resolve_model_path(ref, path.parent)))
    except (AttributeError, KeyError, TypeError):
        return []
    return out


def merge_inputs(path: Path) -> list[tuple[str, Path]]:
    """``(field, path)`` of everything a MergeKit merge reads: the YAML and each model it names."""
    refs = [(f"yaml_config_path: {where}", local) for where, _, local in model_references(path)]
    return [("yaml_config_path", path), *refs]


def _slice_lists(data: dict[str, Any]) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    if data.get("slices"):
        yield "", data["slices"]
    for name, module in (data.get("modules") or {}).items():
        if module.get("slices"):
            yield f"modules.{name}.", module["slices"]


def _model_refs(data: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any], str]]:
    """``(yaml path, container, key)`` of every model reference in a schema-valid document."""
    for key in ("base_model", "tokenizer_source"):
        if data.get(key) is not None and data[key] not in ("union", "base"):
            yield key, data, key
    tok = data.get("tokenizer") or {}
    if isinstance(tok.get("source"), (str, dict)) and tok["source"] not in ("union", "base"):
        yield "tokenizer.source", tok, "source"
    sections = [("", data)] + [(f"modules.{n}.", m) for n, m in (data.get("modules") or {}).items()]
    for prefix, section in sections:
        for i, entry in enumerate(section.get("models") or []):
            yield f"{prefix}models[{i}].model", entry, "model"
        for i, sl in enumerate(section.get("slices") or []):
            if sl.get("base_model") is not None:
                yield f"{prefix}slices[{i}].base_model", sl, "base_model"
            for j, src in enumerate(sl.get("sources") or []):
                yield f"{prefix}slices[{i}].sources[{j}].model", src, "model"


def _ref_paths(ref: Any) -> tuple[str, str | None]:
    """(model path, lora path or None) of a model reference, revisions dropped."""
    if isinstance(ref, str):
        parts = ref.split("+")
        return parts[0].split("@")[0], (parts[1].split("@")[0] if len(parts) > 1 else None)
    model, lora = ref["model"], ref.get("lora")
    model = model if isinstance(model, str) else model["path"]
    lora = lora if lora is None or isinstance(lora, str) else lora["path"]
    return model.split("@")[0], (lora.split("@")[0] if lora else None)


def _map_ref(ref: Any, fn: Callable[[str], str]) -> Any:
    def one(p: Any) -> Any:
        if isinstance(p, dict):
            return {**p, "path": fn(p["path"])}
        path, at, rev = p.partition("@")
        return fn(path) + at + rev

    if isinstance(ref, str):
        return "+".join(one(p) for p in ref.split("+"))
    out = dict(ref)
    out["model"] = one(ref["model"])
    if ref.get("lora") is not None:
        out["lora"] = one(ref["lora"])
    return out


def _yaml_path(loc: Any) -> str:
    parts: list[str] = []
    for item in loc:
        parts.append(f"[{item}]" if isinstance(item, int) else ("." if parts else "") + str(item))
    return "".join(parts)


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
