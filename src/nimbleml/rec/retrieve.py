"""Candidate retrieval: the top m items of the whole catalogue for a user state, by inner product.

The ranker scores an item as ``state · item_embedding`` (tied embeddings, ``rec.model``), so
the items it would rank highest over the whole catalogue are a maximum-inner-product search
over the item table. :class:`ItemIndex` does it approximately with faiss (HNSW graph or
IVF lists, chosen by ``nimbleml bench retrieve``); :class:`ExactIndex` does it exactly with
one torch matmul and is the reference both for recall and for tests.

Both share one face, which the serving layer calls::

    index.search(states (B, D) float32, k, exclude=[ids per user] | None) -> (ids (B, k) int64, scores (B, k) float32)

Item ids are the model's dense ids 1..n_items (0 = padding is never returned; a row with
fewer than k retrievable items is padded with id 0 and score -inf). ``exclude`` lists, per
user, item ids that must not be returned (the history, when the model excludes seen items).

On disk, beside the model (``nimbleml rec index --model DIR``): ``item_index.faiss`` and
``item_index.json`` (the faiss factory string, search parameters, and a SHA-256 fingerprint
of the item table, so an index built for other weights is refused with one NimbleError).
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import faiss
import numpy as np
import torch

from nimbleml.errors import NimbleError
from nimbleml.rec.evaluate import SeqRecScorer
from nimbleml.rec.model import SeqRec
from nimbleml.rec.train import load_checkpoint

log = logging.getLogger(__name__)

INDEX_FILE = "item_index.faiss"
INDEX_META_FILE = "item_index.json"
SCORE_BLOCK_BYTES = 1 << 30  # exact search scores at most this much of the (users, items) matrix at once


@dataclass
class IndexSpec:
    """What to build and how to search it. The defaults are the measured choice on the
    Video.txt catalogue (``nimbleml bench retrieve``): an HNSW graph over the raw vectors."""

    factory: str = "HNSW32,Flat"  # faiss index_factory string: "HNSW32,Flat", "IVF1024,Flat", "IVF4096,PQ32,RFlat", ...
    search: dict[str, float] = field(default_factory=lambda: {"efSearch": 128})  # faiss ParameterSpace values at query time
    threads: int = 1  # faiss OpenMP threads for build and search (1: batch-1 serving latency)
    # vectors k-means sees when training IVF lists (a random sample above this many): faiss asks
    # for 39-256 per list; more gives better lists and a longer build
    train_points: int = 100_000
    kmeans_iters: int = 10  # k-means iterations for IVF lists (faiss's default)

    def to_dict(self) -> dict:
        return asdict(self)


def item_table(model: SeqRec) -> np.ndarray:
    """(n_items + 1, D) float32 output item embeddings of a model (row 0 = padding)."""
    return model.item_emb.weight.detach().cpu().float().numpy()


def fingerprint(table: np.ndarray) -> str:
    """SHA-256 of an item table's float32 bytes: ties an index to the weights it was built from."""
    return hashlib.sha256(np.ascontiguousarray(table, dtype=np.float32).tobytes()).hexdigest()


def _exclusion_width(exclude: list[np.ndarray] | None) -> int:
    return 0 if exclude is None else max((len(np.unique(e)) for e in exclude), default=0)


def _drop_excluded(
    ids: np.ndarray, scores: np.ndarray, k: int, exclude: list[np.ndarray] | None
) -> tuple[np.ndarray, np.ndarray]:
    """Keep, per row, the first k ids that are real items (> 0) and not excluded; pad with (0, -inf)."""
    out_ids = np.zeros((len(ids), k), dtype=np.int64)
    out_scores = np.full((len(ids), k), -np.inf, dtype=np.float32)
    for row in range(len(ids)):
        keep = ids[row] > 0
        if exclude is not None and len(exclude[row]):
            keep &= ~np.isin(ids[row], exclude[row])
        chosen = np.flatnonzero(keep)[:k]
        out_ids[row, : len(chosen)] = ids[row, chosen]
        out_scores[row, : len(chosen)] = scores[row, chosen]
    return out_ids, out_scores


def _check_states(states: np.ndarray, dim: int) -> np.ndarray:
    states = np.ascontiguousarray(states, dtype=np.float32)
    if states.ndim != 2 or states.shape[1] != dim:
        raise NimbleError(f"user states must be (batch, {dim}) float32, got shape {states.shape}",
                          fix="pass the model's last-position states, e.g. SeqRec.last_state(history)")
    return states


class BuildOverBudget(NimbleError):
    """An index build ran out of its time limit: how many items it had added, and when."""

    def __init__(self, factory: str, added: int, total: int, elapsed_s: float):
        self.added, self.total, self.elapsed_s = added, total, elapsed_s
        self.projected_s = elapsed_s * total / added  # at the rate so far (HNSW insertion slows as the graph grows)
        super().__init__(f"building {factory} added {added:,} of {total:,} items in {elapsed_s:.0f} s "
                         f"(about {self.projected_s:.0f} s for all at that rate)",
                         fix="raise the time limit, or use an IVF index at this size")


class ExactIndex:
    """Exact maximum-inner-product search: one (B, D) x (D, n_items) torch matmul and a top-k.
    The reference that approximate indexes are measured against."""

    def __init__(self, table: np.ndarray):
        self.table = torch.as_tensor(np.ascontiguousarray(table, dtype=np.float32))  # (n_items + 1, D)
        self.n_items, self.dim = self.table.shape[0] - 1, self.table.shape[1]

    def search(
        self, states: np.ndarray, k: int, exclude: list[np.ndarray] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        states = torch.as_tensor(_check_states(states, self.dim))
        rows = max(1, SCORE_BLOCK_BYTES // (4 * len(self.table)))  # users scored at once
        ids, values = [], []
        for first in range(0, len(states), rows):
            scores = states[first : first + rows] @ self.table.T
            scores[:, 0] = float("-inf")
            if exclude is not None:
                for row, items in enumerate(exclude[first : first + rows]):
                    scores[row, torch.as_tensor(np.asarray(items, dtype=np.int64))] = float("-inf")
            top = torch.topk(scores, min(k, self.n_items), dim=1)
            ids.append(top.indices.numpy())
            values.append(top.values.numpy())
        ids = np.concatenate(ids) if ids else np.zeros((0, min(k, self.n_items)), dtype=np.int64)
        values = np.concatenate(values) if values else np.zeros(ids.shape, dtype=np.float32)
        ids = np.where(np.isneginf(values), 0, ids)
        if k > self.n_items:
            ids = np.pad(ids, ((0, 0), (0, k - self.n_items)))
            values = np.pad(values, ((0, 0), (0, k - self.n_items)), constant_values=-np.inf)
        return ids.astype(np.int64), values.astype(np.float32)


class ItemIndex:
    """Approximate maximum-inner-product search over item embeddings with faiss."""

    def __init__(self, index: faiss.Index, spec: IndexSpec, table_fingerprint: str, build_s: float):
        self.index = index
        self.spec = spec
        self.fingerprint = table_fingerprint
        self.build_s = build_s  # seconds to train and fill the index
        self.n_items, self.dim = index.ntotal, index.d
        self.set_search(spec.search)

    def set_search(self, search: dict[str, float]) -> None:
        """Apply query-time faiss parameters (efSearch, nprobe, k_factor_rf, ...) and record them."""
        self.spec.search = dict(search)
        faiss.omp_set_num_threads(self.spec.threads)
        space = faiss.ParameterSpace()
        for name, value in self.spec.search.items():
            try:
                space.set_index_parameter(self.index, name, value)
            except RuntimeError as exc:
                raise NimbleError(f"search parameter {name}={value} does not apply to {self.spec.factory!r} ({exc})",
                                  fix="use efSearch for HNSW indexes, nprobe for IVF ones") from exc

    @classmethod
    def build(cls, table: np.ndarray, spec: IndexSpec | None = None, time_limit_s: float | None = None,
              block: int = 200_000) -> ItemIndex:
        """Index rows 1..n_items of a (n_items + 1, D) table (row 0 is padding, left out), adding
        ``block`` rows at a time; :class:`BuildOverBudget` when ``time_limit_s`` runs out first
        (an HNSW graph over millions of items on 2 cores: the error says how far it got)."""
        spec = spec or IndexSpec()
        faiss.omp_set_num_threads(spec.threads)
        vectors = np.ascontiguousarray(table[1:], dtype=np.float32)
        start = time.perf_counter()
        try:
            index = faiss.index_factory(vectors.shape[1], spec.factory, faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as exc:
            raise NimbleError(f"faiss cannot build {spec.factory!r} ({exc})",
                              fix="use a faiss index_factory string such as HNSW32,Flat or IVF1024,Flat") from exc
        if not index.is_trained:
            if (ivf := faiss.try_extract_index_ivf(index)) is not None:
                ivf.cp.niter = spec.kmeans_iters
            sample = vectors
            if len(vectors) > spec.train_points:
                chosen = np.random.default_rng(0).choice(len(vectors), spec.train_points, replace=False)
                sample = vectors[np.sort(chosen)]
            index.train(sample)
        for first in range(0, len(vectors), block):
            index.add(vectors[first : first + block])
            elapsed = time.perf_counter() - start
            added = min(first + block, len(vectors))
            if time_limit_s is not None and elapsed > time_limit_s and added < len(vectors):
                raise BuildOverBudget(spec.factory, added, len(vectors), elapsed)
        build_s = time.perf_counter() - start
        log.info("built %s over %d items x %d dims in %.1f s", spec.factory, len(vectors), vectors.shape[1], build_s)
        return cls(index, spec, fingerprint(table), build_s)

    def add(self, vectors: np.ndarray) -> float:
        """Append (n, D) new items (ids n_items + 1 ..) as a growing catalogue would; returns the
        seconds it took. The index no longer matches a saved table's fingerprint: save the grown
        table's index by building it again."""
        faiss.omp_set_num_threads(self.spec.threads)
        start = time.perf_counter()
        self.index.add(np.ascontiguousarray(vectors, dtype=np.float32))
        self.n_items = self.index.ntotal
        self.fingerprint = ""
        return time.perf_counter() - start

    def search(
        self, states: np.ndarray, k: int, exclude: list[np.ndarray] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(B, D) states -> top-k (ids (B, k) int64 item ids, scores (B, k) float32), excluded ids
        removed. The index is asked for k plus the longest exclusion list, so filtering never
        leaves a row short while the catalogue has items left."""
        states = _check_states(states, self.dim)
        fetch = min(k + _exclusion_width(exclude), self.n_items)
        scores, positions = self.index.search(states, fetch)
        ids = np.where(positions >= 0, positions + 1, 0)  # faiss positions 0.. are item ids 1..
        return _drop_excluded(ids, scores, k, exclude)

    def memory_mb(self) -> float:
        """Size of the serialised index in MiB (vectors, codes and graph), written to a
        temporary file rather than copied in memory (a flat index at 4.2M items is 2 GiB)."""
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / INDEX_FILE
            faiss.write_index(self.index, str(path))
            return path.stat().st_size / 2**20

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        faiss.write_index(self.index, str(directory / INDEX_FILE))
        meta = {"spec": self.spec.to_dict(), "fingerprint": self.fingerprint, "n_items": self.n_items,
                "dim": self.dim, "build_s": self.build_s}  # fmt: skip
        (directory / INDEX_META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        return directory / INDEX_FILE

    @classmethod
    def load(cls, model_dir: str | Path, model: SeqRec | None = None) -> ItemIndex:
        """The index saved in a model folder, checked against that folder's weights (or ``model``):
        one NimbleError when it is missing, unreadable or built from other weights."""
        model_dir = Path(model_dir)
        index_path, meta_path = model_dir / INDEX_FILE, model_dir / INDEX_META_FILE
        fix = f"run `nimbleml rec index --model {model_dir}`"
        for required in (index_path, meta_path):
            if not required.is_file():
                raise NimbleError("item index not found", path=required, fix=fix)
        try:
            meta = json.loads(meta_path.read_text())
            spec = IndexSpec(**meta["spec"])
            index = faiss.read_index(str(index_path))
        except (ValueError, KeyError, TypeError, RuntimeError) as exc:
            raise NimbleError(f"unreadable item index ({exc})", path=index_path, fix=fix) from exc
        model = model if model is not None else load_checkpoint(model_dir)
        table = item_table(model)
        if (meta.get("fingerprint") != fingerprint(table) or index.ntotal != model.config.n_items
                or index.d != table.shape[1]):
            raise NimbleError(
                f"item index does not match the model's weights (index: {index.ntotal} items x {index.d}, "
                f"model: {model.config.n_items} x {table.shape[1]}; fingerprints differ)",
                path=index_path, fix=f"rebuild it: {fix}",
            )
        return cls(index, spec, meta["fingerprint"], float(meta.get("build_s", 0.0)))


def user_states(model: SeqRec, history: np.ndarray, behaviors: np.ndarray | None = None,
                batch_size: int = 1024) -> np.ndarray:
    """(B, L) left-padded histories -> (B, D) float32 last-position states of the model.
    Leading columns that are padding in every row of a batch are cut (positions count back
    from the last event, so the states are unchanged)."""
    out = []
    with torch.no_grad():
        for start in range(0, len(history), batch_size):
            block = np.asarray(history[start : start + batch_size], dtype=np.int64)
            used = (block != 0).any(axis=0)
            width = block.shape[1] - int(used.argmax()) if used.any() else 1
            hist = torch.as_tensor(block[:, -width:])
            beh = None if behaviors is None else torch.as_tensor(
                np.asarray(behaviors[start : start + batch_size], dtype=np.int64)[:, -width:])
            out.append(model.eval().last_state(hist, beh).float().numpy())
    return np.concatenate(out) if out else np.zeros((0, model.config.dim), dtype=np.float32)


def rank_candidates(
    model: SeqRec, history: np.ndarray, candidates: np.ndarray, behaviors: np.ndarray | None = None
) -> np.ndarray:
    """The ranker's (B, C) scores of retrieved candidates (the serving forward, through
    :class:`SeqRecScorer`); padding slots (id 0) of a short row score -inf."""
    scores = SeqRecScorer(model).score(history, candidates, behaviors)
    return np.where(candidates > 0, scores, -np.inf)


@dataclass
class Recommendation:
    """Top items for one user, best first: dense item ids and the ranker's scores."""

    items: list[int]
    scores: list[float]

    def to_dict(self) -> dict:
        return asdict(self)


def recommend(
    model: SeqRec, index: ItemIndex | ExactIndex, history: np.ndarray, k: int = 10, n_candidates: int = 50,
    behaviors: np.ndarray | None = None,
) -> list[Recommendation]:
    """Retrieve ``n_candidates`` items per user from the index, rank them with the model's
    serving forward, return the top k. history: (B, L) left-padded dense ids. Seen items are
    excluded when the model was built with ``exclude_history``."""
    history = np.asarray(history, dtype=np.int64)
    exclude = [row[row > 0] for row in history] if model.config.exclude_history else None
    candidates, _ = index.search(user_states(model, history, behaviors), n_candidates, exclude)
    scores = rank_candidates(model, history, candidates, behaviors)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    out = []
    for row in range(len(history)):
        keep = [int(i) for i in order[row] if candidates[row, i] > 0]
        out.append(Recommendation(items=[int(candidates[row, i]) for i in keep],
                                  scores=[float(scores[row, i]) for i in keep]))
    return out
