"""Ranking metrics and the three evaluation protocols for next-item recommendation.

A *rank* is the 0-based position of the held-out item among the items scored (0 = top).
Ties are counted pessimistically: every other item whose score equals the target's is ranked
above it, so a model that scores everything equal gets no credit (and a constant popularity
ranking cannot profit from ties).

Protocols, all on leave-last-out targets (``rec.data.leave_last_out``):

- :func:`evaluate_full` — rank the target against the whole catalogue (every item but the
  padding id 0). This is the number we quote.
- :func:`evaluate_sampled` — the SASRec paper's protocol: the target plus 100 negatives drawn
  uniformly from items the user has not interacted with (at most 10,000 users, as in SASRec).
  Kept to compare with published numbers; it overstates quality, since random negatives are
  mostly easy.
- :func:`evaluate_candidates` — the serving task: re-rank 50 candidates, the target plus 49
  negatives drawn in proportion to training popularity (excluding the target and the user's
  history). HR@50 here is always 1, which is why we never report it.

Anything with ``score_all(history, behaviors)`` and ``score(history, candidates, behaviors)``
returning numpy arrays can be evaluated: the model through :class:`SeqRecScorer`, the
baselines in ``rec.baselines`` directly.

Every protocol can split its result by target (``repeat``: a (U,) bool from
:func:`repeat_targets`): the same ranks, so the same negatives, on the users whose target they
had interacted with before ("repeat") and on the rest ("novel"). The split matters on repeat-heavy
logs: the sampled protocols never draw a history item as a negative, so a history item among the
candidates *is* the target, which inflates every scorer that ranks the history first.

Every protocol takes ``exclude_history``: when True, every item in the user's input window
is scored -inf by :func:`mask_seen` *here*, for every scorer alike (a repeat target is then a
miss, as it is for a model that never recommends seen items); when False nothing is removed,
since users do re-consume items. A score of -inf means "never recommended" and ranks last;
NaN or +inf scores are a broken scorer and raise (a NaN target would otherwise rank first).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from nimbleml.errors import NimbleError
from nimbleml.rec.model import SeqRec

log = logging.getLogger(__name__)


class Scorer(Protocol):
    """What the protocols need from a model or baseline."""

    def score_all(self, history: np.ndarray, behaviors: np.ndarray | None = None) -> np.ndarray:
        """(B, L) int64 item ids, left-padded with 0 -> (B, n_items + 1) float scores."""
        ...

    def score(
        self, history: np.ndarray, candidates: np.ndarray, behaviors: np.ndarray | None = None
    ) -> np.ndarray:
        """(B, L) history and (B, C) candidate ids -> (B, C) float scores."""
        ...


# ---------------------------------------------------------------- metrics on ranks


def hit_rate(ranks: np.ndarray, k: int) -> float:
    """Share of targets ranked in the top k (rank < k)."""
    return float(np.mean(np.asarray(ranks) < k))


def ndcg(ranks: np.ndarray, k: int) -> float:
    """Mean NDCG@k with one relevant item: 1 / log2(rank + 2) if rank < k, else 0."""
    ranks = np.asarray(ranks, dtype=np.float64)
    return float(np.mean(np.where(ranks < k, 1.0 / np.log2(ranks + 2.0), 0.0)))


def mrr(ranks: np.ndarray) -> float:
    """Mean reciprocal rank, 1 / (rank + 1), over the whole ranking (no cut-off)."""
    return float(np.mean(1.0 / (np.asarray(ranks, dtype=np.float64) + 1.0)))


TARGET_GROUPS = ("repeat", "novel")  # the split by target: items the user had before, and new ones


@dataclass
class RankingResult:
    """Metrics of one protocol. to_dict() gives {"hr@10": ..., "ndcg@10": ..., "mrr": ...,
    "n_users": ...}, and with the split by target also "repeat" and "novel", each the same
    metrics on the users whose target the user had (had not) interacted with before; both keys
    are always there, an empty group with n_users 0 and null metrics."""

    protocol: str  # "full", "sampled100" or "candidates50"
    n_users: int  # users evaluated
    metrics: dict[str, float | None] = field(default_factory=dict)
    by_target: dict[str, RankingResult] | None = None  # "repeat" / "novel" -> the same protocol on those users

    @classmethod
    def from_ranks(
        cls, protocol: str, ranks: np.ndarray, ks: tuple[int, ...], repeat: np.ndarray | None = None
    ) -> RankingResult:
        """ranks: (U,) 0-based; repeat: (U,) bool, True where the target is a repeat (None: no split)."""
        ranks = np.asarray(ranks)
        metrics: dict[str, float | None] = {}
        for k in ks:
            metrics[f"hr@{k}"] = hit_rate(ranks, k) if len(ranks) else None
        for k in ks:
            metrics[f"ndcg@{k}"] = ndcg(ranks, k) if len(ranks) else None
        metrics["mrr"] = mrr(ranks) if len(ranks) else None
        by_target = None
        if repeat is not None:
            repeat = np.asarray(repeat, dtype=bool)
            by_target = {
                group: cls.from_ranks(protocol, ranks[repeat == (group == "repeat")], ks) for group in TARGET_GROUPS
            }
        return cls(protocol=protocol, n_users=len(ranks), metrics=metrics, by_target=by_target)

    def __getitem__(self, key: str) -> float | None:
        return self.metrics[key]

    def to_dict(self) -> dict:
        out: dict = {**self.metrics, "n_users": self.n_users}
        if self.by_target is not None:
            out.update({group: result.to_dict() for group, result in self.by_target.items()})
        return out


def checked_scores(scores: np.ndarray) -> np.ndarray:
    """A scorer's output as float64, or NimbleError if any score is NaN or +inf.

    NaN compares false against everything, so a NaN target would rank first and score
    perfect metrics; +inf ties to the top. -inf is allowed: it is how an item is excluded."""
    scores = np.asarray(scores, dtype=np.float64)
    n_nan, n_inf = int(np.isnan(scores).sum()), int(np.isposinf(scores).sum())
    if n_nan or n_inf:
        raise NimbleError(
            f"scorer returned {n_nan} NaN and {n_inf} +inf scores out of {scores.size}; ranks would be meaningless",
            fix="check the model's weights and inputs (a diverged run or a broken quantised/pruned variant?)",
        )
    return scores


def mask_seen(scores: np.ndarray, history: np.ndarray, candidates: np.ndarray | None = None) -> np.ndarray:
    """Set to -inf, in place, the score of every item in the user's history row.

    scores: (B, n_items + 1) when candidates is None, else (B, C) for the (B, C) candidate ids;
    history: (B, L) left-padded ids (0 = padding, never an item). The one mask every scorer gets."""
    history = np.asarray(history, dtype=np.int64)
    if candidates is None:
        rows = np.repeat(np.arange(len(history)), history.shape[1])
        keep = history.ravel() > 0
        scores[rows[keep], history.ravel()[keep]] = -np.inf
    else:
        seen = ((candidates[:, :, None] == history[:, None, :]) & (history[:, None, :] > 0)).any(axis=2)
        scores[seen] = -np.inf
    return scores


def _ranks_of_first(scores: np.ndarray) -> np.ndarray:
    """(B, C) scores with the target in column 0 -> (B,) pessimistic 0-based ranks."""
    scores = checked_scores(scores)
    target = scores[:, :1]
    return (scores[:, 1:] >= target).sum(axis=1)


# ---------------------------------------------------------------- the model as a scorer


def validate_history(history: np.ndarray, n_items: int, name: str = "history") -> np.ndarray:
    """Check a (B, L) id array at the boundary; returns it as int64 or raises NimbleError."""
    history = np.asarray(history)
    if history.ndim != 2:
        raise NimbleError(f"{name} must be 2-D (batch, seq_len), got shape {history.shape}",
                          fix="pass one left-padded row of item ids per user")
    if not np.issubdtype(history.dtype, np.integer):
        raise NimbleError(f"{name} must hold integer item ids, got {history.dtype}",
                          fix="map items to the dense ids saved by `rec prepare`")
    if history.size and (history.min() < 0 or history.max() > n_items):
        raise NimbleError(
            f"{name} has item ids outside 0..{n_items} (min {history.min()}, max {history.max()})",
            fix="use the dense ids of the prepared data the model was trained on; 0 is padding",
        )
    return history.astype(np.int64, copy=False)


class SeqRecScorer:
    """Wraps a :class:`SeqRec` as a numpy-in, numpy-out scorer; validates ids once, here."""

    def __init__(self, model: SeqRec, device: str | torch.device | None = None, batch_size: int = 512):
        self.model = model
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.batch_size = batch_size

    def _run(self, history: np.ndarray, behaviors: np.ndarray | None, candidates: np.ndarray | None) -> np.ndarray:
        history = validate_history(history, self.model.config.n_items)[:, -self.model.config.max_len :]
        if behaviors is not None and self.model.config.use_behavior:
            behaviors = np.asarray(behaviors)[:, -history.shape[1] :]
        else:
            behaviors = None
        if candidates is not None:
            candidates = validate_history(candidates, self.model.config.n_items, name="candidates")
        was_training = self.model.training
        self.model.eval()
        out = []
        with torch.no_grad():
            for start in range(0, len(history), self.batch_size):
                rows = slice(start, start + self.batch_size)
                block = history[rows]
                # positions count back from the last event, so leading all-padding columns can go
                used = (block != 0).any(axis=0)
                width = block.shape[1] - int(used.argmax()) if used.any() else 1
                hist = torch.as_tensor(block[:, -width:], device=self.device)
                beh = None if behaviors is None else torch.as_tensor(
                    behaviors[rows, -width:], dtype=torch.int64, device=self.device)
                if candidates is None:
                    scores = self.model.score_all(hist, beh)
                else:
                    scores = self.model(hist, torch.as_tensor(candidates[rows], device=self.device), beh)
                out.append(scores.float().cpu().numpy())
        self.model.train(was_training)
        width = self.model.config.n_items + 1 if candidates is None else candidates.shape[1]
        return np.concatenate(out) if out else np.zeros((0, width), dtype=np.float32)

    def score_all(self, history: np.ndarray, behaviors: np.ndarray | None = None) -> np.ndarray:
        return self._run(history, behaviors, None)

    def score(self, history: np.ndarray, candidates: np.ndarray, behaviors: np.ndarray | None = None) -> np.ndarray:
        return self._run(history, behaviors, candidates)


# ---------------------------------------------------------------- protocols


def evaluate_full(
    scorer: Scorer,
    inputs: np.ndarray,
    targets: np.ndarray,
    behaviors: np.ndarray | None = None,
    exclude_history: bool = False,
    ks: tuple[int, ...] = (10, 50),
    batch_size: int = 1024,
    repeat: np.ndarray | None = None,
) -> RankingResult:
    """Rank each target against the full catalogue (every item but the padding id 0).

    inputs: (U, L) left-padded histories; targets: (U,) held-out item ids (1..n_items);
    exclude_history: score the input window's items -inf (:func:`mask_seen`); repeat: (U,)
    bool, repeat targets (:func:`repeat_targets`), for the split by target (None: no split).
    """
    ranks = full_ranks(scorer, inputs, targets, behaviors, exclude_history, batch_size)
    return RankingResult.from_ranks("full", ranks, ks, repeat)


def full_ranks(
    scorer: Scorer,
    inputs: np.ndarray,
    targets: np.ndarray,
    behaviors: np.ndarray | None = None,
    exclude_history: bool = False,
    batch_size: int = 1024,
) -> np.ndarray:
    """(U,) 0-based rank of each target among every item but the padding id, as
    :func:`evaluate_full` scores it (``batch_size`` users at a time)."""
    inputs = np.asarray(inputs, dtype=np.int64)
    targets = np.asarray(targets, dtype=np.int64)
    ranks = np.empty(len(targets), dtype=np.int64)
    for start in range(0, len(targets), batch_size):
        rows = slice(start, start + batch_size)
        scores = checked_scores(scorer.score_all(inputs[rows], None if behaviors is None else behaviors[rows]))
        if exclude_history:
            mask_seen(scores, inputs[rows])
        target = targets[rows]
        target_score = scores[np.arange(len(target)), target].copy()
        scores[:, 0] = -np.inf
        scores[np.arange(len(target)), target] = -np.inf
        # pessimistic ties: every other item scoring >= the target ranks above it
        ranks[rows] = (scores >= target_score[:, None]).sum(axis=1)
    return ranks


def _sample_negatives(
    rng: np.random.Generator,
    exclude_rows: np.ndarray | Sequence[np.ndarray],
    targets: np.ndarray,
    n_negatives: int,
    n_items: int,
    popularity: np.ndarray | None,
) -> np.ndarray:
    """(U, n_negatives) distinct negatives per user, none in that user's row of exclude_rows
    (a (U, W) 0-padded array, or one 1-D array of item ids per user) nor equal to its target;
    uniform over 1..n_items, or proportional to popularity."""
    if popularity is not None:
        weights = np.asarray(popularity, dtype=np.float64).copy()
        weights[0] = 0.0
        cdf = np.cumsum(weights)
        cdf /= cdf[-1]
        n_available = int((weights > 0).sum())
    else:
        n_available = n_items
    out = np.empty((len(targets), n_negatives), dtype=np.int64)
    for u in range(len(targets)):
        seen = np.asarray(exclude_rows[u])
        banned = np.union1d(seen[seen > 0], targets[u : u + 1])
        if n_available - len(banned) < n_negatives:
            raise NimbleError(
                f"user row {u}: only {n_available - len(banned)} items are left to sample "
                f"{n_negatives} negatives from",
                fix="use fewer negatives or a larger catalogue",
            )
        chosen = np.empty(0, dtype=np.int64)
        while len(chosen) < n_negatives:
            draw = 2 * n_negatives + len(banned)
            if popularity is None:
                items = rng.integers(1, n_items + 1, size=draw)
            else:
                items = np.searchsorted(cdf, rng.random(draw), side="right")
            items = items[~np.isin(items, banned)]
            items = np.concatenate([chosen, items])
            _, first = np.unique(items, return_index=True)
            chosen = items[np.sort(first)]
        out[u] = chosen[:n_negatives]
    return out


def _evaluate_on_candidates(
    scorer: Scorer,
    protocol: str,
    inputs: np.ndarray,
    targets: np.ndarray,
    negatives: np.ndarray,
    behaviors: np.ndarray | None,
    ks: tuple[int, ...],
    exclude_history: bool,
    repeat: np.ndarray | None = None,
    batch_size: int = 1024,
) -> RankingResult:
    candidates = np.concatenate([targets[:, None], negatives], axis=1)
    ranks = np.empty(len(targets), dtype=np.int64)
    for start in range(0, len(targets), batch_size):
        rows = slice(start, start + batch_size)
        scores = checked_scores(
            scorer.score(inputs[rows], candidates[rows], None if behaviors is None else behaviors[rows])
        )
        if exclude_history:
            mask_seen(scores, inputs[rows], candidates[rows])
        ranks[rows] = _ranks_of_first(scores)
    return RankingResult.from_ranks(protocol, ranks, ks, repeat)


def _user_subset(n_users: int, max_users: int | None, rng: np.random.Generator) -> np.ndarray:
    if max_users is None or n_users <= max_users:
        return np.arange(n_users)
    return np.sort(rng.choice(n_users, size=max_users, replace=False))


def evaluate_sampled(
    scorer: Scorer,
    inputs: np.ndarray,
    targets: np.ndarray,
    n_items: int,
    behaviors: np.ndarray | None = None,
    n_negatives: int = 100,
    max_users: int | None = 10_000,
    seed: int = 0,
    ks: tuple[int, ...] = (10,),
    seen: Sequence[np.ndarray] | None = None,
    exclude_history: bool = False,
    repeat: np.ndarray | None = None,
) -> RankingResult:
    """SASRec's protocol: target + ``n_negatives`` items drawn uniformly from items the user
    has not interacted with (and not the target), on a random subset of at most ``max_users`` users.
    repeat: (U,) bool repeat targets for the split by target (None: no split).

    seen: per user, every item id interacted with before the target (SASRec excludes the
    whole history, not only the model's input window); None uses the input rows, which
    misses the older events of users with more than L of them. As in SASRec the draw is
    uniform, not popularity-weighted; unlike SASRec's sampler the negatives of one user are
    distinct.
    """
    rng = np.random.default_rng(seed)
    inputs = np.asarray(inputs, dtype=np.int64)
    targets = np.asarray(targets, dtype=np.int64)
    users = _user_subset(len(targets), max_users, rng)
    exclude = inputs[users] if seen is None else [seen[u] for u in users]
    negatives = _sample_negatives(rng, exclude, targets[users], n_negatives, n_items, None)
    return _evaluate_on_candidates(
        scorer, f"sampled{n_negatives}", inputs[users], targets[users], negatives,
        None if behaviors is None else behaviors[users], ks, exclude_history,
        None if repeat is None else np.asarray(repeat)[users],
    )


def evaluate_candidates(
    scorer: Scorer,
    inputs: np.ndarray,
    targets: np.ndarray,
    popularity: np.ndarray,
    behaviors: np.ndarray | None = None,
    n_candidates: int = 50,
    max_users: int | None = None,
    seed: int = 0,
    ks: tuple[int, ...] = (10,),
    seen: Sequence[np.ndarray] | None = None,
    exclude_history: bool = False,
    name: str | None = None,
    repeat: np.ndarray | None = None,
) -> RankingResult:
    """The serving task: re-rank ``n_candidates`` items, the target plus ``n_candidates - 1``
    negatives drawn in proportion to ``popularity`` ((n_items + 1,) training counts), never
    the target nor an item the user has seen (``seen`` as in :func:`evaluate_sampled`; None =
    the history row). Reports HR@k, NDCG@k and MRR under protocol ``name`` (default
    ``candidates{n_candidates}``), split by target when ``repeat`` ((U,) bool) is given."""
    rng = np.random.default_rng(seed)
    inputs = np.asarray(inputs, dtype=np.int64)
    targets = np.asarray(targets, dtype=np.int64)
    users = _user_subset(len(targets), max_users, rng)
    popularity = np.asarray(popularity)
    exclude = inputs[users] if seen is None else [seen[u] for u in users]
    negatives = _sample_negatives(
        rng, exclude, targets[users], n_candidates - 1, len(popularity) - 1, popularity
    )
    return _evaluate_on_candidates(
        scorer, name or f"candidates{n_candidates}", inputs[users], targets[users], negatives,
        None if behaviors is None else behaviors[users], ks, exclude_history,
        None if repeat is None else np.asarray(repeat)[users],
    )


def repeat_targets(targets: np.ndarray, seen: Sequence[np.ndarray]) -> np.ndarray:
    """(U,) bool: True where the user had already interacted with the target item before it."""
    return np.array([bool(np.isin(t, s).item()) for t, s in zip(targets, seen)], dtype=bool)


def evaluate_protocols(
    scorer: Scorer,
    inputs: np.ndarray,
    targets: np.ndarray,
    popularity: np.ndarray,
    behaviors: np.ndarray | None = None,
    seed: int = 0,
    seen: Sequence[np.ndarray] | None = None,
    exclude_history: bool = False,
) -> dict[str, RankingResult]:
    """Every protocol on one set of targets: {"full", "sampled100", "candidates50",
    "candidates50_novel"}, each split by target ("repeat" / "novel" inside each: the same
    ranks, so the same negatives, on the users whose target is / is not in ``seen``).
    "candidates50_novel" is the older form of the novel split, the 50-candidate task re-drawn on
    the novel users only (kept so earlier runs compare); it differs from ``candidates50.novel``
    only in the negatives' draw. The same seed gives every scorer the same sampled negatives;
    ``seen`` (per user, every item before the target; None = the input rows) keeps the sampled
    negatives out of the whole history; ``exclude_history`` masks the input window for every
    scorer alike."""
    n_items = len(popularity) - 1
    inputs = np.asarray(inputs, dtype=np.int64)
    targets = np.asarray(targets, dtype=np.int64)
    seen = list(inputs) if seen is None else seen
    repeat = repeat_targets(targets, seen)
    novel = np.flatnonzero(~repeat)
    results = {
        "full": evaluate_full(scorer, inputs, targets, behaviors, exclude_history, repeat=repeat),
        "sampled100": evaluate_sampled(
            scorer, inputs, targets, n_items, behaviors, seed=seed, seen=seen, exclude_history=exclude_history,
            repeat=repeat,
        ),
        "candidates50": evaluate_candidates(
            scorer, inputs, targets, popularity, behaviors, seed=seed, seen=seen, exclude_history=exclude_history,
            repeat=repeat,
        ),
    }
    if len(novel):
        results["candidates50_novel"] = evaluate_candidates(
            scorer, inputs[novel], targets[novel], popularity, None if behaviors is None else behaviors[novel],
            seed=seed, seen=[seen[u] for u in novel], exclude_history=exclude_history, name="candidates50_novel",
        )
    return results
