"""GRPO's rewards, as TRL's reward functions: built from ``preference.rewards``, no user code.

TRL calls each function with the batch's ``prompts`` and ``completions`` (chat messages, as the
rows are) and the rows' other columns as keywords (``reference``), plus ``completion_ids`` and
``trainer_state``; each returns one float per completion (None: no opinion, which TRL skips).
Its ``__name__`` names the reward in the logs (``rewards/<name>/mean``).

- ``exact_match`` / ``f1``: against the row's reference answer, with the evaluation's SQuAD
  normalization (``evaluation.metrics``);
- ``regex``: 1 when the completion matches (a format check);
- ``length``: 0 up to ``max_tokens`` completion tokens, falling to -1 at twice that;
- ``beam``: a BEAM process scores: the worker sends the job's subscriber a ``reward_request``
  event and waits for the answer (``rewards/3``), at most ``timeout_s`` (``JobContext.request``).
  A cancel while it waits stops the job inside that step, untrained (``JobCancelled`` with the
  last checkpoint): no step trains on rewards nobody gave.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from finetune_worker.config.preference import BeamReward, LengthReward, MatchReward, RegexReward, Reward
from finetune_worker.context import JobContext, RequestTimeout
from finetune_worker.errors import JobCancelled, JobFailed
from finetune_worker.evaluation import metrics

RewardFunc = Callable[..., list[float | None]]


def reward_functions(rewards: list[Reward], ctx: JobContext) -> tuple[list[RewardFunc], list[float]]:
    """TRL's ``reward_funcs`` and ``reward_weights`` for the configured rewards."""
    funcs: list[RewardFunc] = []
    names: dict[str, int] = {}
    for spec in rewards:
        func = _build(spec, ctx)
        names[spec.type] = names.get(spec.type, 0) + 1
        # Two rewards of one type stay apart in the logs: regex, regex_2, ...
        func.__name__ = spec.type if names[spec.type] == 1 else f"{spec.type}_{names[spec.type]}"
        funcs.append(func)
    return funcs, [spec.weight for spec in rewards]


def text_of(item: Any) -> str:
    """A prompt's or completion's text: the last message's content of a chat, or the string."""
    if isinstance(item, list):
        return str(item[-1].get("content", "")) if item else ""
    return str(item)


def _build(spec: Reward, ctx: JobContext) -> RewardFunc:
    if isinstance(spec, MatchReward):
        score: Callable[[str, str], float] = metrics.token_f1
        if spec.type == "exact_match":
            score = metrics.exact_match if spec.normalize else _strict_match

        def match(completions: list[Any], reference: list[str | None], **_: Any) -> list[float | None]:
            return [
                None if ref is None else score(text_of(c), ref)
                for c, ref in zip(completions, reference, strict=True)
            ]

        return match
    if isinstance(spec, RegexReward):
        pattern = re.compile(spec.pattern)
        find = pattern.fullmatch if spec.full else pattern.search

        def regex(completions: list[Any], **_: Any) -> list[float | None]:
            return [1.0 if find(text_of(c)) else 0.0 for c in completions]

        return regex
    if isinstance(spec, LengthReward):
        limit = spec.max_tokens

        def length(completion_ids: list[list[int]], **_: Any) -> list[float | None]:
            return [-min(1.0, max(0, len(ids) - limit) / limit) for ids in completion_ids]

        return length
    assert isinstance(spec, BeamReward)
    return _beam(spec, ctx)


def _strict_match(prediction: str, reference: str) -> float:
    return float(prediction.strip() == reference.strip())


def _beam(spec: BeamReward, ctx: JobContext) -> RewardFunc:
    def beam(
        prompts: list[Any],
        completions: list[Any],
        reference: list[str | None] | None = None,
        trainer_state: Any = None,
        **_: Any,
    ) -> list[float | None]:
        n = len(completions)
        step = int(getattr(trainer_state, "global_step", 0) or 0) + 1
        if ctx.cancelled:
            raise _cancelled(ctx, step - 1)  # no request for a step that will not train
        payload = {
            "step": step,
            "prompts": [text_of(p) for p in prompts],
            "completions": [text_of(c) for c in completions],
            "references": list(reference) if reference is not None else [None] * n,
        }
        try:
            values = ctx.request("reward_request", payload, size=n, timeout_s=spec.timeout_s)
        except RequestTimeout as exc:
            raise JobFailed(
                "reward_failed",
                f"preference.rewards: no answer to the reward request for step {step} ({n} completions) "
                f"within {spec.timeout_s:g} s: {exc}",
                hint="The job's subscriber must answer each reward_request event with "
                "finetune_worker:rewards(JobId, Request, Rewards) (FineTuning.rewards/4 in Elixir); "
                "raise preference.rewards[].timeout_s if scoring takes longer.",
                details={"step": step},
            ) from None
        if values is None:  # cancelled while it waited: the step is not trained
            raise _cancelled(ctx, step - 1)
        return [None if v is None else float(v) for v in values]

    return beam


def _cancelled(ctx: JobContext, step: int) -> JobCancelled:
    """A cancel inside a step: it stops there, untrained; the last checkpoint is where to resume."""
    from finetune_worker.training.checkpoints import latest_checkpoint

    last = latest_checkpoint(ctx.config.paths.output)
    return JobCancelled(step=step, checkpoint=str(last) if last else None)
