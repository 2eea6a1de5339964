"""Does this adapter fit this base? Checked before merging, so a refusal names what differs.

peft's own failures on a wrong base are a ``size mismatch for base_model.model...lora_A`` trace or
a list of target modules it could not find; the user needs "the adapter was trained on a model
with hidden size 256, this base has 128". The checks read the adapter's config and safetensors
header and compare them with the loaded base model, without applying anything.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path
from typing import Any

from finetune_worker.errors import JobFailed

#: Config fields whose difference means "another model", named in refusals.
_DIMENSIONS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "vocab_size")  # fmt: skip

#: peft adapter kinds that have weights to fold into the base.
MERGEABLE = frozenset({"LORA", "ADALORA", "LOHA", "LOKR", "IA3", "OFT", "BOFT", "VERA", "FOURIERFT", "HRA"})

_LORA_KEY = re.compile(
    r"^(?P<module>.+)\.(?P<part>lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)"
    r"(?:\.weight)?$"
)
_PREFIX = "base_model.model."
_WRAPPERS = re.compile(r"\.(?:base_layer|modules_to_save|original_module)(?=\.)")
_HINT = "Merge the adapter into the model it was trained on (the base_model_path of its training run)."


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def mismatch(message: str, **details: Any) -> JobFailed:
    return JobFailed("adapter_mismatch", message, hint=_HINT, details=details)


def check_config(adapter_cfg: dict[str, Any], base_cfg: dict[str, Any], base_dir: Path) -> list[str]:
    """Compare what the adapter records about its base with ``base_dir``; return warnings, raise on mismatch."""
    warnings: list[str] = []
    peft_type = str(adapter_cfg.get("peft_type", "")).upper()
    if peft_type not in MERGEABLE:
        raise mismatch(
            f"adapter type {peft_type or '(none)'} has no weights to merge into a base model "
            f"(mergeable: {', '.join(sorted(MERGEABLE))})",
            peft_type=peft_type,
        )
    base_arch = (base_cfg.get("architectures") or [None])[0]
    trained_arch = (adapter_cfg.get("auto_mapping") or {}).get("base_model_class")
    if trained_arch and base_arch and trained_arch != base_arch:
        raise mismatch(
            f"architecture differs: the adapter was trained on a {trained_arch}, the base is a {base_arch}",
            adapter=trained_arch,
            base=base_arch,
        )
    recorded = adapter_cfg.get("base_model_name_or_path")
    if not recorded:
        return ["the adapter does not record its base model; checking tensor shapes only"]
    recorded_dir = Path(str(recorded)).expanduser()
    if recorded_dir.resolve() == base_dir.resolve():
        return warnings
    recorded_cfg = read_json(recorded_dir / "config.json") if recorded_dir.is_dir() else {}
    if not recorded_cfg:
        return [
            f"the adapter was trained on '{recorded}', which is not here to compare; checking tensor shapes"
        ]
    if recorded_cfg.get("model_type") != base_cfg.get("model_type"):
        raise mismatch(
            f"model type differs: the adapter's base '{recorded}' is {recorded_cfg.get('model_type')!r}, "
            f"base_model_path is {base_cfg.get('model_type')!r}",
        )
    differs = [
        f"{k} {recorded_cfg.get(k)} vs {base_cfg.get(k)}"
        for k in _DIMENSIONS
        if k in recorded_cfg and recorded_cfg.get(k) != base_cfg.get(k)
    ]
    if differs:
        raise mismatch(
            f"the adapter was trained on '{recorded}', a different model than base_model_path: "
            + ", ".join(differs)
            + " (adapter's base vs base_model_path)",
        )
    warnings.append(
        f"the adapter records base '{recorded}'; merging into '{base_dir}', which has the same shape"
    )
    return warnings


def adapter_shapes(adapter_dir: Path) -> dict[str, list[int]]:
    """Tensor name -> shape from ``adapter_model.safetensors``'s header ({} if there is none)."""
    file = adapter_dir / "adapter_model.safetensors"
    try:
        with file.open("rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
    except (OSError, ValueError, struct.error):
        return {}
    return {k: list(v["shape"]) for k, v in header.items() if k != "__metadata__"}


def check_shapes(
    model: Any, shapes: dict[str, list[int]], adapter_cfg: dict[str, Any], base_cfg: dict[str, Any]
) -> None:
    """Every adapter tensor must land on a base module of the right size; raise naming the first that does not."""
    vocab = base_cfg.get("vocab_size")
    for key, shape in sorted(shapes.items()):
        # peft saves whole embeddings/heads (save_embedding_layers, modules_to_save) under wrapper names
        name = _WRAPPERS.sub("", key.removeprefix(_PREFIX))
        m = _LORA_KEY.match(name)
        module_name = m.group("module") if m else name.rsplit(".", 1)[0]
        module = _submodule(model, module_name)
        if module is None:
            layers = base_cfg.get("num_hidden_layers")
            raise mismatch(
                f"target module '{module_name}' of the adapter is not in the base model"
                + (f" (the base has {layers} layers)" if layers else ""),
                module=module_name,
            )
        if m is None:  # a full tensor saved with modules_to_save (embeddings, lm_head)
            param = getattr(module, name.rsplit(".", 1)[1], None)
            if param is not None and list(param.shape) != shape:
                raise _size_mismatch(module_name, name, shape, list(param.shape), vocab)
            continue
        part = m.group("part")
        features = _io_features(module)
        if features is None:
            continue
        expected_in, expected_out = features
        rank = _configured_rank(adapter_cfg, module_name)
        if part == "lora_A":
            got_rank, got_in = shape[0], shape[-1]
            if got_in != expected_in:
                raise _size_mismatch(module_name, "input features", [got_in], [expected_in], vocab)
        elif part == "lora_B":
            got_rank, got_out = shape[-1], shape[0]
            if got_out != expected_out:
                raise _size_mismatch(module_name, "output features", [got_out], [expected_out], vocab)
        elif part == "lora_embedding_A":
            got_rank, got_in = shape[0], shape[1]
            if got_in != expected_in:
                raise _size_mismatch(module_name, "vocabulary rows", [got_in], [expected_in], vocab)
        elif part == "lora_embedding_B":
            got_rank, got_out = shape[1], shape[0]
            if got_out != expected_out:
                raise _size_mismatch(module_name, "embedding width", [got_out], [expected_out], vocab)
        else:
            continue
        if rank is not None and got_rank != rank:
            raise mismatch(
                f"rank differs at '{module_name}': adapter_config.json says r={rank}, its {part} has rank "
                f"{got_rank} (the adapter files do not belong together)",
                module=module_name,
            )


def tokenizer_size(adapter_dir: Path) -> int | None:
    """Token ids a tokenizer saved with the adapter can produce (highest id + 1), if it saved one."""
    tok_file = adapter_dir / "tokenizer.json"
    if not tok_file.is_file():
        return None
    data = read_json(tok_file)
    vocab = (data.get("model") or {}).get("vocab") or {}
    ids = list(vocab.values()) if isinstance(vocab, dict) else list(range(len(vocab)))
    ids += [t.get("id", -1) for t in data.get("added_tokens") or []]
    return max(ids, default=-1) + 1


def resized_vocab(adapter_dir: Path, base_rows: int, shapes: dict[str, list[int]]) -> int | None:
    """Rows to resize the base's embeddings to, when the adapter comes from a vocabulary-extending run.

    That run resized the embeddings before training and saved them whole (``save_embedding_layers``)
    next to a tokenizer of the new size; peft then needs the base resized the same way first. Larger
    embeddings *without* a matching tokenizer are another model's, which :func:`check_shapes` refuses.
    """
    rows = {s[0] for k, s in shapes.items() if k.endswith(("embed_tokens.weight", "lm_head.weight"))}
    tokens = tokenizer_size(adapter_dir)
    if tokens is None or len(rows) != 1:
        return None
    (saved,) = rows
    return saved if saved > base_rows and tokens <= saved and tokens > base_rows else None


def check_vocab(adapter_dir: Path, base_rows: int) -> None:
    """A tokenizer saved with the adapter must fit the base's embedding (after any resize)."""
    needed = tokenizer_size(adapter_dir)
    if needed is not None and needed > base_rows:
        raise mismatch(
            f"vocabulary size differs: the adapter's tokenizer has {needed} tokens, the base's embedding "
            f"{base_rows} rows",
            adapter_vocab=needed,
            base_vocab=base_rows,
        )


def _size_mismatch(module: str, what: str, got: list[int], want: list[int], vocab: Any) -> JobFailed:
    is_vocab = vocab is not None and vocab in want and ("embed" in module or "lm_head" in module)
    label = "vocabulary size differs" if is_vocab else "shape differs"
    return mismatch(
        f"{label} at '{module}': the adapter's {what} {got} vs the base's {want}",
        module=module,
        adapter=got,
        base=want,
    )


def _submodule(model: Any, name: str) -> Any:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def _io_features(module: Any) -> tuple[int, int] | None:
    if hasattr(module, "in_features") and hasattr(module, "out_features"):
        return int(module.in_features), int(module.out_features)
    if hasattr(module, "num_embeddings"):
        return int(module.num_embeddings), int(module.embedding_dim)
    return None


def _configured_rank(adapter_cfg: dict[str, Any], module_name: str) -> int | None:
    if str(adapter_cfg.get("peft_type", "")).upper() != "LORA":
        return None  # AdaLoRA and friends prune ranks per module
    for pattern, r in (adapter_cfg.get("rank_pattern") or {}).items():
        if re.search(rf"(^|\.){pattern}$", module_name) or pattern == module_name:
            return int(r)
    r = adapter_cfg.get("r")
    return int(r) if isinstance(r, int) else None
