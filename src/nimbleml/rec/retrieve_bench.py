"""`nimbleml bench retrieve`: approximate item retrieval against exact search, tuned on validation
queries and reported on disjoint test queries (the habit of ann-benchmarks), then end to end.

Queries are user states of a trained model (``--dataset NAME:MODEL:DATA[:RANKER]``, the first
one's model also seeds the synthetic catalogue). Users are split once, at random: validation
queries are the states of ``--valid-queries`` users at their validation step, test queries the
states of ``--test-queries`` other users at their test step. Every search parameter
(nlist and the quantiser through the method list, nprobe / efSearch through each method's sweep)
is chosen on validation recall alone; test rows report recall@50 with a 95% interval and batch-1
latency. Catalogues:

- each dataset's real item table (``video`` 24k, ``taobao`` 55k);
- ``synthetic-24k`` and ``synthetic-4.2M``: SYNTHETIC tables drawn from a Gaussian mixture fitted
  to the first dataset's item table (``rec.catalogue``); the 24k draw is the realism check (the
  same methods at the real table's size should find it about as hard), the 4.2M one is Taobao's
  catalogue size. ``catalogue_realism`` in the JSON compares spectrum, norms and
  nearest-neighbour distances with the real table.

Per method: ``build_s`` (train + add every item), ``add_10k_s`` (the last 10k items added to
the built index, as a growing catalogue would), ``memory_mb`` (serialised index). Recall is
against exact search (a torch matmul) over the same table for the same query vectors; exact
search and faiss get the same ``--threads``.

``two_stage.<dataset>.<pipeline>.{ndcg@10, hr@10, mrr, hr@50, n_users}`` on up to
``--two-stage-users`` users outside the validation queries, at their test step:
``full_ranking`` (the uncompressed model over the whole catalogue), ``exact_top50_model`` and
``ann_top50_model`` (retrieve 50, the uncompressed model ranks them: what the 50-cut and the ANN
cost), and with a RANKER folder (what ``nimbleml serve`` would load: a ``compress`` output, its
int8 ONNX graph where it has one) ``exact_top50_served`` and ``ann_top50_served``. For the
retrieval pipelines hr@50 is the retrieval stage's alone (the target among the 50). The ANN is
the method and setting chosen on that dataset's validation queries.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from nimbleml.environment import environment
from nimbleml.errors import NimbleError
from nimbleml.progress import track
from nimbleml.rec.catalogue import CatalogueConfig, CatalogueModel, compare_catalogues
from nimbleml.rec.compression import OnnxScorer, load_variant
from nimbleml.rec.data import SequenceData, leave_last_out
from nimbleml.rec.evaluate import RankingResult, SeqRecScorer, evaluate_full
from nimbleml.rec.model import SeqRec
from nimbleml.rec.retrieve import (
    BuildOverBudget,
    ExactIndex,
    IndexSpec,
    ItemIndex,
    item_table,
    user_states,
)
from nimbleml.rec.serving import RECENT_FIRST
from nimbleml.rec.train import load_checkpoint
from nimbleml.serve.bundle import recent_distinct

log = logging.getLogger(__name__)

HELP = "ANN item retrieval (faiss IVF / IVF-SQ8 / IVF-PQ+refine / HNSW) vs exact search, tuned on validation queries"
RESULT_FILE = "retrieve_bench.json"
CURVE_FILE = "retrieve_curves.png"
K = 50
ADDED_ITEMS = 10_000  # items added to a built index (the add_10k_s column)
# a model that keeps history items rankable and adds a repeat bonus (Taobao) is also given
# candidate lists that start with the user's most recent distinct items, as its served bundle
# retrieves: the ANN's inner product knows nothing of the bonus, so it rarely retrieves the
# repeats the ranker would put first
RECENT_CANDIDATES = RECENT_FIRST


@dataclass
class Method:
    """One index (a faiss factory string and its build settings) and the search settings tried
    on it, cheapest first."""

    factory: str
    sweep: list[dict[str, float]]
    train_points: int = 100_000  # k-means sample for IVF lists (IndexSpec.train_points)
    kmeans_iters: int = 10  # k-means iterations (IndexSpec.kmeans_iters)

    def spec(self, search: dict[str, float], threads: int) -> IndexSpec:
        return IndexSpec(factory=self.factory, search=dict(search), threads=threads, train_points=self.train_points,
                         kmeans_iters=self.kmeans_iters)


def _nprobe(values: list[int], **extra: float) -> list[dict[str, float]]:
    return [{"nprobe": v, **extra} for v in values]


def _ivf_hnsw(values: list[int]) -> list[dict[str, float]]:
    """nprobe sweep for an HNSW coarse quantiser, whose own efSearch must reach nprobe."""
    return [{"nprobe": v, "quantizer_efSearch": max(2 * v, 64)} for v in values]


# real tables (24k-55k items) and the same-size synthetic draw
SMALL_METHODS: list[Method] = [
    Method("IVF256,Flat", _nprobe([4, 8, 16, 32, 64])),
    Method("IVF256,SQ8", _nprobe([4, 8, 16, 32, 64])),
    Method("IVF256,PQ32x4fs,RFlat", _nprobe([8, 16, 32, 64], k_factor_rf=4)),
    Method("HNSW32,Flat", [{"efSearch": v} for v in (16, 32, 64, 128, 256)]),
]
# millions of items on 2 cores. k-means on 32 vectors per list keeps the IVF builds within a few
# minutes; HNSW gets --hnsw-budget-s and is reported as a projection when it does not finish.
LARGE_METHODS: list[Method] = [
    Method("IVF4096,Flat", _nprobe([16, 32, 64, 128, 256, 512]), train_points=131_072),
    Method("IVF4096,SQ8", _nprobe([16, 32, 64, 128, 256]), train_points=131_072),
    # 8-bit scalar codes stop near recall 0.97 at any nprobe (synthetic 4.2M): re-rank exactly
    Method("IVF4096,SQ8,RFlat", _nprobe([16, 32, 64, 128, 256, 512], k_factor_rf=2), train_points=131_072),
    # 4-bit PQ re-ranking 4 x 50 candidates stayed at recall 0.25 whatever nprobe (synthetic
    # 4.2M): its codes order a list too coarsely, so the exact re-rank gets many more
    Method("IVF4096,PQ32x4fs,RFlat", [{"nprobe": 16, "k_factor_rf": 32}, {"nprobe": 32, "k_factor_rf": 64},
                                      {"nprobe": 32, "k_factor_rf": 256}, {"nprobe": 64, "k_factor_rf": 256},
                                      {"nprobe": 128, "k_factor_rf": 256}, {"nprobe": 256, "k_factor_rf": 256}],
           train_points=131_072),
    Method("IVF8192_HNSW32,Flat", _ivf_hnsw([32, 64, 128, 256, 512, 1024]), train_points=131_072),
    Method("HNSW32,Flat", [{"efSearch": v} for v in (32, 64, 128, 256)]),
]


@dataclass
class Dataset:
    """One trained model and its data: query states for the catalogue rows, users for the two-stage table."""

    name: str
    model_dir: Path
    data_dir: Path
    ranker_dir: Path | None = None  # what the server would load (a `compress` folder); None: no served rows

    @classmethod
    def parse(cls, text: str) -> Dataset:
        parts = text.split(":")
        if len(parts) not in (3, 4) or not all(parts):
            raise NimbleError(f"--dataset {text!r} is not NAME:MODEL:DATA[:RANKER]",
                              fix="e.g. --dataset video:runs/video/model:runs/video/data:runs/video/quantize-static")
        return cls(parts[0], Path(parts[1]), Path(parts[2]), Path(parts[3]) if len(parts) == 4 else None)


@dataclass
class QuerySplit:
    """Disjoint validation and test users, and their query states (Q, D) float32."""

    valid_users: np.ndarray
    test_users: np.ndarray
    valid: np.ndarray  # states at each validation user's validation step
    test: np.ndarray  # states at each test user's test step


def split_users(n_users: int, n_valid: int, n_test: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(validation users, test users): disjoint, sorted. The test side gets what is left when
    there are fewer than n_valid + n_test users."""
    if n_users < 2:
        raise NimbleError(f"{n_users} users cannot give disjoint validation and test queries",
                          fix="use data with at least 2 users")
    order = np.random.default_rng(seed).permutation(n_users)
    n_valid = min(n_valid, n_users // 3)
    n_test = min(n_test, n_users - n_valid)
    return np.sort(order[:n_valid]), np.sort(order[n_valid : n_valid + n_test])


def query_split(model: SeqRec, data: SequenceData, n_valid: int, n_test: int, seed: int) -> QuerySplit:
    split = leave_last_out(data, max_len=model.config.max_len)
    valid_users, test_users = split_users(data.n_users, n_valid, n_test, seed)
    behaviors = model.config.use_behavior
    return QuerySplit(
        valid_users, test_users,
        user_states(model, split.valid_input[valid_users], split.valid_behaviors[valid_users] if behaviors else None),
        user_states(model, split.test_input[test_users], split.test_behaviors[test_users] if behaviors else None),
    )  # fmt: skip


def item_query_split(table: np.ndarray, n_valid: int, n_test: int, seed: int) -> QuerySplit:
    """Disjoint validation and test queries that are real item vectors (rows 1.. of ``table``):
    a stress test with queries spread over the whole table, where a barely trained model's user
    states all point one way (``query_spread``). "users" are item ids here."""
    valid, test = split_users(len(table) - 1, n_valid, n_test, seed)
    rows = {"valid": valid + 1, "test": test + 1}
    return QuerySplit(rows["valid"], rows["test"], np.ascontiguousarray(table[rows["valid"]]),
                      np.ascontiguousarray(table[rows["test"]]))


def recall_per_query(approx: np.ndarray, exact: np.ndarray) -> np.ndarray:
    """(Q,) share of each exact top-k row found in the approximate row (same queries, same table)."""
    return np.array([len(np.intersect1d(a[a > 0], e)) / len(e) for a, e in zip(approx, exact)])


def mean_ci95(values: np.ndarray) -> tuple[float, list[float]]:
    """Mean and its normal-approximation 95% interval, clipped to [0, 1]."""
    mean = float(np.mean(values))
    half = 1.96 * float(np.std(values, ddof=1)) / np.sqrt(len(values)) if len(values) > 1 else 0.0
    return mean, [max(0.0, mean - half), min(1.0, mean + half)]


def timed_search(index: ItemIndex | ExactIndex, states: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Batch-1 search of every state: (ids (Q, K), per-query milliseconds (Q,))."""
    index.search(states[:1], K)  # warm-up: first-touch page faults, lazy allocations
    ids = np.zeros((len(states), K), dtype=np.int64)
    times = np.zeros(len(states))
    for q in range(len(states)):
        start = time.perf_counter()
        ids[q] = index.search(states[q : q + 1], K)[0][0]
        times[q] = (time.perf_counter() - start) * 1e3
    return ids, times


@dataclass
class BenchRow:
    """One (catalogue, method, search setting, query split) measurement."""

    catalogue: str
    method: str
    params: dict
    recall: float  # recall@50 against exact search, mean over the split's queries
    recall_ci95: list[float]
    p50_ms: float  # batch-1 latency
    p99_ms: float
    build_s: float  # train + add every item
    add_10k_s: float | None  # the last 10k items added to the built index (None: not measured)
    memory_mb: float  # serialised index (exact: the float32 table)
    split: str  # "valid" or "test"
    n_queries: int
    speedup_p50: float = 1.0  # exact search's p50 on the same catalogue and split over this p50
    chosen: bool = False  # the method's setting chosen on validation recall
    note: str = ""

    def to_dict(self) -> dict:
        out = asdict(self)
        out["recall@50"] = out.pop("recall")
        out["recall@50_ci95"] = out.pop("recall_ci95")
        return out


@dataclass
class CatalogueResult:
    name: str
    rows: list[BenchRow] = field(default_factory=list)
    selected: dict | None = None  # the fastest chosen setting meeting the target on validation, its test row
    not_built: list[dict] = field(default_factory=list)  # methods whose build ran out of its time limit
    query_spread: dict = field(default_factory=dict)  # how different the test queries' exact top-50s are


def query_spread(truth: np.ndarray, seed: int = 0, pairs: int = 1000) -> dict:
    """How much the exact top-50s of different queries overlap: near 1 when every user gets the
    same items (a popularity-like model, which any index answers easily), near 0 for spread queries."""
    rng = np.random.default_rng(seed)
    a, b = rng.integers(0, len(truth), (2, pairs))
    keep = a != b
    overlap = [len(np.intersect1d(truth[i], truth[j])) / truth.shape[1] for i, j in zip(a[keep], b[keep])]
    return {"mean_pair_overlap": float(np.mean(overlap)) if overlap else float("nan"),
            "distinct_items": int(len(np.unique(truth))), "queries": int(len(truth))}


def choose(valid_rows: list[BenchRow], target: float) -> BenchRow:
    """The first (cheapest) setting whose validation recall reaches ``target``; else the best one."""
    reaching = [r for r in valid_rows if r.recall >= target]
    return reaching[0] if reaching else max(valid_rows, key=lambda r: r.recall)


def pareto_front(rows: list[BenchRow]) -> list[BenchRow]:
    """Rows no other row beats on both recall (higher) and p50 (lower), fastest first."""
    front, best = [], -1.0
    for row in sorted(rows, key=lambda r: (r.p50_ms, -r.recall)):
        if row.recall > best:
            front.append(row)
            best = row.recall
    return front


def bench_catalogue(
    name: str, table: np.ndarray, queries: QuerySplit, methods: list[Method], threads: int, target: float,
    exact_timed: int, hnsw_budget_s: float,
) -> CatalogueResult:
    """Exact search plus every method on one (n_items + 1, D) table: a validation sweep per
    method, then every swept setting on the test queries; the chosen settings marked."""
    torch.set_num_threads(threads)
    result = CatalogueResult(name)
    exact = ExactIndex(table)
    splits = {"valid": queries.valid, "test": queries.test}
    truth = {split: exact.search(states, K)[0] for split, states in splits.items()}
    result.query_spread = query_spread(truth["test"])
    exact_p50 = {}
    for split, states in splits.items():
        _, ms = timed_search(exact, states[:exact_timed])
        exact_p50[split] = float(np.percentile(ms, 50))
        result.rows.append(BenchRow(name, "exact", {"torch_threads": threads}, 1.0, [1.0, 1.0], exact_p50[split],
                                    float(np.percentile(ms, 99)), 0.0, 0.0, table.nbytes / 2**20, split,
                                    len(ms), note="torch matmul + top-k"))  # fmt: skip
    log.info("%s: exact p50 %.2f ms over %d items", name, exact_p50["test"], len(table) - 1)
    del exact
    n_added = min(ADDED_ITEMS, (len(table) - 1) // 10)
    for method in methods:
        spec = method.spec(method.sweep[0], threads)
        budget = hnsw_budget_s if method.factory.startswith("HNSW") else None
        try:
            index = ItemIndex.build(table[: len(table) - n_added], spec, time_limit_s=budget)
        except BuildOverBudget as over:
            log.warning("%s: %s", name, over)
            result.not_built.append({"method": method.factory, "added": over.added, "total": over.total,
                                     "elapsed_s": over.elapsed_s, "projected_s": over.projected_s})
            continue
        add_s = index.add(table[len(table) - n_added :])
        build_s, memory = index.build_s + add_s, index.memory_mb()
        method_rows: dict[str, list[BenchRow]] = {"valid": [], "test": []}
        for search in method.sweep:
            index.set_search(search)
            for split, states in splits.items():
                ids, ms = timed_search(index, states)
                recall, ci = mean_ci95(recall_per_query(ids, truth[split]))
                p50 = float(np.percentile(ms, 50))
                method_rows[split].append(BenchRow(
                    name, method.factory, dict(search), recall, ci, p50, float(np.percentile(ms, 99)), build_s,
                    add_s * ADDED_ITEMS / n_added, memory, split, len(states), exact_p50[split] / p50,
                ))  # fmt: skip
            log.info("%s %s %s: valid recall@50 %.4f, test %.4f, test p50 %.3f ms", name, method.factory, search,
                     method_rows["valid"][-1].recall, method_rows["test"][-1].recall, method_rows["test"][-1].p50_ms)
            if method_rows["valid"][-1].recall >= max(target, 0.995):
                break  # further settings only cost more
        chosen = method_rows["valid"].index(choose(method_rows["valid"], target))
        for split in splits:
            method_rows[split][chosen].chosen = True
            result.rows += method_rows[split]
        del index
        gc.collect()
    result.selected = select(result.rows, target)
    return result


def select(rows: list[BenchRow], target: float) -> dict | None:
    """Among the chosen settings that reach ``target`` on validation, the fastest on validation,
    with its test row: what a practitioner would deploy."""
    valid = [r for r in rows if r.chosen and r.split == "valid" and r.recall >= target]
    if not valid:
        return None
    best = min(valid, key=lambda r: r.p50_ms)
    test = next(r for r in rows if r.split == "test" and r.method == best.method and r.params == best.params)
    return {"method": best.method, "params": best.params, "valid": best.to_dict(), "test": test.to_dict()}


# ---------------------------------------------------------------- two-stage


def _ranks_after_retrieval(
    candidates: np.ndarray, scores: np.ndarray, targets: np.ndarray, miss_rank: int
) -> np.ndarray:
    """Rank of each target among its retrieved candidates ordered by the ranker's score
    (pessimistic ties); a target not retrieved gets ``miss_rank`` (the catalogue size: no
    credit in HR@k or NDCG@k, next to none in MRR)."""
    ranks = np.full(len(targets), miss_rank, dtype=np.int64)
    for u, target in enumerate(targets):
        hit = np.flatnonzero(candidates[u] == target)
        if len(hit):
            ranks[u] = int((np.delete(scores[u], hit[0]) >= scores[u, hit[0]]).sum())
    return ranks


def with_recent_history(candidates: np.ndarray, history: np.ndarray, n_recent: int) -> np.ndarray:
    """(B, K) retrieved ids -> (B, K): each user's ``n_recent`` most recent distinct history items
    first, then the retrieved items not among them, in their order; 0-padded."""
    out = np.zeros_like(candidates)
    for u in range(len(candidates)):
        recent = recent_distinct(history[u], n_recent)  # what the server does (serve/service.py)
        retrieved = candidates[u][(candidates[u] > 0) & ~np.isin(candidates[u], recent)]
        merged = np.concatenate([recent, retrieved])[: candidates.shape[1]]
        out[u, : len(merged)] = merged
    return out


def served_ranker(ranker_dir: Path) -> tuple[SeqRec, OnnxScorer | SeqRecScorer, str]:
    """(float model, scorer, description) of a folder as ``nimbleml serve`` would rank with it:
    its int8 ONNX graph where a ``compress`` recipe wrote one, else its float weights."""
    model, variant, onnx_path = load_variant(ranker_dir)
    recipes = "+".join(variant.get("recipes", [])) or "uncompressed"
    if onnx_path is not None:
        return model, OnnxScorer(onnx_path, model.config), f"{recipes} (int8 ONNX, onnxruntime)"
    return model, SeqRecScorer(model), f"{recipes} (float, torch)"


def _score_in_blocks(scorer: SeqRecScorer | OnnxScorer, history: np.ndarray, candidates: np.ndarray,
                     behaviors: np.ndarray | None, block: int = 256) -> np.ndarray:
    """(U, C) ranker scores, ``block`` users per call (an ONNX session runs whatever batch it is
    given at once); padding slots (id 0) are scored as item 1 and left for the caller to mask."""
    candidates = np.where(candidates > 0, candidates, 1)
    rows = [slice(i, i + block) for i in range(0, len(history), block)]
    return np.concatenate([scorer.score(history[r], candidates[r], None if behaviors is None else behaviors[r])
                           for r in rows])


def two_stage(dataset: Dataset, users: np.ndarray, index_spec: IndexSpec, threads: int) -> tuple[dict, dict]:
    """Test-user quality of full ranking by the uncompressed model against retrieve-50-then-rank
    pipelines -> ({pipeline: metrics}, notes)."""
    torch.set_num_threads(threads)
    model = load_checkpoint(dataset.model_dir)
    data = SequenceData.load(dataset.data_dir)
    split = leave_last_out(data, max_len=model.config.max_len)
    history, targets = split.test_input[users], split.test_target[users]
    behaviors = split.test_behaviors[users]
    use_behavior = model.config.use_behavior
    full = evaluate_full(SeqRecScorer(model), history, targets, behaviors if use_behavior else None,
                         model.config.exclude_history, ks=(10, 50))
    pipelines = {"full_ranking": full.to_dict()}
    notes = {"index": index_spec.to_dict(), "users": len(users)}
    rankers: list[tuple[str, SeqRec, SeqRecScorer | OnnxScorer]] = [("model", model, SeqRecScorer(model))]
    if dataset.ranker_dir is not None:
        served_model, scorer, description = served_ranker(dataset.ranker_dir)
        rankers.append(("served", served_model, scorer))
        notes["served_ranker"] = f"{dataset.ranker_dir}: {description}"
    for ranker_name, ranker_model, scorer in rankers:
        table = item_table(ranker_model)
        beh = behaviors if ranker_model.config.use_behavior else None
        states = user_states(ranker_model, history, beh)
        exclude = [row[row > 0] for row in history] if ranker_model.config.exclude_history else None
        ann = ItemIndex.build(table, IndexSpec(**{**index_spec.to_dict(), "threads": threads}))
        retrieved = {"exact": ExactIndex(table).search(states, K, exclude)[0], "ann": ann.search(states, K, exclude)[0]}
        if ranker_model.config.repeat_scores:
            retrieved[f"ann_recent{RECENT_CANDIDATES}"] = with_recent_history(retrieved["ann"], history,
                                                                               RECENT_CANDIDATES)
        for retriever_name, candidates in retrieved.items():
            scores = np.where(candidates > 0, _score_in_blocks(scorer, history, candidates, beh), -np.inf)
            ranks = _ranks_after_retrieval(candidates, scores, targets, model.config.n_items)
            result = RankingResult.from_ranks("two_stage", ranks, (10, 50))
            pipelines[f"{retriever_name}_top{K}_{ranker_name}"] = result.to_dict()
    return pipelines, notes


# ---------------------------------------------------------------- curves and tables


def plot_curves(results: list[CatalogueResult], path: Path) -> Path:
    """Recall@50 against p50 per method (test queries), the Pareto front dashed, exact search
    dotted; one panel per catalogue."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4.5), squeeze=False)
    for ax, result in zip(axes[0], results):
        test = [r for r in result.rows if r.split == "test" and r.method != "exact"]
        for method in dict.fromkeys(r.method for r in test):
            rows = [r for r in test if r.method == method]
            ax.plot([r.recall for r in rows], [r.p50_ms for r in rows], marker="o", label=method)
            ax.plot([r.recall for r in rows if r.chosen], [r.p50_ms for r in rows if r.chosen], "k*", markersize=12)
        front = pareto_front(test)
        ax.plot([r.recall for r in front], [r.p50_ms for r in front], "k--", linewidth=1, label="Pareto front")
        exact = next(r for r in result.rows if r.split == "test" and r.method == "exact")
        ax.axhline(exact.p50_ms, color="grey", linestyle=":", label="exact search")
        ax.set(title=result.name, xlabel="recall@50 (test queries)", ylabel="p50 ms, batch 1", yscale="log")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("* = setting chosen on validation queries")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _table(rows: list[BenchRow]) -> Table:
    table = Table(title=f"retrieval on test queries: recall@{K} vs exact, batch-1 latency (* = chosen on validation)")
    for column in ("catalogue", "method", "params", f"recall@{K}", "95% CI", "p50 ms", "p99 ms", "speedup",
                   "build s", "add 10k s", "MiB"):
        table.add_column(column, justify="left" if column in ("catalogue", "method", "params") else "right")
    for r in rows:
        if r.split != "test":
            continue
        table.add_row(r.catalogue, r.method + (" *" if r.chosen else ""), json.dumps(r.params),
                      f"{r.recall:.4f}", f"{r.recall_ci95[0]:.4f}-{r.recall_ci95[1]:.4f}", f"{r.p50_ms:.3f}",
                      f"{r.p99_ms:.3f}", f"{r.speedup_p50:.1f}x", f"{r.build_s:.1f}",
                      "" if r.add_10k_s is None else f"{r.add_10k_s:.2f}", f"{r.memory_mb:.0f}")  # fmt: skip
    return table


def _two_stage_table(stages: dict) -> Table:
    table = Table(title="two-stage quality on test users (reference: full ranking by the uncompressed model)")
    for column in ("dataset", "pipeline", "ndcg@10", "hr@10", "mrr", "hr@50", "users"):
        table.add_column(column, justify="left" if column in ("dataset", "pipeline") else "right")
    for dataset, pipelines in stages.items():
        for name, r in pipelines.items():
            table.add_row(dataset, name, f"{r['ndcg@10']:.4f}", f"{r['hr@10']:.4f}", f"{r['mrr']:.4f}",
                          f"{r['hr@50']:.4f}", f"{r['n_users']:,}")
    return table


# ---------------------------------------------------------------- the command


def size_name(n: int) -> str:
    """4_200_000 -> "4.2M", 23_698 -> "24k", 400 -> "400"."""
    return f"{n / 1e6:g}M" if n >= 1_000_000 else f"{n / 1e3:.0f}k" if n >= 1000 else str(n)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", action="append", required=True, type=Dataset.parse,
                        help="NAME:MODEL:DATA[:RANKER] (repeatable; the first seeds the synthetic catalogue). "
                             "RANKER: the folder the server would load, e.g. a `compress` output")
    parser.add_argument("--synthetic-items", type=int, default=4_200_000,
                        help="size of the large SYNTHETIC catalogue (0 = skip)")
    parser.add_argument("--components", type=int, default=CatalogueConfig.n_components,
                        help="Gaussian mixture components of the synthetic catalogue")
    parser.add_argument("--valid-queries", type=int, default=1000, help="validation users (tuning)")
    parser.add_argument("--test-queries", type=int, default=2000, help="test users (reported), not validation ones")
    parser.add_argument("--exact-timed", type=int, default=200, help="queries timed for exact search's latency")
    parser.add_argument("--target-recall", type=float, default=0.98, help="validation recall@50 a setting must reach")
    parser.add_argument("--threads", type=int, default=2, help="threads of exact search (torch) and of faiss alike")
    parser.add_argument("--hnsw-budget-s", type=float, default=300.0,
                        help="seconds an HNSW build at the large size may take before it is reported as a projection")
    parser.add_argument("--two-stage-users", type=int, default=10_000,
                        help="users per dataset in the two-stage table (0: no two-stage table)")
    parser.add_argument("--queries", choices=["users", "items"], default="users",
                        help="query vectors: test users' states (what is served), or held-out real item vectors "
                             "(a stress test: spread queries)")
    parser.add_argument("--only", action="append", default=None, metavar="FACTORY",
                        help="measure only these methods (repeatable; exact search always runs), e.g. to rerun one")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="output folder for retrieve_bench.json and the curves")


def _only(methods: list[Method], factories: list[str] | None) -> list[Method]:
    return methods if factories is None else [m for m in methods if m.factory in factories]


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: list[CatalogueResult] = []
    splits: dict[str, QuerySplit] = {}
    loadavg = [os.getloadavg()]
    source_table, source_queries = None, None
    for dataset in args.dataset:
        model = load_checkpoint(dataset.model_dir)
        data = SequenceData.load(dataset.data_dir)
        table = item_table(model)
        splits[dataset.name] = query_split(model, data, args.valid_queries, args.test_queries, args.seed)
        queries = splits[dataset.name]
        if args.queries == "items":
            queries = item_query_split(table, args.valid_queries, args.test_queries, args.seed)
        if source_table is None:
            source_table, source_queries = table, queries
        results.append(bench_catalogue(dataset.name, table, queries, _only(SMALL_METHODS, args.only),
                                       args.threads,
                                       args.target_recall, args.exact_timed, args.hnsw_budget_s))
        loadavg.append(os.getloadavg())
    generator = CatalogueModel(CatalogueConfig(n_components=args.components, seed=args.seed)).fit(source_table)
    realism = compare_catalogues(source_table, generator.sample(len(source_table) - 1, seed=args.seed + 1))
    synthetic_runs = [(f"synthetic-{size_name(len(source_table) - 1)}", len(source_table) - 1,
                       _only(SMALL_METHODS, args.only))]
    if args.synthetic_items:
        synthetic_runs.append((f"synthetic-{size_name(args.synthetic_items)}", args.synthetic_items,
                               _only(LARGE_METHODS, args.only)))
    for name, n_items, methods in track(synthetic_runs, description="synthetic catalogues"):
        table = generator.sample(n_items, seed=args.seed + 1)
        results.append(bench_catalogue(name, table, source_queries, methods, args.threads, args.target_recall,
                                       args.exact_timed, args.hnsw_budget_s))
        loadavg.append(os.getloadavg())
        del table
        gc.collect()
    stages, stage_notes = {}, {}
    for dataset, result in zip(args.dataset if args.two_stage_users else [], results):
        chosen = result.selected or {"method": "HNSW32,Flat", "params": {"efSearch": 128}}
        method = next(m for m in SMALL_METHODS if m.factory == chosen["method"])
        spec = method.spec(chosen["params"], args.threads)
        model_users = SequenceData.load(dataset.data_dir).n_users
        users = np.setdiff1d(np.arange(model_users), splits[dataset.name].valid_users)  # none tuned the index
        if len(users) > args.two_stage_users:
            users = np.sort(np.random.default_rng(args.seed).choice(users, args.two_stage_users, replace=False))
        stages[dataset.name], stage_notes[dataset.name] = two_stage(dataset, users, spec, args.threads)
    curve = plot_curves(results, out / CURVE_FILE)
    payload = {
        "rows": [row.to_dict() for result in results for row in result.rows],
        "selected": {result.name: result.selected for result in results},
        "not_built": {result.name: result.not_built for result in results if result.not_built},
        "query_spread": {result.name: result.query_spread for result in results},
        "pareto_test": {result.name: [{"method": r.method, "params": r.params, "recall@50": r.recall,
                                       "p50_ms": r.p50_ms}
                                      for r in pareto_front([r for r in result.rows if r.split == "test"
                                                             and r.method != "exact"])]
                        for result in results},
        "two_stage": stages,
        "two_stage_notes": stage_notes,
        "catalogue_realism": {"source": args.dataset[0].name, "generator": {**generator.config.to_dict(),
                              "fit_s": generator.fit_s}, **realism.to_dict()},
        "synthetic": "SYNTHETIC catalogues (synthetic-*): draws from a Gaussian mixture fitted to the first "
                     "dataset's item table, queried with that model's real user states",
        "queries": {name: {"valid": len(s.valid_users), "test": len(s.test_users)} for name, s in splits.items()},
        "query_source": args.queries,
        "target_recall": args.target_recall,
        "threads": {"torch": args.threads, "faiss": args.threads},
        "curves": CURVE_FILE,
        "loadavg_1_5_15": loadavg,
        "environment": environment(),
    }  # fmt: skip
    (out / RESULT_FILE).write_text(json.dumps(payload, indent=2) + "\n")
    console = Console()
    console.print(_table([row for result in results for row in result.rows]))
    console.print(_two_stage_table(stages))
    console.print(f"load average during the run: {loadavg}; wrote {out / RESULT_FILE} and {curve}")
    return 0
