"""Write a transformers causal LM as one GGUF file, with the ``gguf`` package's writer.

llama.cpp's own converter (``convert_hf_to_gguf.py``) ships with llama.cpp's sources and in no
installable package, so the file is built here from the pieces ``gguf`` does offer: its writer,
its tensor-name maps, its quantizers (f16, q8_0) and its ``SpecialVocab`` (BPE merges, special
token ids, the chat template). What this module adds is what the converter would have decided for
the architectures of :data:`~finetune_worker.config.export.GGUF_ARCHITECTURES` (read in llama.cpp's
converter and model code vendored by llama-cpp-python 0.3.36; the job's verification fails a file
where any of it is wrong):

- the llama.cpp architecture (``llama`` for Llama and Mistral, ``qwen2`` for Qwen2) and the
  hyperparameters it reads (``<arch>.*`` keys), linear RoPE scaling among them;
- the q/k row order: transformers rotates the two *halves* of each head's vector
  (``rotate_half``); llama.cpp's ``llama`` architecture rotates *adjacent pairs* (its RoPE type
  "norm"), so there the rows of ``q_proj`` and ``k_proj`` (and their biases) are reordered per head
  (row ``i`` of the first half goes to ``2i``, row ``i`` of the second half to ``2i + 1``).
  llama.cpp's ``qwen2`` rotates halves (RoPE type "neox"), as transformers does: no reordering;
- biases (Qwen2's q/k/v, a Llama's ``attention_bias``/``mlp_bias``), under llama.cpp's names;
- Llama 3's RoPE scaling (``rope_type: llama3``): llama.cpp divides each RoPE frequency by the
  matching value of a ``rope_freqs`` tensor, which is taken here from the loaded model itself
  (default RoPE's inverse frequencies over the model's);
- the token list and types of a byte-level BPE tokenizer (``tokenizer.ggml.model = gpt2``) and
  llama.cpp's name for its pre-tokenizer.

Tensors are converted and written one at a time (header and tensor index first), so the peak
memory is the model plus one tensor, and a progress callback and a cancel check run between them.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from finetune_worker.config.export import (
    GGUF_ARCHITECTURES,
    GgufArchitecture,
    gguf_config_issues,
    gguf_pre_tokenizer,
    rope_settings,
)
from finetune_worker.errors import JobFailed

#: Matrices of these types are written as asked; 1-D tensors (norms) always stay f32.
_FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "q8_0": "MOSTLY_Q8_0"}
_TENSOR_TYPES = {"f32": "F32", "f16": "F16", "q8_0": "Q8_0"}

#: ``(done, total)`` after each tensor written.
Progress = Callable[[int, int], None]


def ggml_rope_order(weight: np.ndarray, heads: int) -> np.ndarray:
    """``weight``'s rows (per head: first half, second half) interleaved (pairs), for llama.cpp.

    A head of size ``d`` holds rows ``[x_0 .. x_{d/2-1}, y_0 .. y_{d/2-1}]``; transformers rotates
    ``(x_i, y_i)``, llama.cpp rotates rows ``(2i, 2i+1)``, so the result is ``[x_0, y_0, x_1, y_1, ...]``.
    """
    rows = weight.shape[0]
    if rows % (2 * heads):
        raise ValueError(f"{rows} rows do not split into {heads} heads of an even size")
    per_half = rows // heads // 2
    reordered: np.ndarray = weight.reshape(heads, 2, per_half, *weight.shape[1:]).swapaxes(1, 2)
    return reordered.reshape(weight.shape)


def gguf_file_name(gguf_type: str) -> str:
    return f"model-{gguf_type}.gguf"


def write_gguf(
    model: Any,
    tokenizer: Any,
    tokenizer_files: Path,
    dest: Path,
    gguf_type: str,
    *,
    name: str,
    progress: Progress,
    check_cancelled: Callable[[], None],
) -> dict[str, Any]:
    """Write ``model`` (one of :data:`GGUF_ARCHITECTURES`, in memory) and ``tokenizer`` to ``dest``.

    ``tokenizer_files`` is a folder holding the saved tokenizer and config (``SpecialVocab`` reads
    merges, special ids and the chat template there). Returns ``{"tensors": n, "tensor_types":
    {type: count}}``.
    """
    import gguf

    arch = _architecture(model)
    config = model.config
    rope = rope_layout(model, arch)
    writer = gguf.GGUFWriter(str(dest), arch.arch)
    try:
        vocab_rows = int(model.get_input_embeddings().weight.shape[0])
        _add_hyperparameters(writer, config, vocab_rows, gguf_type, name, rope)
        _add_tokenizer(writer, tokenizer, tokenizer_files, vocab_rows)
        plan = _tensor_plan(model, arch, gguf_type, rope)
        for gguf_name, _, shape, dtype, nbytes, qtype in plan:
            writer.add_tensor_info(gguf_name, shape, dtype, nbytes, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        check_cancelled()
        counts: dict[str, int] = {}
        for done, (_, convert, _, _, nbytes, qtype) in enumerate(plan, start=1):
            data = convert()
            assert data.nbytes == nbytes, (data.nbytes, nbytes)
            writer.write_tensor_data(data)
            counts[qtype.name.lower()] = counts.get(qtype.name.lower(), 0) + 1
            progress(done, len(plan))
            check_cancelled()
        writer.flush()
    finally:
        writer.close()
    return {"tensors": len(plan), "tensor_types": counts}


def _unsupported(message: str) -> JobFailed:
    return JobFailed(
        "unsupported_model",
        f"gguf: {message}",
        hint='Drop "gguf" from formats, or convert with llama.cpp\'s convert_hf_to_gguf.py.',
    )


def _architecture(model: Any) -> GgufArchitecture:
    """The model's :class:`GgufArchitecture`, after the checks validate made on its config.json."""
    class_name = type(model).__name__
    problems = gguf_config_issues({**model.config.to_dict(), "architectures": [class_name]})
    if problems:
        raise _unsupported("; ".join(problems))
    return GGUF_ARCHITECTURES[class_name]


def _head_dim(config: Any) -> int:
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def _rope_theta(config: Any) -> float:
    rope = getattr(config, "rope_parameters", None) or {}
    return float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def rope_freq_factors(model: Any) -> np.ndarray:
    """Per RoPE frequency, how many times slower the model turns than default RoPE (1 where unscaled).

    Read from the loaded model's rotary embedding (``inv_freq``), the very frequencies its logits
    were computed with, over default RoPE's for the same ``rope_theta`` and head size: llama.cpp
    divides its default frequencies by these (its ``rope_freqs`` tensor).
    """
    import torch

    rotary = getattr(getattr(model, "model", None), "rotary_emb", None)
    inv_freq = getattr(rotary, "inv_freq", None)
    if not isinstance(inv_freq, torch.Tensor):
        raise _unsupported("cannot find the model's rotary embedding (model.rotary_emb.inv_freq)")
    if float(getattr(rotary, "attention_scaling", 1.0)) != 1.0:
        raise _unsupported(
            "the model's RoPE scales attention (attention_scaling), which this exporter cannot write"
        )
    dim = _head_dim(model.config)
    if inv_freq.numel() * 2 != dim:
        raise _unsupported(f"RoPE covers {inv_freq.numel() * 2} of the {dim} dimensions of a head")
    # default RoPE's inverse frequencies, computed as transformers computes them
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).to(dtype=torch.float32) / dim
    default = 1.0 / (_rope_theta(model.config) ** exponents)
    factors: np.ndarray = (default / inv_freq.detach().to("cpu", torch.float32)).numpy().astype(np.float32)
    return factors


def rope_layout(model: Any, arch: GgufArchitecture) -> dict[str, Any]:
    """How the model's RoPE is written: ``{"linear": factor}``, ``{"rope_freqs": array}`` or ``{}``."""
    rope_type, params = rope_settings(model.config.to_dict())
    factors = rope_freq_factors(model)
    if rope_type == "default":
        expected = 1.0
    elif rope_type == "linear":
        expected = float(params["factor"])
    elif rope_type == "llama3" and rope_type in arch.rope_types:
        return {"rope_freqs": factors}
    else:
        raise _unsupported(f"RoPE type {rope_type!r} is not supported for {type(model).__name__}")
    if not np.allclose(factors, expected, rtol=1e-5, atol=0):
        raise _unsupported(
            f"the model's RoPE frequencies are not those of {rope_type!r} RoPE (scaled by "
            f"{float(factors.min()):g} to {float(factors.max()):g})"
        )
    return {"linear": expected} if rope_type == "linear" else {}


def _add_hyperparameters(
    writer: Any, config: Any, vocab_rows: int, gguf_type: str, name: str, rope: dict[str, Any]
) -> None:
    import gguf

    heads = int(config.num_attention_heads)
    head_dim = _head_dim(config)
    writer.add_name(name)
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(int(config.num_hidden_layers))
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_head_count(heads)
    writer.add_head_count_kv(int(getattr(config, "num_key_value_heads", None) or heads))
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(_rope_theta(config))
    if "linear" in rope:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["linear"])
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(vocab_rows)
    writer.add_file_type(int(gguf.LlamaFileType[_FILE_TYPES[gguf_type]]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _add_tokenizer(writer: Any, tokenizer: Any, files: Path, vocab_rows: int) -> None:
    """The byte-level BPE vocabulary as llama.cpp's ``gpt2`` tokenizer model reads it."""
    import gguf

    tokenizer_json = json.loads((files / "tokenizer.json").read_text(encoding="utf-8"))
    by_id = {i: token for token, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    if by_id and max(by_id) >= vocab_rows:
        raise JobFailed(
            "unsupported_model",
            f"the tokenizer has token id {max(by_id)}, past the model's {vocab_rows} embedding rows",
        )
    tokens: list[str] = []
    types: list[int] = []
    for i in range(vocab_rows):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")  # rows no token maps to (a vocabulary padded to a round size)
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(gguf_pre_tokenizer(tokenizer_json))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(files, load_merges=True, n_vocab=vocab_rows)
    # Whether a BOS/EOS is added when text is tokenized, as transformers does it for this tokenizer
    # (llama.cpp's default for gpt2 vocabularies could differ).
    probe = tokenizer("a")["input_ids"]
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    special.add_special_token["bos"] = len(probe) > len(bare) and probe[0] == tokenizer.bos_token_id
    special.add_special_token["eos"] = len(probe) > len(bare) and probe[-1] == tokenizer.eos_token_id
    special.add_to_gguf(writer, quiet=True)


def model_tensors(model: Any) -> list[tuple[str, Any]]:
    """The model's tensors to write, by transformers name (a tied LM head only once, as the embedding)."""
    tensors = list(model.state_dict().items())
    head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    tied = bool(getattr(model.config, "tie_word_embeddings", False)) or (
        head is not None and head.weight.data_ptr() == embeddings.weight.data_ptr()
    )
    # llama.cpp uses token_embd for the output when output.weight is absent
    return [(name, t) for name, t in tensors if not (tied and name == "lm_head.weight")]


def extra_tensors(model: Any, arch: GgufArchitecture, rope: dict[str, Any]) -> list[tuple[str, np.ndarray]]:
    """Tensors llama.cpp needs that the model does not hold: ``rope_freqs`` for Llama 3's RoPE."""
    import gguf

    if "rope_freqs" not in rope:
        return []
    return [(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", rope["rope_freqs"])]


_QK_ROWS = ("q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias")


def _tensor_plan(
    model: Any, arch: GgufArchitecture, gguf_type: str, rope: dict[str, Any]
) -> list[tuple[Any, ...]]:
    """``(gguf name, convert(), shape, numpy dtype, nbytes, GGML type)`` per tensor, in writing order.

    ``convert`` makes the array only when it is written. ``shape`` and ``nbytes`` are those
    ``GGUFWriter.add_tensor_info`` expects (a quantized tensor: its byte shape, dtype uint8).
    """
    import gguf
    import torch
    from gguf.quants import quant_shape_to_byte_shape

    config = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.arch.upper()], int(config.num_hidden_layers))
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    wanted = gguf.GGMLQuantizationType[_TENSOR_TYPES[gguf_type]]
    sources: list[tuple[str, str, Any]] = [(n, n, t) for n, t in extra_tensors(model, arch, rope)]
    for hf_name, tensor in model_tensors(model):
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise _unsupported(
                f"the model's tensor '{hf_name}' has no name in llama.cpp's {arch.arch!r} architecture"
            )
        sources.append((gguf_name, hf_name, tensor))
    plan: list[tuple[Any, ...]] = []
    for gguf_name, hf_name, tensor in sources:
        heads_here = 0
        if arch.pair_rope and hf_name.endswith(_QK_ROWS):
            heads_here = heads if hf_name.endswith(_QK_ROWS[:2]) else kv_heads
        shape = tuple(int(s) for s in tensor.shape)
        qtype = wanted
        if len(shape) < 2:
            qtype = gguf.GGMLQuantizationType.F32
        elif qtype == gguf.GGMLQuantizationType.Q8_0 and shape[-1] % 32:
            qtype = gguf.GGMLQuantizationType.F16  # q8_0 blocks are 32 values of a row
        dtype: np.dtype[Any]
        if qtype == gguf.GGMLQuantizationType.F32:
            dtype, byte_shape = np.dtype(np.float32), shape
        elif qtype == gguf.GGMLQuantizationType.F16:
            dtype, byte_shape = np.dtype(np.float16), shape
        else:
            dtype, byte_shape = np.dtype(np.uint8), tuple(quant_shape_to_byte_shape(shape, qtype))
        nbytes = int(np.prod(byte_shape)) * dtype.itemsize

        def convert(tensor: Any = tensor, heads_here: int = heads_here, qtype: Any = qtype) -> np.ndarray:
            if isinstance(tensor, torch.Tensor):
                tensor = tensor.detach().to(torch.float32).cpu().numpy()
            data = np.asarray(tensor, dtype=np.float32)
            if heads_here:
                data = ggml_rope_order(data, heads_here)
            return np.ascontiguousarray(gguf.quants.quantize(data, qtype))

        plan.append((gguf_name, convert, byte_shape, dtype, nbytes, qtype))
    return plan
