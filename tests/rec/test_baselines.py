"""Item-KNN and EASE against hand-computed answers on a toy matrix; validation selection."""

from __future__ import annotations

import math

import numpy as np
import pytest

from nimbleml.errors import NimbleError
from nimbleml.rec.baselines import EASE, ItemCooccurrence, ItemKNN, RecentItems, fit_on_validation, training_matrix
from tests.rec.test_train import sequences


# training parts (all but the last two events): {1, 2}, {2, 3}, {1, 2, 3}, {4}
TOY = sequences([[1, 2, 4, 4], [2, 3, 4, 4], [1, 2, 3, 2, 4, 4], [4, 1, 1]], n_items=4)


def test_training_matrix_is_binary_over_the_training_part() -> None:
    expected = [[0, 1, 1, 0, 0], [0, 0, 1, 1, 0], [0, 1, 1, 1, 0], [0, 0, 0, 0, 1]]
    np.testing.assert_array_equal(training_matrix(TOY).toarray(), expected)


def test_item_knn_cosine_by_hand() -> None:
    # users per item: 1 -> 2, 2 -> 3, 3 -> 2; co-occurrences (1,2)=2, (1,3)=1, (2,3)=2; item 4 alone
    s12, s13, s23 = 2 / math.sqrt(6), 1 / 2, 2 / math.sqrt(6)
    knn = ItemKNN(neighbours=2).fit(TOY)
    scores = knn.score_all(np.array([[0, 1], [1, 3]]))
    assert scores[0, 2] == pytest.approx(s12) and scores[0, 3] == pytest.approx(s13)
    assert scores[1, 2] == pytest.approx(s12 + s23)  # summed over distinct history items
    assert scores[0, 1] < 0 and scores[0, 4] < 0  # nothing points to them: below every neighbour
    # one neighbour per item: item 1 keeps item 2 (0.816 > 0.5), so item 3 falls to the fallback
    pruned = ItemKNN(neighbours=1).fit(TOY).score_all(np.array([[0, 1]]))
    assert pruned[0, 2] == pytest.approx(s12) and pruned[0, 3] < 0


def test_ease_closed_form_by_hand() -> None:
    l2 = 0.5
    x = training_matrix(TOY).toarray()[:, 1:]
    p = np.linalg.inv(x.T @ x + l2 * np.eye(4))
    b = np.eye(4) - p / np.diag(p)  # B_ij = -P_ij / P_jj off the diagonal, 0 on it
    ease = EASE(l2=l2).fit(TOY)
    np.testing.assert_allclose(ease.weights_, b, atol=1e-5)
    assert np.all(np.diag(ease.weights_) == 0.0) and ease.coverage_ == 1.0
    scores = ease.score_all(np.array([[0, 1, 3], [0, 0, 2]]))
    np.testing.assert_allclose(scores[:, 1:], [b[0] + b[2], b[1]], atol=1e-5)


def test_ease_on_the_most_popular_items_when_the_catalogue_is_too_big() -> None:
    # training users per item: 1 -> 2, 2 -> 3, 3 -> 2, 4 -> 1; keep 2: item 2 and (first by id) item 1
    ease = EASE(l2=0.5, max_items=2).fit(TOY)
    np.testing.assert_array_equal(ease.items_, [1, 2])
    x = training_matrix(TOY).toarray()[:, 1:3]
    p = np.linalg.inv(x.T @ x + 0.5 * np.eye(2))
    np.testing.assert_allclose(ease.weights_, np.eye(2) - p / np.diag(p), atol=1e-5)
    scores = ease.score_all(np.array([[0, 1]]))
    assert scores[0, 2] > scores[0, 3] and scores[0, 4] < scores[0, 2]  # items 3, 4 rank below 1, 2
    assert 0.0 < ease.coverage_ < 1.0


def test_selection_uses_validation_targets_only() -> None:
    knn, selection = fit_on_validation("itemknn", TOY)
    assert selection.params["neighbours"] in ItemKNN.grid["neighbours"]
    assert set(selection.valid_ndcg10) == {str(v) for v in ItemKNN.grid["neighbours"]}
    assert isinstance(knn, ItemKNN) and knn.neighbours == selection.params["neighbours"]
    _, none = fit_on_validation("popular", TOY)
    assert none.params == {}


def test_recent_items_rank_past_items_by_decayed_counts_above_co_occurrence() -> None:
    history = np.array([[0, 1, 3, 1]])  # ages: item 1 at 2 and 0, item 3 at 1
    scores = RecentItems(decay=0.5).fit(TOY).score_all(history)
    assert scores[0, 1] == pytest.approx(1.0 + 0.25 + 1.0) and scores[0, 3] == pytest.approx(1.0 + 0.5)
    novel = ItemCooccurrence().fit(TOY).score_all(history)[0]
    assert 0.0 <= scores[0, 2] < 1.0 and 0.0 <= scores[0, 4] < 1.0
    assert (scores[0, 2] > scores[0, 4]) == (novel[2] > novel[4])  # the rest keep co-occurrence's order
    plain = RecentItems(decay=1.0).fit(TOY).score_all(np.array([[3, 1, 1, 0]]))  # 0 is padding, not an item
    assert plain[0, 1] == pytest.approx(3.0) and plain[0, 3] == pytest.approx(2.0) and plain[0, 0] < 1.0
    with pytest.raises(NimbleError, match="decay"):
        RecentItems(decay=0.0)
