"""The optional parts of the install: which extra brings which package, and the problem a job
that needs a missing one gets (at ``validate``/``submit``, before anything loads)."""

from __future__ import annotations

import importlib.util

#: Top-level module -> (the extra that installs it, what needs it).
EXTRAS: dict[str, tuple[str, str]] = {
    "mergekit": ("merge", "MergeKit merges"),
    "bitsandbytes": ("qlora", "4-bit and 8-bit loading (quantization)"),
    "trl": ("preference", "Preference training (DPO, ORPO, KTO)"),
    "onnx": ("export", "ONNX exports"),
    "onnxscript": ("export", "ONNX exports (torch.onnx)"),
    "onnxruntime": ("export", "Verifying ONNX exports"),
    "gguf": ("export", "GGUF exports"),
    "llama_cpp": ("llamacpp", "Verifying GGUF exports (llama.cpp)"),
    "optuna": ("sweep", "Hyperparameter sweeps"),
}


def installed(module: str) -> bool:
    """Whether ``module`` can be imported, found without importing it (mergekit pulls in torch)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a module left half-imported, or blocked in sys.modules
        return False


def missing_extra(module: str) -> str | None:
    """Why a job cannot run without ``module`` and how to install it; None when it is installed."""
    if installed(module):
        return None
    extra, what = EXTRAS[module]
    return f"{what} need the {module} package, which is not installed: pip install 'finetune-worker[{extra}]'"
