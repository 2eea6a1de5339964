"""The ``train`` job, top to bottom: checks, model, data, base eval, train, final eval, save.

Runs on the runner thread (the ``train`` kind of ``config.train``). Cheap checks come first because a job
may wait in the queue for hours after ``submit`` validated it: paths can vanish meanwhile.
Every failure leaves as a :class:`JobFailed` with a code and a hint; a cancel leaves as
:class:`JobCancelled` carrying the checkpoint written at the step boundary.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import traceback
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from finetune_worker.config.train import VIRTUAL_TOKEN_METHODS, TrainConfig
from finetune_worker.context import JobContext, release_memory
from finetune_worker.errors import JobCancelled, JobFailed
from finetune_worker.outputs import DATA_CACHE, share_files, write_text_atomic
from finetune_worker.security import redact
from finetune_worker.training import checkpoints as ckpt
from finetune_worker.training.failures import classify_training_exception
from finetune_worker.training.report import write_report
from finetune_worker.training.run_card import write_card, write_next_configs

# OpenMP threads that spin while they wait collapse CPU training 20-40x as soon as another
# process competes for the cores (measured here: a 45-row eval went from 0.24 s to 22 s).
# Only effective if torch is not imported yet; an explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

log = logging.getLogger("finetune_worker.training")

SUMMARY = "summary.json"
#: peft loads it as an adapter named after the folder, and module names cannot hold "." or "-".
INITIAL_ADAPTER = "initial_adapter"
#: Adapter inits that rewrite the base weights and that peft can convert back to plain LoRA.
#: (LoftQ's adapter is meant for the LoftQ-quantized base, i.e. the base loaded in 4-bit.)
MUTATING_INITS = frozenset({"pissa"})


def run(ctx: JobContext) -> dict[str, Any]:
    cfg: TrainConfig = ctx.config
    if ctx.rank is not None:
        return _train(ctx, cfg)  # a torchrun rank: the launching worker holds the output lock
    from finetune_worker.training.model import check_attention_kernel

    check_attention_kernel(cfg)  # before the output folder, the data, or a torchrun launch
    # One job per output_dir, across workers and machines sharing it. The workers of the other nodes
    # of one multi-node job write into the same (shared) folder as node 0's: node 0 holds the lock.
    lock = (
        ckpt.output_lock(cfg) if cfg.distributed is None or cfg.distributed.node_rank == 0 else nullcontext()
    )
    with lock:
        if cfg.distributed is not None:
            # A torchrun process group trains; this thread only launches and supervises it.
            from finetune_worker.training.distributed.launcher import run_distributed

            return run_distributed(ctx)
        return _train(ctx, cfg)


def _train(ctx: JobContext, cfg: TrainConfig) -> dict[str, Any]:
    trackers: list[Any] = []  # experiment-tracking runs, closed here whichever way the job ends
    try:
        return _run(ctx, cfg, trackers)
    except JobCancelled as exc:
        _close_tracking(trackers, "KILLED")
        _drop_frames(exc)
        raise
    except JobFailed as exc:
        _close_tracking(trackers, "FAILED")
        _drop_frames(exc)
        raise
    except Exception as exc:
        _close_tracking(trackers, "FAILED")
        failure = classify_training_exception(exc)
        # The JobManager logs no traceback for a named failure, so keep it in the worker's log here.
        log.error("train job %s failed (%s)", ctx.job_id, failure.error, exc_info=exc)
        _drop_frames(exc)
        raise failure from None
    finally:
        release_memory()  # before the terminal event: the GPU memory is free once a BEAM sees it


def _drop_frames(exc: BaseException) -> None:
    """Let go of the model and trainer that the traceback's frames still hold (GPU memory)."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        traceback.clear_frames(cur.__traceback__)
        cur = cur.__cause__ or cur.__context__


def _close_tracking(trackers: list[Any], status: str) -> None:
    if trackers:
        from finetune_worker.training.tracking import finish_tracking

        finish_tracking(trackers, None, status)


def _run(ctx: JobContext, cfg: TrainConfig, trackers: list[Any]) -> dict[str, Any]:
    started = time.monotonic()
    out = cfg.paths.output
    # Inside a torchrun rank (distributed.rank_main) the launcher prepared the output_dir once.
    rank = ctx.rank
    if rank is None:
        resume_from = ckpt.prepare_output_dir(cfg, out)
        if resume_from is not None:
            ctx.log(f"resuming from {resume_from}")
    else:
        resume_from = ctx.resume_from

    # Heavy imports only now, on the runner thread.
    from transformers import set_seed

    from finetune_worker.hf import check_causal_lm, load_tokenizer
    from finetune_worker.training.callbacks import METRICS_FILE, EventCallback, MetricsHistory
    from finetune_worker.training.continual import (
        ContinualPenalty,
        diagonal_fisher,
        reference_loss,
        reference_rows,
    )
    from finetune_worker.training.data import PreparedData, prepare_data
    from finetune_worker.training.data_collate import choose_batching, flat_batch_tokens, make_collator
    from finetune_worker.training.loss_weights import token_weight_ids, token_weight_table
    from finetune_worker.training.model import load_model, plan_hardware, planned_steps, trainable_parameters
    from finetune_worker.training.preference import (
        PreferenceData,
        PreferenceScorer,
        build_preference_trainer,
        prepare_preference_data,
    )
    from finetune_worker.training.tracking import finish_tracking, tracking_callbacks, tracking_summary
    from finetune_worker.training.trainer import build_trainer, read_run_state
    from finetune_worker.training.unfreeze import ProgressiveUnfreezing

    def warn(message: str) -> None:
        ctx.log(message, level="warning")

    # The tokenizer and the data first: a bad row or a missing file fails in seconds, not after
    # minutes of loading a model.
    ctx.phase("preparing_data")
    check_causal_lm(cfg.paths.model, "model_name")  # once: load_model trusts it
    tokenizer = load_tokenizer(cfg.paths.model, "model_name")
    weighting = cfg.loss_weights
    token_ids = token_weight_ids(weighting.tokens, tokenizer) if weighting is not None else {}
    keep = cfg.evaluation.max_rows if cfg.evaluation is not None and cfg.evaluation.dataset is None else 0
    data_started = time.monotonic()
    cache = ctx.data_cache or out / DATA_CACHE
    data: PreparedData | PreferenceData
    if cfg.preference is not None:
        data = prepare_preference_data(cfg, tokenizer, cache, check_cancelled=ctx.check_cancelled)
    else:
        data = prepare_data(
            cfg.data,
            tokenizer,
            cfg.sources,
            seed=cfg.seed,
            cache_dir=cache,
            warn=warn,
            keep_examples=keep,
            check_cancelled=ctx.check_cancelled_alone,  # one rank builds while the others wait
            progress=lambda done, total: ctx.progress(done, total, unit="rows", started=data_started),
            class_weights=weighting.classes if weighting is not None else None,
        )
        _check_classes(data.stats, warn)
    train_rows, eval_rows, stats = data.train, data.eval, data.stats
    has_eval = eval_rows is not None and len(eval_rows) > 0
    reused = " (tokenized earlier: reused from the data cache)" if data.from_cache else ""
    ctx.log(f"{len(train_rows)} training and {len(eval_rows) if has_eval else 0} held-out examples{reused}")
    if len(cfg.sources) > 1:
        ctx.log(
            "sources: "
            + ", ".join(
                f"{p['name']} {p['sequences']} rows ({100 * (p['share'] or 0):.1f}% of trained tokens)"
                for p in stats["sources"]
            )
        )
    ctx.check_cancelled()

    ctx.phase("loading_model")
    set_seed(cfg.seed)  # adapter init is random: seed it like the Trainer seeds everything else
    plan = plan_hardware(cfg, warn)
    steps = planned_steps(cfg, len(train_rows))
    model = load_model(cfg, plan, warn, steps)
    initial_adapter = save_initial_adapter(cfg, model, out) if rank in (None, 0) else None
    trainable, total = trainable_parameters(model)
    ctx.log(
        f"{cfg.peft.method} on {plan.device} ({plan.precision}"
        f"{', ' + str(cfg.quantization.bits) + '-bit base' if cfg.quantization else ''}): "
        f"{trainable:,} of {total:,} parameters train ({100.0 * trainable / max(total, 1):.2f}%)"
    )
    ctx.check_cancelled()

    extra_callbacks: list[Any] = []
    if cfg.peft.unfreeze:
        phases = cfg.peft.unfreeze
        # The run's end in each unit (in epochs unknown here when max_steps decides it).
        run_end = {"step": steps, "epoch": None if cfg.max_steps else cfg.training_parameters.epochs}
        for i, phase in enumerate(phases):
            unit, start = phase.start
            end = run_end[unit]
            if end is not None and start >= end:
                warn(f"peft.unfreeze[{i}] starts at {unit} {start:g}, after the run's last ({end:g})")
        extra_callbacks.append(
            ProgressiveUnfreezing(model, phases, cfg.training_parameters.learning_rate, ctx.emit)
        )

    history = MetricsHistory(out / METRICS_FILE)
    callback = EventCallback(ctx.emit, ctx.cancel_event, out, history, language_model=cfg.preference is None)
    trackers.extend(tracking_callbacks(cfg.tracking, ctx, out, resuming=resume_from is not None))
    if isinstance(data, PreferenceData):
        trainer = build_preference_trainer(
            cfg, ctx, plan, model, tokenizer, train_rows, eval_rows, [callback, *trackers], out
        )
    else:
        attn = str(getattr(model.config, "_attn_implementation", None) or cfg.attn_implementation)
        batching, why, slow = choose_batching(
            cfg.data.packing,
            attn,
            cfg.peft.method in VIRTUAL_TOKEN_METHODS,
            flat_batch_tokens(train_rows, cfg.training_parameters.batch_size),
        )
        (warn if slow else ctx.log)(f"batches: {why}")
        stats["batching"] = batching
        collator = make_collator(tokenizer, batching)
        vocabulary = max(len(tokenizer), int(getattr(model.config, "vocab_size", 0) or 0))
        trainer = build_trainer(
            cfg,
            plan,
            model,
            tokenizer,
            train_rows,
            eval_rows,
            collator,
            [callback, *trackers, *extra_callbacks],
            out,
            token_weights=token_weight_table(token_ids, vocabulary) if token_ids else None,
        )
    finished = resume_from is not None and _already_trained(trainer, resume_from)
    if finished and resume_from is not None:
        stored = _stored_result(out, resume_from)
        if stored is not None:
            _close_tracking(trackers, "FINISHED")
            trackers.clear()
            ctx.log(
                f"already complete: {out} holds this run's final step ({ckpt.checkpoint_step(resume_from)}); "
                'nothing to train. Set "overwrite": true with "resume": false to train it again.'
            )
            return stored
        ctx.log(f"{resume_from} is this run's final step: finishing from it without training")
    continual = cfg.continual
    reference, reference_before = None, None
    reference_batch = cfg.eval.batch_size or cfg.training_parameters.batch_size
    if cfg.reference_source is not None:
        # After the already-complete check: a finished run needs none of this. The model is still
        # the base here (a resumed run loads its checkpoint when training starts).
        reference = reference_rows(cfg, tokenizer)
        ctx.phase("evaluating")
        reference_before = reference_loss(model, reference, tokenizer, reference_batch, ctx.check_cancelled)
        ctx.log(f"reference data: {len(reference)} rows, loss {_rounded(reference_before)} before training")
    if continual is not None and (continual.l2_to_base or continual.ewc):
        fisher = None
        if continual.ewc and reference is not None:
            fisher = diagonal_fisher(model, reference, tokenizer, ctx.check_cancelled)
        trainer.penalty = ContinualPenalty(model, continual.l2_to_base, continual.ewc, fisher)
    if resume_from is not None:
        run_state = read_run_state(resume_from)
        if run_state is not None:
            trainer.prior_loss_sum = float(run_state.get("loss_sum", 0.0))
    evaluator = None
    if cfg.evaluation is not None and isinstance(data, PreparedData):
        # the evaluate job's scores before and after training
        from finetune_worker.evaluation.in_training import TrainingEvaluator

        evaluator = TrainingEvaluator(
            cfg, tokenizer, ctx, held_out=data.held_examples, training=data.train_examples
        )
    scorer = PreferenceScorer(cfg, tokenizer, ctx, data.scored) if isinstance(data, PreferenceData) else None
    # An evaluation section on the held-out split is the base and final evaluation: the Trainer's
    # loss-only pass over the same rows would be a second, slightly different line per model.
    endpoints_by_section = evaluator is not None and evaluator.on_held_out
    base_eval: dict[str, float | None] = {}
    if has_eval or evaluator is not None:
        ctx.phase("evaluating")
    if has_eval and not endpoints_by_section:
        trainer.evaluate()
        base_eval = dict(callback.last_eval)
        ctx.check_cancelled()
    if scorer is not None:
        scorer.run("base", model, step=trainer.state.global_step, reference=callback.last_eval)
    if evaluator is not None:
        scores = evaluator.run("base", model, step=0)
        if endpoints_by_section:
            base_eval = callback.section_evaluated(trainer.args, 0, scores)
            for tracker in trackers:
                tracker.log_eval(base_eval, 0)
        ctx.check_cancelled()

    ctx.phase("training")
    if finished and resume_from is not None:
        result = _restore_final_checkpoint(trainer, resume_from)
        history.resume_at(ckpt.checkpoint_step(resume_from))
        callback.training_done()
    else:
        result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    step = trainer.state.global_step
    if callback.cancel_requested:
        last = callback.last_checkpoint or ckpt.latest_checkpoint(out)
        raise JobCancelled(step=step, checkpoint=str(last) if last else None)

    final_eval: dict[str, float | None] = {}
    if has_eval or evaluator is not None:
        ctx.phase("evaluating")
    best_loaded = trainer.args.load_best_model_at_end and trainer.state.best_model_checkpoint is not None
    if has_eval and not endpoints_by_section:
        if callback.last_eval_step != step or best_loaded:  # else just evaluated at this very step
            trainer.evaluate()
        final_eval = dict(callback.last_eval)
    if scorer is not None:
        scorer.run("fine_tuned", trainer.model, step=step, reference=callback.last_eval)
    if evaluator is not None:
        scores = evaluator.run("fine_tuned", trainer.model, step=step)
        if endpoints_by_section:
            final_eval = callback.section_evaluated(trainer.args, step, scores)
            for tracker in trackers:
                tracker.log_eval(final_eval, step)

    reference_after = None
    if reference is not None:
        reference_after = reference_loss(
            trainer.model, reference, tokenizer, reference_batch, ctx.check_cancelled
        )

    ctx.phase("saving")
    trainer.check_finite_weights()
    save_outputs(trainer, tokenizer, out, initial_adapter)
    if initial_adapter is not None:
        shutil.rmtree(initial_adapter, ignore_errors=True)  # only needed for the conversion above
    if not trainer.args.should_save:
        return {}  # a rank other than 0: rank 0 writes the outputs and reports them
    summary = _summary(
        cfg, trainer, result, stats, base_eval, final_eval, resume_from, started, len(train_rows)
    )
    if evaluator is not None:
        summary["evaluation"] = evaluator.summary()
    if scorer is not None:
        summary["preference"] = scorer.summary()
    if continual is not None:
        summary["continual"] = _continual_summary(cfg, reference, reference_before, reference_after)
    if trackers:
        summary["tracking"] = tracking_summary(trackers)
    summary_path = out / SUMMARY
    write_text_atomic(summary_path, json.dumps(summary, indent=2, sort_keys=False, default=str))
    weights_key = "model_path" if cfg.peft.method == "full" else "adapter_path"
    try:
        write_next_configs(cfg, out)
        write_card(cfg, out, summary, weights_key)
        write_report(out, summary, history.rows(), out.name)
    except (OSError, ValueError, TypeError) as exc:  # the weights are saved: a missing page is a warning
        warn(f"could not write the model card, report or next-step configs: {exc}")
    finish_tracking(trackers, out, summary=summary)  # the final scores, the run's documents
    trackers.clear()
    ckpt.clear_staging(out)
    ckpt.clear_data_cache(out)
    share_files(out, recursive=False)  # the adapter/model (checkpoints were shared as published)
    return {
        "outputs": {"output_dir": str(out), weights_key: str(out), "summary_path": str(summary_path)},
        "summary": summary,
    }


def _check_classes(stats: dict[str, Any], warn: Any) -> None:
    """``loss_weights.classes`` that no training row's answer matched: a warning for some, a
    failure for all (the weights would do nothing)."""
    counts = stats.get("class_counts")
    if counts is None:
        return
    unmatched = [name for name, n in counts.items() if not n]
    if len(unmatched) == len(counts):
        raise JobFailed(
            "invalid_config",
            f"loss_weights.classes: no training row's answer is any of {sorted(counts)[:10]}",
            hint="A class is the text of a row's last assistant turn, stripped of surrounding spaces and "
            "compared exactly (case included); plain-text rows have none.",
        )
    if unmatched:
        warn(f"loss_weights.classes: no training row's answer is {', '.join(map(repr, unmatched[:10]))}")


def _continual_summary(
    cfg: TrainConfig, reference: list[Any] | None, before: float | None, after: float | None
) -> dict[str, Any]:
    c = cfg.continual
    assert c is not None
    return {
        "reference_rows": len(reference) if reference is not None else 0,
        "reference_loss_before": _rounded(before),
        "reference_loss_after": _rounded(after),
        "forgetting": _rounded(after - before) if before is not None and after is not None else None,
        "l2_to_base": c.l2_to_base,
        "ewc": c.ewc,
        "replay_share": c.replay.share if c.replay is not None else None,
    }


def _rounded(value: float | None) -> float | None:
    return round(value, 6) if value is not None else None


def save_initial_adapter(cfg: TrainConfig, model: Any, out: Path) -> Path | None:
    """PiSSA rewrites the base weights at init; keep the initial adapter to undo that at save.

    It lives in the hidden staging folder and goes once the final adapter is saved (each run
    rebuilds the same one from the seed, so a resumed run needs no copy from before).
    """
    if cfg.peft.method not in MUTATING_INITS:
        return None
    path = ckpt.staging_dir(out) / INITIAL_ADAPTER
    model.save_pretrained(str(path))
    return path


def _already_trained(trainer: Any, checkpoint: Path) -> bool:
    """Whether ``checkpoint`` holds the run's last step (the Trainer would step past it)."""
    planned = trainer.set_initial_training_values(trainer.args, trainer.get_train_dataloader())[6]
    return ckpt.checkpoint_step(checkpoint) >= int(planned)


def _stored_result(out: Path, checkpoint: Path) -> dict[str, Any] | None:
    """The completed result of a finished run in ``out`` (its summary.json), if it is this checkpoint's."""
    try:
        summary = json.loads((out / SUMMARY).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(summary, dict) or summary.get("steps") != ckpt.checkpoint_step(checkpoint):
        return None
    weights_key = "model_path" if summary.get("method") == "full" else "adapter_path"
    return {
        "outputs": {"output_dir": str(out), weights_key: str(out), "summary_path": str(out / SUMMARY)},
        "summary": {**summary, "already_complete": True},
    }


def _restore_final_checkpoint(trainer: Any, checkpoint: Path) -> Any:
    """Load a finished run's last checkpoint instead of training (a kill came after it, before the save)."""
    from transformers import TrainerState
    from transformers.trainer_utils import TrainOutput

    trainer._load_from_checkpoint(str(checkpoint))
    trainer.state = TrainerState.load_from_json(str(checkpoint / "trainer_state.json"))
    trainer._initial_global_step = trainer.state.global_step  # no step of this call: all came before
    return TrainOutput(trainer.state.global_step, 0.0, {})


def save_outputs(trainer: Any, tokenizer: Any, out: Path, initial_adapter: Path | None) -> None:
    """Adapter (or full model), tokenizer and training args into ``out``."""
    trainer.save_model(str(out))  # every rank calls it: FSDP gathers the sharded weights here
    if not trainer.args.should_save:
        return
    tokenizer.save_pretrained(str(out))
    if initial_adapter is not None:
        # Saved as the difference to the initial adapter, it is a plain LoRA (rank 2r) that applies
        # to the *original* base model, which is what users load it onto.
        trainer.model.save_pretrained(str(out), path_initial_model_for_weight_conversion=str(initial_adapter))


def _summary(
    cfg: TrainConfig,
    trainer: Any,
    result: Any,
    stats: Any,
    base_eval: dict[str, float | None],
    final_eval: dict[str, float | None],
    resume_from: Path | None,
    started: float,
    n_train: int,
) -> dict[str, Any]:
    base_ppl, final_ppl = base_eval.get("perplexity"), final_eval.get("perplexity")
    improvement = None
    if base_ppl and final_ppl is not None:
        improvement = round(100.0 * (base_ppl - final_ppl) / base_ppl, 3)
    state = trainer.state
    return {
        "method": cfg.peft.method,
        "model_name": cfg.model_name,
        "base_eval_loss": base_eval.get("eval_loss"),
        "base_perplexity": base_ppl,
        "final_eval_loss": final_eval.get("eval_loss"),
        "final_perplexity": final_ppl,
        "improvement_pct": improvement,
        "train_loss": _whole_run_loss(trainer, result),
        "steps": state.global_step,
        "total_steps": state.max_steps,
        "epochs": round(float(state.epoch or 0.0), 4),
        "tokens_seen": int(state.num_input_tokens_seen),
        "train_examples": n_train,
        "runtime_s": round(time.monotonic() - started, 3),
        "resumed_from": str(resume_from) if resume_from else None,
        **_best(trainer),
        "data": _plain(stats),
        "config": redact(cfg.model_dump(mode="json")),
    }


def _best(trainer: Any) -> dict[str, Any]:
    """Which evaluation the saved weights come from, when the best one was kept."""
    state = trainer.state
    if not trainer.args.load_best_model_at_end or state.best_model_checkpoint is None:
        return {}
    return {
        "best_step": state.best_global_step,
        "best_metric": _finite(state.best_metric),
        "best_checkpoint": state.best_model_checkpoint,
    }


def _whole_run_loss(trainer: Any, result: Any) -> float | None:
    """Mean training loss over every step of the run, resumed parts included.

    The Trainer's ``training_loss`` covers only its own ``train()`` call; the loss summed before
    it comes from the resumed checkpoint (``trainer.prior_loss_sum``).
    """
    session = _finite(getattr(result, "training_loss", None))
    steps = trainer.state.global_step
    if session is None or not steps:
        return session
    initial = getattr(trainer, "_initial_global_step", 0) or 0
    if not trainer.prior_loss_sum and initial:
        # Resumed from a checkpoint that predates the saved loss sum: only this call's steps.
        return session if steps > initial else None
    return _finite((trainer.prior_loss_sum + session * (steps - initial)) / steps)


def _plain(value: Any) -> Any:
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    if hasattr(value, "__dataclass_fields__"):
        from dataclasses import asdict

        return asdict(value)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _finite(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if out == out and abs(out) != float("inf") else None
