"""Metrics against hand-computed values, and the protocols on hand-built scorers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from nimbleml.errors import NimbleError
from nimbleml.rec.evaluate import (
    evaluate_candidates,
    evaluate_full,
    evaluate_protocols,
    evaluate_sampled,
    hit_rate,
    mrr,
    ndcg,
    repeat_targets,
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
    # history items are not excluded by default; excluding them lifts users 2 and 3's targets
    # and makes user 1's repeat target (item 1, in the history) a miss ranked last (6 columns)
    excluded = evaluate_full(scorer, history, targets, exclude_history=True, ks=(1,))
    assert excluded["mrr"] == pytest.approx((1 / 7 + 1 / 2 + 1 / 4) / 3)


class NaNScorer(FixedScorer):
    """A broken model: NaN for every user's first candidate / item 1."""

    def score_all(self, history: np.ndarray, behaviors: np.ndarray | None = None) -> np.ndarray:
        scores = super().score_all(history)
        scores[:, 1] = np.nan
        return scores

    def score(self, history: np.ndarray, candidates: np.ndarray, behaviors: np.ndarray | None = None) -> np.ndarray:
        scores = super().score(history, candidates)
        scores[:, 0] = np.nan  # column 0 is the target
        return scores


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_or_inf_target_scores_raise(bad: float) -> None:
    weights = np.linspace(1.0, 0.0, 201)
    with pytest.raises(NimbleError, match="NaN"):
        evaluate_full(NaNScorer(weights), np.zeros((3, 2), np.int64), np.array([1, 1, 1]))
    with pytest.raises(NimbleError, match="NaN"):
        evaluate_sampled(NaNScorer(weights), np.zeros((3, 2), np.int64), np.array([5, 6, 7]), 200)
    weights[1] = bad
    with pytest.raises(NimbleError, match=r"\+inf" if bad > 0 else "NaN"):
        evaluate_candidates(FixedScorer(weights), np.zeros((3, 2), np.int64), np.array([1, 1, 1]), np.ones(201))


def test_history_mask_is_applied_by_the_evaluation_to_any_scorer() -> None:
    """A scorer that knows nothing of masks gets the same -inf on seen items as the model."""
    n_items = 200
    weights = np.zeros(n_items + 1)
    weights[1:6] = 10.0  # items 1..5 beat every negative, and users 0..3 have seen them
    history = np.tile(np.array([[0, 1, 2, 3, 4, 5]]), (4, 1))
    targets = np.array([6, 7, 8, 9])  # score 0, tied with every negative: pessimistic rank 100 / 49
    scorer = FixedScorer(weights)
    plain = evaluate_sampled(scorer, history, targets, n_items, seed=0)
    masked = evaluate_sampled(scorer, history, targets, n_items, seed=0, exclude_history=True)
    assert plain["hr@10"] == masked["hr@10"] == 0.0  # history items are never sampled negatives
    full_plain = evaluate_full(scorer, history, targets, ks=(10,))
    full_masked = evaluate_full(scorer, history, targets, exclude_history=True, ks=(10,))
    assert full_plain["mrr"] < full_masked["mrr"]
    # the masked full ranking is exactly the ranking with items 1..5 removed from the catalogue
    assert full_masked["mrr"] == pytest.approx(1 / (n_items - 5))
    repeat = evaluate_candidates(scorer, history, np.array([1, 2, 3, 4]), np.ones(n_items + 1), exclude_history=True)
    assert repeat["hr@10"] == 0.0  # seen targets are masked too: a repeat is a miss


def test_protocols_split_repeat_targets() -> None:
    n_items = 200
    scorer = FixedScorer(np.linspace(1.0, 0.0, n_items + 1))
    history = np.array([[0, 3], [0, 4], [0, 5], [0, 6]])
    seen = [np.array([3, 10]), np.array([4]), np.array([5]), np.array([6])]
    targets = np.array([10, 4, 50, 60])  # users 0 and 1 repeat an item
    np.testing.assert_array_equal(repeat_targets(targets, seen), [True, True, False, False])
    results = evaluate_protocols(scorer, history, targets, np.ones(n_items + 1), seen=seen)
    assert results["candidates50"].n_users == 4 and results["candidates50_novel"].n_users == 2
    # every protocol is split by target: the same ranks, so the groups' means make up the whole
    for protocol in ("full", "sampled100", "candidates50"):
        out = results[protocol].to_dict()
        assert out["repeat"]["n_users"] == 2 and out["novel"]["n_users"] == 2
        for metric in ("hr@10", "ndcg@10", "mrr"):
            assert out[metric] == pytest.approx((out["repeat"][metric] + out["novel"][metric]) / 2)
    # full ranking by weight, 0-based: item j has rank j - 1 (every lower id scores higher)
    full = results["full"].to_dict()
    assert full["repeat"]["mrr"] == pytest.approx((1 / 10 + 1 / 4) / 2)
    assert full["novel"]["mrr"] == pytest.approx((1 / 50 + 1 / 60) / 2)
    assert "repeat" not in results["candidates50_novel"].to_dict()  # the older form is not split


def test_split_by_target_keeps_both_keys_when_a_group_is_empty() -> None:
    scorer = FixedScorer(np.linspace(1.0, 0.0, 31))
    result = evaluate_full(scorer, np.array([[0, 3], [0, 4]]), np.array([7, 8]), repeat=np.array([False, False]))
    out = result.to_dict()
    assert out["repeat"] == {"hr@10": None, "hr@50": None, "ndcg@10": None, "ndcg@50": None, "mrr": None, "n_users": 0}
    assert out["novel"]["n_users"] == 2 and out["novel"]["mrr"] == out["mrr"]
    assert "repeat" not in evaluate_full(scorer, np.array([[0, 3]]), np.array([7])).to_dict()  # no split asked


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
