"""Write a Llama-family transformers model as one GGUF file, with the ``gguf`` package's writer.

llama.cpp's own converter (``convert_hf_to_gguf.py``) ships with llama.cpp's sources and in no
installable package, so the file is built here from the pieces ``gguf`` does offer: its writer,
its tensor-name map for llama.cpp's ``llama`` architecture, its quantizers (f16, q8_0) and its
``SpecialVocab`` (BPE merges, special token ids, the chat template). What this module adds is
what the converter would have decided for a ``LlamaForCausalLM``:

- the hyperparameters llama.cpp reads (``llama.*`` keys);
- the q/k row order: transformers' Llama rotates the two *halves* of each head's vector
  (``rotate_half``), llama.cpp's ``llama`` architecture rotates *adjacent pairs* (its RoPE type
  "norm"), so the rows of ``q_proj`` and ``k_proj`` are reordered per head (row ``i`` of the first
  half goes to ``2i``, row ``i`` of the second half to ``2i + 1``), as llama.cpp's converter does
  for Llama (its ``LlamaModel.permute``, read in llama.cpp's sources vendored by llama-cpp-python
  0.3.36). The job's verification fails when this is wrong;
- the token list and types of a byte-level BPE tokenizer (``tokenizer.ggml.model = gpt2``).

Tensors are converted and written one at a time (header and tensor index first), so the peak
memory is the model plus one tensor, and a progress callback and a cancel check run between them.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from finetune_worker.config.export import gguf_pre_tokenizer
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
    reorder_rope: bool = True,
) -> dict[str, Any]:
    """Write ``model`` (a ``LlamaForCausalLM`` in memory) and ``tokenizer`` to ``dest``.

    ``tokenizer_files`` is a folder holding the saved tokenizer and config (``SpecialVocab`` reads
    merges, special ids and the chat template there). ``reorder_rope=False`` writes q/k as
    transformers holds them: a wrong file, for the tests that show the verification catches it.
    Returns ``{"tensors": n, "tensor_types": {type: count}}``.
    """
    import gguf

    config = model.config
    writer = gguf.GGUFWriter(str(dest), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    try:
        vocab_rows = int(model.get_input_embeddings().weight.shape[0])
        _add_hyperparameters(writer, config, vocab_rows, gguf_type, name)
        _add_tokenizer(writer, tokenizer, tokenizer_files, vocab_rows)
        plan = _tensor_plan(model, gguf_type, reorder_rope)
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


def _add_hyperparameters(writer: Any, config: Any, vocab_rows: int, gguf_type: str, name: str) -> None:
    import gguf

    heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    rope = getattr(config, "rope_parameters", None) or {}
    theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
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
    writer.add_rope_freq_base(float(theta))
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


def _tensor_plan(model: Any, gguf_type: str, reorder_rope: bool) -> list[tuple[Any, ...]]:
    """``(gguf name, convert(), shape, numpy dtype, nbytes, GGML type)`` per tensor, in writing order.

    ``convert`` makes the array only when it is written. ``shape`` and ``nbytes`` are those
    ``GGUFWriter.add_tensor_info`` expects (a quantized tensor: its byte shape, dtype uint8).
    """
    import gguf
    import torch
    from gguf.quants import quant_shape_to_byte_shape

    config = model.config
    blocks = int(config.num_hidden_layers)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, blocks)
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    wanted = gguf.GGMLQuantizationType[_TENSOR_TYPES[gguf_type]]
    plan: list[tuple[Any, ...]] = []
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp uses token_embd for the output when output.weight is absent
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise JobFailed(
                "unsupported_model",
                f"gguf: the model's tensor '{hf_name}' has no llama.cpp name; this is not a plain Llama model",
                hint='Drop "gguf" from formats, or convert with llama.cpp\'s convert_hf_to_gguf.py.',
            )
        heads_here = (
            heads
            if hf_name.endswith("q_proj.weight")
            else kv_heads
            if hf_name.endswith("k_proj.weight")
            else 0
        )
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

        def convert(
            tensor: torch.Tensor = tensor, heads_here: int = heads_here, qtype: Any = qtype
        ) -> np.ndarray:
            data = tensor.detach().to(torch.float32).cpu().numpy()
            if heads_here and reorder_rope:
                data = ggml_rope_order(data, heads_here)
            return np.ascontiguousarray(gguf.quants.quantize(data, qtype))

        plan.append((gguf_name, convert, byte_shape, dtype, nbytes, qtype))
    return plan
