"""The train job's ``evaluation`` section: the evaluate job's scores before and after training.

Runs on the model the Trainer trains, in process: before training the adapters are at their
init (LoRA's B is zero, so the model computes what the base computes), after training they
hold the result. Both runs use the same rows, the same tokenization as training and greedy
answers, so the two sets of numbers compare fairly. Used by the training job::

    evaluator = TrainingEvaluator(cfg, tokenizer, ctx)   # when cfg.evaluation is set
    evaluator.run("base", model, step=0)                  # before trainer.train()
    evaluator.run("fine_tuned", model, step=60)           # after it
    summary["evaluation"] = evaluator.summary()

When the section scores the held-out split (it names no dataset of its own), its two runs are
the job's base and final evaluations: the job does not also run the Trainer's loss-only
evaluation of the same rows before and after training (one line per model, not two).
"""

from __future__ import annotations

from typing import Any

from finetune_worker.context import JobContext
from finetune_worker.data.rows import Example
from finetune_worker.evaluation import metrics
from finetune_worker.evaluation.scoring import ModelScores, prepare, progress_events, score_model

STAGES = ("base", "fine_tuned")


class TrainingEvaluator:
    def __init__(
        self,
        train_cfg: Any,
        tokenizer: Any,
        ctx: JobContext,
        *,
        held_out: list[Example],
        training: list[Example],
    ):
        """``held_out`` and ``training``: the first held-out and training examples (training's
        data pass kept them), used when the section names no dataset of its own."""
        from finetune_worker.data.sources import load_examples

        self.section = train_cfg.evaluation
        self._ctx = ctx
        if self.section.dataset is not None:
            examples = load_examples(train_cfg.evaluation_source, self.section.max_rows)
            source = self.section.dataset.path
        else:
            # The same held-out rows the Trainer's eval uses; training rows only if none are held out.
            examples, source = (held_out, "held-out split") if held_out else (training, "training rows")
        self.source = source
        #: Its scores stand for the job's base and final evaluations (the Trainer's rows).
        self.on_held_out = source == "held-out split"
        self.items = prepare(examples[: self.section.max_rows], tokenizer, train_cfg.data)
        self._tokenizer = tokenizer
        self.scores: dict[str, ModelScores] = {}

    def run(self, stage: str, model: Any, step: int | None = None) -> dict[str, Any]:
        """Score ``model`` now; ``stage`` is "base" or "fine_tuned", ``step`` the training step
        its weights are from. Restores train mode after."""
        was_training = model.training
        model.eval()  # dropout off: the scores must not depend on the RNG
        try:
            scores = score_model(
                model,
                self._tokenizer,
                self.items,
                batch_size=self.section.batch_size,
                sampling=self.section.generation if self.section.generate_answers else None,
                cancel=self._ctx.cancel_event,
                progress=progress_events(self._ctx),
            )
        finally:
            model.train(was_training)
        self.scores[stage] = scores
        values = {k: v for k, v in scores.metrics.items() if v is not None}
        self._ctx.emit("eval", model=stage, metrics=values, **({} if step is None else {"step": step}))
        return scores.metrics

    def summary(self) -> dict[str, Any]:
        # `metrics` is a table (events.TABLE_KEYS): model label -> that model's scores.
        out: dict[str, Any] = {
            "rows_from": self.source,
            "rows": len(self.items),
            "metrics": {stage: self.scores[stage].metrics for stage in STAGES if stage in self.scores},
        }
        if all(stage in self.scores for stage in STAGES):
            out["improvement"] = metrics.improvement(
                self.scores["fine_tuned"].metrics, self.scores["base"].metrics
            )
            out["samples"] = self._samples()
        return out

    def _samples(self) -> list[dict[str, Any]]:
        base, tuned = self.scores["base"].rows, self.scores["fine_tuned"].rows
        shown: list[dict[str, Any]] = []
        for before, after in zip(base, tuned, strict=True):
            if len(shown) >= self.section.samples:
                break
            if "prediction" in after:
                shown.append(
                    {
                        "row": after["row"],
                        "prompt": after["prompt"],
                        "reference": after["reference"],
                        "base": before.get("prediction"),
                        "fine_tuned": after["prediction"],
                    }
                )
        return shown
