"""The ``evaluate`` and ``generate`` jobs (kinds declared in ``config.evaluate``), top to bottom.

evaluate: load the model, read the dataset the way training reads it, score it (loss,
perplexity, generated-answer metrics), optionally score a second model the same way, then
send an ``eval`` event and write ``metrics.json`` and ``predictions.jsonl``.
generate: load the model, then for each prompt stream ``token`` events as text becomes final,
and return every completion in ``completed`` (and ``completions.jsonl``).
Both stop on cancel between batches/prompts and, through a stopping criterion, mid-generation.
"""

from __future__ import annotations

import gc
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from finetune_worker.config.evaluate import EvaluateConfig, GenerateConfig
from finetune_worker.context import JobContext
from finetune_worker.errors import JobCancelled, JobFailed
from finetune_worker.evaluation.scoring import ModelScores
from finetune_worker.outputs import write_text_atomic

METRICS_FILE = "metrics.json"
PREDICTIONS_FILE = "predictions.jsonl"
COMPLETIONS_FILE = "completions.jsonl"

_ANSWER_KEYS = ("prediction", "exact_match", "f1", "bleu", "rouge_l", "loss", "tokens")


def run_evaluate(ctx: JobContext) -> dict[str, Any]:
    return _classified(_evaluate, ctx)


def run_generate(ctx: JobContext) -> dict[str, Any]:
    return _classified(_generate, ctx)


def _classified(body: Callable[[Any, Any], dict[str, Any]], ctx: JobContext) -> dict[str, Any]:
    """Run a job body; failures we did not name get training's classification (OOM, paths...)."""
    try:
        return body(ctx, ctx.config)
    except (JobFailed, JobCancelled):
        raise
    except Exception as exc:
        from finetune_worker.training.failures import classify_training_exception

        raise classify_training_exception(exc) from exc


# ---- evaluate ------------------------------------------------------------------------------


def _evaluate(ctx: JobContext, cfg: EvaluateConfig) -> dict[str, Any]:
    started = time.monotonic()
    from finetune_worker.data.sources import load_examples

    # Read the data first: a bad row should fail before minutes of model loading.
    ctx.phase("preparing_data")
    examples = load_examples(cfg.source, cfg.max_rows)
    ctx.log(f"{len(examples)} row(s) from {cfg.dataset.path}")
    out = _output_dir(cfg.output_dir, cfg)

    main = _score(ctx, cfg, examples, "model", cfg.model_path, cfg.adapter_path)
    # A record of fixed fields; the scores are in the `metrics` table (events.TABLE_KEYS).
    result: dict[str, Any] = {
        "model_path": cfg.model_path,
        "adapter_path": cfg.adapter_path,
        "dataset_path": cfg.dataset.path,
        "metrics": dict(main.metrics),
    }
    rows = main.rows
    if cfg.compare_model_path is not None:
        from finetune_worker.evaluation.metrics import improvement

        other = _score(ctx, cfg, examples, "compare", cfg.compare_model_path, cfg.compare_adapter_path)
        result["compare"] = {
            "model_path": cfg.compare_model_path,
            "adapter_path": cfg.compare_adapter_path,
            "metrics": dict(other.metrics),
        }
        result["improvement"] = improvement(main.metrics, other.metrics)
        ctx.log(f"improvement over the comparison model: {_brief(result['improvement'])}")
        for row, theirs in zip(rows, other.rows, strict=True):
            row.update({f"compare_{k}": theirs[k] for k in _ANSWER_KEYS if k in theirs})
    result["runtime_s"] = round(time.monotonic() - started, 3)

    outputs: dict[str, Any] = {}
    if out is not None:
        ctx.phase("saving")
        metrics_path, predictions_path = out / METRICS_FILE, out / PREDICTIONS_FILE
        write_text_atomic(predictions_path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        write_text_atomic(metrics_path, json.dumps(result, indent=2) + "\n")
        outputs = {
            "output_dir": str(out),
            "metrics_path": str(metrics_path),
            "predictions_path": str(predictions_path),
        }
    return {"outputs": outputs, "summary": result}


def _score(
    ctx: JobContext,
    cfg: EvaluateConfig,
    examples: list[Any],
    which: str,
    model_path: str,
    adapter_path: str | None,
) -> ModelScores:
    from finetune_worker.evaluation.loading import load_for_inference
    from finetune_worker.evaluation.scoring import prepare, progress_events, score_model

    ctx.phase("loading_model")
    prefix = "" if which == "model" else "compare_"
    lm = load_for_inference(
        cfg,
        lambda m: ctx.log(m, level="warning"),
        model_key=f"{prefix}model_path",
        adapter_key=f"{prefix}adapter_path",
        model_path=model_path,
        adapter_path=adapter_path,
    )
    ctx.log(f"{which}: {lm.description}")
    ctx.check_cancelled()
    # Each model is tokenized with its own tokenizer: the comparison model may use another.
    items = prepare(examples, lm.tokenizer, cfg.data)
    ctx.phase("evaluating")
    scores = score_model(
        lm.model,
        lm.tokenizer,
        items,
        batch_size=cfg.batch_size,
        sampling=cfg.generation if cfg.generate_answers else None,
        cancel=ctx.cancel_event,
        progress=progress_events(ctx),
    )
    ctx.emit("eval", model=which, metrics={k: v for k, v in scores.metrics.items() if v is not None})
    del lm
    gc.collect()  # two models at once would double peak memory
    return scores


def _brief(values: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:+g}" for k, v in values.items()) or "nothing comparable"


# ---- generate ------------------------------------------------------------------------------


def _generate(ctx: JobContext, cfg: GenerateConfig) -> dict[str, Any]:
    started = time.monotonic()
    from finetune_worker.evaluation.generation import generate, prompt_ids
    from finetune_worker.evaluation.loading import load_for_inference
    from finetune_worker.hf import ensure_chat_template

    out = _output_dir(cfg.output_dir, cfg)
    ctx.phase("loading_model")
    lm = load_for_inference(cfg, lambda m: ctx.log(m, level="warning"))
    ctx.log(lm.description)
    ensure_chat_template(lm.tokenizer, cfg.chat_template)
    encoded = []
    for i, prompt in enumerate(cfg.prompts):
        try:
            encoded.append(prompt_ids(lm.tokenizer, prompt, cfg.system_prompt))
        except Exception as exc:  # a template's raise_exception(), e.g. roles out of order
            raise JobFailed(
                "invalid_config",
                f"prompts[{i}]: the chat template cannot render it ({type(exc).__name__}: {exc})",
                hint="Fix the message list, or set chat_template to a template that accepts it.",
            ) from exc
    ctx.check_cancelled()

    ctx.phase("generating")
    completions: list[dict[str, Any]] = []
    n = cfg.num_return_sequences
    for i, ids in enumerate(encoded):
        counters = [0] * n

        def on_text(row: int, piece: str, i: int = i, counters: list[int] = counters) -> None:
            payload: dict[str, Any] = {"index": counters[row], "text": piece, "prompt_index": i}
            if n > 1:
                payload["sequence"] = row
            counters[row] += 1
            ctx.emit("token", **payload)

        results = generate(
            lm.model,
            lm.tokenizer,
            [ids],
            cfg,
            num_return_sequences=n,
            on_text=on_text,
            cancel=ctx.cancel_event,
        )
        ctx.check_cancelled(step=i)
        for seq, c in enumerate(results):
            entry = {"prompt_index": i, "prompt": _prompt_json(cfg.prompts[i]), "text": c.text}
            if n > 1:
                entry["sequence"] = seq
            entry.update(tokens=c.tokens, finish_reason=c.finish_reason)
            completions.append(entry)
        ctx.emit(
            "progress",
            done=i + 1,
            total=len(encoded),
            unit="prompts",
            percent=round(100.0 * (i + 1) / len(encoded), 2),
        )

    outputs: dict[str, Any] = {}
    if out is not None:
        path = out / COMPLETIONS_FILE
        write_text_atomic(path, "".join(json.dumps(c, ensure_ascii=False) + "\n" for c in completions))
        outputs = {"output_dir": str(out), "completions_path": str(path)}
    summary = {
        "completions": completions,
        "prompts": len(encoded),
        "generated_tokens": sum(c["tokens"] for c in completions),
        "seed": cfg.seed,
        "runtime_s": round(time.monotonic() - started, 3),
    }
    return {"outputs": outputs, "summary": summary}


def _prompt_json(prompt: Any) -> Any:
    return prompt if isinstance(prompt, str) else [m.model_dump() for m in prompt]


# ---- files ---------------------------------------------------------------------------------


def _output_dir(value: str | None, cfg: Any) -> Path | None:
    if value is None:
        return None
    out: Path = cfg.resolved(value)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise JobFailed(
            "output_dir_not_writable",
            f"output_dir: cannot write to '{value}' ({exc.strerror or exc})",
            hint="Choose an output_dir this user can create and write to.",
        ) from exc
    return out
