"""Score one loaded model on a list of examples: loss, perplexity and answer metrics.

Tokenization and loss masks are training's own (:class:`ChatEncoder`), so the perplexity here
is over exactly the tokens training optimizes (the assistant's, with
``train_on_responses_only``). Loss is the mean over all those tokens of the dataset
(token-weighted), not a mean of per-batch means as the HF Trainer reports. Rows with a
reference answer (Q&A answer, instruction output, last assistant message) get an answer
generated from the conversation before it, scored against the reference.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from finetune_worker.config.data import DataConfig
from finetune_worker.config.evaluate import Sampling
from finetune_worker.context import CancelFlag
from finetune_worker.data.rows import Example
from finetune_worker.evaluation import metrics
from finetune_worker.evaluation.generation import generate
from finetune_worker.training.data import IGNORE_INDEX, ChatEncoder

#: progress(stage, done, total): stage is "loss" or "answers".
Progress = Callable[[str, int, int], None]


@dataclass
class EvalItem:
    """One source row ready to score."""

    row: int
    kind: str
    sequences: list[dict[str, list[int]]]  # token rows with labels (text may span blocks)
    prompt: list[int] | None = None  # chat rows: the conversation before the reference answer
    prompt_text: str | None = None
    reference: str | None = None


@dataclass
class ModelScores:
    metrics: dict[str, Any]
    rows: list[dict[str, Any]] = field(default_factory=list)


def prepare(examples: list[Example], tokenizer: Any, data_cfg: DataConfig) -> list[EvalItem]:
    encoder = ChatEncoder(tokenizer, data_cfg)
    items: list[EvalItem] = []
    for ex in examples:
        sequences, _ = encoder.encode_all([ex])
        item = EvalItem(row=ex.row, kind=ex.kind, sequences=sequences)
        if ex.kind != "text":
            last = max(i for i, m in enumerate(ex.messages) if m["role"] == "assistant")
            context = ex.messages[:last]
            answer = ex.messages[last]
            # A reference is what the assistant said; a turn that only calls tools has none to score.
            if (
                any(m["role"] == "user" for m in context)
                and answer["content"]
                and not answer.get("tool_calls")
            ):
                item.reference = answer["content"]
                text = tokenizer.apply_chat_template(
                    context,
                    tools=ex.tools,
                    chat_template=encoder.template,
                    tokenize=False,
                    add_generation_prompt=True,
                )
                item.prompt_text = str(text)
                # Templates write their own special tokens, as training's encoder assumes.
                item.prompt = list(tokenizer(item.prompt_text, add_special_tokens=False)["input_ids"])
        items.append(item)
    return items


def score_model(
    model: Any,
    tokenizer: Any,
    items: list[EvalItem],
    *,
    batch_size: int,
    sampling: Sampling | None,
    cancel: CancelFlag | None = None,
    progress: Progress | None = None,
) -> ModelScores:
    """Loss over every item, then (unless ``sampling`` is None) generated answers for those with a reference."""
    rows = [{"row": it.row, "kind": it.kind} for it in items]
    total_nll, total_tokens = 0.0, 0
    flat = [(i, seq) for i, it in enumerate(items) for seq in it.sequences]
    per_item: list[list[float]] = [[0.0, 0.0] for _ in items]
    for start in range(0, len(flat), batch_size):
        _check(cancel)
        chunk = flat[start : start + batch_size]
        for (i, _), (nll, count) in zip(
            chunk, _batch_nll(model, tokenizer, [s for _, s in chunk]), strict=True
        ):
            per_item[i][0] += nll
            per_item[i][1] += count
        if progress:
            progress("loss", min(start + batch_size, len(flat)), len(flat))
    for row, (item_nll, item_count) in zip(rows, per_item, strict=True):
        total_nll += item_nll
        total_tokens += int(item_count)
        row["tokens"] = int(item_count)
        row["loss"] = round(item_nll / item_count, 6) if item_count else None
    loss = total_nll / total_tokens if total_tokens else None
    result: dict[str, Any] = {
        "eval_loss": round(loss, 6) if loss is not None else None,
        "perplexity": _round(metrics.perplexity(loss)),
        "rows": len(items),
        "scored_tokens": total_tokens,
    }

    answerable = [i for i, it in enumerate(items) if it.prompt is not None]
    if sampling is not None and answerable:
        for start in range(0, len(answerable), batch_size):
            _check(cancel)
            batch = answerable[start : start + batch_size]
            prompts = [items[i].prompt or [] for i in batch]
            answers = generate(model, tokenizer, prompts, sampling, cancel=cancel)
            _check(cancel)
            for i, answer in zip(batch, answers, strict=True):
                text = answer.text
                ref = items[i].reference or ""
                rows[i].update({"prompt": items[i].prompt_text, "reference": ref, "prediction": text.strip()})
                rows[i].update({k: round(v, 6) for k, v in metrics.score_row(text.strip(), ref).items()})
            if progress:
                progress("answers", min(start + batch_size, len(answerable)), len(answerable))
        result.update(metrics.aggregate(rows))
    return ModelScores(result, rows)


def progress_events(ctx: Any) -> Progress:
    """A :data:`Progress` that reports to the job's subscriber: the phase ("evaluating" while
    scoring loss, "generating" while answering) and ``progress`` events with done/total/unit."""
    current = "loss"  # the caller sets the "evaluating" phase before scoring

    def report(stage: str, done: int, total: int) -> None:
        nonlocal current
        if stage != current:
            current = stage
            ctx.phase("evaluating" if stage == "loss" else "generating")
        unit = "sequences" if stage == "loss" else "answers"
        ctx.emit("progress", done=done, total=total, unit=unit, percent=round(100.0 * done / total, 2))

    return report


@torch.inference_mode()
def _batch_nll(model: Any, tokenizer: Any, seqs: list[dict[str, list[int]]]) -> list[tuple[float, int]]:
    """Summed next-token NLL and count of labelled tokens, per sequence."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    width = max(len(s["input_ids"]) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    labels = torch.full((len(seqs), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        n = len(s["input_ids"])
        ids[r, :n] = torch.tensor(s["input_ids"])
        labels[r, :n] = torch.tensor(s["labels"])
        mask[r, :n] = 1
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
    # Prompt tuning prepends virtual tokens: their logits come first and predict nothing of ours.
    logits = logits[:, -width:]
    out: list[tuple[float, int]] = []
    for r in range(len(seqs)):
        # One row at a time keeps the float32 copy of the logits to a single sequence.
        target = labels[r, 1:].to(device)
        keep = target != IGNORE_INDEX
        count = int(keep.sum())
        if count == 0:
            out.append((0.0, 0))
            continue
        row_logits = logits[r, :-1][keep].float()
        nll = torch.nn.functional.cross_entropy(row_logits, target[keep], reduction="sum")
        out.append((float(nll), count))
    return out


def _check(cancel: CancelFlag | None) -> None:
    if cancel is not None and cancel.is_set():
        from finetune_worker.errors import JobCancelled

        raise JobCancelled()


def _round(value: float | None) -> float | None:
    return round(value, 6) if value is not None and math.isfinite(value) else None
