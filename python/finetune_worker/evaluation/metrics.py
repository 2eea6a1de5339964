"""Scores for generated answers against references: exact match, token F1, BLEU, ROUGE-L.

Exact match and F1 follow the SQuAD evaluation script's normalization (lower case, no
punctuation, no articles, single spaces), so "The sky is blue." matches "the sky is blue".
BLEU is sacrebleu's (corpus BLEU for the dataset, smoothed sentence BLEU per row). ROUGE-L is
computed here: the ``rouge-score`` package would pull nltk and absl for one LCS.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Sequence
from typing import Any

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize(text: str) -> str:
    text = text.lower().translate(_PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize(prediction) == normalize(reference))


def token_f1(prediction: str, reference: str) -> float:
    pred, ref = normalize(prediction).split(), normalize(reference).split()
    if not pred or not ref:
        return float(pred == ref)  # both empty counts as a match, one empty as a miss
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1: longest common subsequence of lower-cased word tokens."""
    pred, ref = _rouge_tokens(prediction), _rouge_tokens(reference)
    if not pred or not ref:
        return float(pred == ref)
    lcs = _lcs_length(pred, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def sentence_bleu(prediction: str, reference: str) -> float:
    import sacrebleu

    return float(sacrebleu.sentence_bleu(prediction, [reference]).score)


def corpus_bleu(predictions: Sequence[str], references: Sequence[str]) -> float:
    import sacrebleu

    if not predictions:
        return 0.0
    return float(sacrebleu.corpus_bleu(list(predictions), [list(references)]).score)


def score_row(prediction: str, reference: str) -> dict[str, float]:
    """One row's scores, all on the 0-100 scale of the dataset figures (and of sacrebleu's BLEU)."""
    return {
        "exact_match": 100.0 * exact_match(prediction, reference),
        "f1": round(100.0 * token_f1(prediction, reference), 4),
        "bleu": round(sentence_bleu(prediction, reference), 4),
        "rouge_l": round(100.0 * rouge_l(prediction, reference), 4),
    }


def aggregate(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Dataset-level answer metrics from per-row predictions (rows with a reference only).

    EM, F1 and ROUGE-L are the rows' scores (0-100) averaged; BLEU is corpus BLEU, which is
    not the mean of sentence BLEUs.
    """
    scored = [r for r in rows if r.get("reference") is not None and r.get("prediction") is not None]
    if not scored:
        return {}
    n = len(scored)
    return {
        "exact_match": round(sum(r["exact_match"] for r in scored) / n, 4),
        "f1": round(sum(r["f1"] for r in scored) / n, 4),
        "bleu": round(corpus_bleu([r["prediction"] for r in scored], [r["reference"] for r in scored]), 4),
        "rouge_l": round(sum(r["rouge_l"] for r in scored) / n, 4),
        "answered_rows": n,
    }


def perplexity(loss: float | None) -> float | None:
    if loss is None:
        return None
    try:
        return math.exp(loss)
    except OverflowError:
        return None


def improvement(model: dict[str, Any], baseline: dict[str, Any]) -> dict[str, Any]:
    """How much better ``model`` is than ``baseline``: positive numbers always mean better."""
    out: dict[str, Any] = {}
    if model.get("eval_loss") is not None and baseline.get("eval_loss") is not None:
        out["eval_loss_delta"] = round(baseline["eval_loss"] - model["eval_loss"], 6)
    ppl, base_ppl = model.get("perplexity"), baseline.get("perplexity")
    if ppl is not None and base_ppl:
        out["perplexity_delta"] = round(base_ppl - ppl, 6)
        out["perplexity_reduction_pct"] = round(100.0 * (base_ppl - ppl) / base_ppl, 4)
    for key in ("exact_match", "f1", "bleu", "rouge_l"):
        if model.get(key) is not None and baseline.get(key) is not None:
            out[f"{key}_delta"] = round(model[key] - baseline[key], 4)
    return out


def _rouge_tokens(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    # One row of the DP table at a time: answers are short, memory stays O(len(b)).
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b, start=1):
            cur.append(prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1]))
        prev = cur
    return prev[-1]
