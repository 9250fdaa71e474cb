"""`nimbleml bench retrieve`: approximate item retrieval against exact search, side by side.

For each catalogue, every method answers the same queries one at a time (batch 1) and is
compared with the exact top-50 of a torch matmul over the same item table:

- ``video``: the trained model's item embeddings (``--model``), queried with the
  last-position states of test users from ``--data`` (their real queries);
- ``synthetic``: ``--synthetic-items`` vectors (4.2M, the size of Taobao's catalogue) with
  the model's dimension, each a random item embedding of the model plus Gaussian noise
  (0.5 x the table's per-dimension std), so the geometry is the learnt one's, and the same
  user states as queries. A synthetic table says how the index scales, not how well a model
  trained on 4.2M items would retrieve.

Rows of ``retrieve_bench.json``: ``{catalogue, method, params, recall@50, p50_ms, p99_ms,
build_s, memory_mb, speedup_p50}`` (speedup against exact search on the same catalogue).
With ``--data`` it also writes ``two_stage``: NDCG@10, HR@10 and MRR on the test users of
full-catalogue ranking, exact top-50 -> rank, and ANN top-50 -> rank by the same model, so
the loss from the 50-cut and from the ANN can be read apart.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from nimbleml.environment import environment
from nimbleml.progress import track
from nimbleml.rec.data import SequenceData, leave_last_out
from nimbleml.rec.evaluate import RankingResult, SeqRecScorer, evaluate_full
from nimbleml.rec.retrieve import ExactIndex, IndexSpec, ItemIndex, item_table, rank_candidates, user_states
from nimbleml.rec.train import load_checkpoint

log = logging.getLogger(__name__)

HELP = "ANN item retrieval (faiss HNSW / IVF / IVF-PQ) vs exact search: recall@50, batch-1 latency, build, memory"
RESULT_FILE = "retrieve_bench.json"
K = 50

# (factory, search-parameter sweep) per catalogue size; the sweep reuses one built index.
# 8-bit PQ ("PQ16") is left out: its training ran for minutes on 20k vectors here, where the
# 4-bit fast-scan PQ ("PQ32x4fs") and the 8-bit scalar quantiser ("SQ8") train in seconds.
SMALL_METHODS: list[tuple[str, list[dict]]] = [
    ("HNSW32,Flat", [{"efSearch": 64}, {"efSearch": 128}, {"efSearch": 256}]),
    ("IVF256,Flat", [{"nprobe": 8}, {"nprobe": 16}, {"nprobe": 32}]),
    ("IVF256,SQ8", [{"nprobe": 16}, {"nprobe": 32}]),
    ("IVF256,PQ32x4fs", [{"nprobe": 32}]),
    ("IVF256,PQ32x4fs,RFlat", [{"nprobe": 32, "k_factor_rf": 4}]),
]
# HNSW is left out at millions of items on 2 CPU cores: HNSW32 inserted 100k vectors in 72 s
# under the shared load, i.e. about an hour for 4.2M; IVF builds in minutes.
LARGE_METHODS: list[tuple[str, list[dict]]] = [
    ("IVF2048,Flat", [{"nprobe": 8}, {"nprobe": 16}, {"nprobe": 32}, {"nprobe": 64}]),
    ("IVF2048,SQ8", [{"nprobe": 16}, {"nprobe": 32}]),
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="folder written by `rec train` (its item embeddings)")
    parser.add_argument("--data", required=True, help="prepared data of that model (query states from test users)")
    parser.add_argument("--synthetic-items", type=int, default=4_200_000, help="synthetic catalogue size (0 = skip)")
    parser.add_argument("--queries", type=int, default=300, help="batch-1 queries timed per method")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of exact search (faiss: see --faiss-threads)")
    parser.add_argument("--faiss-threads", type=int, default=1,
                        help="faiss OpenMP threads for build and search (1: a batch-1 query runs on one thread anyway, "
                             "and OpenMP spin-waits on a loaded machine)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="output folder for retrieve_bench.json")


def _timed_search(index: ItemIndex | ExactIndex, states: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Batch-1 search of every state: (ids (Q, K), per-query milliseconds (Q,))."""
    index.search(states[:1], K)  # warm-up: first-touch page faults, lazy allocations
    ids = np.zeros((len(states), K), dtype=np.int64)
    times = np.zeros(len(states))
    for q in range(len(states)):
        start = time.perf_counter()
        ids[q] = index.search(states[q : q + 1], K)[0][0]
        times[q] = (time.perf_counter() - start) * 1e3
    return ids, times


def _recall(approx: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(np.intersect1d(a, e)) / len(e) for a, e in zip(approx, exact)]))


def bench_catalogue(name: str, table: np.ndarray, states: np.ndarray, methods: list[tuple[str, list[dict]]],
                    threads: int, faiss_threads: int = 1) -> list[dict]:
    """Exact search plus every (factory, search) method on one table -> result rows."""
    torch.set_num_threads(threads)
    start = time.perf_counter()
    exact = ExactIndex(table)
    exact_build = time.perf_counter() - start
    truth, exact_ms = _timed_search(exact, states)
    exact_p50 = float(np.percentile(exact_ms, 50))
    rows = [dict(catalogue=name, method="exact", params={"torch_threads": threads}, **{"recall@50": 1.0},
                 p50_ms=exact_p50, p99_ms=float(np.percentile(exact_ms, 99)), build_s=exact_build,
                 memory_mb=table.nbytes / 2**20, speedup_p50=1.0)]
    log.info("%s: exact p50 %.2f ms over %d items", name, exact_p50, len(table) - 1)
    for factory, sweep in methods:
        index = ItemIndex.build(table, IndexSpec(factory=factory, search=sweep[0], threads=faiss_threads))
        memory = index.memory_mb()
        for search in sweep:
            index.set_search(search)
            ids, ms = _timed_search(index, states)
            p50 = float(np.percentile(ms, 50))
            rows.append(dict(catalogue=name, method=factory, params=search, **{"recall@50": _recall(ids, truth)},
                             p50_ms=p50, p99_ms=float(np.percentile(ms, 99)), build_s=index.build_s,
                             memory_mb=memory, speedup_p50=exact_p50 / p50))
            log.info("%s %s %s: recall@50 %.3f, p50 %.3f ms", name, factory, search, rows[-1]["recall@50"], p50)
        del index
    return rows


def synthetic_table(table: np.ndarray, n_items: int, seed: int) -> np.ndarray:
    """(n_items + 1, D) float32: random rows of ``table`` plus N(0, (0.5 std)²) noise per dimension."""
    rng = np.random.default_rng(seed)
    out = np.empty((n_items + 1, table.shape[1]), dtype=np.float32)
    noise = 0.5 * table[1:].std(axis=0).astype(np.float32)
    for start in range(1, n_items + 1, 1 << 20):
        stop = min(start + (1 << 20), n_items + 1)
        out[start:stop] = table[rng.integers(1, len(table), stop - start)]
        out[start:stop] += rng.standard_normal((stop - start, table.shape[1]), dtype=np.float32) * noise
    out[0] = 0.0
    return out


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


def two_stage(model_dir: Path, data: SequenceData, index: ItemIndex, max_users: int, seed: int) -> list[dict]:
    """Test-user quality of full ranking vs exact top-50 -> rank vs ANN top-50 -> rank."""
    model = load_checkpoint(model_dir)
    split = leave_last_out(data, max_len=model.config.max_len)
    users = np.arange(data.n_users)
    if len(users) > max_users:
        users = np.sort(np.random.default_rng(seed).choice(len(users), max_users, replace=False))
    history, targets = split.test_input[users], split.test_target[users]
    behaviors = split.test_behaviors[users] if model.config.use_behavior else None
    exclude = [row[row > 0] for row in history] if model.config.exclude_history else None
    full = evaluate_full(SeqRecScorer(model), history, targets, behaviors, model.config.exclude_history, ks=(10, 50))
    states = user_states(model, history, behaviors)
    rows = [dict(pipeline="full ranking", **full.to_dict())]
    for name, retriever in (("exact top-50 -> rank", ExactIndex(item_table(model))), ("ANN top-50 -> rank", index)):
        candidates, _ = retriever.search(states, K, exclude)
        scores = rank_candidates(model, history, candidates, behaviors)
        result = RankingResult.from_ranks("two_stage", _ranks_after_retrieval(candidates, scores, targets, model.config.n_items), (10, 50))
        rows.append(dict(pipeline=name, **result.to_dict()))
    return rows


def _table(rows: list[dict]) -> Table:
    table = Table(title=f"retrieval: recall@{K} vs exact, batch-1 latency")
    for column in ("catalogue", "method", "params", f"recall@{K}", "p50 ms", "p99 ms", "speedup", "build s", "MiB"):
        table.add_column(column, justify="left" if column in ("catalogue", "method", "params") else "right")
    for r in rows:
        table.add_row(r["catalogue"], r["method"], json.dumps(r["params"]), f"{r['recall@50']:.3f}",
                      f"{r['p50_ms']:.3f}", f"{r['p99_ms']:.3f}", f"{r['speedup_p50']:.1f}x",
                      f"{r['build_s']:.1f}", f"{r['memory_mb']:.0f}")  # fmt: skip
    return table


def _two_stage_table(rows: list[dict]) -> Table:
    table = Table(title="two-stage quality on test users (same model ranks)")
    for column in ("pipeline", "ndcg@10", "hr@10", "hr@50", "mrr", "users"):
        table.add_column(column, justify="left" if column == "pipeline" else "right")
    for r in rows:
        table.add_row(r["pipeline"], f"{r['ndcg@10']:.4f}", f"{r['hr@10']:.4f}", f"{r['hr@50']:.4f}",
                      f"{r['mrr']:.4f}", f"{r['n_users']:,}")
    return table


def run(args: argparse.Namespace) -> int:
    model_dir, out = Path(args.model), Path(args.out)
    model = load_checkpoint(model_dir)
    data = SequenceData.load(Path(args.data))
    split = leave_last_out(data, max_len=model.config.max_len)
    rng = np.random.default_rng(args.seed)
    users = rng.choice(data.n_users, size=min(args.queries, data.n_users), replace=False)
    behaviors = split.test_behaviors[users] if model.config.use_behavior else None
    states = user_states(model, split.test_input[users], behaviors)
    table = item_table(model)
    catalogues = [("video", table, SMALL_METHODS)]
    if args.synthetic_items:
        catalogues.append((f"synthetic-{args.synthetic_items / 1e6:g}M", None, LARGE_METHODS))
    rows: list[dict] = []
    loadavg = [os.getloadavg()]
    for name, items, methods in track(catalogues, description="catalogues"):
        items = synthetic_table(table, args.synthetic_items, args.seed) if items is None else items
        rows += bench_catalogue(name, items, states, methods, args.threads, args.faiss_threads)
        loadavg.append(os.getloadavg())
        del items
    chosen = ItemIndex.build(table, IndexSpec(threads=args.faiss_threads))
    stages = two_stage(model_dir, data, chosen, max_users=10_000, seed=args.seed)
    payload = {
        "rows": rows,
        "two_stage": stages,
        "two_stage_index": chosen.spec.to_dict(),
        "queries": len(users),
        "threads": {"torch": args.threads, "faiss": args.faiss_threads},
        "loadavg_1_5_15": loadavg,
        "synthetic": "each vector = a random item embedding of the model + N(0, (0.5 std)^2) noise per dimension",
        "environment": environment(),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / RESULT_FILE).write_text(json.dumps(payload, indent=2) + "\n")
    console = Console()
    console.print(_table(rows))
    console.print(_two_stage_table(stages))
    console.print(f"load average during the run: {loadavg}; wrote {out / RESULT_FILE}")
    return 0
