"""`nimbleml bench retrieve` end to end on a tiny model and catalogue."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from nimbleml.rec import retrieve_bench
from nimbleml.rec.model import SeqRec, SeqRecConfig
from nimbleml.rec.train import TrainConfig, save_checkpoint, train
from tests.rec.test_train import make_data


@pytest.fixture
def tiny_run(tmp_path, monkeypatch):
    data = make_data(n_users=120, n_items=400)
    model = SeqRec(SeqRecConfig.small(data.n_items))
    train(model, data, TrainConfig(epochs=1, batch_size=32, threads=1))
    save_checkpoint(model, {}, tmp_path / "model")
    data.save(tmp_path / "data")
    monkeypatch.setattr(retrieve_bench, "SMALL_METHODS", [("HNSW32,Flat", [{"efSearch": 64}, {"efSearch": 128}])])
    monkeypatch.setattr(retrieve_bench, "LARGE_METHODS", [("IVF16,Flat", [{"nprobe": 4}])])
    return tmp_path


def test_bench_writes_rows_and_two_stage(tiny_run) -> None:
    parser = argparse.ArgumentParser()
    retrieve_bench.add_arguments(parser)
    args = parser.parse_args(["--model", str(tiny_run / "model"), "--data", str(tiny_run / "data"),
                              "--synthetic-items", "3000", "--queries", "20", "--threads", "1",
                              "--out", str(tiny_run / "out")])  # fmt: skip
    assert retrieve_bench.run(args) == 0
    result = json.loads((tiny_run / "out" / "retrieve_bench.json").read_text())
    keys = {"catalogue", "method", "params", "recall@50", "p50_ms", "p99_ms", "build_s", "memory_mb"}
    assert all(keys <= set(row) for row in result["rows"])
    assert [(r["catalogue"], r["method"]) for r in result["rows"]] == [
        ("video", "exact"), ("video", "HNSW32,Flat"), ("video", "HNSW32,Flat"),
        ("synthetic-0.003M", "exact"), ("synthetic-0.003M", "IVF16,Flat"),
    ]
    assert all(0.0 <= r["recall@50"] <= 1.0 for r in result["rows"])
    stages = {row["pipeline"]: row for row in result["two_stage"]}
    # the same model ranks: exact top-50 -> rank keeps every target full ranking puts in its top 10
    assert stages["exact top-50 -> rank"]["hr@10"] == pytest.approx(stages["full ranking"]["hr@10"])
    assert stages["exact top-50 -> rank"]["ndcg@10"] == pytest.approx(stages["full ranking"]["ndcg@10"])
    assert 0.0 <= stages["ANN top-50 -> rank"]["hr@10"] <= stages["ANN top-50 -> rank"]["hr@50"] <= 1.0


def test_a_target_not_retrieved_gets_no_credit() -> None:
    candidates = np.array([[5, 6, 7], [5, 6, 7]])
    scores = np.array([[0.1, 0.9, 0.5], [0.1, 0.9, 0.5]])
    ranks = retrieve_bench._ranks_after_retrieval(candidates, scores, np.array([7, 8]), miss_rank=1000)
    np.testing.assert_array_equal(ranks, [1, 1000])  # item 7 is second by score; item 8 was not retrieved


def test_synthetic_table_keeps_the_geometry() -> None:
    table = np.random.default_rng(0).normal(size=(50, 8)).astype(np.float32)
    table[0] = 0
    synthetic = retrieve_bench.synthetic_table(table, 10_000, seed=1)
    assert synthetic.shape == (10_001, 8) and synthetic.dtype == np.float32 and not synthetic[0].any()
    np.testing.assert_allclose(synthetic[1:].std(axis=0), np.sqrt(1.25) * table[1:].std(axis=0), rtol=0.1)
