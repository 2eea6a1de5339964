"""Answer metrics against hand-computed values (no model needed)."""

from __future__ import annotations

import pytest

from finetune_worker.evaluation import metrics as m


def test_normalize_follows_squad() -> None:
    assert m.normalize("The  Sky, is BLUE!") == "sky is blue"
    assert m.normalize("An apple a day") == "apple day"


def test_exact_match_ignores_case_punctuation_and_articles() -> None:
    assert m.exact_match("The sky is blue.", "sky is blue") == 1.0
    assert m.exact_match("The sky is grey.", "The sky is blue.") == 0.0


def test_token_f1() -> None:
    # pred {sky, is, blue, today} vs ref {sky, is, blue}: P=3/4, R=1, F1=6/7
    assert m.token_f1("the sky is blue today", "the sky is blue") == pytest.approx(6 / 7)
    assert m.token_f1("cat", "dog") == 0.0
    assert m.token_f1("", "") == 1.0 and m.token_f1("", "x") == 0.0
    # repeated tokens count only as often as they appear in both
    assert m.token_f1("a b b b", "b b") == pytest.approx(2 * (2 / 3) * 1 / (2 / 3 + 1))


def test_rouge_l_is_lcs_f1() -> None:
    # LCS("police killed the gunman", "police kill the gunman") = police, the, gunman = 3
    assert m.rouge_l("police killed the gunman", "police kill the gunman") == pytest.approx(0.75)
    # order matters for LCS, unlike bag-of-words F1
    assert m.rouge_l("a b c d", "d c b a") == pytest.approx(0.25)
    assert m.token_f1("x y z w", "w z y x") == 1.0
    assert m.rouge_l("", "") == 1.0


def test_bleu_from_sacrebleu() -> None:
    sentence = "the quick brown fox jumps over the lazy dog"
    assert m.sentence_bleu(sentence, sentence) == pytest.approx(100.0)
    assert m.corpus_bleu(
        [sentence, "hello there my friend"], [sentence, "hello there my friend"]
    ) == pytest.approx(100.0)
    assert 0 < m.sentence_bleu("the quick brown fox jumps over a dog", sentence) < 100
    assert m.corpus_bleu([], []) == 0.0


def test_aggregate_and_improvement() -> None:
    rows = [
        {"reference": "blue", "prediction": "blue", **m.score_row("blue", "blue")},
        {"reference": "red", "prediction": "green", **m.score_row("green", "red")},
        {"row": 3},  # a text row: no reference, not scored
    ]
    agg = m.aggregate(rows)
    assert agg["exact_match"] == 50.0 and agg["f1"] == 50.0 and agg["answered_rows"] == 2
    better = {"eval_loss": 1.0, "perplexity": 2.718, "exact_match": 50.0}
    base = {"eval_loss": 2.0, "perplexity": 7.389, "exact_match": 0.0}
    imp = m.improvement(better, base)
    assert imp["eval_loss_delta"] == 1.0 and imp["exact_match_delta"] == 50.0
    assert imp["perplexity_reduction_pct"] == pytest.approx(100 * (7.389 - 2.718) / 7.389, abs=1e-3)
    assert m.perplexity(10_000.0) is None  # overflow is reported as unknown, not inf
