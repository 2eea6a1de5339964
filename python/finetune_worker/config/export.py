"""The ``export`` job config: a model (or a training run's adapter, merged first) to ONNX and GGUF.

Everything checked here reads JSON files only (config.json, adapter_config.json, tokenizer.json):
nothing imports torch, onnx, gguf or llama.cpp, so ``submit`` answers at once. What can only be
known once the model is loaded (a graph torch cannot trace, logits that differ) fails the job.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from finetune_worker.config.base import StrictModel
from finetune_worker.errors import ConfigIssue
from finetune_worker.kinds import JobKind
from finetune_worker.outputs import destination_issue

Format = Literal["onnx", "gguf"]
GgufType = Literal["f32", "f16", "q8_0"]
ALL_FORMATS: tuple[Format, ...] = ("onnx", "gguf")


@dataclass(frozen=True)
class GgufArchitecture:
    """How the GGUF writer lays out one transformers architecture, as llama.cpp reads it.

    Read in llama.cpp's converter and model code (vendored by llama-cpp-python 0.3.36) and verified
    against llama.cpp on tiny random models of each architecture by the tests.
    """

    #: llama.cpp's architecture (``general.architecture``, the prefix of the hyperparameter keys).
    arch: str
    #: llama.cpp rotates *adjacent pairs* for this architecture (its RoPE type "norm") where
    #: transformers rotates the two halves of each head: the q/k rows (and biases) are reordered.
    #: False where llama.cpp rotates halves too (RoPE type "neox", Qwen2).
    pair_rope: bool
    #: The ``rope_type`` values it reproduces: ``llama3`` needs llama.cpp's ``rope_freqs`` tensor,
    #: which only some of llama.cpp's graphs read.
    rope_types: tuple[str, ...]
    #: llama.cpp's graph assumes ``heads * head_dim == hidden_size`` (its attention output is square).
    square_attention: bool = False


#: transformers architectures the GGUF writer handles. Anything else is refused at validate time.
GGUF_ARCHITECTURES: dict[str, GgufArchitecture] = {
    "LlamaForCausalLM": GgufArchitecture("llama", pair_rope=True, rope_types=("default", "linear", "llama3")),
    # llama.cpp's converter writes Mistral as its "llama" architecture (no sliding window there).
    "MistralForCausalLM": GgufArchitecture(
        "llama", pair_rope=True, rope_types=("default", "linear", "llama3")
    ),
    "Qwen2ForCausalLM": GgufArchitecture(
        "qwen2", pair_rope=False, rope_types=("default", "linear"), square_attention=True
    ),
}

#: The largest absolute logit difference accepted by default, per format and tensor type. Measured
#: on the tiny model (docs/configs.md, "Export"): fp32 runtimes agree to ~1e-5, f16 weights to ~1e-2,
#: q8_0 to ~0.1; a wrong export (q/k layout, a corrupt tensor) is off by whole units.
DEFAULT_TOLERANCE: dict[str, float] = {"onnx": 1e-3, "f32": 1e-3, "f16": 5e-2, "q8_0": 0.5}
#: The smallest share of positions whose most likely next token must agree, by default: a lossy type
#: may flip near-ties (q8_0 agreed at 34 of 36 positions of the tiny model); a broken export agrees at
#: about one in four.
DEFAULT_MIN_TOP1: dict[str, float] = {"onnx": 0.95, "f32": 0.95, "f16": 0.9, "q8_0": 0.8}

DEFAULT_PROMPTS = (
    "The quick brown fox jumps over the lazy dog.",
    "Question: what is the capital of France?\nAnswer:",
)


class ExportConfig(StrictModel):
    """Export a model to ONNX and/or GGUF and check each result against the PyTorch model."""

    job: Literal["export"] = Field("export", description="Job kind.")
    model_path: str = Field(
        ...,
        description="Local model directory, or a training run's output_dir holding a peft adapter "
        "(then merged onto the base its adapter_config.json names, before exporting).",
    )
    adapter_path: str | None = Field(
        None, description="peft adapter directory merged onto model_path before exporting."
    )
    output_dir: str = Field(
        ...,
        description="Directory the exports are written to (model.onnx with config and tokenizer under "
        "onnx/, model-<gguf_type>.gguf); it appears only once every format is written and verified.",
    )
    formats: list[Format] = Field(
        default_factory=lambda: list(ALL_FORMATS),
        min_length=1,
        description='Formats to write: "onnx" (torch.onnx, logits for input_ids + attention_mask, dynamic '
        'batch and sequence axes, no KV cache) and "gguf" (llama.cpp; Llama, Mistral and Qwen2 models).',
    )
    gguf_type: GgufType = Field(
        "f16",
        description="Type of the GGUF's matrices: f32, f16 or q8_0 (8-bit blocks); norms stay f32.",
    )
    onnx_opset: int = Field(18, ge=18, le=23, description="ONNX opset the graph is exported with.")
    verify: bool = Field(
        True,
        description="Load each export back (onnxruntime; llama-cpp-python for GGUF) and compare its "
        "logits with the PyTorch model's on verify_prompts; false skips it (not recommended).",
    )
    verify_prompts: list[str] = Field(
        default_factory=lambda: list(DEFAULT_PROMPTS),
        min_length=1,
        max_length=16,
        description="Texts whose next-token logits are compared at every position (1 to 16).",
    )
    tolerance: float | None = Field(
        None,
        gt=0,
        description="Largest absolute logit difference accepted; null takes the default of each format "
        "and type (onnx 1e-3, gguf f32 1e-3, f16 5e-2, q8_0 0.5).",
    )
    min_top1_agreement: float | None = Field(
        None,
        ge=0,
        le=1,
        description="Smallest share of positions whose most likely next token must be the same as the "
        "PyTorch model's; null takes the default of each format and type (onnx and gguf f32 0.95, f16 0.9, "
        "q8_0 0.8).",
    )
    overwrite: bool = Field(
        False, description="Replace a non-empty output_dir (only once the new exports are complete)."
    )

    @field_validator("formats")
    @classmethod
    def _once_each(cls, formats: list[Format]) -> list[Format]:
        if len(set(formats)) != len(formats):
            raise ValueError("names a format twice")
        return formats

    @field_validator("verify_prompts")
    @classmethod
    def _not_blank(cls, prompts: list[str]) -> list[str]:
        for i, prompt in enumerate(prompts):
            if not prompt.strip():
                raise ValueError(f"prompt {i} is empty; every prompt needs some text to compare logits on")
        return prompts

    def tolerance_for(self, fmt: str) -> float:
        """The logit tolerance of ``fmt`` (``"onnx"`` or ``"gguf"``) as configured or by default."""
        if self.tolerance is not None:
            return self.tolerance
        return DEFAULT_TOLERANCE["onnx" if fmt == "onnx" else self.gguf_type]

    def min_top1_for(self, fmt: str) -> float:
        """The top-1 agreement ``fmt`` must reach, as configured or by default."""
        if self.min_top1_agreement is not None:
            return self.min_top1_agreement
        return DEFAULT_MIN_TOP1["onnx" if fmt == "onnx" else self.gguf_type]

    def model_dirs(self) -> tuple[Path, Path | None]:
        """(base model directory, adapter directory or None), as the job will load them."""
        model = self.resolved(self.model_path)
        if self.adapter_path is not None:
            return model, self.resolved(self.adapter_path)
        if not (model / "config.json").is_file() and (model / "adapter_config.json").is_file():
            base = _read_json(model / "adapter_config.json").get("base_model_name_or_path")
            return (self.resolved(str(base)) if base else model), model
        return model, None

    def inputs(self) -> list[tuple[str, Path]]:
        """The folders the job reads, named as the config names them (outputs may not touch them)."""
        base, adapter = self.model_dirs()
        if adapter is None:
            return [("model_path", base)]
        if self.adapter_path is None:  # model_path is a training run's adapter
            return [("model_path", adapter), ("model_path's base model", base)]
        return [("model_path", base), ("adapter_path", adapter)]

    def environment_issues(self) -> list[ConfigIssue]:
        from finetune_worker.extras import EXTRAS, installed

        issues: list[ConfigIssue] = []
        # One problem per extra to install, naming all its missing packages.
        by_extra: dict[str, list[str]] = {}
        for module in _needed_modules(self.formats, self.verify):
            if not installed(module):
                by_extra.setdefault(EXTRAS[module][0], []).append(module)
        for extra, modules in by_extra.items():
            message = f"this export needs {', '.join(modules)}, not installed: pip install 'finetune-worker[{extra}]'"
            if all(m in _VERIFIERS for m in modules):
                message += ' (or set "verify": false to skip loading the export back)'
            issues.append(ConfigIssue("job", message))
        model_issues = self._model_issues()
        issues += model_issues
        if "gguf" in self.formats and not model_issues:
            issues += [ConfigIssue("formats", m) for m in gguf_support_issues(*self.model_dirs())]
        return issues + self._output_issues(self.inputs())

    def _model_issues(self) -> list[ConfigIssue]:
        model = self.resolved(self.model_path)
        if not model.is_dir():
            return [
                ConfigIssue(
                    "model_path",
                    f"no local model at '{self.model_path}'; this worker loads models from local paths "
                    "(no hub access)",
                )
            ]
        has_model = (model / "config.json").is_file()
        if not has_model and not (model / "adapter_config.json").is_file():
            return [
                ConfigIssue(
                    "model_path",
                    f"'{self.model_path}' holds neither a model (config.json) nor an adapter "
                    "(adapter_config.json)",
                )
            ]
        if self.adapter_path is not None:
            adapter = self.resolved(self.adapter_path)
            if not has_model:
                return [
                    ConfigIssue(
                        "adapter_path",
                        f"model_path '{self.model_path}' is itself an adapter; point model_path at its base "
                        "model, or drop adapter_path",
                    )
                ]
            if not (adapter / "adapter_config.json").is_file():
                return [
                    ConfigIssue(
                        "adapter_path",
                        f"no peft adapter (adapter_config.json) at '{self.adapter_path}'",
                    )
                ]
        base, _ = self.model_dirs()
        if not (base / "config.json").is_file():
            return [
                ConfigIssue(
                    "model_path",
                    f"'{self.model_path}' is an adapter whose base model '{base}' is not a local model "
                    "directory; set model_path to the base and adapter_path to the adapter",
                )
            ]
        return []

    def _output_issues(self, inputs: list[tuple[str, Path]]) -> list[ConfigIssue]:
        out = self.resolved(self.output_dir)
        if out.exists() and not out.is_dir():
            return [ConfigIssue("output_dir", "exists and is not a directory", self.output_dir)]
        problem = destination_issue(out, inputs)
        if problem is not None:
            return [ConfigIssue("output_dir", problem, self.output_dir)]
        if out.is_dir() and any(out.iterdir()) and not self.overwrite:
            return [
                ConfigIssue(
                    "output_dir",
                    'is a non-empty directory; choose a new path or set "overwrite": true to replace it',
                    self.output_dir,
                )
            ]
        parent = next((p for p in out.parents if p.exists()), None)
        if parent is not None and not (parent.is_dir() and os.access(parent, os.W_OK | os.X_OK)):
            return [ConfigIssue("output_dir", f"'{parent}' is not a writable directory", self.output_dir)]
        return []


_VERIFIERS = frozenset({"onnxruntime", "llama_cpp"})


def _needed_modules(formats: Sequence[str], verify: bool) -> list[str]:
    needed = []
    if "onnx" in formats:
        needed += ["onnx", "onnxscript"] + (["onnxruntime"] if verify else [])
    if "gguf" in formats:
        needed += ["gguf"] + (["llama_cpp"] if verify else [])
    return needed


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def tokenizer_dir(base: Path, adapter: Path | None) -> Path:
    """Where the exported tokenizer comes from: the adapter's folder when training saved one there."""
    if adapter is not None and (adapter / "tokenizer.json").is_file():
        return adapter
    return base


def gguf_support_issues(base: Path, adapter: Path | None) -> list[str]:
    """Why this model cannot be written as GGUF here (architecture, RoPE, attention, tokenizer), or []."""
    config = _read_json(base / "config.json")
    problems = [f"gguf: {m}" for m in gguf_config_issues(config)]
    if (config.get("architectures") or [None])[0] not in GGUF_ARCHITECTURES:
        return problems  # another architecture: that says it all
    return problems + [f"gguf: {m}" for m in tokenizer_issues(tokenizer_dir(base, adapter))]


def gguf_config_issues(config: dict[str, Any]) -> list[str]:
    """Why a model of this ``config.json`` (or ``config.to_dict()``) has no GGUF form here, or []."""
    arch_name = (config.get("architectures") or ["(none)"])[0]
    arch = GGUF_ARCHITECTURES.get(arch_name)
    if arch is None:
        return [
            f"the model is a {arch_name}; the GGUF export supports {', '.join(sorted(GGUF_ARCHITECTURES))} "
            'only (no mixture-of-experts models). Drop "gguf" from formats, or convert with llama.cpp\'s '
            "convert_hf_to_gguf.py"
        ]
    problems = []
    rope_type, rope = rope_settings(config)
    if rope_type not in arch.rope_types:
        problems.append(
            f"RoPE type {rope_type!r} (rope_parameters) is not supported for {arch_name} by this exporter "
            f"({', '.join(arch.rope_types)} only)"
        )
    if rope.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0)) != 1.0:
        problems.append("a partial_rotary_factor other than 1 is not supported by this exporter")
    if config.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act {config.get('hidden_act')!r}: llama.cpp's {arch.arch} graph uses silu")
    window = sliding_window(config)
    if window is not None:
        problems.append(
            f"the model attends through a sliding window of {window} tokens, shorter than its "
            f"{config.get('max_position_embeddings')} positions; llama.cpp's {arch.arch} architecture attends "
            "to the whole context, so longer texts would not match"
        )
    if any(config.get(key) for key in ("num_local_experts", "num_experts")):
        problems.append("mixture-of-experts models are not supported by this exporter")
    if arch.square_attention:
        heads = int(config.get("num_attention_heads") or 0)
        head_dim = config.get("head_dim")
        if head_dim and heads and int(head_dim) * heads != config.get("hidden_size"):
            problems.append(
                f"head_dim {head_dim} x {heads} heads is not hidden_size {config.get('hidden_size')}, "
                f"which llama.cpp's {arch.arch} graph assumes"
            )
    if config.get("quantization_config"):
        problems.append(
            "the model is a quantized checkpoint (quantization_config); export an unquantized one"
        )
    return problems


def rope_settings(config: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(rope_type, its parameters) of a config dict, old (``rope_scaling``) or new (``rope_parameters``)."""
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if isinstance(rope.get("full_attention"), dict):  # per layer type (the sliding ones are refused)
        rope = rope["full_attention"]
    return str(rope.get("rope_type") or rope.get("type") or "default"), rope


def sliding_window(config: dict[str, Any]) -> int | None:
    """The window of layers that attend to fewer tokens than the model's context, or None."""
    window = config.get("sliding_window")
    context = config.get("max_position_embeddings")
    if not window or (context and int(window) >= int(context)):
        return None
    layer_types = config.get("layer_types")
    if layer_types is not None:
        return int(window) if "sliding_attention" in layer_types else None
    if config.get("model_type") == "qwen2" or "use_sliding_window" in config:
        # Qwen2 (before layer_types): layers from max_window_layers on, only with use_sliding_window
        layers = int(config.get("num_hidden_layers") or 0)
        if not config.get("use_sliding_window") or int(config.get("max_window_layers", layers)) >= layers:
            return None
    return int(window)


def tokenizer_issues(folder: Path) -> list[str]:
    """Why the tokenizer in ``folder`` has no GGUF form here ([] when :func:`gguf_pre_tokenizer` knows it)."""
    try:
        gguf_pre_tokenizer(_read_json(folder / "tokenizer.json"))
    except ValueError as exc:
        return [f"the tokenizer in '{folder}' {exc}"]
    return []


#: The pre-tokenizer regexes of the byte-level BPE tokenizers llama.cpp knows by name, as
#: tokenizer.json holds them (a ``Split`` before a regex-less ``ByteLevel``), with whether llama.cpp
#: looks a whole pre-token up in the vocabulary before merging (``ignore_merges``) under that name.
#: The regexes are those llama.cpp quotes from the tokenizer.json files (src/llama-vocab.cpp).
_SPLIT_PRE_TOKENIZERS: dict[str, tuple[str, bool]] = {
    # Llama 3 and 3.x: numbers split into groups of up to three digits
    "llama-bpe": (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
        r"|\s*[\r\n]+|\s+(?!\S)|\s+",
        True,
    ),
    # Qwen2 and Qwen2.5: one digit per pre-token
    "qwen2": (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
        r"|\s*[\r\n]+|\s+(?!\S)|\s+",
        False,
    ),
}


def gguf_pre_tokenizer(tokenizer_json: dict[str, Any]) -> str:
    """llama.cpp's name (``tokenizer.ggml.pre``) for a byte-level BPE tokenizer.json's pre-tokenizer.

    Recognised: GPT-2's own (``ByteLevel`` with its regex: llama.cpp's ``gpt-2``), and a ``Split`` on
    Llama 3's regex (``llama-bpe``) or Qwen2's (``qwen2``) followed by a regex-less ``ByteLevel``.
    The only normalizer accepted is NFC (Qwen2's), which llama.cpp does not apply: text already in
    NFC, as most text is, tokenizes the same. SentencePiece-style tokenizers (BPE with byte fallback:
    Llama 2, Mistral 7B) are refused. The job checks that llama.cpp tokenizes the verify prompts as
    transformers does.
    """
    if not tokenizer_json:
        raise ValueError("has no tokenizer.json (a byte-level BPE tokenizer is needed for GGUF)")
    model = tokenizer_json.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        kind = "SentencePiece-style BPE (byte fallback)" if model.get("byte_fallback") else model.get("type")
        raise ValueError(
            f"is a {kind} tokenizer; the GGUF export supports byte-level BPE (GPT-2 style: Llama 3, Qwen2) "
            "tokenizers only"
        )
    if (tokenizer_json.get("decoder") or {}).get("type") != "ByteLevel":
        raise ValueError(
            "does not decode byte-level; the GGUF export supports byte-level BPE tokenizers only"
        )
    normalizer = tokenizer_json.get("normalizer")
    if normalizer and normalizer.get("type") != "NFC":
        raise ValueError(
            f"has a {normalizer.get('type')} normalizer, which llama.cpp's BPE tokenizer does not apply"
        )
    pre = tokenizer_json.get("pre_tokenizer") or {}
    name, ignore_merges = _pre_tokenizer_name(pre)
    if bool(model.get("ignore_merges")) != ignore_merges:
        raise ValueError(
            f"has ignore_merges {bool(model.get('ignore_merges'))} where llama.cpp's {name!r} pre-tokenizer "
            f"has {ignore_merges}"
        )
    return name


def _pre_tokenizer_name(pre: dict[str, Any]) -> tuple[str, bool]:
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space"):
        return "gpt-2", False
    steps = pre.get("pretokenizers") or []
    if pre.get("type") == "Sequence" and len(steps) == 2:
        split, byte_level = steps
        regex = (split.get("pattern") or {}).get("Regex")
        if (
            split.get("type") == "Split"
            and split.get("behavior") == "Isolated"
            and not split.get("invert")
            and byte_level.get("type") == "ByteLevel"
            and not byte_level.get("use_regex", True)
            and not byte_level.get("add_prefix_space")
        ):
            for name, (known, ignore_merges) in _SPLIT_PRE_TOKENIZERS.items():
                if regex == known:
                    return name, ignore_merges
    kinds = "+".join(str(s.get("type")) for s in steps) if steps else pre.get("type")
    raise ValueError(
        f"has a pre-tokenizer ({kinds}) this exporter cannot name for llama.cpp (GPT-2's, Llama 3's and "
        "Qwen2's only)"
    )


KINDS = (JobKind("export", ExportConfig, run="finetune_worker.export.job:run", order=90),)
