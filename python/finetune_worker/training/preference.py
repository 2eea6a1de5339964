"""Preference training (DPO, ORPO, KTO): the data, the TRL trainer, and held-out preference scores.

A ``train`` job with a ``preference`` section runs through ``training/job.py`` like any other:
the same output folder, model loading (LoRA family, QLoRA, full), checkpoints, resume, cancel,
events, tracking and summary. What differs lives here:

- **data**: the sources' preference rows (``data.rows.normalize_preference``) are checked row by
  row, split and mixed like supervised rows (the same passes and helpers as ``training/data.py``),
  then written as chat messages to Arrow files in the data cache, which TRL tokenizes with the
  run's chat template (``Dataset.map``, cached beside them on disk);
- **the trainer**: TRL's ``DPOTrainer``, ``ORPOTrainer`` or ``KTOTrainer`` with our atomic
  checkpoints mixed in (``trainer.AtomicCheckpoints``) and the run's TrainingArguments. The DPO and
  KTO reference is the adapter's starting point (TRL keeps a frozen copy of it as the adapter
  "ref"; it is the base model for an adapter that starts at zero) or, for full fine-tuning, a
  frozen copy of the model made before training;
- **scores**: before and after training, each held-out pair's chosen-minus-rejected log-probability
  under the model (summed over the answer's tokens): the share of pairs where the chosen answer
  is the more likely one (``accuracy``) and the mean difference (``margin``); for KTO the mean
  log-probability of desirable and of undesirable answers and their gap. Measured, not taken from
  the loss: they say whether the model now prefers what the data prefers.
"""

from __future__ import annotations

import copy
import functools
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune_worker.config.train import TrainConfig
from finetune_worker.data.readers import SourceProblem
from finetune_worker.data.rows import PreferenceExample
from finetune_worker.data.sources import Source, iter_examples, source_failure
from finetune_worker.errors import JobFailed
from finetune_worker.training.data import (
    ChatEncoder,
    changed_failure,
    files_of,
    held_out_mask,
    mixture_targets,
    row_multiplicity,
    scan_sources,
)

#: Rows written to Arrow at a time.
WRITE_ROWS = 1000
#: Where the preference rows go inside the data cache (rebuilt for every run: TRL's tokenized
#: copies are cached beside them).
FOLDER = "preference"


@dataclass
class PreferenceData:
    """What :func:`prepare_preference_data` gives the job (the same names as ``PreparedData``)."""

    train: Any  # a datasets.Dataset of chat-message rows, TRL's shape
    eval: Any  # the held-out rows, or None
    stats: dict[str, Any]
    #: The first held-out rows (``preference.eval_rows`` of them), scored before and after training.
    scored: list[PreferenceExample] = field(default_factory=list)
    from_cache: bool = False


def prepare_preference_data(
    cfg: TrainConfig,
    tokenizer: Any,
    cache_dir: Path,
    *,
    check_cancelled: Callable[[], None] | None = None,
) -> PreferenceData:
    """Check, split, mix and write the preference rows of ``cfg.sources`` (see the module doc).

    Sets ``tokenizer.chat_template`` to the run's template (the tokenizer's own, ``data.chat_template``,
    or ChatML), which TRL renders the rows with and which is saved with the outputs.
    """
    assert cfg.preference is not None
    sources = cfg.sources
    files = [files_of(s) for s in sources]
    label_files = sum(len(f) for f in files) > 1
    counts = scan_sources(sources, files, label_files, check_cancelled)
    tokenizer.chat_template = ChatEncoder(tokenizer, cfg.data).template

    folder = cache_dir / FOLDER
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    row_format = cfg.preference.row_format
    train_sink = _Sink(folder / "train.arrow", row_format)
    eval_sink = _Sink(folder / "eval.arrow", row_format)
    held_masks = [
        held_out_mask(c.rows, s.validation_split, cfg.seed, s.index)
        for s, c in zip(sources, counts, strict=True)
    ]
    train_counts = [int(c.rows - m.sum()) for c, m in zip(counts, held_masks, strict=True)]
    targets = mixture_targets(sources, train_counts)
    scored: list[PreferenceExample] = []
    per_source: list[dict[str, Any]] = []
    labels: Counter[str] = Counter()
    for source, source_files, count, mask, n_train, target in zip(
        sources, files, counts, held_masks, train_counts, targets, strict=True
    ):
        uses = row_multiplicity(n_train, target, cfg.seed, source.index)
        held = j = 0
        for i, example in enumerate(_examples(source, source_files, label_files, len(mask))):
            if mask[i]:
                eval_sink.add(example, 1)
                held += 1
                if len(scored) < cfg.preference.eval_rows:
                    scored.append(example)
            else:
                train_sink.add(example, int(uses[j]))
                if example.label is not None:
                    labels["desirable" if example.label else "undesirable"] += int(uses[j])
                j += 1
            if check_cancelled is not None and i % 10_000 == 0:
                check_cancelled()
        per_source.append(
            {
                "name": source.name,
                "path": str(source.path),
                "rows": count.rows,
                "eval_rows": held,
                "train_rows": int(target),
                "sequences": int(target),
                "weight": source.weight,
                "repeat": source.repeat,
                "format_counts": dict(sorted(count.formats.items())),
            }
        )
    total = sum(p["sequences"] for p in per_source) or 1
    for p in per_source:
        p["share"] = round(p["sequences"] / total, 4)  # of the training rows (tokens come from TRL)
    train_ds = train_sink.close()
    eval_ds = None
    if eval_sink.rows:
        eval_ds = eval_sink.close()
    else:
        eval_sink.finish()
    if eval_ds is not None and cfg.preference.method == "grpo" and len(eval_ds) > cfg.preference.eval_rows:
        # GRPO's evaluation samples and scores num_generations answers per prompt (BEAM rewards
        # included): the scored rows are the first eval_rows, as for the other methods.
        eval_ds = eval_ds.select(range(cfg.preference.eval_rows))
    format_counts: Counter[str] = Counter()
    for c in counts:
        format_counts.update(c.formats)
    stats: dict[str, Any] = {
        "rows": sum(c.rows for c in counts),
        "train_rows": train_sink.rows,
        "eval_rows": eval_sink.rows,
        "format_counts": dict(sorted(format_counts.items())),
        "max_seq_length": cfg.data.max_seq_length,
        "batching": "pad",  # TRL pads each batch to its longest pair
        "warnings": [],
        "sources": per_source,
        **({"labels": dict(sorted(labels.items()))} if labels else {}),
    }
    return PreferenceData(train_ds, eval_ds, stats, scored)


def _examples(
    source: Source, files: list[Any], label_files: bool, expected: int
) -> Iterator[PreferenceExample]:
    """The source's rows, which the first pass found good; a file changed since then fails."""
    seen = 0
    try:
        for item in iter_examples(source, files, label_files=label_files):
            if not isinstance(item, PreferenceExample) or seen >= expected:
                raise changed_failure(source)
            seen += 1
            yield item
    except SourceProblem as exc:
        raise source_failure(source, exc) from None
    if seen != expected:
        raise changed_failure(source)


class _Sink:
    """Preference rows appended one at a time, written to an Arrow stream file in record batches."""

    def __init__(self, target: Path, row_format: str):
        import pyarrow as pa

        messages = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
        fields = {
            "preference": [pa.field(n, messages) for n in ("prompt", "chosen", "rejected")],
            "unpaired_preference": [
                pa.field("prompt", messages),
                pa.field("completion", messages),
                pa.field("label", pa.bool_()),
            ],
            "prompts": [pa.field("prompt", messages), pa.field("reference", pa.string())],
        }[row_format]
        self.schema = pa.schema(fields)
        self.target = target
        self._file = pa.OSFile(str(target), "wb")
        self._writer = pa.ipc.new_stream(self._file, self.schema)
        self._rows: list[dict[str, Any]] = []
        self.rows = 0

    def add(self, example: PreferenceExample, copies: int) -> None:
        row: dict[str, Any] = {name: getattr(example, name) for name in self.schema.names}
        for _ in range(copies):
            self._rows.append(row)
        self.rows += copies
        if len(self._rows) >= WRITE_ROWS:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa

        if self._rows:
            self._writer.write_batch(pa.RecordBatch.from_pylist(self._rows, schema=self.schema))
            self._rows = []

    def finish(self) -> None:
        """Write what is left and close the file."""
        self._flush()
        self._writer.close()
        self._file.close()

    def close(self) -> Any:
        """The rows as a ``datasets.Dataset`` memory-mapped from the file."""
        import datasets

        self.finish()
        return datasets.Dataset.from_file(str(self.target))


# ---- the trainer ---------------------------------------------------------------------------------


def build_preference_trainer(
    cfg: TrainConfig,
    ctx: Any,
    plan: Any,
    model: Any,
    tokenizer: Any,
    train_rows: Any,
    eval_rows: Any,
    callbacks: list[Any],
    output_dir: Path,
) -> Any:
    """TRL's trainer for ``cfg.preference.method``, with atomic checkpoints mixed in."""
    from transformers import PrinterCallback

    from finetune_worker.training.trainer import AtomicCheckpoints, run_callbacks, training_argument_values

    pref = cfg.preference
    assert pref is not None
    has_eval = eval_rows is not None and len(eval_rows) > 0
    values = training_argument_values(cfg, plan, output_dir, has_eval)
    values.update(beta=pref.kl_beta)
    if pref.method != "grpo":
        values.update(max_length=cfg.data.max_seq_length)
    extra: dict[str, Any] = {}
    Config, Base = _trl_classes(pref.method)
    if pref.method == "grpo":
        from finetune_worker.training.rewards import reward_functions

        funcs, weights = reward_functions(pref.rewards, ctx)
        extra["reward_funcs"] = funcs
        values.update(
            num_generations=pref.num_generations,
            max_completion_length=pref.max_completion_length,
            temperature=pref.temperature,
            reward_weights=weights,
            log_completions=False,
        )
    elif pref.method == "dpo":
        values.update(loss_type=[pref.loss_type], label_smoothing=pref.label_smoothing)
    elif pref.method == "kto":
        values.update(desirable_weight=pref.desirable_weight, undesirable_weight=pref.undesirable_weight)
    if pref.method in ("orpo", "grpo"):
        # Their batches have no input_ids (ORPO: chosen_/rejected_input_ids; GRPO: prompt_ids and
        # completion_ids): the Trainer cannot count tokens in them.
        values.update(include_num_input_tokens_seen="no")
    if pref.method in ("dpo", "kto") and not _is_peft(model):
        # Full fine-tuning: the reference is the model as it starts, frozen (TRL would load a
        # second copy from the model's path, in its default dtype and on no particular device).
        ref = copy.deepcopy(model).eval()
        ref.requires_grad_(False)
        extra["ref_model"] = ref
    trainer_class = type(f"Atomic{Base.__name__}", (_TrainedAdapterOnly, AtomicCheckpoints, Base), {})
    trainer = trainer_class(
        model=model,
        args=Config(**values),
        train_dataset=train_rows,
        eval_dataset=eval_rows if has_eval else None,
        processing_class=tokenizer,
        callbacks=run_callbacks(cfg, callbacks, has_eval),
        keep=cfg.checkpoint.keep,
        **extra,
    )
    trainer.remove_callback(PrinterCallback)
    return trainer


def _trl_classes(method: str) -> tuple[Any, Any]:
    """``(config class, trainer class)`` of TRL for ``method``, imported only when used."""
    if method == "grpo":
        from trl.trainer.grpo_config import GRPOConfig
        from trl.trainer.grpo_trainer import GRPOTrainer

        return GRPOConfig, GRPOTrainer
    if method == "dpo":
        from trl.trainer.dpo_config import DPOConfig
        from trl.trainer.dpo_trainer import DPOTrainer

        return DPOConfig, DPOTrainer
    if method == "kto":
        from trl.trainer.kto_config import KTOConfig
        from trl.trainer.kto_trainer import KTOTrainer

        return KTOConfig, KTOTrainer
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    return ORPOConfig, ORPOTrainer


class _TrainedAdapterOnly:
    """TRL keeps the DPO/KTO reference of an adapter as a second, frozen adapter named "ref"; the
    run's checkpoints and outputs hold the trained adapter only (what users load and merge)."""

    def _save(self, output_dir: str | None = None, state_dict: Any = None) -> None:
        model = self.accelerator.unwrap_model(self.model)  # type: ignore[attr-defined]
        if "ref" not in getattr(model, "peft_config", {}):
            super()._save(output_dir, state_dict)  # type: ignore[misc]
            return
        model.save_pretrained = functools.partial(
            type(model).save_pretrained, model, selected_adapters=["default"]
        )
        try:
            super()._save(output_dir, state_dict)  # type: ignore[misc]
        finally:
            del model.save_pretrained


def _is_peft(model: Any) -> bool:
    return hasattr(model, "peft_config")


# ---- held-out preference scores ------------------------------------------------------------------


def preference_scores(
    model: Any,
    tokenizer: Any,
    examples: list[PreferenceExample],
    max_length: int,
    progress: Callable[[int, int], None] | None = None,
    check_cancelled: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """How much more likely the model finds the preferred answers (see the module doc)."""
    import torch

    was_training = model.training
    model.eval()
    chosen: list[float] = []
    rejected: list[float] = []
    started = time.monotonic()
    try:
        with torch.no_grad():
            for n, example in enumerate(examples, start=1):
                if example.kind == "preference":
                    assert example.chosen is not None and example.rejected is not None
                    chosen.append(_answer_logp(model, tokenizer, example.prompt, example.chosen, max_length))
                    rejected.append(
                        _answer_logp(model, tokenizer, example.prompt, example.rejected, max_length)
                    )
                else:
                    assert example.completion is not None
                    logp = _answer_logp(model, tokenizer, example.prompt, example.completion, max_length)
                    (chosen if example.label else rejected).append(logp)
                if progress is not None and (n == len(examples) or time.monotonic() - started >= 1.0):
                    started = time.monotonic()
                    progress(n, len(examples))
                if check_cancelled is not None:
                    check_cancelled()
    finally:
        model.train(was_training)
    if examples and examples[0].kind == "preference":
        margins = [c - r for c, r in zip(chosen, rejected, strict=True)]
        return {
            "rows": len(margins),
            "accuracy": _mean([1.0 if m > 0 else 0.0 for m in margins]),
            "margin": _mean(margins),
            "chosen_logp": _mean(chosen),
            "rejected_logp": _mean(rejected),
        }
    desirable, undesirable = _mean(chosen), _mean(rejected)
    return {
        "rows": len(chosen) + len(rejected),
        "desirable_logp": desirable,
        "undesirable_logp": undesirable,
        "margin": desirable - undesirable if desirable is not None and undesirable is not None else None,
    }


class PreferenceScorer:
    """The held-out preference scores of the base and the fine-tuned model, as ``eval`` events
    (``model`` base / fine_tuned) and the summary's ``preference`` section."""

    #: TRL's evaluation metrics (against the reference) kept beside ours after training.
    REWARD_METRICS = {"rewards/accuracies": "reward_accuracy", "rewards/margins": "reward_margin"}

    def __init__(self, cfg: TrainConfig, tokenizer: Any, ctx: Any, examples: list[PreferenceExample]):
        assert cfg.preference is not None
        self.method = cfg.preference.method
        self._tokenizer, self._ctx, self.examples = tokenizer, ctx, examples
        self._max_length = cfg.data.max_seq_length
        self.metrics: dict[str, dict[str, Any]] = {}

    def run(self, stage: str, model: Any, step: int, reference: dict[str, Any] | None = None) -> None:
        if not self.examples:
            return
        if self.method == "grpo":
            # The held-out prompts' sampled completions were just scored by the Trainer's evaluation,
            # with the job's own rewards (a BEAM reward included): those are the scores.
            scores = {
                k: v
                for k, v in (reference or {}).items()
                if k in ("reward", "reward_std", "completions/mean_length") or k.startswith("rewards/")
            }
            self.metrics[stage] = {"rows": len(self.examples), **scores}  # its eval event is out already
            return
        started = time.monotonic()
        unit = "pairs" if self.examples[0].kind == "preference" else "rows"
        scores = preference_scores(
            model,
            self._tokenizer,
            self.examples,
            self._max_length,
            progress=lambda done, total: self._ctx.progress(done, total, unit=unit, started=started),
            check_cancelled=self._ctx.check_cancelled,
        )
        for key, name in self.REWARD_METRICS.items():
            if reference and reference.get(key) is not None:
                scores[name] = reference[key]
        self.metrics[stage] = scores
        self._ctx.emit(
            "eval", model=stage, step=step, metrics={k: v for k, v in scores.items() if v is not None}
        )

    def summary(self) -> dict[str, Any]:
        # `metrics` and `improvement` are tables (wire.vocabulary.TABLE_KEYS).
        out: dict[str, Any] = {"method": self.method, "rows": len(self.examples), "metrics": self.metrics}
        base, tuned = self.metrics.get("base"), self.metrics.get("fine_tuned")
        if base and tuned:
            out["improvement"] = {
                k: round(tuned[k] - base[k], 6)
                for k in ("accuracy", "margin", "reward")
                if isinstance(base.get(k), (int, float)) and isinstance(tuned.get(k), (int, float))
            }
        return out


def _answer_logp(
    model: Any, tokenizer: Any, prompt: list[dict[str, Any]], answer: list[dict[str, Any]], max_length: int
) -> float:
    """log P(answer | prompt), summed over the answer's tokens, as TRL tokenizes a pair: the prompt
    with its generation prompt, the whole conversation, the answer from where the two part."""
    import torch

    prompt_ids = _ids(tokenizer, prompt, add_generation_prompt=True)
    full = _ids(tokenizer, prompt + answer, add_generation_prompt=False)[:max_length]
    start = 0
    while start < min(len(prompt_ids), len(full)) and prompt_ids[start] == full[start]:
        start += 1
    if start >= len(full):
        raise JobFailed(
            "bad_dataset_row",
            f"a held-out prompt fills data.max_seq_length ({max_length} tokens), leaving no room for its answer",
            hint="raise data.max_seq_length, or shorten the prompts",
        )
    device = next(model.parameters()).device
    ids = torch.tensor([full], device=device)
    logits = model(input_ids=ids).logits[0, :-1].float()
    logps = torch.log_softmax(logits, dim=-1).gather(-1, ids[0, 1:, None]).squeeze(-1)
    return float(logps[max(start - 1, 0) :].sum())


def _ids(tokenizer: Any, messages: list[dict[str, Any]], *, add_generation_prompt: bool) -> list[int]:
    encoded = tokenizer.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=True
    )
    return list(encoded["input_ids"])


def _mean(values: list[float]) -> float | None:
    return round(sum(values) / len(values), 6) if values else None
