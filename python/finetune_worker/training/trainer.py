"""HF Trainer wiring: TrainingArguments from the config, and atomic checkpoint saves.

What we change in the Trainer:

- where a checkpoint is written: into ``output_dir/.staging/checkpoint-N``, published with one
  rename once complete (see ``checkpoints.py``), then rotated to ``checkpoint.keep`` (the best
  checkpoint, when one is tracked, is never rotated away);
- each checkpoint also holds the whole run's training-loss sum (``RUN_STATE``), so a resumed
  run reports the same ``train_loss`` as an uninterrupted one (the Trainer's covers only the
  steps of its own ``train()`` call);
- ``eval_loss`` is the token-weighted mean over the held-out set, a property of the model:
  the Trainer's is a mean of per-batch means, which moves with the eval batch size.

Everything else (resume of model, optimizer, scheduler, RNG and data position) is the Trainer's own.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import EarlyStoppingCallback, PrinterCallback, Trainer, TrainerCallback, TrainingArguments

from finetune_worker.config.train import DEFAULT_DECAY_FRACTION, TrainConfig, scheduler_kwargs
from finetune_worker.errors import JobFailed
from finetune_worker.training.checkpoints import publish, rotate, staging_dir
from finetune_worker.training.data_collate import LengthGroupedBatches, row_lengths
from finetune_worker.training.model import Plan

#: Our state inside each checkpoint: ``{"loss_sum", "global_step"}`` of the whole run so far.
RUN_STATE = "finetune_worker_state.json"


def read_run_state(checkpoint: Path) -> dict[str, Any] | None:
    """The run state saved in ``checkpoint``; None for a checkpoint written before we saved it."""
    try:
        data = json.loads((checkpoint / RUN_STATE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def diverged(what: str) -> JobFailed:
    return JobFailed(
        "training_diverged",
        f"{what}; the run diverged and nothing from this step was saved",
        hint="Lower training_parameters.learning_rate, keep max_grad_norm above 0, use fp32 or bf16 instead of "
        "fp16, and look for extreme values in the data; resume from the last checkpoint.",
    )


if TYPE_CHECKING:  # the mixin's super() is the Trainer it is mixed into
    _TrainerBase = Trainer
else:
    _TrainerBase = object


class AtomicCheckpoints(_TrainerBase):
    """What every trainer of ours adds to a ``transformers.Trainer`` (or a TRL trainer, which is
    one): checkpoints that appear on disk all at once or not at all, the whole run's loss sum in
    each, no step on a NaN loss, no save of NaN weights (see the module doc). Mixed in first:
    ``class T(AtomicCheckpoints, Trainer)``."""

    def __init__(self, *args: Any, keep: int, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._keep = keep
        self._staging = False
        #: Loss summed over the steps before this train() call (from the resumed checkpoint).
        self.prior_loss_sum = 0.0

    def run_loss_sum(self) -> float:
        """Sum of the per-step training losses of the whole run so far, as the Trainer counts them."""
        pending = getattr(self, "_tr_loss", None)
        pending_value = float(pending.item()) if isinstance(pending, torch.Tensor) else 0.0
        return self.prior_loss_sum + float(getattr(self, "_total_loss_scalar", 0.0)) + pending_value

    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        loss = super().training_step(*args, **kwargs)
        # The Trainer hides a NaN/inf step loss from its logs (logging_nan_inf_filter) and trains
        # on: the weights it saves are then NaN. One sync per micro-step is the price of knowing.
        if not bool(torch.isfinite(loss).all()):
            raise diverged(f"the training loss became {float(loss):g} at step {self.state.global_step + 1}")
        return loss

    def create_model_card(self, *args: Any, **kwargs: Any) -> None:
        """No card from the Trainer (TRL's write one into output_dir at every checkpoint): the run's
        card is ours, written from its results once it completes (``run_card``)."""

    def check_finite_weights(self) -> None:
        """Refuse to save weights that are no longer numbers (an update can overflow while the loss
        that led to it was still finite)."""
        assert self.model is not None
        for name, param in self.model.named_parameters():
            if param.requires_grad and not bool(torch.isfinite(param.detach()).all()):
                raise diverged(
                    f"the weights of {name} are NaN or infinite after step {self.state.global_step}"
                )

    def train(self, *args: Any, **kwargs: Any) -> Any:
        if self.args.world_size > 1 and self.model_wrapped is self.model:
            # An evaluate() before train() let accelerate mark the bare model as prepared (eval
            # mode skips the DDP wrapper), and train() then never wraps it: the ranks would step
            # on their own gradients, unsynchronized. Forget that mark so train() wraps it.
            self.model.__dict__.pop("_is_accelerate_prepared", None)
            self.accelerator._models = [m for m in self.accelerator._models if m is not self.model]
        return super().train(*args, **kwargs)

    def create_scheduler(self, num_training_steps: int, optimizer: Any = None) -> Any:
        # warmup_stable_decay has no default decay length in transformers; ours is a fraction of
        # the run, known only here.
        kwargs = self.args.lr_scheduler_kwargs
        assert isinstance(kwargs, dict)  # built by training_arguments from a validated config
        if self.args.lr_scheduler_type == "warmup_stable_decay" and "num_decay_steps" not in kwargs:
            kwargs["num_decay_steps"] = max(1, round(DEFAULT_DECAY_FRACTION * num_training_steps))
        return super().create_scheduler(num_training_steps, optimizer)

    def _get_output_dir(self, trial: Any) -> str:
        if self._staging:
            return str(staging_dir(Path(str(self.args.output_dir))))
        return super()._get_output_dir(trial)

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        self.check_finite_weights()
        out = Path(str(self.args.output_dir))
        staged = staging_dir(out) / f"checkpoint-{self.state.global_step}"
        # Under torchrun every rank writes into the same staged folder (its RNG state at least),
        # so only the saving process prepares and publishes it, and the others wait on both
        # sides (a no-op in a single process).
        main = self.args.should_save
        if main:
            shutil.rmtree(staged, ignore_errors=True)
            staged.parent.mkdir(parents=True, exist_ok=True)
        self.accelerator.wait_for_everyone()
        self._staging = True
        try:
            super()._save_checkpoint(model, trial)
        except RuntimeError as exc:
            _raise_if_out_of_space(exc, staged.parent)
            raise
        finally:
            self._staging = False
        # Computed on every rank (it may gather), written by the saving one.
        run_state = {"loss_sum": self.run_loss_sum(), "global_step": self.state.global_step}
        self.accelerator.wait_for_everyone()
        if main:
            (staged / RUN_STATE).write_text(json.dumps(run_state))
            if self.state.best_model_checkpoint == str(staged):
                # The Trainer named the folder it wrote into; the best checkpoint is the published
                # one. Fixed in the staged state file too, before the publish makes it visible.
                self.state.best_model_checkpoint = str(out / staged.name)
                self.state.save_to_json(str(staged / "trainer_state.json"))
            final = publish(staged, out)
            best = self.state.best_model_checkpoint
            rotate(out, self._keep, protect=[final, *([Path(best)] if best else [])])
        self.accelerator.wait_for_everyone()


class AtomicCheckpointTrainer(AtomicCheckpoints, Trainer):
    """The supervised trainer: atomic checkpoints, plus length-grouped batches, the token-weighted
    eval loss, per-source loss weights and the chunked LM-head loss (see the module doc)."""

    def __init__(
        self,
        *args: Any,
        keep: int,
        chunked_loss: str | bool = False,
        token_weights: torch.Tensor | None = None,
        **kwargs: Any,
    ):
        super().__init__(*args, keep=keep, **kwargs)
        self._chunked_loss = chunked_loss
        #: loss_weights.tokens as a vocabulary-sized table (training.loss_weights), or None.
        self._token_table = token_weights
        #: continual learning's penalty (training.continual.ContinualPenalty), set by the job once
        #: it knows the run is not already complete; None: no penalty.
        self.penalty: Callable[[], torch.Tensor] | None = None
        self._penalties: list[float] = []  # its values since the last log
        self._group_by_length = bool(getattr(self.data_collator, "groups_by_length", False))
        self._eval_sums: list[torch.Tensor] | None = None

    # ---- length-grouped batches (data.packing "group") -------------------------------------------

    def _get_train_sampler(self, train_dataset: Any = None) -> Any:
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if not self._group_by_length or dataset is None:
            return super()._get_train_sampler(train_dataset)
        args = self.args
        global_batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
        seed = args.data_seed if args.data_seed is not None else args.seed
        return LengthGroupedBatches(row_lengths(dataset), global_batch, seed)

    def _get_eval_sampler(self, eval_dataset: Any) -> Any:
        if not self._group_by_length or eval_dataset is None or self.args.world_size > 1:
            return super()._get_eval_sampler(eval_dataset)
        # Shortest first: little padding, and the loss is a token-weighted sum (order-free).
        import numpy as np

        return np.argsort(np.asarray(row_lengths(eval_dataset)), kind="stable").tolist()

    # ---- token-weighted eval loss ------------------------------------------------------------

    def compute_loss(self, model: Any, inputs: Any, *args: Any, **kwargs: Any) -> Any:
        out = self._language_model_loss(model, inputs, *args, **kwargs)
        if self.penalty is None or not model.training:
            return out
        # Added once per optimizer step: each micro-batch's loss is a 1/accumulation share of the
        # step's when the Trainer does not divide it by the accumulation steps itself.
        num_items = kwargs.get("num_items_in_batch", args[1] if len(args) > 1 else None)
        scaled = self.loss_is_scaled_for_ga
        if scaled is None:
            scaled = (
                self.model_accepts_loss_kwargs and num_items is not None
            ) or self.compute_loss_func is not None
        term = self.penalty()
        self._penalties.append(float(term.detach()))
        if scaled:
            term = term / self.current_gradient_accumulation_steps
        if isinstance(out, tuple):
            return (out[0] + term.to(out[0].device), *out[1:])
        return out + term.to(out.device)

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        # The training loss includes the penalty; its own mean goes beside it.
        if "loss" in logs and self._penalties:
            logs["penalty"] = sum(self._penalties) / len(self._penalties)
            self._penalties.clear()
        super().log(logs, *args, **kwargs)

    def _language_model_loss(self, model: Any, inputs: Any, *args: Any, **kwargs: Any) -> Any:
        weights = inputs.pop("token_weights", None)
        if self._token_table is not None and model.training:
            weights = self._with_token_weights(weights, inputs["labels"])
        head = self._chunked_head(model, inputs)
        if head is not None:
            return self._chunked_head_loss(
                model, head, inputs, weights if model.training else None, *args, **kwargs
            )
        if weights is not None and model.training:
            return self._weighted_loss(model, inputs, weights, *args, **kwargs)
        count = None
        if self._eval_sums is not None and not model.training:
            # The model's loss is the mean over the batch's target tokens (labels shifted by one).
            shifted = inputs.get("shift_labels")
            targets = shifted if shifted is not None else inputs["labels"][..., 1:]
            count = (targets != -100).sum()
        out = super().compute_loss(model, inputs, *args, **kwargs)
        if count is not None and self._eval_sums is not None:
            loss = out[0] if isinstance(out, tuple) else out
            self._eval_sums[0] += loss.detach().float() * count
            self._eval_sums[1] += count
        return out

    def _with_token_weights(self, weights: torch.Tensor | None, labels: torch.Tensor) -> torch.Tensor:
        """Each position's weight times its label's ``loss_weights.tokens`` weight (labels are the
        targets, aligned as the row weights are: both are read shifted by one)."""
        assert self._token_table is not None
        if self._token_table.device != labels.device:
            self._token_table = self._token_table.to(labels.device)
        per_token = self._token_table[labels.clamp(min=0)]
        return per_token if weights is None else per_token * weights.to(per_token.device)

    def _weighted_loss(
        self,
        model: Any,
        inputs: Any,
        weights: torch.Tensor,
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        """The causal-LM loss with each target token's cross-entropy times its source's
        ``loss_weight``, normalized as the model's own loss is (by the accumulated batch's target
        tokens when the Trainer counts them, so a weight of 1 everywhere is the usual loss)."""
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        logits = outputs.logits
        if logits.shape[1] > labels.shape[1]:  # prompt tuning prepends virtual tokens' logits
            logits = logits[:, -labels.shape[1] :]
        targets = labels[..., 1:].reshape(-1)
        token_loss = torch.nn.functional.cross_entropy(
            logits[..., :-1, :].float().reshape(-1, logits.shape[-1]),
            targets,
            ignore_index=-100,
            reduction="none",
        )
        valid = targets != -100
        total = (token_loss * weights[..., 1:].reshape(-1).to(token_loss.dtype) * valid).sum()
        scaled = self.model_accepts_loss_kwargs and num_items_in_batch is not None
        loss = total / (num_items_in_batch if scaled else valid.sum().clamp(min=1))
        if scaled and self.args.average_tokens_across_devices:
            # As Trainer.compute_loss: the count was summed over the processes.
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        return (loss, outputs) if return_outputs else loss

    # ---- chunked LM head + cross-entropy (training_parameters.chunked_loss) ----------------------

    def _chunked_head(self, model: Any, inputs: Any) -> tuple[Any, str] | None:
        """``(the CausalLM that owns the head, the head's attribute name)`` when this batch's loss
        should go through :func:`chunked_head_loss`, else None (the model's own loss)."""
        mode = self._chunked_loss
        if mode is False or "labels" not in inputs or self.args.world_size > 1:
            return None  # under DDP the head must run inside the wrapped forward
        if adalora_config(model) is not None:
            return None  # its orthogonality regulariser is added to the model's own loss
        unwrapped = self.accelerator.unwrap_model(model)
        base = unwrapped.get_base_model() if hasattr(unwrapped, "get_base_model") else unwrapped
        head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
        config = getattr(base, "config", None)
        if head is None or getattr(base, "lm_head", None) is not head or config is None:
            return None
        if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
            return None  # the logits are transformed after the head: leave them to the model
        if mode == "auto":
            vocab = int(getattr(config, "vocab_size", 0) or 0)
            if inputs["labels"].numel() * vocab * 4 < CHUNKED_LOSS_AUTO_BYTES:
                return None
        return base, "lm_head"

    def _chunked_head_loss(
        self,
        model: Any,
        owner: tuple[Any, str],
        inputs: Any,
        weights: torch.Tensor | None,
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        """The causal-LM loss with the head run on the trained tokens only, a chunk at a time
        (see :func:`chunked_head_loss`); normalized as the model's own loss is."""
        base, name = owner
        head = getattr(base, name)
        labels = inputs.pop("labels")
        capture = _HiddenCapture()
        setattr(base, name, capture)
        try:
            outputs = model(**inputs)
        finally:
            setattr(base, name, head)
        hidden = capture.hidden
        if hidden is None:
            raise RuntimeError("the model did not call its LM head")
        if hidden.shape[1] > labels.shape[1]:  # prompt tuning prepends virtual tokens
            hidden = hidden[:, -labels.shape[1] :]
        total, valid = chunked_head_loss(head, hidden, labels, weights)
        if self._eval_sums is not None and not model.training:
            self._eval_sums[0] += total.detach().float()
            self._eval_sums[1] += valid
        scaled = self.model_accepts_loss_kwargs and num_items_in_batch is not None and model.training
        loss = total / (num_items_in_batch if scaled else valid.clamp(min=1))
        if scaled and self.args.average_tokens_across_devices:
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        return (loss, outputs) if return_outputs else loss

    def evaluation_loop(self, *args: Any, **kwargs: Any) -> Any:
        device = self.args.device
        self._eval_sums = [torch.zeros((), device=device), torch.zeros((), device=device, dtype=torch.long)]
        # The held-out loss is the language-modelling loss: AdaLoRA's regulariser, which its model
        # adds to every loss it returns, stays out of it.
        adalora = adalora_config(self.model)
        reg_weight = adalora.orth_reg_weight if adalora is not None else 0.0
        if adalora is not None:
            adalora.orth_reg_weight = 0.0
        try:
            output = super().evaluation_loop(*args, **kwargs)
            total, count = (self.accelerator.reduce(t, reduction="sum") for t in self._eval_sums)
        finally:
            self._eval_sums = None
            if adalora is not None:
                adalora.orth_reg_weight = reg_weight
        prefix = kwargs.get("metric_key_prefix", args[4] if len(args) > 4 else "eval")
        if int(count) > 0 and output.metrics is not None and f"{prefix}_loss" in output.metrics:
            output.metrics[f"{prefix}_loss"] = float(total) / int(count)
        return output


#: chunked_loss "auto" takes over when a batch's fp32 logits would be at least this large.
CHUNKED_LOSS_AUTO_BYTES = 64 * 2**20
#: Trained tokens per chunk of the chunked head: 4,096 x a 128k vocab is 2 GiB of fp32 logits
#: at most at a time, 4,096 x 32k is 512 MiB.
CHUNK_TOKENS = 4096


class _HiddenCapture(torch.nn.Module):
    """Stands in for the LM head for one forward: keeps its input, returns zero-width logits."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden: torch.Tensor | None = None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        self.hidden = hidden
        return hidden.new_zeros((*hidden.shape[:-1], 0))


def _chunk_loss(
    head: Any, hidden: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    logits = head(hidden).float()
    token_loss = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
    return (token_loss * weights).sum()


def chunked_head_loss(
    head: Any, hidden: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum of the trained tokens' cross-entropy x weight, their count)`` for a causal LM.

    Only positions whose next label is trained go through ``head`` (with responses-only labels,
    the prompt's share of the head's matmul is saved too), CHUNK_TOKENS of them at a time under
    activation checkpointing: each chunk's logits exist only while its loss (and, in backward,
    its gradient) is computed. Written here because the fused kernels that do this (Liger's
    fused linear cross-entropy, cut-cross-entropy) are Triton, GPU-only; this is plain torch.
    """
    from torch.utils.checkpoint import checkpoint

    targets = labels[:, 1:].reshape(-1)
    keep = (targets != -100).nonzero().squeeze(-1)
    flat = hidden[:, :-1].reshape(-1, hidden.shape[-1]).index_select(0, keep)
    picked = targets.index_select(0, keep)
    if weights is not None:
        w = weights[:, 1:].reshape(-1).index_select(0, keep).to(torch.float32)
    else:
        w = torch.ones(picked.shape, dtype=torch.float32, device=picked.device)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, flat.shape[0], CHUNK_TOKENS):
        end = start + CHUNK_TOKENS
        total = total + checkpoint(
            _chunk_loss, head, flat[start:end], picked[start:end], w[start:end], use_reentrant=False
        )
    if flat.shape[0] == 0:
        total = total + hidden.sum() * 0.0  # keep the graph connected on a batch with nothing to train
    return total, torch.tensor(int(keep.numel()), device=hidden.device)


#: What torch's zip writer says when a write came up short (it drops the errno): "[enforce fail at
#: inline_container.cc] unexpected pos", "PytorchStreamWriter failed writing file".
_SHORT_WRITE = ("inline_container", "pytorchstreamwriter")
#: Less free space than this on the checkpoint's filesystem after a short write: the disk is full.
_NEARLY_FULL = 16 * 2**20


def _raise_if_out_of_space(exc: RuntimeError, where: Path) -> None:
    """Turn torch's errno-less short-write error into the ``ENOSPC`` it was, when the filesystem
    of ``where`` is (nearly) full; anything else is left to propagate as it is."""
    if not any(marker in str(exc).lower() for marker in _SHORT_WRITE):
        return
    try:
        st = os.statvfs(where)
    except OSError:
        return
    free = st.f_bavail * st.f_frsize
    if free < _NEARLY_FULL:
        raise OSError(
            errno.ENOSPC,
            f"No space left on device while writing a checkpoint ({free} bytes free)",
            str(where),
        ) from exc


def training_arguments(cfg: TrainConfig, plan: Plan, output_dir: Path, has_eval: bool) -> TrainingArguments:
    return TrainingArguments(**training_argument_values(cfg, plan, output_dir, has_eval))


def training_argument_values(
    cfg: TrainConfig, plan: Plan, output_dir: Path, has_eval: bool
) -> dict[str, Any]:
    """The TrainingArguments of a run, as keywords (a TRL trainer's config takes them too)."""
    tp, ev = cfg.training_parameters, cfg.eval
    step_eval = has_eval and ev.every_steps is not None
    tracks_best = step_eval and (ev.early_stopping_patience is not None or ev.load_best_model_at_end)
    return dict(
        output_dir=str(output_dir),
        num_train_epochs=tp.epochs,
        max_steps=cfg.max_steps or -1,
        per_device_train_batch_size=tp.batch_size,
        per_device_eval_batch_size=ev.batch_size or tp.batch_size,
        gradient_accumulation_steps=tp.gradient_accumulation_steps,
        learning_rate=tp.learning_rate,
        weight_decay=tp.weight_decay,
        warmup_steps=cfg.warmup,
        lr_scheduler_type=tp.lr_scheduler,
        lr_scheduler_kwargs=scheduler_kwargs(tp.lr_scheduler, tp.lr_scheduler_kwargs),
        max_grad_norm=tp.max_grad_norm,
        optim=plan.optimizer,
        bf16=plan.precision == "bf16",
        fp16=plan.precision == "fp16",
        use_cpu=plan.device == "cpu",
        # transformers 5 renamed gradient checkpointing; a quantized base got it from
        # prepare_model_for_kbit_training already.
        activation_checkpointing=tp.gradient_checkpointing and cfg.quantization is None,
        activation_checkpointing_kwargs={"use_reentrant": False},
        logging_strategy="steps",
        logging_steps=tp.logging_steps,
        eval_strategy="steps" if step_eval else "no",
        eval_steps=ev.every_steps if step_eval else None,
        save_strategy="steps",
        save_steps=cfg.checkpoint.every_steps,
        save_total_limit=None,  # rotation is ours: it must only ever count complete checkpoints
        # Early stopping reads state.best_metric, which needs only metric_for_best_model. With
        # load_best_model_at_end the Trainer loads the best checkpoint after the last step (our
        # rotation never deletes it), so the outputs hold the best weights.
        load_best_model_at_end=ev.load_best_model_at_end and step_eval,
        metric_for_best_model=ev.metric_for_best_model if tracks_best else None,
        greater_is_better=ev.greater_is_better if tracks_best else None,
        seed=cfg.seed,
        data_seed=cfg.seed,
        report_to="none",
        disable_tqdm=True,
        remove_unused_columns=False,  # our rows are already model inputs; the collator needs them all
        include_num_input_tokens_seen="non_padding",
        # The eval loss is all an evaluation needs (compute_loss sums it per token); without this
        # the Trainer keeps every held-out batch's logits, rows x length x vocab floats, in memory
        # (a 1,000-row split at 256 tokens and a 1k vocab: ~1 GiB; a 32k vocab: 32 times that).
        prediction_loss_only=True,
        dataloader_num_workers=0,
        # Inside a torchrun rank (distributed.rank_main): the strategy's own arguments.
        **(cfg.distributed.trainer_arguments() if cfg.distributed is not None else {}),
    )


def build_trainer(
    cfg: TrainConfig,
    plan: Plan,
    model: Any,
    tokenizer: Any,
    train_rows: Any,
    eval_rows: Any,
    collator: Any,
    callbacks: list[Any],
    output_dir: Path,
    *,
    token_weights: torch.Tensor | None = None,
) -> AtomicCheckpointTrainer:
    has_eval = eval_rows is not None and len(eval_rows) > 0
    args = training_arguments(cfg, plan, output_dir, has_eval)
    trainer = AtomicCheckpointTrainer(
        model=model,
        args=args,
        train_dataset=train_rows,
        eval_dataset=eval_rows if has_eval else None,
        data_collator=collator,
        processing_class=tokenizer,
        callbacks=run_callbacks(cfg, callbacks, has_eval),
        keep=cfg.checkpoint.keep,
        chunked_loss=cfg.training_parameters.chunked_loss,
        token_weights=token_weights,
    )
    # With tqdm off the Trainer prints every log dict; our events already carry them.
    trainer.remove_callback(PrinterCallback)
    return trainer


def run_callbacks(cfg: TrainConfig, callbacks: list[Any], has_eval: bool) -> list[Any]:
    """``callbacks`` plus early stopping when the config asks for it and there is held-out data,
    and AdaLoRA's rank allocation."""
    out = list(callbacks)
    if cfg.eval.early_stopping_patience is not None and has_eval:
        out.append(
            EarlyStoppingCallback(
                early_stopping_patience=cfg.eval.early_stopping_patience,
                early_stopping_threshold=cfg.eval.early_stopping_threshold,
            )
        )
    if cfg.peft.method == "adalora":
        out.append(AdaLoraAllocation())
    return out


def adalora_config(model: Any) -> Any:
    """The AdaLoRA config of a peft model being trained with it, else None."""
    config = getattr(model, "peft_config", {}).get("default")
    return config if getattr(config, "peft_type", None) == "ADALORA" else None


class AdaLoraAllocation(TrainerCallback):
    """AdaLoRA's budget step: after each optimizer step, while the gradients are still there (the
    Trainer zeroes them after ``on_optimizer_step``), score each rank's importance and prune."""

    def on_optimizer_step(
        self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any
    ) -> None:
        model.base_model.update_and_allocate(state.global_step)  # 0-based: the step being finished
