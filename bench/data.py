"""What the training benchmarks train on: the "small" tiny model and a variable-length instruction set.

The dataset is generated, deterministically, from the tiny model's own corpus so every word is
one the byte-level BPE knows (about 1.2 tokens a word). Each row's length, counted in tokens of
the chat-rendered conversation (what the worker and the plain script both train on), is drawn
log-uniformly between 30 and 400: instruction data is long-tailed, many short answers and a
few long ones. Padding waste, and so what packing can win, depends on that shape, which is why
the report prints the padding share it measured.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MIN_TOKENS = 30
MAX_TOKENS = 400

_ASKS = [
    "Continue the story.",
    "Write a few sentences about daily life.",
    "Describe what happens next.",
    "Tell me about the village.",
    "Summarize the scene in your own words.",
    "Answer in plain sentences.",
    "Write a short passage for a reading class.",
]


@dataclass(frozen=True)
class DatasetInfo:
    path: Path
    lengths: list[int]  # tokens per row, chat template included

    @property
    def total_tokens(self) -> int:
        return sum(self.lengths)


def small_model(work_dir: Path) -> Path:
    """The 4-layer, 256-hidden tiny Llama the issue names, built once under ``work_dir``."""
    from finetune_worker.testing.tiny import build_tiny_model

    return build_tiny_model(work_dir / "small-model", size="small")


def bench_model(work_dir: Path, quick: bool) -> Path:
    """The small model, or in quick mode the tiny one: quick runs check that a part works, no more."""
    if not quick:
        return small_model(work_dir)
    from finetune_worker.testing.tiny import build_tiny_model

    return build_tiny_model(work_dir / "tiny-model", size="tiny")


def messages_of(row: dict[str, str]) -> list[dict[str, str]]:
    """The conversation an instruction row stands for, as the worker's data pipeline builds it."""
    user = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
    return [{"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}]


def build_dataset(
    path: Path,
    tokenizer: Any,
    *,
    n: int = 2000,
    lo: int = MIN_TOKENS,
    hi: int = MAX_TOKENS,
    seed: int = 0,
    spread: str = "log",
) -> DatasetInfo:
    """Write ``n`` instruction rows of ``lo``..``hi`` tokens each to ``path`` (JSONL); same inputs,
    same file. Lengths are drawn log-uniformly (``spread="log"``: many short rows, a long tail)
    or uniformly (``"uniform"``: long chat exports, the median half way)."""
    rng = random.Random(seed)
    sentences = [s.strip() for s in _corpus().splitlines() if s.strip()]
    if spread == "log":
        targets = [round(math.exp(rng.uniform(math.log(lo), math.log(hi)))) for _ in range(n)]
    else:
        targets = [round(rng.uniform(lo, hi)) for _ in range(n)]
    rows: list[dict[str, str]] = []
    words: list[list[str]] = []
    for _ in range(n):
        start = rng.randrange(len(sentences))
        # Enough running text for the longest answer; the fit below cuts it to length.
        text = " ".join(sentences[(start + k) % len(sentences)] for k in range(max(80, hi // 4))).split()
        words.append(text)
        rows.append({"instruction": rng.choice(_ASKS), "input": "", "output": ""})
    counts = [max(1, round(t / 1.2) - 10) for t in targets]
    for _ in range(4):  # proportional correction converges in two or three passes
        lengths = _lengths(tokenizer, rows, words, counts)
        counts = [
            max(1, min(len(w), round(c * t / max(n_tok, 1))))
            for c, t, n_tok, w in zip(counts, targets, lengths, words, strict=True)
        ]
    lengths = _lengths(tokenizer, rows, words, counts)
    for i in range(n):  # the few rows still outside the range move a word at a time
        while lengths[i] > hi and counts[i] > 1:
            counts[i] -= 1
            lengths[i] = _lengths(tokenizer, [rows[i]], [words[i]], [counts[i]])[0]
        while lengths[i] < lo and counts[i] < len(words[i]):
            counts[i] += 1
            lengths[i] = _lengths(tokenizer, [rows[i]], [words[i]], [counts[i]])[0]
        if not lo <= lengths[i] <= hi:
            raise RuntimeError(f"row {i}: cannot fit {lengths[i]} tokens into {lo}..{hi}")
    for row, w, c in zip(rows, words, counts, strict=True):
        row["output"] = " ".join(w[:c])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(path)
    return DatasetInfo(path=path, lengths=lengths)


def read_lengths(path: Path, tokenizer: Any) -> list[int]:
    """Tokens per row of a dataset file, counted the way :func:`build_dataset` counts them."""
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    texts = [tokenizer.apply_chat_template(messages_of(r), tokenize=False) for r in rows]
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def padding_share(lengths: list[int], batch_size: int) -> float:
    """Fraction of a padded run's tokens that are padding, batching rows in file order."""
    real = padded = 0
    for start in range(0, len(lengths), batch_size):
        batch = lengths[start : start + batch_size]
        real += sum(batch)
        padded += max(batch) * len(batch)
    return 1.0 - real / padded if padded else 0.0


def _lengths(
    tokenizer: Any, rows: list[dict[str, str]], words: list[list[str]], counts: list[int]
) -> list[int]:
    texts = []
    for row, w, c in zip(rows, words, counts, strict=True):
        candidate = dict(row, output=" ".join(w[:c]))
        texts.append(tokenizer.apply_chat_template(messages_of(candidate), tokenize=False))
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def _corpus() -> str:
    from finetune_worker.testing.tiny import corpus_text

    return corpus_text()
