"""Turn a dataset file into token rows for the Trainer: ``build_datasets`` and ``make_collator``.

Chat-like rows (conversations, Q&A, instruction) go through the chat template; with
``train_on_responses_only`` only the assistant's tokens (its content and end-of-turn token)
carry labels. Two ways to find them: the template's ``{% generation %}`` tags through
``apply_chat_template(return_assistant_tokens_mask=True)`` when it has them, otherwise a
prefix diff that works with any template (render the conversation up to each assistant turn
with and without that turn; the difference is what the assistant said). Plain text trains on
every token and is cut into blocks. Rows are plain dicts of int lists, which the HF Trainer
takes as a map-style dataset as they are.
"""

from __future__ import annotations

import logging
import random
import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from finetune_worker.config.data import DataConfig
from finetune_worker.errors import JobFailed
from finetune_worker.hf import CHATML_TEMPLATE
from finetune_worker.training.data_collate import make_collator
from finetune_worker.training.data_formats import Example, load_examples

__all__ = ["IGNORE_INDEX", "ChatEncoder", "build_datasets", "make_collator", "split_examples"]

IGNORE_INDEX = -100  # label value the loss skips (torch CrossEntropyLoss's default ignore_index)
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")
log = logging.getLogger(__name__)

Row = dict[str, list[int]]


def build_datasets(
    data_cfg: DataConfig,
    tokenizer: Any,
    path: str | Path,
    *,
    validation_split: float,
    seed: int,
    warn: Callable[[str], None] | None = None,
) -> tuple[list[Row], list[Row], dict[str, Any]]:
    """Read, validate, split and tokenize ``path``: ``(train_rows, eval_rows, stats)``.

    The split is by source row (blocks of one document never straddle it) and depends only on
    ``seed``. ``stats`` counts rows, sequences, tokens, trained tokens, truncations and formats.
    When chat rows were rendered, ``tokenizer.chat_template`` is set to the template used, so
    the tokenizer saved with the outputs renders prompts as training did.
    """
    examples = load_examples(Path(path), data_cfg)
    train_ex, eval_ex = split_examples(examples, validation_split, seed)
    encoder = ChatEncoder(tokenizer, data_cfg)
    train_rows, train_counts = encoder.encode_all(train_ex)
    eval_rows, eval_counts = encoder.encode_all(eval_ex)
    counts = train_counts + eval_counts
    if not train_rows:
        raise JobFailed(
            "bad_dataset_row",
            f"no trainable examples in {path}: every row lost its trained tokens to truncation",
            hint="raise data.max_seq_length, or shorten the prompts",
        )

    warnings: list[str] = []
    if counts["truncated"]:
        warnings.append(
            f"{counts['truncated']} example(s) longer than data.max_seq_length={data_cfg.max_seq_length} "
            "were truncated (their start is kept)"
        )
    if counts["dropped"]:
        warnings.append(
            f"{counts['dropped']} example(s) had no assistant tokens left after truncation and were skipped"
        )
    if validation_split > 0 and not eval_rows:
        warnings.append(f"validation_split={validation_split} but the dataset is too small to hold rows out")
    for message in warnings:
        (warn or log.warning)(message)

    stats: dict[str, Any] = {
        "rows": len(examples),
        "train_rows": len(train_rows),
        "eval_rows": len(eval_rows),
        "tokens": counts["tokens"],
        "trained_tokens": counts["trained_tokens"],
        "train_tokens": train_counts["tokens"],
        "truncated": counts["truncated"],
        "dropped": counts["dropped"],
        "format_counts": dict(sorted(Counter(e.kind for e in examples).items())),
        "mask_method": encoder.mask_method,
        "max_seq_length": data_cfg.max_seq_length,
        "warnings": warnings,
    }
    if any(kind != "text" for kind in stats["format_counts"]):
        # The template the chat rows were rendered with goes out with the outputs: evaluate,
        # generate and anyone loading them with AutoTokenizer must render prompts the same way.
        tokenizer.chat_template = encoder.template
    return train_rows, eval_rows, stats


def split_examples(
    examples: list[Example], validation_split: float, seed: int
) -> tuple[list[Example], list[Example]]:
    """Deterministic hold-out by ``seed``; each side keeps file order."""
    n = len(examples)
    # At least one row each side once a split is asked for and possible.
    n_eval = min(max(round(n * validation_split), 1), n - 1) if validation_split > 0 and n >= 2 else 0
    order = list(range(n))
    random.Random(seed).shuffle(order)
    held = set(order[:n_eval])
    return [e for i, e in enumerate(examples) if i not in held], [
        e for i, e in enumerate(examples) if i in held
    ]


#: Raw text is tokenized in pieces of at most this many characters (see ChatEncoder._tokenize_texts).
TEXT_PIECE_CHARS = 1_000_000


def text_pieces(text: str, limit: int) -> list[str]:
    """``text`` cut into pieces of at most ``limit`` characters, each cut after whitespace when there is any."""
    pieces: list[str] = []
    start = 0
    while len(text) - start > limit:
        cut = max(text.rfind(" ", start, start + limit), text.rfind("\n", start, start + limit))
        end = cut + 1 if cut > start else start + limit
        pieces.append(text[start:end])
        start = end
    pieces.append(text[start:])
    return pieces


class ChatEncoder:
    """Tokenizes examples into ``{"input_ids", "labels"}`` rows under one DataConfig."""

    def __init__(self, tokenizer: Any, cfg: DataConfig):
        self.tokenizer = tokenizer
        self.cfg = cfg
        own = getattr(tokenizer, "chat_template", None)
        if isinstance(own, dict):  # named templates (e.g. "default", "tool_use"): chat rows need the default
            own = own.get("default") or next(iter(own.values()), None)
        self.template: str = cfg.chat_template or own or CHATML_TEMPLATE
        # Offsets (fast tokenizers) are what the generation-tag mask is computed from.
        has_tags = bool(_GENERATION_TAG.search(self.template))
        self.mask_method = (
            "generation_tags" if has_tags and getattr(tokenizer, "is_fast", False) else "prefix_diff"
        )
        self.block_size = min(cfg.text_block_size or cfg.max_seq_length, cfg.max_seq_length)

    def encode_all(self, examples: list[Example]) -> tuple[list[Row], Counter[str]]:
        counts: Counter[str] = Counter(tokens=0, trained_tokens=0, truncated=0, dropped=0)
        rows: list[Row] = []
        texts = [e for e in examples if e.kind == "text"]
        if texts:
            for ids in self._tokenize_texts([e.text or "" for e in texts]):
                rows.extend(self._blocks(ids))
        for example in examples:
            if example.kind == "text":
                continue
            ids, labels = self.encode_chat(example.messages, row=example.row)
            if len(ids) > self.cfg.max_seq_length:
                counts["truncated"] += 1
                ids, labels = ids[: self.cfg.max_seq_length], labels[: self.cfg.max_seq_length]
            # The first label never gets a prediction (causal shift): a row needs one after it.
            if all(label == IGNORE_INDEX for label in labels[1:]):
                counts["dropped"] += 1
                continue
            rows.append({"input_ids": ids, "labels": labels})
        for row in rows:
            counts["tokens"] += len(row["input_ids"])
            counts["trained_tokens"] += sum(1 for label in row["labels"][1:] if label != IGNORE_INDEX)
        return rows, counts

    def _tokenize_texts(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each raw text. A text longer than TEXT_PIECE_CHARS is tokenized in pieces
        cut at whitespace and joined (the fast tokenizer aborts the process on a 32 MiB string);
        only the first piece gets the tokenizer's special tokens."""
        firsts, rests, owners = [], [], []
        for i, text in enumerate(texts):
            pieces = text_pieces(text, TEXT_PIECE_CHARS)
            firsts.append(pieces[0])
            rests += pieces[1:]
            owners += [i] * (len(pieces) - 1)
        out = [list(ids) for ids in self.tokenizer(firsts, add_special_tokens=True)["input_ids"]]
        if rests:
            for owner, ids in zip(
                owners, self.tokenizer(rests, add_special_tokens=False)["input_ids"], strict=True
            ):
                out[owner].extend(ids)
        return out

    def _blocks(self, ids: list[int]) -> list[Row]:
        eos = self.tokenizer.eos_token_id
        if eos is not None and (not ids or ids[-1] != eos):
            ids.append(eos)  # documents end with eos so the model learns where text stops
        out = []
        for start in range(0, len(ids), self.block_size):
            block = ids[start : start + self.block_size]
            if len(block) >= 2:  # one token has nothing to predict
                out.append({"input_ids": block, "labels": list(block)})
        return out

    def encode_chat(self, messages: list[dict[str, str]], *, row: int = 0) -> tuple[list[int], list[int]]:
        """``(input_ids, labels)`` of one conversation; labels mask non-assistant tokens if configured."""
        try:
            if not self.cfg.train_on_responses_only:
                ids = self._ids(self._render(messages))
                return ids, list(ids)
            if self.mask_method == "generation_tags":
                enc = self.tokenizer.apply_chat_template(
                    messages,
                    chat_template=self.template,
                    tokenize=True,
                    return_dict=True,
                    return_assistant_tokens_mask=True,
                )
                ids, mask = list(enc["input_ids"]), list(enc["assistant_masks"])
            else:
                ids, mask = self._prefix_diff(messages)
        except JobFailed:
            raise
        except Exception as exc:  # a template's own raise_exception(), or a Jinja error
            raise JobFailed(
                "bad_dataset_row",
                f"row {row}: the chat template cannot render this conversation ({type(exc).__name__}: {exc})",
                hint="fix the row, or set data.chat_template to a template that accepts it",
            ) from exc
        labels = [t if m else IGNORE_INDEX for t, m in zip(ids, mask, strict=True)]
        return ids, labels

    def _render(self, messages: list[dict[str, str]], *, add_generation_prompt: bool = False) -> str:
        text = self.tokenizer.apply_chat_template(
            messages, chat_template=self.template, tokenize=False, add_generation_prompt=add_generation_prompt
        )
        return str(text)

    def _ids(self, text: str) -> list[int]:
        # Templates write their own bos/special tokens, as apply_chat_template(tokenize=True) assumes.
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _prefix_diff(self, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
        full = self._render(messages)
        spans: list[tuple[int, int]] = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self._render(messages[:i], add_generation_prompt=True)
            through = self._render(messages[: i + 1])
            if not (through.startswith(before) and full.startswith(through)):
                raise JobFailed(
                    "invalid_config",
                    "the chat template renders earlier turns differently once later turns follow, so the "
                    "assistant's tokens cannot be located",
                    hint="set data.train_on_responses_only to false, or use a template with {% generation %} tags",
                )
            # Trailing whitespace after the end-of-turn token is layout, not something the assistant says.
            spans.append((len(before), max(len(before), len(through.rstrip()))))
        if getattr(self.tokenizer, "is_fast", False):
            enc = self.tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
            ids = list(enc["input_ids"])
            mask = [int(any(start < e and end > s for s, e in spans)) for start, end in enc["offset_mapping"]]
            return ids, mask
        # Slow tokenizers have no offsets: count tokens of each rendered prefix instead.
        ids = self._ids(full)
        mask = [0] * len(ids)
        for s, e in spans:
            for k in range(len(self._ids(full[:s])), min(len(self._ids(full[:e])), len(ids))):
                mask[k] = 1
        return ids, mask
