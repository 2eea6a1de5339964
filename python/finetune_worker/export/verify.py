"""Load an export back in its own runtime and compare its logits with the PyTorch model's.

Every position of every verify prompt is compared: the largest absolute logit difference, and
the share of positions whose most likely next token is the same. ONNX runs in onnxruntime on
one right-padded batch of all prompts (so the dynamic batch and sequence axes and the attention
mask are exercised; padded positions are not compared). GGUF runs in llama.cpp
(llama-cpp-python) one prompt at a time, with an f32 KV cache so that the comparison measures
the file rather than the runtime's cache precision; llama.cpp must also tokenize each prompt
exactly as transformers does (the GGUF's tokenizer metadata is checked too).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from finetune_worker.errors import JobFailed

#: ggml's type id of f32 (``GGML_TYPE_F32``), for llama.cpp's KV cache.
_GGML_F32 = 0


@dataclass(frozen=True)
class Comparison:
    """How one export's logits compare with the PyTorch model's on the verify prompts."""

    max_abs_diff: float
    mean_abs_diff: float
    top1_agreement: float
    tokens: int
    prompts: int
    tolerance: float
    min_top1_agreement: float
    reference_max_abs: float  # the scale of the logits compared

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.tolerance and self.top1_agreement >= self.min_top1_agreement

    def summary(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "max_abs_diff": _round(self.max_abs_diff),
            "mean_abs_diff": _round(self.mean_abs_diff),
            "top1_agreement": round(self.top1_agreement, 4),
            "tokens": self.tokens,
            "prompts": self.prompts,
            "tolerance": self.tolerance,
            "min_top1_agreement": self.min_top1_agreement,
            "reference_max_abs": _round(self.reference_max_abs),
        }

    def check(self, fmt: str) -> None:
        """Raise ``export_mismatch`` naming the numbers when the export is outside the bounds."""
        if self.passed:
            return
        why = []
        if self.max_abs_diff > self.tolerance:
            why.append(
                f"the largest logit difference is {self.max_abs_diff:.4g} (tolerance {self.tolerance:g})"
            )
        if self.top1_agreement < self.min_top1_agreement:
            why.append(
                f"the most likely next token agrees at {self.top1_agreement:.1%} of {self.tokens} positions "
                f"(min_top1_agreement {self.min_top1_agreement:g})"
            )
        raise JobFailed(
            "export_mismatch",
            f"{fmt}: the export does not reproduce the PyTorch model: " + " and ".join(why),
            hint="Nothing was written to output_dir. A lossy type (q8_0, f16) may need a larger tolerance on a "
            "large model; a difference of whole logits means a broken export (report it).",
            details=self.summary(),
        )


def compare(
    reference: list[np.ndarray], got: list[np.ndarray], *, tolerance: float, min_top1: float
) -> Comparison:
    """Compare per-prompt ``[positions, vocab]`` logits."""
    diffs = [np.abs(g.astype(np.float64) - r.astype(np.float64)) for r, g in zip(reference, got, strict=True)]
    tokens = sum(r.shape[0] for r in reference)
    same = sum(int((g.argmax(-1) == r.argmax(-1)).sum()) for r, g in zip(reference, got, strict=True))
    return Comparison(
        max_abs_diff=float(max(d.max() for d in diffs)),
        mean_abs_diff=float(sum(d.sum() for d in diffs) / sum(d.size for d in diffs)),
        top1_agreement=same / tokens,
        tokens=tokens,
        prompts=len(reference),
        tolerance=tolerance,
        min_top1_agreement=min_top1,
        reference_max_abs=float(max(np.abs(r).max() for r in reference)),
    )


def reference_logits(model: Any, prompt_ids: list[list[int]]) -> list[np.ndarray]:
    """The PyTorch model's fp32 logits, one prompt at a time (no padding to get wrong)."""
    import torch

    out = []
    with torch.no_grad():
        for ids in prompt_ids:
            logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0]
            out.append(logits.float().cpu().numpy())
    return out


def onnx_logits(path: Path, prompt_ids: list[list[int]], pad_id: int) -> list[np.ndarray]:
    """onnxruntime's logits for all prompts in one right-padded batch, cut back to each prompt."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = _threads()
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    width = max(len(ids) for ids in prompt_ids)
    input_ids = np.full((len(prompt_ids), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(prompt_ids), width), dtype=np.int64)
    for row, ids in enumerate(prompt_ids):
        input_ids[row, : len(ids)] = ids
        mask[row, : len(ids)] = 1
    (logits,) = session.run(["logits"], {"input_ids": input_ids, "attention_mask": mask})
    return [np.asarray(logits[row, : len(ids)]) for row, ids in enumerate(prompt_ids)]


def gguf_logits(path: Path, prompts: list[str], prompt_ids: list[list[int]]) -> list[np.ndarray]:
    """llama.cpp's logits for each prompt's token ids; raises when it tokenizes a prompt otherwise."""
    from llama_cpp import Llama

    llm = Llama(
        str(path),
        n_ctx=max(64, max(len(ids) for ids in prompt_ids) + 8),
        logits_all=True,
        n_threads=_threads(),
        type_k=_GGML_F32,
        type_v=_GGML_F32,
        verbose=False,
    )
    try:
        for i, (text, ids) in enumerate(zip(prompts, prompt_ids, strict=True)):
            theirs = llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)
            if list(theirs) != list(ids):
                raise JobFailed(
                    "export_mismatch",
                    f"gguf: llama.cpp tokenizes verify_prompts[{i}] as {_ids(theirs)}, transformers as "
                    f"{_ids(ids)}: the GGUF's tokenizer does not reproduce the model's",
                    hint="Nothing was written to output_dir; the tokenizer's pre-tokenizer or special tokens "
                    "have no exact llama.cpp counterpart (report it with the model's tokenizer.json).",
                )
        out = []
        for ids in prompt_ids:
            llm.reset()
            llm.eval(ids)
            out.append(np.array(llm.scores[: len(ids)], dtype=np.float32))
        return out
    finally:
        llm.close()


def _threads() -> int:
    return max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1))


def _ids(ids: list[int]) -> str:
    shown = ", ".join(str(i) for i in ids[:12])
    return f"[{shown}{', ...' if len(ids) > 12 else ''}] ({len(ids)} tokens)"


def _round(value: float) -> float:
    return float(f"{value:.4g}")
