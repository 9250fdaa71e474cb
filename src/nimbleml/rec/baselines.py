"""Non-neural next-item baselines with the same scorer face as the model.

Each baseline is an estimator: ``fit(data) -> self`` on the training part of each user's
sequence (every event but the last two, which are the validation and test targets), then
``score_all(history)`` / ``score(history, candidates)`` so ``rec.evaluate`` runs them
through the same protocols as :class:`~nimbleml.rec.model.SeqRec`.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from typing import Self

import numpy as np
import scipy.sparse as sp

from nimbleml.rec.data import SequenceData, leave_last_out

log = logging.getLogger(__name__)


class Recommender(ABC):
    """A baseline ranker: fit on training sequences, score histories."""

    name: str = "recommender"

    @abstractmethod
    def fit(self, data: SequenceData) -> Self:
        """Learn from the training part of every user's sequence."""

    @abstractmethod
    def score_all(self, history: np.ndarray, behaviors: np.ndarray | None = None) -> np.ndarray:
        """(B, L) left-padded item ids -> (B, n_items + 1) float64 scores (column 0 = padding)."""

    def score(
        self, history: np.ndarray, candidates: np.ndarray, behaviors: np.ndarray | None = None
    ) -> np.ndarray:
        """(B, L) history, (B, C) candidate ids -> (B, C) scores."""
        return np.take_along_axis(self.score_all(history, behaviors), np.asarray(candidates, dtype=np.int64), axis=1)


class MostPopular(Recommender):
    """Ranks every user's candidates by training interaction counts."""

    name = "popular"

    def fit(self, data: SequenceData) -> Self:
        self.counts_ = np.asarray(data.item_popularity(), dtype=np.float64)
        return self

    def score_all(self, history: np.ndarray, behaviors: np.ndarray | None = None) -> np.ndarray:
        return np.broadcast_to(self.counts_, (len(history), len(self.counts_))).copy()


class ItemCooccurrence(Recommender):
    """Item-to-item co-occurrence: items seen within ``window`` events of each other in a
    training sequence co-occur (counted in both directions). A history scores item j by the
    summed co-occurrence of j with its ``n_last`` most recent items; ties (notably items never
    co-occurring) are broken by popularity, scaled below one count so it never overturns one.
    """

    name = "cooccurrence"

    def __init__(self, window: int = 3, n_last: int = 3):
        self.window = window  # events apart (1 = adjacent) that still count as co-occurring
        self.n_last = n_last  # most recent history items whose co-occurrence rows are summed

    def fit(self, data: SequenceData) -> Self:
        split = leave_last_out(data, max_len=1)
        users = np.repeat(np.arange(data.n_users), np.diff(split.train_offsets))
        items = split.train_items.astype(np.int64)
        rows, cols = [], []
        for gap in range(1, self.window + 1):
            same_user = users[gap:] == users[:-gap]
            rows += [items[:-gap][same_user], items[gap:][same_user]]
            cols += [items[gap:][same_user], items[:-gap][same_user]]
        size = data.n_items + 1
        row = np.concatenate(rows) if rows else np.empty(0, np.int64)
        col = np.concatenate(cols) if cols else np.empty(0, np.int64)
        self.cooccurrence_ = sp.csr_matrix((np.ones(len(row)), (row, col)), shape=(size, size))
        self.cooccurrence_.sum_duplicates()
        popularity = np.asarray(data.item_popularity(), dtype=np.float64)
        self.tiebreak_ = 0.5 * popularity / (popularity.max() + 1.0)
        log.debug("co-occurrence matrix: %d non-zeros", self.cooccurrence_.nnz)
        return self

    def score_all(self, history: np.ndarray, behaviors: np.ndarray | None = None) -> np.ndarray:
        recent = np.asarray(history, dtype=np.int64)[:, -self.n_last :]
        size = self.cooccurrence_.shape[0]
        rows = np.repeat(np.arange(len(recent)), recent.shape[1])
        selector = sp.csr_matrix(
            ((recent.ravel() > 0).astype(np.float64), (rows, recent.ravel())), shape=(len(recent), size)
        )
        return (selector @ self.cooccurrence_).toarray() + self.tiebreak_


BASELINES: dict[str, type[Recommender]] = {
    MostPopular.name: MostPopular,
    ItemCooccurrence.name: ItemCooccurrence,
}
