"""The ``train`` job config: the seed format plus optional richer sections.

The seed document (``model_name``, ``training_parameters``, ``dataset``, ``output_dir``,
``quantization``) is accepted exactly as written; everything else is optional with a default.
Schema problems come from pydantic (all at once, with JSON paths); checks that need two fields
or the file system live in :meth:`TrainConfig.environment_issues`, which runs before anything
heavy loads. Nothing here imports torch: ``submit`` must answer at once.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from collections.abc import Mapping
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError

from finetune_worker.config.base import MAX_SEED, StrictModel, schema_also
from finetune_worker.config.data import DataConfig, DatasetSection, column_renames
from finetune_worker.config.distributed import DistributedConfig
from finetune_worker.config.generation import TrainingEvaluation
from finetune_worker.config.methods import ContinualSection, LossWeights, UnfreezePhase
from finetune_worker.config.preference import PreferenceSection
from finetune_worker.config.tracking import TrackingConfig
from finetune_worker.data.rows import PREFERENCE_FORMATS, RowSpec
from finetune_worker.data.sources import Source, preview_issues
from finetune_worker.errors import ConfigIssue
from finetune_worker.kinds import JobKind
from finetune_worker.outputs import resume_checkpoint_issue, run_folder_issue

#: Preference settings that belong to some methods only (setting them for another is refused).
METHOD_ONLY = {
    "loss_type": ("dpo",),
    "label_smoothing": ("dpo",),
    "desirable_weight": ("kto",),
    "undesirable_weight": ("kto",),
    "rewards": ("grpo",),
    "num_generations": ("grpo",),
    "max_completion_length": ("grpo",),
    "temperature": ("grpo",),
    "reference_column": ("grpo",),
}

PeftMethod = Literal[
    "lora",
    "dora",
    "rslora",
    "loftq",
    "pissa",
    "adalora",
    "full",
    "ia3",
    "prefix_tuning",
    "prompt_tuning",
    "p_tuning",
]
LORA_FAMILY = frozenset({"lora", "dora", "rslora", "loftq", "pissa"})
VIRTUAL_TOKEN_METHODS = frozenset({"prefix_tuning", "prompt_tuning", "p_tuning"})


class _Section(StrictModel):
    pass


class TrainingParameters(_Section):
    """Optimization knobs (HF TrainingArguments underneath)."""

    epochs: float = Field(
        3.0, gt=0, le=10**6, description="Passes over the training set; max_steps wins when set."
    )
    batch_size: int = Field(4, gt=0, description="Examples per device per step (before accumulation).")
    learning_rate: float = Field(
        2e-4, gt=0, description="Peak learning rate; 2e-4 suits LoRA, use ~2e-5 for full."
    )
    weight_decay: float = Field(
        0.0, ge=0, description="AdamW decoupled weight decay; 0 keeps adapters unshrunk."
    )
    warmup_steps: float = Field(
        0,
        ge=0,
        description="Linear warmup: an int is a step count, a float in (0, 1) a fraction of all steps.",
    )
    warmup_ratio: float | None = Field(
        None,
        ge=0,
        lt=1,
        description="Warmup as a fraction of all steps (mapped onto warmup_steps, as transformers 5 does).",
    )
    gradient_accumulation_steps: int = Field(1, gt=0, description="Micro-batches per optimizer step.")
    lr_scheduler: Literal[
        "linear",
        "cosine",
        "cosine_with_restarts",
        "polynomial",
        "constant",
        "constant_with_warmup",
        "inverse_sqrt",
        "cosine_with_min_lr",
        "warmup_stable_decay",
    ] = Field("linear", description="Learning-rate schedule after warmup (a transformers SchedulerType).")
    lr_scheduler_kwargs: dict[str, float | int | str] = Field(
        default_factory=dict,
        description="Settings of the chosen schedule (checked per schedule, see SCHEDULER_KWARGS): "
        "cosine_with_min_lr takes min_lr or min_lr_rate (default min_lr_rate 0.1), warmup_stable_decay "
        "num_decay_steps (default 10% of the steps), min_lr_ratio, decay_type...",
    )
    max_grad_norm: float = Field(1.0, ge=0, description="Gradient clipping norm; 0 disables clipping.")
    optimizer: Literal[
        "adamw_torch",
        "adamw_torch_fused",
        "adafactor",
        "sgd",
        "adamw_8bit",
        "paged_adamw_8bit",
        "paged_adamw_32bit",
    ] = Field(
        "adamw_torch",
        description="Optimizer; the 8-bit/paged ones need CUDA and fall back to adamw_torch on CPU with a warning.",
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 on CUDA that supports it, fp16 on older CUDA, fp32 on CPU."
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in backward: less memory, ~30% slower."
    )
    chunked_loss: Literal["auto"] | bool = Field(
        "auto",
        description="Compute the LM head and cross-entropy only for trained tokens, a chunk at a time, "
        "recomputed in backward: no batch x length x vocab logits in memory. auto: when a batch's "
        "logits would take more than 64 MiB (large vocabularies, long rows).",
    )
    logging_steps: int = Field(10, gt=0, description="Send a metrics event every N optimizer steps.")


#: The module each attention kernel needs (transformers imports it when the model loads).
ATTENTION_PACKAGES = {"flash_attention_2": "flash_attn", "flash_attention_3": "flash_attn_interface"}

#: Each schedule's own settings (``training_parameters.lr_scheduler_kwargs``): name -> (type,
#: lowest, highest, choices). transformers raises deep in the Trainer for a missing or unknown
#: one; checking here makes it a config issue at submit.
_Number = tuple[type, float | None, float | None, tuple[str, ...] | None]
_CYCLES: _Number = (float, 0.0, None, None)
SCHEDULER_KWARGS: dict[str, dict[str, _Number]] = {
    "linear": {},
    "cosine": {"num_cycles": _CYCLES},
    "cosine_with_restarts": {"num_cycles": (int, 1, None, None)},
    "polynomial": {"power": (float, 0.0, None, None), "lr_end": (float, 0.0, None, None)},
    "constant": {},
    "constant_with_warmup": {},
    "inverse_sqrt": {"timescale": (int, 1, None, None)},
    "cosine_with_min_lr": {
        "min_lr": (float, 0.0, None, None),
        "min_lr_rate": (float, 0.0, 1.0, None),
        "num_cycles": _CYCLES,
    },
    "warmup_stable_decay": {
        "num_decay_steps": (int, 0, None, None),
        "num_stable_steps": (int, 0, None, None),
        "min_lr_ratio": (float, 0.0, 1.0, None),
        "num_cycles": _CYCLES,
        "decay_type": (str, None, None, ("linear", "cosine", "1-sqrt")),
        "warmup_type": (str, None, None, ("linear", "cosine", "1-sqrt")),
    },
}
#: Defaults for settings transformers requires but has none for.
DEFAULT_MIN_LR_RATE = 0.1
DEFAULT_DECAY_FRACTION = 0.1


def scheduler_kwargs_issues(name: str, kwargs: Mapping[str, object]) -> list[ConfigIssue]:
    """Unknown settings for ``name``, values of the wrong type or out of range."""
    where = "training_parameters.lr_scheduler_kwargs"
    spec = SCHEDULER_KWARGS.get(name, {})
    issues: list[ConfigIssue] = []
    for key, value in kwargs.items():
        if key not in spec:
            allowed = ", ".join(sorted(spec)) or "none"
            issues.append(
                ConfigIssue(
                    f"{where}.{key}", f"not a setting of lr_scheduler {name!r} (it takes: {allowed})", value
                )
            )
            continue
        kind, lo, hi, choices = spec[key]
        if kind is str:
            if value not in (choices or ()):
                issues.append(ConfigIssue(f"{where}.{key}", f"expected one of {list(choices or ())}", value))
            continue
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or (kind is int and not float(value).is_integer())
        ):
            issues.append(
                ConfigIssue(
                    f"{where}.{key}", f"expected {'a whole number' if kind is int else 'a number'}", value
                )
            )
            continue
        if value != value or value in (float("inf"), float("-inf")):
            issues.append(ConfigIssue(f"{where}.{key}", "must be a finite number", value))
        elif (lo is not None and value < lo) or (hi is not None and value > hi):
            bounds = f">= {lo}" if hi is None else f"between {lo} and {hi}"
            issues.append(ConfigIssue(f"{where}.{key}", f"must be {bounds}", value))
    if name == "cosine_with_min_lr" and "min_lr" in kwargs and "min_lr_rate" in kwargs:
        issues.append(ConfigIssue(f"{where}.min_lr", "set min_lr or min_lr_rate, not both", kwargs["min_lr"]))
    return issues


def scheduler_kwargs(name: str, kwargs: Mapping[str, object]) -> dict[str, object]:
    """The kwargs transformers gets: validated ones, whole numbers as ints, plus our defaults."""
    spec = SCHEDULER_KWARGS.get(name, {})
    out: dict[str, object] = {k: (int(v) if spec[k][0] is int else v) for k, v in kwargs.items()}  # type: ignore[call-overload]
    if name == "cosine_with_min_lr" and "min_lr" not in out and "min_lr_rate" not in out:
        out["min_lr_rate"] = DEFAULT_MIN_LR_RATE
    return out


def quantization_issues(quantization: Quantization | None, key: str = "quantization") -> list[ConfigIssue]:
    """A quantized load needs bitsandbytes, an optional extra."""
    from finetune_worker.extras import missing_extra

    missing = missing_extra("bitsandbytes") if quantization is not None else None
    return [ConfigIssue(key, missing)] if missing else []


class Quantization(_Section):
    """bitsandbytes loading of the base model (QLoRA when combined with a LoRA method)."""

    bits: Literal[4, 8] = Field(4, description="4 = NF4/FP4 (QLoRA), 8 = LLM.int8.")
    use_double_quant: bool = Field(True, description="Quantize the 4-bit scales too: ~0.4 bit/param saved.")
    quant_type: Literal["nf4", "fp4"] = Field(
        "nf4", description="4-bit data type; NF4 fits normal weights best."
    )


class PeftSection(_Section):
    """Which parameters train: an adapter method via peft, or ``full`` fine-tuning."""

    method: PeftMethod = Field(
        "lora", description="Adapter method, or 'full' to train the model's own weights."
    )
    r: int = Field(8, gt=0, description="LoRA rank: adapter capacity vs. size.")
    alpha: float = Field(
        16, gt=0, description="LoRA scale numerator (scale = alpha/r, or alpha/sqrt(r) for rslora)."
    )
    dropout: float = Field(
        0.05, ge=0, lt=1, description="Dropout on the LoRA input; regularizes small datasets."
    )
    target_modules: Literal["all-linear"] | list[str] = Field(
        "all-linear", description="Modules to adapt: 'all-linear' (every linear but the LM head) or names."
    )
    num_virtual_tokens: int = Field(20, gt=0, description="Prefix/prompt/P-tuning: learned virtual tokens.")
    encoder_hidden_size: int = Field(
        128,
        gt=0,
        description="P-tuning: hidden size of the prompt encoder (an MLP) that makes the virtual tokens.",
    )
    adalora_init_r: int = Field(
        12,
        gt=0,
        description="AdaLoRA: the rank every module starts with; the budget then shrinks to r on average, "
        "kept where it matters most (importance scores).",
    )
    adalora_tinit: float = Field(
        0.1,
        ge=0,
        lt=1,
        description="AdaLoRA: share of the run's steps before the rank budget starts to shrink.",
    )
    adalora_tfinal: float = Field(
        0.2,
        ge=0,
        lt=1,
        description="AdaLoRA: share of the run's steps at the end with the final ranks fixed.",
    )
    orth_reg_weight: float = Field(
        0.5, ge=0, description="AdaLoRA: weight of the orthogonality regulariser added to the training loss."
    )
    loftq_bits: Literal[4, 8] = Field(
        4, description="LoftQ: bits of the quantization its init compensates for."
    )
    freeze_layers: int = Field(0, ge=0, description="Full fine-tuning: freeze the first N decoder layers.")
    freeze_embeddings: bool = Field(False, description="Full fine-tuning: freeze the input embeddings.")
    unfreeze: list[UnfreezePhase] | None = Field(
        None,
        min_length=1,
        max_length=64,
        description="Full fine-tuning: progressive unfreezing, a list of phases in order of their start "
        "(the first at 0), each training the last N layers (or all) at its own learning rate; a phase "
        "event marks each boundary.",
    )


class EvalSection(_Section):
    """Evaluation during training on the held-out split (``dataset.validation_split``)."""

    every_steps: int | None = Field(
        None, gt=0, description="Evaluate every N steps; default: once per epoch and at the end."
    )
    batch_size: int | None = Field(None, gt=0, description="Eval batch size; default: training batch size.")
    early_stopping_patience: int | None = Field(
        None, gt=0, description="Stop after N evaluations without a lower eval loss (needs every_steps)."
    )
    early_stopping_threshold: float = Field(0.0, ge=0, description="Smallest eval-loss drop that counts.")
    load_best_model_at_end: bool = Field(
        False,
        description="Save the weights of the best evaluation (by metric_for_best_model) instead of the last "
        "step's; needs every_steps, and checkpoint.every_steps a multiple of it. The chosen step is in "
        "the summary (best_step, best_metric, best_checkpoint).",
    )
    metric_for_best_model: Literal["eval_loss"] = Field(
        "eval_loss",
        description="What 'best' means: the held-out loss (the only metric evaluated in training).",
    )
    greater_is_better: bool = Field(
        False, description="Whether a higher metric_for_best_model is better (not for a loss)."
    )


class CheckpointSection(_Section):
    """Atomic checkpoints (temp dir, renamed when complete) for resume and cancel."""

    every_steps: int = Field(100, gt=0, description="Save a resumable checkpoint every N optimizer steps.")
    keep: int = Field(2, gt=0, description="Keep the N newest complete checkpoints; older ones are deleted.")


def _layer_count(model_dir: Path) -> int | None:
    """``num_hidden_layers`` from the model's config.json (None when it does not say)."""
    try:
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict):
        return None
    value = config.get("num_hidden_layers", (config.get("text_config") or {}).get("num_hidden_layers"))
    return value if isinstance(value, int) and value > 0 else None


def _missing_model(model_name: str) -> ConfigIssue | None:
    if StrictModel.resolved(model_name).is_dir():
        return None
    return ConfigIssue(
        "model_name",
        f"no local model at '{model_name}'; this worker loads models from local paths (no hub access)",
    )


@dataclass(frozen=True)
class TrainPaths:
    """The resolved paths of a train config (``TrainConfig.paths``)."""

    model: Path
    datasets: tuple[Path, ...]  # each source's path, in order
    output: Path
    resume: Path | None  # an explicit checkpoint ("auto" finds one in output)
    evaluation_dataset: Path | None


class TrainConfig(_Section):
    """A training job. The seed format is a valid instance as written."""

    job: Literal["train"] = Field("train", description="Job kind; optional for the seed format.")
    model_name: str = Field(..., description="Local model directory (this worker has no hub access).")
    output_dir: str = Field(..., description="Where the adapter/model, summary.json and checkpoints go.")
    training_parameters: TrainingParameters = Field(
        default_factory=TrainingParameters, description="Optimization settings."
    )
    dataset: DatasetSection = Field(
        ...,
        description="Training data: one source ({path}) or a mixture (a list, or {sources: [...]}).",
        json_schema_extra=schema_also(
            {"type": "array", "items": {"$ref": "#/$defs/DatasetSource"}, "minItems": 1, "maxItems": 256}
        ),
    )
    data: DataConfig = Field(default_factory=DataConfig, description="How rows become token sequences.")
    quantization: Quantization | None = Field(
        None, description="Load the base in 4/8-bit; null loads it unquantized."
    )
    peft: PeftSection = Field(default_factory=PeftSection, description="Adapter method and its settings.")
    eval: EvalSection = Field(
        default_factory=EvalSection, description="Evaluation schedule and early stopping."
    )
    checkpoint: CheckpointSection = Field(
        default_factory=CheckpointSection, description="Checkpoint schedule."
    )
    resume: Literal["auto"] | Literal[False] | str = Field(
        "auto",
        description="'auto': continue from the newest complete checkpoint in output_dir; false: start fresh; "
        "or a checkpoint directory path.",
    )
    max_steps: int | None = Field(
        None, gt=0, le=10**9, description="Stop after N optimizer steps (overrides epochs)."
    )
    seed: int = Field(
        42, ge=0, le=MAX_SEED, description="Seeds model init of adapters, data shuffling and dropout."
    )
    overwrite: bool = Field(
        False, description="Allow starting fresh in an output_dir that holds another run."
    )
    evaluation: TrainingEvaluation | None = Field(
        None, description="Run the evaluate job's scoring on the model before and after training."
    )
    tracking: TrackingConfig | None = Field(
        None, description="Experiment tracking (MLflow, TensorBoard, W&B); failures only warn."
    )
    attn_implementation: Literal[
        "sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention"
    ] = Field(
        "sdpa",
        description="Attention kernel. flash_attention_2 (the flash_attn package) and flash_attention_3 "
        "(flash_attn_interface, Hopper GPUs) need CUDA; flex_attention (torch's FlexAttention) needs CUDA "
        "to train. All three take packed rows as separate sequences, so data.packing auto flattens "
        "batches with them.",
    )
    preference: PreferenceSection | None = Field(
        None,
        description="Preference training (DPO, ORPO, KTO) on preference rows instead of supervised "
        "fine-tuning on demonstrations.",
    )
    distributed: DistributedConfig | None = Field(
        None, description="Train as a torchrun process group (several GPUs or nodes); null: in the worker."
    )
    continual: ContinualSection | None = Field(
        None,
        description="Continual learning against forgetting: a penalty that keeps the weights near the "
        "base (L2 or EWC), replayed general rows, and the reference data's loss before and after.",
    )
    loss_weights: LossWeights | None = Field(
        None, description="Per-token and per-class weights in the training loss."
    )

    # ---- derived values -------------------------------------------------------------------

    @cached_property
    def paths(self) -> TrainPaths:
        """Every path of the run, resolved once (``StrictModel.resolved``)."""
        resume = self.resume if isinstance(self.resume, str) and self.resume != "auto" else None
        held_out = self.evaluation.dataset if self.evaluation is not None else None
        return TrainPaths(
            model=self.resolved(self.model_name),
            datasets=tuple(self.resolved(s.path) for s in self.dataset.entries()),
            output=self.resolved(self.output_dir),
            resume=self.resolved(resume) if resume else None,
            evaluation_dataset=self.resolved(held_out.path) if held_out is not None else None,
        )

    @cached_property
    def sources(self) -> list[Source]:
        """The data sources, each with the ``data`` section's defaults filled in."""
        data, entries = self.data, self.dataset.entries()
        listed = self.dataset.sources is not None
        names: dict[str, int] = {}
        out = []
        for i, entry in enumerate(entries):
            path = self.resolved(entry.path)
            name = entry.name or path.name
            names[name] = names.get(name, 0) + 1
            if names[name] > 1:
                name = f"{name} ({names[name]})"  # two sources of one file name stay apart in the counts
            out.append(
                Source(
                    index=i,
                    name=name,
                    path=path,
                    where=f"dataset.sources[{i}]" if listed else "dataset",
                    spec=RowSpec(
                        format=self.row_format(entry.format or data.format),
                        renames=column_renames(entry.columns if entry.columns is not None else data.columns),
                        system_prompt=entry.system_prompt or data.system_prompt,
                        reference=(
                            self.preference.reference_column
                            if self.preference is not None and self.preference.method == "grpo"
                            else None
                        ),
                        reference_required=self.preference is not None and self.preference.needs_reference,
                    ),
                    file_format=entry.file_format or data.file_format,
                    split=entry.split,
                    weight=entry.weight,
                    repeat=entry.repeat,
                    loss_weight=entry.loss_weight,
                    validation_split=(
                        entry.validation_split
                        if entry.validation_split is not None
                        else self.dataset.validation_split
                    ),
                )
            )
        replay = self.replay_source
        if replay is not None:
            out.append(replace(replay, index=len(out), name=f"replay: {replay.name}"))
        return out

    def row_format(self, format: str) -> str:
        """A source's row format: a preference job reads its method's preference rows."""
        if self.preference is None or format != "auto":
            return format
        return self.preference.row_format

    @property
    def holds_out(self) -> bool:
        """Whether any source keeps rows out of training for evaluation."""
        return any(s.validation_split > 0 for s in self.sources)

    @property
    def warmup(self) -> float:
        """transformers 5 takes a ratio through ``warmup_steps`` (a float < 1)."""
        tp = self.training_parameters
        if tp.warmup_ratio is not None:
            return tp.warmup_ratio
        return int(tp.warmup_steps) if tp.warmup_steps >= 1 else tp.warmup_steps

    def run_fingerprint(self) -> str:
        """What makes two runs the same run: everything except how long and whether to resume."""
        data = self.model_dump(mode="json")
        for key in ("resume", "overwrite", "max_steps", "checkpoint", "eval", "tracking", "evaluation"):
            data.pop(key, None)
        data["training_parameters"].pop("epochs", None)
        data["training_parameters"].pop("logging_steps", None)
        data["model_name"] = str(self.resolved(self.model_name))
        for i, entry in enumerate(data["dataset"].get("sources") or [data["dataset"]]):
            if entry.get("path") is not None:
                entry["path"] = str(self.paths.datasets[i])
        continual = data.get("continual") or {}
        for section in (continual.get("reference"), (continual.get("replay") or {}).get("dataset")):
            if section and section.get("path") is not None:
                section["path"] = str(self.resolved(section["path"]))
        data["output_dir"] = str(self.resolved(self.output_dir))
        if data.get("distributed"):
            # Where the rendezvous happens and which node this is do not change what is trained.
            for key in ("node_rank", "master_addr", "master_port", "stop_timeout_s"):
                data["distributed"].pop(key, None)
        text = json.dumps(data, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    # ---- checks beyond the schema -----------------------------------------------------------

    def semantic_issues(self) -> list[ConfigIssue]:
        """Cross-field problems (no file system access)."""
        issues: list[ConfigIssue] = []
        tp, peft = self.training_parameters, self.peft
        if tp.warmup_ratio is not None and tp.warmup_steps:
            issues.append(
                ConfigIssue(
                    "training_parameters.warmup_ratio",
                    "set warmup_steps or warmup_ratio, not both (warmup_steps also takes a float < 1 as a ratio)",
                    tp.warmup_ratio,
                )
            )
        if tp.warmup_steps >= 1 and tp.warmup_steps != int(tp.warmup_steps):
            issues.append(
                ConfigIssue(
                    "training_parameters.warmup_steps",
                    "a step count must be whole; use a float below 1 for a ratio",
                    tp.warmup_steps,
                )
            )
        issues.extend(scheduler_kwargs_issues(tp.lr_scheduler, tp.lr_scheduler_kwargs))
        if self.quantization is not None and peft.method == "full":
            issues.append(
                ConfigIssue(
                    "quantization",
                    "full fine-tuning cannot update quantized weights; remove quantization or use a LoRA method",
                )
            )
        if self.quantization is not None and peft.method == "loftq":
            issues.append(
                ConfigIssue(
                    "peft.method",
                    "loftq quantizes the base itself while initializing; load it unquantized (remove quantization)",
                    peft.method,
                )
            )
        if peft.method != "full" and (peft.freeze_layers or peft.freeze_embeddings):
            issues.append(
                ConfigIssue(
                    "peft.freeze_layers" if peft.freeze_layers else "peft.freeze_embeddings",
                    "freezing applies to full fine-tuning only (adapter methods already freeze the base)",
                )
            )
        if self.eval.early_stopping_patience is not None and not self.holds_out:
            issues.append(
                ConfigIssue(
                    "eval.early_stopping_patience",
                    "early stopping needs held-out data: set dataset.validation_split above 0",
                )
            )
        if self.eval.early_stopping_patience is not None and self.eval.every_steps is None:
            issues.append(
                ConfigIssue(
                    "eval.every_steps",
                    "early stopping needs a step-based evaluation schedule: set eval.every_steps",
                )
            )
        if self.eval.load_best_model_at_end:
            issues.extend(self._best_model_issues())
        package = ATTENTION_PACKAGES.get(self.attn_implementation)
        if package is not None and importlib.util.find_spec(package) is None:
            issues.append(
                ConfigIssue(
                    "attn_implementation",
                    f"{self.attn_implementation} needs the {package} package, which is not installed; use 'sdpa'",
                    self.attn_implementation,
                )
            )
        if isinstance(self.resume, str) and self.resume not in ("auto",) and not self.resume.strip():
            issues.append(ConfigIssue("resume", "expected 'auto', false, or a checkpoint path", self.resume))
        if self.distributed is not None:
            issues.extend(self.distributed.issues())
        issues.extend(self._preference_issues())
        if peft.method == "adalora":
            issues.extend(self._adalora_issues())
        issues += self._unfreeze_issues() + self._continual_issues() + self._loss_weight_issues()
        return issues

    def _refused_with(
        self, key: str, what: str, sections: tuple[str, ...] = ("preference", "distributed")
    ) -> list[ConfigIssue]:
        """``key`` is not available with preference training or a distributed run."""
        why = {
            "preference": "TRL's trainers compute their own loss and own the optimizer",
            "distributed": "it runs in one process for now",
        }
        return [
            ConfigIssue(key, f"{what} is not available with {section} training: {why[section]}")
            for section, value in (("preference", self.preference), ("distributed", self.distributed))
            if value is not None and section in sections
        ]

    def _unfreeze_issues(self) -> list[ConfigIssue]:
        phases = self.peft.unfreeze
        if phases is None:
            return []
        where = "peft.unfreeze"
        issues = []
        if self.peft.method != "full":
            issues.append(
                ConfigIssue(
                    where,
                    "progressive unfreezing is for full fine-tuning (peft.method full)",
                    self.peft.method,
                )
            )
        units = {phase.start[0] for phase in phases}
        if len(units) > 1:
            issues.append(ConfigIssue(where, "give every phase's start in one unit: all epoch or all step"))
        starts = [phase.start[1] for phase in phases]
        if starts[0] != 0:
            issues.append(ConfigIssue(f"{where}[0]", "the first phase starts at 0", starts[0]))
        issues += [
            ConfigIssue(f"{where}[{i}]", "phases must start in increasing order", starts[i])
            for i in range(1, len(starts))
            if starts[i] <= starts[i - 1]
        ]
        return issues + self._refused_with(where, "progressive unfreezing")

    def _continual_issues(self) -> list[ConfigIssue]:
        c = self.continual
        if c is None:
            return []
        issues = []
        if c.ewc and c.reference is None:
            issues.append(
                ConfigIssue(
                    "continual.ewc", "EWC estimates its Fisher on reference data: set continual.reference"
                )
            )
        if c.replay is not None and c.replay.dataset is None and c.reference is None:
            issues.append(
                ConfigIssue(
                    "continual.replay.dataset",
                    "replay needs general rows: set continual.replay.dataset or continual.reference",
                )
            )
        if c.reference is None and c.replay is None and not c.l2_to_base:
            issues.append(
                ConfigIssue(
                    "continual",
                    "sets nothing: give a reference, a penalty strength (l2_to_base, ewc) or replay",
                )
            )
        if self.peft.method == "adalora":
            issues.append(
                ConfigIssue(
                    "continual",
                    "adalora adds its orthogonality regulariser to every loss its model returns, so the "
                    "reference loss and the Fisher would measure it too: use another adapter method",
                )
            )
        return issues + self._refused_with("continual", "continual learning")

    def _loss_weight_issues(self) -> list[ConfigIssue]:
        if self.loss_weights is None:
            return []
        if not self.loss_weights.active:
            return [ConfigIssue("loss_weights", "sets no weight: give tokens or classes")]
        issues = self._refused_with("loss_weights", "loss weighting", ("preference",))
        if self.peft.method == "adalora":
            issues.append(
                ConfigIssue(
                    "loss_weights",
                    "adalora adds its regulariser to the model's own loss, which loss weights replace",
                )
            )
        return issues

    def _adalora_issues(self) -> list[ConfigIssue]:
        """AdaLoRA's regulariser rides on the model's own loss, and its schedule on one process's steps."""
        peft, tp = self.peft, self.training_parameters
        issues = []
        if peft.adalora_tinit + peft.adalora_tfinal >= 1:
            issues.append(
                ConfigIssue(
                    "peft.adalora_tfinal",
                    "adalora_tinit + adalora_tfinal must leave steps between them (< 1)",
                )
            )
        if peft.adalora_init_r < peft.r:
            issues.append(
                ConfigIssue(
                    "peft.adalora_init_r",
                    f"the starting rank must be at least r ({peft.r})",
                    peft.adalora_init_r,
                )
            )
        if tp.chunked_loss is True:
            issues.append(
                ConfigIssue(
                    "training_parameters.chunked_loss",
                    "adalora adds its orthogonality regulariser to the model's own loss: leave chunked_loss auto",
                )
            )
        weighted = [s.where for s in self.sources if s.loss_weight != 1.0]
        issues += [
            ConfigIssue(
                f"{where}.loss_weight",
                "adalora adds its regulariser to the model's own loss, which loss weights replace",
            )
            for where in weighted
        ]
        why = {
            "preference": "TRL computes its loss from the logits, without adalora's regulariser",
            "distributed": "its rank allocation is not synchronized across processes",
        }
        issues += [
            ConfigIssue(key, f"not available with adalora: {why[key]}")
            for key, value in (("preference", self.preference), ("distributed", self.distributed))
            if value is not None
        ]
        return issues

    def _preference_issues(self) -> list[ConfigIssue]:
        formats = [
            (f"{s.where}.format" if self.dataset.sources else "data.format", s.spec.format)
            for s in self.sources
        ]
        pref = self.preference
        if pref is None:
            return [
                ConfigIssue(where, f'{fmt} rows are for preference training: add a "preference" section', fmt)
                for where, fmt in formats
                if fmt in PREFERENCE_FORMATS
            ]
        from finetune_worker.extras import missing_extra

        missing = missing_extra("trl")
        wanted = pref.row_format
        issues = [
            ConfigIssue(
                where, f'preference.method {pref.method} trains on {wanted} rows; leave format "auto"', fmt
            )
            for where, fmt in formats
            if fmt != wanted
        ]
        refused = {
            "evaluation": (self.evaluation, "the evaluation section scores supervised answers"),
            "distributed": (self.distributed, "preference jobs run in one process for now"),
        }
        issues += [
            ConfigIssue(key, f"not available with preference training: {why}")
            for key, (value, why) in refused.items()
            if value is not None
        ]
        if missing is not None:
            issues.append(ConfigIssue("preference.method", missing, pref.method))
        issues += self._method_issues(pref)
        if self.peft.method == "pissa":
            issues.append(
                ConfigIssue(
                    "peft.method",
                    "pissa rewrites the base weights, which a preference run's reference must keep: use lora",
                    self.peft.method,
                )
            )
        if self.peft.method in VIRTUAL_TOKEN_METHODS:
            issues.append(
                ConfigIssue(
                    "peft.method",
                    "preference training takes the LoRA family, ia3 or full fine-tuning (virtual tokens would "
                    "shift the answers' positions)",
                    self.peft.method,
                )
            )
        return issues

    def _method_issues(self, pref: PreferenceSection) -> list[ConfigIssue]:
        """What one preference method needs of the others' settings."""
        issues = [
            ConfigIssue(
                f"preference.{key}", f"applies to {' and '.join(methods)} only (method is {pref.method})"
            )
            for key, methods in METHOD_ONLY.items()
            if key in pref.model_fields_set and pref.method not in methods
        ]
        tp = self.training_parameters
        if pref.method != "grpo" and pref.beta == 0:
            issues.append(ConfigIssue("preference.beta", f"{pref.method} needs a beta above 0", pref.beta))
        if pref.method == "dpo" and pref.loss_type == "exo_pair" and pref.label_smoothing == 0:
            issues.append(
                ConfigIssue(
                    "preference.label_smoothing", "exo_pair needs a label_smoothing above 0 (1e-3 is EXO's)"
                )
            )
        if pref.method == "kto" and tp.batch_size < 2:
            issues.append(
                ConfigIssue(
                    "training_parameters.batch_size",
                    "kto estimates its KL term from the other rows of a batch: use a batch_size of 2 or more",
                    tp.batch_size,
                )
            )
        if pref.method != "grpo":
            return issues
        if not pref.rewards:
            issues.append(
                ConfigIssue(
                    "preference.rewards",
                    "grpo needs at least one reward: exact_match, f1, regex, length or beam",
                )
            )
        batches = [("training_parameters.batch_size", tp.batch_size * tp.gradient_accumulation_steps)]
        if self.holds_out:
            batches.append(("eval.batch_size", self.eval.batch_size or tp.batch_size))
        for where, size in batches:
            if size % pref.num_generations:
                issues.append(
                    ConfigIssue(
                        where,
                        f"grpo samples preference.num_generations ({pref.num_generations}) completions per "
                        f"prompt, so a batch ({size} completions) must be a multiple of it",
                        size,
                    )
                )
        return issues

    def subscriber_issues(self) -> list[ConfigIssue]:
        """Why this job cannot run without a subscriber to ask (a GRPO ``beam`` reward)."""
        if self.preference is None:
            return []
        return [
            ConfigIssue(
                f"preference.rewards[{i}]",
                "a beam reward is computed by the BEAM process the job's reward requests go to: submit it "
                "with a subscriber pid (submit/2 in port mode), not standalone or with ReplyTo nil",
            )
            for i, reward in enumerate(self.preference.rewards)
            if reward.type == "beam"
        ]

    def _best_model_issues(self) -> list[ConfigIssue]:
        where = "eval.load_best_model_at_end"
        if not self.holds_out:
            return [ConfigIssue(where, "needs held-out data: set dataset.validation_split above 0")]
        every = self.eval.every_steps
        if every is None:
            return [
                ConfigIssue(
                    "eval.every_steps",
                    "load_best_model_at_end needs a step-based evaluation: set eval.every_steps",
                )
            ]
        if self.checkpoint.every_steps % every:
            return [
                ConfigIssue(
                    "checkpoint.every_steps",
                    f"load_best_model_at_end keeps the best checkpoint, so checkpoints must fall on evaluations: "
                    f"make checkpoint.every_steps a multiple of eval.every_steps ({every})",
                    self.checkpoint.every_steps,
                )
            ]
        return []

    @classmethod
    def partial_issues(cls, raw: dict[str, object]) -> list[ConfigIssue]:
        """The model and data problems of a config whose schema failed elsewhere, so that one pass
        reports them all: what ``environment_issues`` would say of the sections that are valid."""
        issues = []
        model_name = raw.get("model_name")
        if isinstance(model_name, str) and model_name:
            missing = _missing_model(model_name)
            issues += [missing] if missing is not None else []
        try:
            dataset = DatasetSection.model_validate(raw.get("dataset"))
            data = DataConfig.model_validate(raw.get("data") or {})
            # The rows' format depends on the preference section: without a valid one, no row check.
            preference = (
                PreferenceSection.model_validate(raw["preference"])
                if raw.get("preference") is not None
                else None
            )
        except ValidationError:
            return issues  # the schema errors already name them
        probe = cls.model_construct(
            dataset=dataset, data=data, preference=preference, model_name="", output_dir=""
        )
        return issues + probe.data_issues()

    def data_issues(self) -> list[ConfigIssue]:
        """What a look at the data reveals without a tokenizer: each source's path, format and first rows."""
        issues = [ConfigIssue(where, message) for where, message in self.dataset.mixture_issues()]
        for source in self.sources:
            issues += [ConfigIssue(f"{source.where}.path", message) for message in preview_issues(source)]
        held_out = self.evaluation_source
        if held_out is not None:
            issues += [
                ConfigIssue("evaluation.dataset.path", message) for message in preview_issues(held_out)
            ]
        reference = self.reference_source  # the replayed rows are one of self.sources
        if reference is not None:
            issues += [
                ConfigIssue(f"{reference.where}.path", message) for message in preview_issues(reference)
            ]
        return issues

    @property
    def reference_source(self) -> Source | None:
        """The ``continual`` section's reference rows (measured before and after; EWC's Fisher)."""
        ref = self.continual.reference if self.continual is not None else None
        if ref is None:
            return None
        return self.data.source(
            self.resolved(ref.path), "continual.reference", split=ref.split, file_format=ref.file_format
        )

    @property
    def replay_source(self) -> Source | None:
        """The replayed general rows, as a source of the mixture whose share of the rows is fixed."""
        replay = self.continual.replay if self.continual is not None else None
        if replay is None:
            return None
        if replay.dataset is None:
            # The reference data beyond the rows the reference loss measures: replaying those
            # would hide the forgetting it reports.
            ref = self.reference_source  # None only in a config semantic_issues refuses
            if ref is None or self.continual is None:
                return None
            skip = self.continual.reference_rows
            return replace(ref, share=replay.share, skip=skip, where="continual.replay")
        return replace(
            self.data.source(
                self.resolved(replay.dataset.path),
                "continual.replay.dataset",
                split=replay.dataset.split,
                file_format=replay.dataset.file_format,
            ),
            share=replay.share,
        )

    @property
    def evaluation_source(self) -> Source | None:
        """The ``evaluation`` section's own rows, when it names a dataset."""
        held_out = self.evaluation.dataset if self.evaluation is not None else None
        if held_out is None:
            return None
        return self.data.source(
            self.resolved(held_out.path),
            "evaluation.dataset",
            split=held_out.split,
            file_format=held_out.file_format,
        )

    def _layer_issues(self, layers: int | None) -> list[ConfigIssue]:
        """What freeze_layers and the unfreezing phases ask of a model with ``layers`` decoder layers."""
        peft = self.peft
        if layers is None:
            return []
        if peft.freeze_layers >= layers:
            return [
                ConfigIssue(
                    "peft.freeze_layers",
                    f"the model has {layers} decoder layers: freezing {peft.freeze_layers} would leave "
                    f"none to train (at most {layers - 1})",
                    peft.freeze_layers,
                )
            ]
        free = layers - peft.freeze_layers
        return [
            ConfigIssue(
                f"peft.unfreeze[{i}].layers",
                f"the model has {layers} decoder layers"
                + (f", {free} of them not frozen by peft.freeze_layers" if peft.freeze_layers else "")
                + f": a phase can train at most {free} (or 'all')",
                phase.layers,
            )
            for i, phase in enumerate(peft.unfreeze or [])
            if isinstance(phase.layers, int) and phase.layers > free
        ]

    def environment_issues(self) -> list[ConfigIssue]:
        """Problems a glance at the file system reveals; run at submit, before anything heavy."""
        issues = self.semantic_issues() + quantization_issues(self.quantization)
        model = self.resolved(self.model_name)
        missing = _missing_model(self.model_name)
        if missing is not None:
            issues.append(missing)
        elif self.peft.method == "full":
            issues += self._layer_issues(_layer_count(model))
        issues += self.data_issues()
        problem = run_folder_issue(
            self.resolved(self.output_dir),
            self.output_dir,
            model_dir=model,
            overwrite=self.overwrite,
            resume=self.resume,
            fingerprint=self.run_fingerprint(),
        )
        if problem is not None:
            issues.append(ConfigIssue("output_dir", problem, self.output_dir))
        problem = (
            None
            if self.resume in ("auto", False)
            else resume_checkpoint_issue(self.resolved(str(self.resume)), str(self.resume))
        )
        if problem is not None:
            issues.append(ConfigIssue("resume", problem, self.resume))
        return issues


KINDS = (
    JobKind(
        "train",
        TrainConfig,
        run="finetune_worker.training.job:run",
        recognise=lambda keys: bool(keys & {"model_name", "training_parameters"}),
        order=30,
    ),
)
