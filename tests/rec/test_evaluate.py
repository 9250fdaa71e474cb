"""Metrics against hand-computed values, and the protocols on hand-built scorers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from nimbleml.errors import NimbleError
from nimbleml.rec.evaluate import (
    evaluate_candidates,
    evaluate_full,
    evaluate_sampled,
    hit_rate,
    mrr,
    ndcg,
    validate_history,
)


def test_metrics_known_values() -> None:
    ranks = np.array([0, 1, 4, 20])
    assert hit_rate(ranks, 1) == 0.25
    assert hit_rate(ranks, 5) == 0.75
    assert ndcg(ranks, 5) == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(6)) / 4)
    assert ndcg(ranks, 1) == 0.25
    assert mrr(ranks) == pytest.approx((1 + 1 / 2 + 1 / 5 + 1 / 21) / 4)


class FixedScorer:
    """Scores item j as weights[j] for every user."""

    def __init__(self, weights: np.ndarray):
        self.weights = np.asarray(weights, dtype=np.float64)

    def score_all(self, history: np.ndarray, behaviors: np.ndarray | None = None) -> np.ndarray:
        return np.tile(self.weights, (len(history), 1))

    def score(self, history: np.ndarray, candidates: np.ndarray, behaviors: np.ndarray | None = None) -> np.ndarray:
        return self.weights[candidates]


def test_full_protocol_ranks_and_pessimistic_ties() -> None:
    # items 1..5; padding column 0 gets the highest score and must be ignored
    scorer = FixedScorer([100.0, 5.0, 4.0, 4.0, 2.0, 1.0])
    history = np.array([[0, 1], [0, 2], [0, 1]])
    targets = np.array([1, 3, 5])  # ranks: 0; item 3 ties item 2 -> 2 (pessimistic); 4
    result = evaluate_full(scorer, history, targets, ks=(1, 3))
    assert result["hr@1"] == pytest.approx(1 / 3)
    assert result["hr@3"] == pytest.approx(2 / 3)
    assert result["mrr"] == pytest.approx((1 + 1 / 3 + 1 / 5) / 3)
    # history items are not excluded by default; excluding them lifts user 2's target
    excluded = evaluate_full(scorer, history, targets, exclude="history", ks=(1,))
    assert excluded["mrr"] == pytest.approx((1 + 1 / 2 + 1 / 4) / 3)


def test_constant_scores_get_no_credit() -> None:
    scorer = FixedScorer(np.zeros(31))  # 30 items, all tied: pessimistic rank 29
    result = evaluate_full(scorer, np.ones((4, 3), dtype=np.int64), np.array([2, 3, 4, 5]))
    assert result["hr@10"] == 0.0


def test_sampled_negatives_avoid_history_and_target() -> None:
    n_items = 120
    weights = np.zeros(n_items + 1)
    weights[1:11] = 1.0  # history/target items score high, everything else 0
    scorer = FixedScorer(weights)
    history = np.tile(np.arange(1, 10), (30, 1))
    targets = np.full(30, 10)
    result = evaluate_sampled(scorer, history, targets, n_items, n_negatives=100, seed=1)
    assert result["hr@10"] == 1.0  # no negative can be one of the high-scoring items
    assert result.n_users == 30
    with pytest.raises(NimbleError):
        evaluate_sampled(scorer, history, targets, 50, n_negatives=100)


def test_sampled_negatives_avoid_the_whole_history() -> None:
    """Items seen before the model's input window (``seen``) are never negatives either (SASRec)."""
    n_items = 130
    weights = np.zeros(n_items + 1)
    weights[1:31] = 1.0  # items 1..30 score as high as the target
    scorer = FixedScorer(weights)
    window = np.tile(np.arange(21, 30), (20, 1))  # the input row holds only items 21..29
    seen = [np.arange(1, 30)] * 20  # but the user saw 1..29
    targets = np.full(20, 30)
    only_window = evaluate_sampled(scorer, window, targets, n_items, seed=3)
    assert only_window["hr@10"] < 1.0  # most of 1..20 are drawn and tie the target
    assert evaluate_sampled(scorer, window, targets, n_items, seed=3, seen=seen)["hr@10"] == 1.0


def test_candidates_sampled_by_popularity() -> None:
    n_items = 200
    popularity = np.zeros(n_items + 1)
    popularity[100:] = 1.0  # only items 100..200 can be negatives
    weights = np.zeros(n_items + 1)
    weights[:100] = 1.0
    result = evaluate_candidates(FixedScorer(weights), np.zeros((5, 4), np.int64), np.arange(1, 6), popularity)
    assert result.protocol == "candidates50"
    assert result["hr@10"] == 1.0 and result["mrr"] == 1.0
    assert set(result.to_dict()) == {"hr@10", "ndcg@10", "mrr", "n_users"}


def test_validate_history_rejects_bad_ids() -> None:
    with pytest.raises(NimbleError, match="outside"):
        validate_history(np.array([[0, 11]]), n_items=10)
    with pytest.raises(NimbleError, match="integer"):
        validate_history(np.array([[0.5]]), n_items=10)
    with pytest.raises(NimbleError, match="2-D"):
        validate_history(np.array([1, 2]), n_items=10)
