"""Load the base model and tokenizer from a local directory, quantize, and attach adapters.

The same code path serves a tiny Llama on CPU and a 7B model on a CUDA GPU: the device,
load dtype and mixed-precision mode are decided here from ``training_parameters.precision``
and what the machine has.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from finetune_worker.config.train import LORA_FAMILY, TrainConfig
from finetune_worker.errors import JobFailed
from finetune_worker.hf import bnb_config, keep_4bit_layout_trainable, unsupported_model

log = logging.getLogger("finetune_worker.training")

Warn = Callable[[str], None]

#: Optimizers that exist only as bitsandbytes CUDA kernels.
CUDA_ONLY_OPTIMIZERS = frozenset({"adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit", "adamw_torch_fused"})


@dataclass(frozen=True)
class Plan:
    """Decisions about the hardware, made once before loading."""

    device: str  # "cuda" | "cpu"
    precision: str  # "fp32" | "bf16" | "fp16": the Trainer's mixed-precision mode
    load_dtype: torch.dtype
    optimizer: str


def plan_hardware(cfg: TrainConfig, warn: Warn) -> Plan:
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    tp = cfg.training_parameters
    precision = tp.precision
    if precision == "auto":
        precision = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if cuda else "fp32"
    elif precision == "fp16" and not cuda:
        warn("training_parameters.precision fp16 needs CUDA (CPU has no fp16 mixed precision); using fp32")
        precision = "fp32"
    elif precision == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        warn("this GPU has no bf16 support; using fp16 mixed precision instead")
        precision = "fp16"
    full = cfg.peft.method == "full"
    if precision == "fp32" or (full and precision == "fp16"):
        # fp16 master weights cannot be unscaled by the grad scaler: full FT keeps fp32 weights.
        load_dtype = torch.float32
    else:
        load_dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    optimizer = tp.optimizer
    if not cuda and optimizer in CUDA_ONLY_OPTIMIZERS:
        warn(f"training_parameters.optimizer {optimizer} needs CUDA; using adamw_torch on CPU")
        optimizer = "adamw_torch"
    if cfg.peft.method == "loftq" and not cuda:
        raise JobFailed(
            "invalid_config",
            "peft.method 'loftq' needs a CUDA GPU (peft runs the LoftQ initialization on cuda)",
            hint="On CPU use 'pissa' (also an SVD-based init) or plain 'lora'.",
        )
    return Plan(device=device, precision=precision, load_dtype=load_dtype, optimizer=optimizer)


def check_attention_kernel(cfg: TrainConfig) -> None:
    """Refuse, before any work, an attention kernel this machine cannot train with."""
    kernel = cfg.attn_implementation
    if kernel not in ("sdpa", "eager") and not torch.cuda.is_available():
        why = " (FlexAttention has no backward pass on CPU)" if kernel == "flex_attention" else ""
        raise JobFailed(
            "invalid_config",
            f"attn_implementation {kernel!r} needs a CUDA GPU{why}",
            hint="On CPU use 'sdpa'; data.packing auto then groups long rows by length instead of flattening them.",
        )


def load_model(cfg: TrainConfig, plan: Plan, warn: Warn, total_steps: int | None = None) -> nn.Module:
    """The base model on its device, quantized if asked, with adapters attached (or frozen parts).

    ``total_steps`` is the run's optimizer steps (AdaLoRA schedules its rank budget over them)."""
    from transformers import AutoModelForCausalLM

    path = cfg.paths.model  # checked by the job (hf.check_causal_lm) before the tokenizer loads
    kwargs: dict[str, Any] = {"dtype": plan.load_dtype, "attn_implementation": cfg.attn_implementation}
    q = cfg.quantization
    if q is not None:
        compute = torch.float32 if plan.precision == "fp32" else plan.load_dtype
        kwargs["quantization_config"] = bnb_config(q, compute)
    if plan.device == "cuda":
        # One process, one GPU: pin every module to it (device_map "auto" would spill to CPU
        # silently and make training crawl instead of failing with a clear OOM).
        kwargs["device_map"] = {"": torch.cuda.current_device()}
    elif q is not None:
        kwargs["device_map"] = "cpu"
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    except ValueError as exc:
        if "attn_implementation" in str(exc) or "attention" in str(exc).lower():
            raise unsupported_model(
                "model_name", path, f"attention implementation not supported: {exc}"
            ) from exc
        raise
    except OSError as exc:
        raise unsupported_model("model_name", path, f"cannot load its weights ({exc})") from exc
    except Exception as exc:
        if type(exc).__name__ == "SafetensorError":  # truncated or corrupt weight file
            raise unsupported_model("model_name", path, f"its weight files are damaged ({exc})") from exc
        raise
    model.config.use_cache = False  # the KV cache is useless in training and warns with checkpointing
    if q is not None and q.bits == 4 and plan.device == "cpu":
        keep_4bit_layout_trainable(model)
    gc = cfg.training_parameters.gradient_checkpointing
    if q is not None:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=gc, gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    if cfg.peft.method == "full":
        _freeze(model, cfg, warn)
        return model
    from peft import get_peft_model

    if gc and q is None:
        # Checkpointed blocks must see an input that requires grad, or adapters get no gradient.
        model.enable_input_require_grads()
    peft_model: nn.Module = get_peft_model(model, peft_config(cfg, total_steps))
    return peft_model


def peft_config(cfg: TrainConfig, total_steps: int | None = None) -> Any:
    from peft import (
        AdaLoraConfig,
        IA3Config,
        LoftQConfig,
        LoraConfig,
        PrefixTuningConfig,
        PromptEncoderConfig,
        PromptTuningConfig,
        TaskType,
    )

    p = cfg.peft
    targets: Any = p.target_modules
    if p.method == "adalora":
        if not total_steps:
            raise ValueError("adalora needs the run's total optimizer steps (load_model(total_steps=...))")
        return AdaLoraConfig(
            task_type=TaskType.CAUSAL_LM,
            target_r=p.r,
            init_r=p.adalora_init_r,
            lora_alpha=p.alpha,  # type: ignore[arg-type]  # peft annotates int; a float scale works
            lora_dropout=p.dropout,
            target_modules=targets,
            total_step=total_steps,
            tinit=int(p.adalora_tinit * total_steps),
            tfinal=int(p.adalora_tfinal * total_steps),
            orth_reg_weight=p.orth_reg_weight,
        )
    if p.method == "p_tuning":
        return PromptEncoderConfig(
            task_type=TaskType.CAUSAL_LM,
            num_virtual_tokens=p.num_virtual_tokens,
            encoder_hidden_size=p.encoder_hidden_size,
        )
    if p.method in LORA_FAMILY:
        extra: dict[str, Any] = {}
        if p.method == "dora":
            extra["use_dora"] = True
        elif p.method == "rslora":
            extra["use_rslora"] = True
        elif p.method == "pissa":
            extra["init_lora_weights"] = "pissa"
        elif p.method == "loftq":
            extra["init_lora_weights"] = "loftq"
            extra["loftq_config"] = LoftQConfig(loftq_bits=p.loftq_bits)
        return LoraConfig(
            task_type=TaskType.CAUSAL_LM,
            r=p.r,
            lora_alpha=p.alpha,  # type: ignore[arg-type]  # peft annotates int; a float scale works
            lora_dropout=p.dropout,
            target_modules=targets,
            **extra,
        )
    if p.method == "ia3":
        # IA3 also needs to know which targets are feed-forward; peft's per-architecture
        # defaults know that, an explicit list cannot tell it.
        if targets == "all-linear":
            return IA3Config(task_type=TaskType.CAUSAL_LM)
        return IA3Config(task_type=TaskType.CAUSAL_LM, target_modules=targets, feedforward_modules=[])
    if p.method == "prefix_tuning":
        return PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=p.num_virtual_tokens)
    if p.method == "prompt_tuning":
        return PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=p.num_virtual_tokens)
    raise AssertionError(f"unhandled peft method {p.method}")


def _freeze(model: Any, cfg: TrainConfig, warn: Warn) -> None:
    n = cfg.peft.freeze_layers
    if cfg.peft.freeze_embeddings:
        emb = model.get_input_embeddings()
        emb.requires_grad_(False)
        out = model.get_output_embeddings()
        if out is not None and out.weight is emb.weight:
            warn("the LM head shares its weights with the embeddings, so freezing embeddings freezes it too")
    if n:
        layers = decoder_layers(model)
        if layers is None:
            raise unsupported_model(
                "model_name", cfg.model_name, "cannot find its decoder layers to freeze (peft.freeze_layers)"
            )
        if n >= len(layers):
            raise JobFailed(
                "invalid_config",
                f"peft.freeze_layers={n} freezes every one of the model's {len(layers)} layers",
                hint=f"Use a value below {len(layers)}.",
            )
        for layer in layers[:n]:
            layer.requires_grad_(False)


def decoder_layers(model: nn.Module) -> nn.ModuleList | None:
    """The stack of transformer blocks: the ModuleList as long as num_hidden_layers."""
    count = getattr(model.config, "num_hidden_layers", None)
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == count:
            return module
    return None


def planned_steps(cfg: TrainConfig, rows: int, world_size: int = 1) -> int:
    """The optimizer steps the Trainer will run for ``rows`` training rows, as it counts them."""
    tp = cfg.training_parameters
    if cfg.max_steps:
        return cfg.max_steps
    batches = math.ceil(rows / (tp.batch_size * world_size))
    per_epoch = max(batches // tp.gradient_accumulation_steps, 1)
    return max(1, math.ceil(tp.epochs * per_epoch))


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
