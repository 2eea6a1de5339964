"""Generate completions, streaming only text that is final.

``generate()`` calls our streamer on the thread that runs it (the job's runner thread), so
no extra thread or queue is needed: each new token is decoded with everything before it and
only the part that can no longer change is handed out. Two things can still change: a
trailing U+FFFD (byte-level BPE split a multi-byte character; the next token completes it)
and a tail that may be the start of a stop string. Both are held back, so the pieces
concatenate to exactly the final completion text. The same streamer cuts completions at stop
strings and, through :class:`StopWhenDone`, ends generation once every row is done or the
job is cancelled.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from finetune_worker.config.evaluate import Message, Sampling
from finetune_worker.context import CancelFlag

#: on_text(row, piece): called with each final piece of text of batch row ``row``.
OnText = Callable[[int, str], None]


@dataclass(frozen=True)
class Completion:
    text: str
    tokens: int  # generated tokens, end-of-turn included
    finish_reason: str  # eos | stop | length


class FinalTextStreamer(BaseStreamer):
    """Per-row text of a batched ``generate()`` call, cut at stop strings, emitted when final."""

    def __init__(
        self,
        tokenizer: Any,
        stop: Sequence[str] = (),
        on_text: OnText | None = None,
        eos_ids: set[int] | None = None,
    ):
        self._tokenizer = tokenizer
        self._stop = [s for s in stop if s]
        self._on_text = on_text
        self._eos = eos_ids if eos_ids is not None else _eos_ids(tokenizer)
        self.ids: list[list[int]] = []
        self.texts: list[str] = []
        self.done: list[bool] = []
        self.finish: list[str] = []  # per row: eos | stop | length
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:
            # generate() first hands over the prompt (batch, seq); completions start after it.
            self._prompt_seen = True
            rows = value.shape[0] if value.dim() > 1 else 1
            self.ids = [[] for _ in range(rows)]
            self.texts = [""] * rows
            self.done = [False] * rows
            self.finish = ["length"] * rows
            return
        for row, token in enumerate(value.reshape(-1).tolist()):
            if self.done[row]:
                continue
            if token in self._eos:
                self.finish[row] = "eos"
                self._flush(row, final=True)
                continue
            self.ids[row].append(int(token))
            self._flush(row, final=False)

    def end(self) -> None:
        for row in range(len(self.ids)):
            if not self.done[row]:
                self._flush(row, final=True)

    def _flush(self, row: int, final: bool) -> None:
        text = self._tokenizer.decode(
            self.ids[row], skip_special_tokens=True, clean_up_tokenization_spaces=False
        )
        cut = _first_stop(text, self._stop)
        if cut is not None:
            text, final = text[:cut], True
            self.finish[row] = "stop"
        if final:
            self.done[row] = True
        else:
            text = _stable_prefix(text, self._stop)
        emitted = self.texts[row]
        if len(text) <= len(emitted) or not text.startswith(emitted):
            # Nothing new, or a decode that rewrote earlier text (never seen with byte-level BPE):
            # what was streamed stays the completion, so the pieces always add up to it.
            return
        piece = text[len(emitted) :]
        self.texts[row] = text
        if self._on_text is not None:
            self._on_text(row, piece)


class StopWhenDone(StoppingCriteria):
    """Ends rows the streamer has finished (stop string seen), and every row on cancel."""

    def __init__(self, streamer: FinalTextStreamer, cancel: CancelFlag | None):
        self._streamer = streamer
        self._cancel = cancel

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        n = input_ids.shape[0]
        if self._cancel is not None and self._cancel.is_set():
            return torch.ones(n, dtype=torch.bool, device=input_ids.device)  # type: ignore[return-value]
        done = self._streamer.done if len(self._streamer.done) == n else [False] * n
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)  # type: ignore[return-value]


def prompt_ids(
    tokenizer: Any, prompt: str | Sequence[Message | dict[str, str]], system_prompt: str | None = None
) -> list[int]:
    """Token ids of one prompt: plain text as is, chat messages through the chat template."""
    if isinstance(prompt, str):
        return list(tokenizer(prompt)["input_ids"])
    messages = [m.model_dump() if isinstance(m, Message) else dict(m) for m in prompt]
    if system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    enc = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    return list(enc["input_ids"])


def generation_config(
    model: Any, tokenizer: Any, sampling: Sampling, num_return_sequences: int = 1
) -> GenerationConfig:
    sample = sampling.temperature > 0
    eos = sorted(_eos_ids(tokenizer) | _model_eos(model))
    return GenerationConfig(
        max_new_tokens=sampling.max_new_tokens,
        do_sample=sample,
        # Greedy decoding ignores these; leaving them unset keeps transformers from warning.
        temperature=sampling.temperature if sample else None,
        top_p=sampling.top_p if sample else None,
        top_k=sampling.top_k if sample else None,
        repetition_penalty=sampling.repetition_penalty,
        num_return_sequences=num_return_sequences,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=eos or None,
        bos_token_id=tokenizer.bos_token_id,
    )


@torch.inference_mode()
def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[list[int]],
    sampling: Sampling,
    *,
    num_return_sequences: int = 1,
    on_text: OnText | None = None,
    cancel: CancelFlag | None = None,
) -> list[Completion]:
    """Completions for a batch of tokenized prompts (left-padded together).

    Returns ``len(prompts) * num_return_sequences`` texts, the sequences of one prompt next to
    each other. Seeds torch from ``sampling.seed`` first, so the same call gives the same texts.
    """
    from transformers import set_seed

    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in prompts], device=device)
    attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    config = generation_config(model, tokenizer, sampling, num_return_sequences)
    eos = config.eos_token_id
    streamer = FinalTextStreamer(tokenizer, sampling.stop, on_text, set(eos) if eos else set())
    set_seed(sampling.seed)
    model.generate(
        input_ids=input_ids,
        attention_mask=attention,
        generation_config=config,
        streamer=streamer,
        stopping_criteria=StoppingCriteriaList([StopWhenDone(streamer, cancel)]),
    )
    return [
        Completion(text, len(ids) + (reason == "eos"), reason)
        for text, ids, reason in zip(streamer.texts, streamer.ids, streamer.finish, strict=True)
    ]


def _first_stop(text: str, stop: Sequence[str]) -> int | None:
    hits = [i for i in (text.find(s) for s in stop) if i >= 0]
    return min(hits) if hits else None


def _stable_prefix(text: str, stop: Sequence[str]) -> str:
    """``text`` minus what the next token may still change."""
    end = len(text)
    while end > 0 and text[end - 1] == "\ufffd":
        end -= 1
    for s in stop:
        # A tail that is a proper prefix of a stop string may turn into that stop string.
        for k in range(min(len(s) - 1, end), 0, -1):
            if text[end - k : end] == s[:k]:
                end -= k
                break
    return text[:end]


def _eos_ids(tokenizer: Any) -> set[int]:
    return {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()


def _model_eos(model: Any) -> set[int]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        return set()
    return {eos} if isinstance(eos, int) else set(eos)
