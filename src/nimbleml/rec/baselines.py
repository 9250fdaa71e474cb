"""Non-neural next-item baselines with the same scorer face as the model.

Each baseline is an estimator: ``fit(data) -> self`` on the training part of each user's
sequence (every event but the last two, which are the validation and test targets), then
``score_all(history)`` / ``score(history, candidates)`` so ``rec.evaluate`` runs them
through the same protocols as :class:`~nimbleml.rec.model.SeqRec`.

Item-KNN and EASE are the simple baselines that full-ranking studies find hard to beat
(Dacrema et al. 2019; Steck 2019). Their one hyperparameter is chosen on the validation
targets by :func:`fit_on_validation`, never on the test targets.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from typing import Self

import numpy as np
import scipy.sparse as sp
import torch

from nimbleml.errors import NimbleError
from nimbleml.rec.data import SequenceData, leave_last_out
from nimbleml.rec.evaluate import evaluate_full

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


def training_matrix(data: SequenceData) -> sp.csr_matrix:
    """(n_users, n_items + 1) binary user-item matrix of the training part (events[:-2])."""
    split = leave_last_out(data, max_len=1)
    users = np.repeat(np.arange(data.n_users), np.diff(split.train_offsets))
    matrix = sp.csr_matrix(
        (np.ones(len(users), dtype=np.float32), (users, split.train_items.astype(np.int64))),
        shape=(data.n_users, data.n_items + 1),
    )
    matrix.data[:] = 1.0  # a repeated item counts once
    return matrix


def history_matrix(history: np.ndarray, n_columns: int) -> sp.csr_matrix:
    """(B, L) left-padded ids -> (B, n_columns) binary rows (padding dropped, repeats once)."""
    history = np.asarray(history, dtype=np.int64)
    rows = np.repeat(np.arange(len(history)), history.shape[1])
    keep = history.ravel() > 0
    matrix = sp.csr_matrix(
        (np.ones(int(keep.sum()), dtype=np.float32), (rows[keep], history.ravel()[keep])), shape=(len(history), n_columns)
    )
    matrix.data[:] = 1.0
    return matrix


def _top_k_per_row(matrix: sp.csr_matrix, k: int) -> sp.csr_matrix:
    """Keep the k largest entries of every row of a CSR matrix (ties: any k of them)."""
    matrix = matrix.tocsr()
    keep = np.zeros(matrix.nnz, dtype=bool)
    for row in range(matrix.shape[0]):
        start, end = matrix.indptr[row], matrix.indptr[row + 1]
        if end - start <= k:
            keep[start:end] = True
        else:
            keep[start + np.argpartition(-matrix.data[start:end], k)[:k]] = True
    pruned = matrix.copy()
    pruned.data = np.where(keep, pruned.data, 0.0).astype(pruned.data.dtype)
    pruned.eliminate_zeros()
    return pruned


class ItemKNN(Recommender):
    """Item-based k-nearest neighbours with cosine similarity (Sarwar et al. 2001; Deshpande &
    Karypis 2004). sim(i, j) = |U_i ∩ U_j| / sqrt(|U_i| |U_j|) over the users of the training
    part; each item keeps its ``neighbours`` most similar items; a history scores j by the
    summed similarity of its distinct items to j. Items no history item points to rank below
    all others, ordered by popularity."""

    name = "itemknn"
    grid = {"neighbours": (20, 50, 100, 200, 500, 1000, 2000, 4000)}  # chosen on validation full NDCG@10

    def __init__(self, neighbours: int = 100):
        self.neighbours = neighbours  # similar items kept per item

    def fit(self, data: SequenceData) -> Self:
        matrix = training_matrix(data)
        norms = np.sqrt(np.asarray(matrix.sum(axis=0)).ravel())
        inverse = sp.diags(np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0))
        similarity = (inverse @ (matrix.T @ matrix).tocsr() @ inverse).tocsr()
        similarity.setdiag(0.0)  # an item is not its own neighbour
        similarity.eliminate_zeros()
        self.similarity_ = _top_k_per_row(similarity, self.neighbours)
        popularity = np.asarray(data.item_popularity(), dtype=np.float64)
        self.fallback_ = popularity / (popularity.max() + 1.0) - 1.0  # in (-1, 0): below any similarity
        return self

    def score_all(self, history: np.ndarray, behaviors: np.ndarray | None = None) -> np.ndarray:
        scores = (history_matrix(history, self.similarity_.shape[0]) @ self.similarity_).toarray().astype(np.float64)
        return np.where(scores > 0, scores, self.fallback_)


class EASE(Recommender):
    """EASE (Steck 2019): a linear item-item model with a zero diagonal, in closed form:
    P = (XᵀX + λI)⁻¹, B = I - P / diag(P) column-wise, scores = x_user · B.

    The Gram matrix is dense and its inverse costs O(n³): 24k items take ~30 minutes on
    2 shared cores, so a catalogue above ``max_items`` is fit on its ``max_items`` most
    popular training items (logged, and reported by ``coverage_``, the share of training
    events on those items); the other items rank below them, by popularity. ``max_items=None``
    fits the whole catalogue."""

    name = "ease"
    grid = {"l2": (25.0, 100.0, 400.0)}  # λ, chosen on validation full NDCG@10

    def __init__(self, l2: float = 100.0, max_items: int | None = 8_000):
        self.l2 = l2  # λ: ridge penalty on the item-item weights
        self.max_items = max_items  # side of the dense Gram matrix (items kept), None = every item

    def fit(self, data: SequenceData) -> Self:
        matrix = training_matrix(data)
        popularity = np.asarray(data.item_popularity(), dtype=np.float64)
        counts = np.asarray(matrix.sum(axis=0)).ravel()
        items = np.flatnonzero(counts[1:] > 0) + 1
        if self.max_items is not None and len(items) > self.max_items:
            items = np.sort(items[np.argsort(-counts[items], kind="stable")[: self.max_items]])
            log.info("EASE: dense Gram over the %d most popular of %d items", len(items), data.n_items)
        self.items_ = items  # item ids with a row/column in B
        self.coverage_ = float(popularity[items].sum() / max(popularity.sum(), 1.0))
        sub = matrix[:, items]
        gram = torch.from_numpy((sub.T @ sub).toarray().astype(np.float32))
        gram.diagonal().add_(self.l2)
        # in place: one (items)² buffer holds the Gram matrix, its factor, P, then B
        torch.linalg.cholesky(gram, out=gram)
        torch.cholesky_inverse(gram, out=gram)
        gram.div_(-gram.diagonal().clone())
        gram.diagonal().zero_()
        self.weights_ = gram.numpy()  # B over self.items_
        self.fallback_ = popularity / (popularity.max() + 1.0) - 1e6  # far below any EASE score
        self.n_columns_ = data.n_items + 1
        return self

    def score_all(self, history: np.ndarray, behaviors: np.ndarray | None = None) -> np.ndarray:
        rows = history_matrix(history, self.n_columns_)[:, self.items_]
        scores = np.broadcast_to(self.fallback_, (len(history), self.n_columns_)).copy()
        scores[:, self.items_] = rows @ self.weights_
        return scores


class RecentItems(Recommender):
    """Repeat consumption first, co-occurrence second: a user's past items rank above every
    other item, by exponentially decayed counts over the history (Σ decay^age, age 0 = the
    last event: recent and frequent items first); the rest rank by :class:`ItemCooccurrence`.

    The heuristic a reviewer asks for on repeat-heavy logs (on the Taobao head 31% of test
    targets were seen before): a sequence model that cannot beat "show them what they just
    looked at" has not learnt the repeat channel. Where history is excluded (no repeats,
    Video.txt) it is co-occurrence."""

    name = "recent"
    grid = {"decay": (0.5, 0.8, 0.95)}  # chosen on validation full NDCG@10

    def __init__(self, decay: float = 0.8):
        if not 0.0 < decay <= 1.0:
            raise NimbleError(f"recent: decay {decay} is not in (0, 1]", fix="e.g. decay=0.8")
        self.decay = decay  # weight of an event one step older (1.0 = plain counts)

    def fit(self, data: SequenceData) -> Self:
        self.cooccurrence_ = ItemCooccurrence().fit(data)
        return self

    def score_all(self, history: np.ndarray, behaviors: np.ndarray | None = None) -> np.ndarray:
        history = np.asarray(history, dtype=np.int64)
        novel = self.cooccurrence_.score_all(history)
        novel /= novel.max(axis=1, keepdims=True) + 1.0  # [0, 1): below every past item
        n, length = history.shape
        ages = self.decay ** np.arange(length - 1, -1, -1, dtype=np.float64)  # last column: age 0
        repeat = np.zeros_like(novel)
        np.add.at(repeat, (np.repeat(np.arange(n), length), history.ravel()), np.tile(ages, n) * (history.ravel() > 0))
        return np.where(repeat > 0, 1.0 + repeat, novel)


BASELINES: dict[str, type[Recommender]] = {
    MostPopular.name: MostPopular,
    ItemCooccurrence.name: ItemCooccurrence,
    ItemKNN.name: ItemKNN,
    EASE.name: EASE,
    RecentItems.name: RecentItems,
}


@dataclass
class Selection:
    """What :func:`fit_on_validation` chose: the parameters and every value's validation score."""

    params: dict  # the chosen hyperparameters
    valid_ndcg10: dict[str, float] = field(default_factory=dict)  # str(value) -> validation full NDCG@10

    def to_dict(self) -> dict:
        return asdict(self)


def fit_on_validation(
    name: str, data: SequenceData, exclude_history: bool = False, max_users: int = 10_000, seed: int = 0
) -> tuple[Recommender, Selection]:
    """Fit baseline ``name``; when it has a ``grid``, fit each value on the training part and
    keep the one with the best full NDCG@10 on the validation targets (at most ``max_users``
    random users, the same mask as the test). The test targets are never looked at."""
    baseline_type = BASELINES[name]
    grid = getattr(baseline_type, "grid", {})
    if not grid:
        return baseline_type().fit(data), Selection(params={})
    ((param, values),) = grid.items()
    split = leave_last_out(data, max_len=100)
    users = np.arange(data.n_users)
    if len(users) > max_users:
        users = np.sort(np.random.default_rng(seed).choice(len(users), size=max_users, replace=False))
    best, selection = None, Selection(params={})
    best_score = -1.0
    for value in values:
        baseline = baseline_type(**{param: value}).fit(data)
        score = evaluate_full(
            baseline, split.valid_input[users], split.valid_target[users], exclude_history=exclude_history, ks=(10,)
        )["ndcg@10"]
        selection.valid_ndcg10[str(value)] = score
        log.info("%s %s=%s: validation full NDCG@10 %.4f", name, param, value, score)
        if score > best_score:
            best, best_score, selection.params = baseline, score, {param: value}
    return best, selection
