"""Export a causal LM to ONNX with torch's own exporter (``torch.onnx.export(..., dynamo=True)``).

Why not optimum: optimum-onnx (0.1.0, the newest release) requires transformers < 4.58 and this
worker runs transformers 5, so it cannot be installed next to it. torch's exporter (torch.export
+ onnxscript) traces the model itself. The graph takes ``input_ids`` and ``attention_mask``
(int64, ``[batch, sequence]``, both axes dynamic) and returns ``logits`` (``[batch, sequence,
vocab]``), with no KV cache (``use_cache=False``): one forward per call, fit for scoring and
for verifying, not for fast token-by-token generation.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

from finetune_worker.errors import JobFailed

ONNX_FILE = "model.onnx"
INPUT_NAMES = ("input_ids", "attention_mask")


def export_onnx(model: Any, dest_dir: Path, opset: int) -> Path:
    """Write ``dest_dir/model.onnx`` (weights over 2 GB go to ``model.onnx.data`` beside it)."""
    import torch

    class LogitsOnly(torch.nn.Module):
        """The model as a function of (input_ids, attention_mask) -> logits, cache off."""

        def __init__(self, inner: Any):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            out = self.inner(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
            logits: torch.Tensor = out.logits
            return logits

    wrapper = LogitsOnly(model).eval()
    # Two rows of different content and a length above 1: torch.export must not specialise on them.
    example = torch.arange(6, dtype=torch.long).reshape(2, 3) % max(2, int(model.config.vocab_size))
    batch = torch.export.Dim("batch")
    sequence = torch.export.Dim("sequence")
    axes = {0: batch, 1: sequence}
    dest_dir.mkdir(parents=True, exist_ok=True)
    path = dest_dir / ONNX_FILE
    exporter_log = logging.getLogger("torch.onnx")
    level = exporter_log.level
    exporter_log.setLevel(logging.ERROR)  # "torchvision is not installed. Skipping torchvision::nms", ...
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter(
                "ignore"
            )  # tracer chatter (deprecations, axis renames) is not news to the user
            program = torch.onnx.export(
                wrapper,
                (example, torch.ones_like(example)),
                dynamo=True,
                input_names=list(INPUT_NAMES),
                output_names=["logits"],
                dynamic_shapes={"input_ids": axes, "attention_mask": axes},
                opset_version=opset,
                verbose=False,
            )
            if program is None:  # only the legacy exporter returns nothing
                raise RuntimeError("torch.onnx.export returned no program")
            program.save(str(path))
    except JobFailed:
        raise
    except Exception as exc:
        raise JobFailed(
            "unsupported_model",
            f"onnx: torch.onnx.export cannot export this model: {type(exc).__name__}: {str(exc).strip()[:600]}",
            hint='Drop "onnx" from formats, or try another onnx_opset.',
        ) from exc
    finally:
        exporter_log.setLevel(level)
    return path
