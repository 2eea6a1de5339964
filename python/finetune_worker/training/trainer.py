"""HF Trainer wiring: TrainingArguments from the config, and atomic checkpoint saves.

The only thing we change in the Trainer is where a checkpoint is written: into
``output_dir/.staging/checkpoint-N``, published with one rename once complete (see
``checkpoints.py``), then rotated to ``checkpoint.keep``. Everything else (resume of model,
optimizer, scheduler, RNG and data position) is the Trainer's own.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from transformers import EarlyStoppingCallback, PrinterCallback, Trainer, TrainingArguments

from finetune_worker.config.train import TrainConfig
from finetune_worker.training.checkpoints import publish, rotate, staging_dir
from finetune_worker.training.model import Plan


class AtomicCheckpointTrainer(Trainer):
    """A Trainer whose checkpoints appear on disk all at once or not at all."""

    def __init__(self, *args: Any, keep: int, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._keep = keep
        self._staging = False

    def train(self, *args: Any, **kwargs: Any) -> Any:
        if self.args.world_size > 1 and self.model_wrapped is self.model:
            # An evaluate() before train() let accelerate mark the bare model as prepared (eval
            # mode skips the DDP wrapper), and train() then never wraps it: the ranks would step
            # on their own gradients, unsynchronized. Forget that mark so train() wraps it.
            self.model.__dict__.pop("_is_accelerate_prepared", None)
            self.accelerator._models = [m for m in self.accelerator._models if m is not self.model]
        return super().train(*args, **kwargs)

    def _get_output_dir(self, trial: Any) -> str:
        if self._staging:
            return str(staging_dir(Path(self.args.output_dir)))
        return super()._get_output_dir(trial)

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        out = Path(self.args.output_dir)
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
        finally:
            self._staging = False
        self.accelerator.wait_for_everyone()
        if main:
            final = publish(staged, out)
            rotate(out, self._keep, protect=final)
        self.accelerator.wait_for_everyone()


def training_arguments(cfg: TrainConfig, plan: Plan, output_dir: Path, has_eval: bool) -> TrainingArguments:
    tp, ev = cfg.training_parameters, cfg.eval
    step_eval = has_eval and ev.every_steps is not None
    return TrainingArguments(
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
        # Early stopping reads state.best_metric, which needs only metric_for_best_model; loading
        # the best checkpoint at the end would fight our rotation, so the final weights are kept.
        load_best_model_at_end=False,
        metric_for_best_model="eval_loss" if ev.early_stopping_patience is not None else None,
        greater_is_better=False if ev.early_stopping_patience is not None else None,
        seed=cfg.seed,
        data_seed=cfg.seed,
        report_to="none",
        disable_tqdm=True,
        remove_unused_columns=False,  # our rows are already model inputs; the collator needs them all
        include_num_input_tokens_seen="non_padding",
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
) -> AtomicCheckpointTrainer:
    has_eval = eval_rows is not None and len(eval_rows) > 0
    args = training_arguments(cfg, plan, output_dir, has_eval)
    all_callbacks = list(callbacks)
    if cfg.eval.early_stopping_patience is not None and has_eval:
        all_callbacks.append(
            EarlyStoppingCallback(
                early_stopping_patience=cfg.eval.early_stopping_patience,
                early_stopping_threshold=cfg.eval.early_stopping_threshold,
            )
        )
    trainer = AtomicCheckpointTrainer(
        model=model,
        args=args,
        train_dataset=train_rows,
        eval_dataset=eval_rows if has_eval else None,
        data_collator=collator,
        processing_class=tokenizer,
        callbacks=all_callbacks,
        keep=cfg.checkpoint.keep,
    )
    # With tqdm off the Trainer prints every log dict; our events already carry them.
    trainer.remove_callback(PrinterCallback)
    return trainer
