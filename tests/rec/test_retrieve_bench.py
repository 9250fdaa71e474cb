"""`nimbleml bench retrieve`: disjoint query splits, recall against exact search, choice on
validation, and the command end to end on a tiny model and catalogue."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from nimbleml.errors import NimbleError
from nimbleml.rec import retrieve_bench
from nimbleml.rec.model import SeqRec, SeqRecConfig
from nimbleml.rec.retrieve_bench import BenchRow, Method, QuerySplit
from nimbleml.rec.train import TrainConfig, save_checkpoint, train
from tests.rec.test_retrieve import random_table
from tests.rec.test_train import make_data


@pytest.mark.parametrize(("n_users", "n_valid", "n_test"), [(5000, 1000, 2000), (815, 1000, 2000), (3, 1, 1)])
def test_validation_and_test_users_are_disjoint(n_users: int, n_valid: int, n_test: int) -> None:
    valid, test = retrieve_bench.split_users(n_users, n_valid, n_test, seed=0)
    assert len(valid) and len(test) and not set(valid) & set(test)
    assert len(valid) <= n_valid and len(test) <= n_test and max(valid.max(), test.max()) < n_users
    with pytest.raises(NimbleError, match="disjoint"):
        retrieve_bench.split_users(1, 1, 1, seed=0)


def test_query_states_come_from_the_split_users() -> None:
    data = make_data(n_users=90, n_items=50)
    model = SeqRec(SeqRecConfig.small(data.n_items)).eval()
    queries = retrieve_bench.query_split(model, data, n_valid=20, n_test=40, seed=1)
    assert queries.valid.shape == (20, model.config.dim) and queries.test.shape == (40, model.config.dim)
    assert not set(queries.valid_users) & set(queries.test_users)


def test_item_queries_are_disjoint_rows_of_the_table() -> None:
    table = random_table(500, 8)
    queries = retrieve_bench.item_query_split(table, 50, 100, seed=0)
    assert not set(queries.valid_users) & set(queries.test_users) and queries.test_users.min() >= 1
    np.testing.assert_array_equal(queries.test, table[queries.test_users])


def test_recall_is_against_exact_search_on_the_same_queries() -> None:
    table = random_table(3000, 16)
    rng = np.random.default_rng(1)
    queries = QuerySplit(np.arange(30), np.arange(30, 90), rng.normal(size=(30, 16)).astype(np.float32),
                         rng.normal(size=(60, 16)).astype(np.float32))
    methods = [Method("Flat", [{}]), Method("IVF16,Flat", [{"nprobe": 1}, {"nprobe": 16}])]
    result = retrieve_bench.bench_catalogue("t", table, queries, methods, threads=1, target=0.99, exact_timed=10,
                                            hnsw_budget_s=60)
    rows = {(r.method, json.dumps(r.params), r.split): r for r in result.rows}
    for split, n in (("valid", 30), ("test", 60)):
        # an exact faiss index finds exactly what the torch reference finds for the same vectors
        assert rows[("Flat", "{}", split)].recall == 1.0 and rows[("Flat", "{}", split)].n_queries == n
        assert rows[("IVF16,Flat", '{"nprobe": 16}', split)].recall == 1.0  # every list probed
        assert rows[("IVF16,Flat", '{"nprobe": 1}', split)].recall < 0.9
        low, high = rows[("IVF16,Flat", '{"nprobe": 1}', split)].recall_ci95
        assert low < rows[("IVF16,Flat", '{"nprobe": 1}', split)].recall < high
    chosen = [r for r in result.rows if r.chosen and r.method == "IVF16,Flat"]
    assert {r.split for r in chosen} == {"valid", "test"} and all(r.params == {"nprobe": 16} for r in chosen)
    assert all(r.add_10k_s is not None and r.build_s > 0 for r in result.rows if r.method != "exact")


def test_query_spread_tells_same_answers_from_different_ones() -> None:
    same = np.tile(np.arange(1, 51), (20, 1))
    assert retrieve_bench.query_spread(same)["mean_pair_overlap"] == 1.0
    apart = np.arange(1, 1001).reshape(20, 50)
    assert retrieve_bench.query_spread(apart) == {"mean_pair_overlap": 0.0, "distinct_items": 1000, "queries": 20}


def row(method: str, recall: float, p50: float, split: str = "valid") -> BenchRow:
    return BenchRow("t", method, {"p": p50}, recall, [recall, recall], p50, p50, 1.0, 0.1, 1.0, split, 10)


def test_choice_is_the_cheapest_setting_reaching_the_target_and_the_front_is_undominated() -> None:
    sweep = [row("m", 0.90, 1.0), row("m", 0.981, 2.0), row("m", 0.995, 4.0)]
    assert retrieve_bench.choose(sweep, 0.98) is sweep[1]
    assert retrieve_bench.choose(sweep, 0.999) is sweep[2]  # none reaches it: the best there is
    rows = [row("a", 0.90, 1.0), row("b", 0.85, 2.0), row("a", 0.99, 3.0), row("b", 0.99, 5.0)]
    assert [(r.method, r.recall) for r in retrieve_bench.pareto_front(rows)] == [("a", 0.90), ("a", 0.99)]


@pytest.fixture
def tiny_run(tmp_path, monkeypatch):
    data = make_data(n_users=150, n_items=400)
    model = SeqRec(SeqRecConfig.small(data.n_items))
    train(model, data, TrainConfig(epochs=1, batch_size=32, threads=1))
    save_checkpoint(model, {}, tmp_path / "model")
    data.save(tmp_path / "data")
    monkeypatch.setattr(retrieve_bench, "SMALL_METHODS", [Method("HNSW32,Flat", [{"efSearch": 16}, {"efSearch": 64}])])
    monkeypatch.setattr(retrieve_bench, "LARGE_METHODS", [Method("IVF16,Flat", [{"nprobe": 4}], train_points=1000)])
    return tmp_path


def test_bench_writes_rows_two_stage_and_curves(tiny_run) -> None:
    parser = argparse.ArgumentParser()
    retrieve_bench.add_arguments(parser)
    model, data = tiny_run / "model", tiny_run / "data"
    args = parser.parse_args(["--dataset", f"tiny:{model}:{data}:{model}", "--synthetic-items", "3000",
                              "--components", "4", "--valid-queries", "30", "--test-queries", "60",
                              "--exact-timed", "10", "--threads", "1", "--out", str(tiny_run / "out")])  # fmt: skip
    assert retrieve_bench.run(args) == 0
    result = json.loads((tiny_run / "out" / "retrieve_bench.json").read_text())
    keys = {"catalogue", "method", "params", "recall@50", "recall@50_ci95", "p50_ms", "p99_ms", "build_s",
            "add_10k_s", "memory_mb", "split"}
    assert all(keys <= set(r) for r in result["rows"])
    assert {(r["catalogue"], r["split"]) for r in result["rows"]} == {
        (c, s) for c in ("tiny", "synthetic-400", "synthetic-3k") for s in ("valid", "test")}
    assert all(0.0 <= r["recall@50"] <= 1.0 for r in result["rows"])
    assert result["queries"]["tiny"] == {"valid": 30, "test": 60}
    assert 0.0 <= result["query_spread"]["tiny"]["mean_pair_overlap"] <= 1.0
    assert 0.0 <= result["catalogue_realism"]["near_copy_share"] <= 1.0
    stages = result["two_stage"]["tiny"]
    assert set(stages) == {"full_ranking", "exact_top50_model", "ann_top50_model", "exact_top50_served",
                           "ann_top50_served"}
    assert all({"ndcg@10", "hr@10", "mrr", "hr@50"} <= set(m) for m in stages.values())
    # the same model ranks: exact top-50 -> rank keeps every target full ranking puts in its top 10
    assert stages["exact_top50_model"]["hr@10"] == pytest.approx(stages["full_ranking"]["hr@10"])
    assert stages["exact_top50_model"]["ndcg@10"] == pytest.approx(stages["full_ranking"]["ndcg@10"])
    assert stages["exact_top50_served"] == stages["exact_top50_model"]  # the served folder is the model itself
    assert 0.0 <= stages["ann_top50_model"]["hr@10"] <= stages["ann_top50_model"]["hr@50"] <= 1.0
    assert (tiny_run / "out" / "retrieve_curves.png").stat().st_size > 0


def test_a_target_not_retrieved_gets_no_credit() -> None:
    candidates = np.array([[5, 6, 7], [5, 6, 7]])
    scores = np.array([[0.1, 0.9, 0.5], [0.1, 0.9, 0.5]])
    ranks = retrieve_bench._ranks_after_retrieval(candidates, scores, np.array([7, 8]), miss_rank=1000)
    np.testing.assert_array_equal(ranks, [1, 1000])  # item 7 is second by score; item 8 was not retrieved


def test_recent_history_leads_the_candidates_without_duplicates() -> None:
    retrieved = np.array([[9, 3, 8, 7, 0]])
    history = np.array([[0, 3, 5, 3, 6]])  # oldest first: the newest distinct items are 6, 3, 5
    np.testing.assert_array_equal(retrieve_bench.with_recent_history(retrieved, history, 2), [[6, 3, 9, 8, 7]])
    np.testing.assert_array_equal(retrieve_bench.with_recent_history(retrieved, history, 3), [[6, 3, 5, 9, 8]])


def test_only_keeps_the_named_methods() -> None:
    methods = [Method("IVF16,Flat", [{}]), Method("HNSW32,Flat", [{}])]
    assert retrieve_bench._only(methods, None) == methods
    assert [m.factory for m in retrieve_bench._only(methods, ["HNSW32,Flat"])] == ["HNSW32,Flat"]


def test_a_malformed_dataset_argument_names_the_form() -> None:
    with pytest.raises(NimbleError, match="NAME:MODEL:DATA"):
        retrieve_bench.Dataset.parse("runs/video/model")
