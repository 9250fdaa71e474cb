"""`bench serve`'s own logic: the naive servers, the answer check, the ratio against the best naive
variant and the wrk agreement. Nothing here is timed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from nimbleml.commands.serve_bench import (NAIVE_ENV, NAIVE_VARIANTS, best_variant, capacity_ratio, check_ranking,
                                           naive_app, naive_factory, wrk_agreement, wrk_skip_reason)

BODY = {"history": [3, 1, 4, 1, 5], "candidates": list(range(1, 51))}


@pytest.mark.parametrize("endpoint", ["async", "sync"])
def test_naive_server_ranks_the_candidates(rec_model: Path, endpoint: str) -> None:
    with TestClient(naive_app(rec_model, endpoint, threads=1)) as client:
        answer = client.post("/v1/recommend", json=BODY)
        assert answer.status_code == 200, answer.text
        assert check_ranking(json.dumps(BODY).encode(), answer.content) is None
        assert client.post("/v1/recommend", json={"history": "x"}).status_code == 422


def test_naive_server_serves_a_model_with_behaviour_embeddings(tmp_path: Path) -> None:
    """Such a model needs a behaviour code per event: the naive server sends 'clicked' where there
    is an item, as ours does when a request leaves them out (it answered 500 before)."""
    import torch

    from nimbleml.rec.model import SeqRec, SeqRecConfig
    from nimbleml.rec.train import save_checkpoint

    torch.manual_seed(0)
    model = SeqRec(SeqRecConfig.small(300, max_len=100, use_behavior=True)).eval()
    folder = save_checkpoint(model, {"note": "test model"}, tmp_path / "behaviour")
    with TestClient(naive_app(folder, "async", threads=1)) as client:
        answer = client.post("/v1/recommend", json=BODY)
        assert answer.status_code == 200, answer.text
        assert check_ranking(json.dumps(BODY).encode(), answer.content) is None


def test_naive_workers_build_their_app_from_the_environment(rec_model: Path, monkeypatch) -> None:
    """uvicorn --workers needs an import string: each worker builds the app from $NIMBLEML_NAIVE."""
    assert NAIVE_VARIANTS["naive_workers"] == ("async", 1, 0)  # one torch thread, one process per core
    monkeypatch.setenv(NAIVE_ENV, f"{rec_model}|async|1")
    with TestClient(naive_factory()) as client:
        answer = client.post("/v1/recommend", json=BODY)
        assert check_ranking(json.dumps(BODY).encode(), answer.content) is None


def _answer(items: list[tuple[int, float | None]]) -> bytes:
    return json.dumps({"items": [{"item": i, "score": s} for i, s in items], "model_version": "v"}).encode()


def test_check_ranking_finds_wrong_answers() -> None:
    request = json.dumps({"history": [7], "candidates": [5, 6, 7]}).encode()
    assert check_ranking(request, _answer([(6, 2.0), (5, 1.5), (7, None)])) is None
    assert "candidates" in check_ranking(request, _answer([(6, 2.0), (5, 1.5)]))
    assert "candidates" in check_ranking(request, _answer([(6, 2.0), (5, 1.5), (8, 1.0)]))
    assert "sorted" in check_ranking(request, _answer([(5, 1.5), (6, 2.0), (7, None)]))
    assert "null" in check_ranking(request, _answer([(6, None), (5, 1.5), (7, None)]))
    assert "outside the history" in check_ranking(request, _answer([(7, 2.0), (5, 1.5), (6, None)]))
    assert "not a ranking" in check_ranking(request, b'{"error": "busy"}')
    assert "finite" in check_ranking(request, _answer([(6, "NaN"), (5, 1.5), (7, None)]))
    assert "not a ranking" in check_ranking(request, b'{"items": [{"item": 6, "score": 1e999}]}')
    assert "not a ranking" in check_ranking(request, _answer([(6, 2.0), ("5", 1.5), (7, None)]))
    duplicate = json.dumps({"candidates": [5, 5, 6]}).encode()
    assert check_ranking(duplicate, _answer([(5, 3.0), (5, 3.0), (6, 1.0)])) is None
    assert check_ranking(duplicate, _answer([(5, 3.0), (6, 2.0), (6, 1.0)])) is not None


def test_ratio_is_against_the_best_naive_variant() -> None:
    rows = {"naive_async": {"max_rps": 294.0, "cpu_ms_per_request": 3.1},
            "naive_sync": {"max_rps": 120.0, "cpu_ms_per_request": 9.0},
            "naive_async_1thread": {"max_rps": 310.0, "cpu_ms_per_request": 2.9},
            "naive_workers": {"max_rps": 606.0, "cpu_ms_per_request": 3.0}}
    assert best_variant(rows) == "naive_workers"
    assert capacity_ratio({"max_rps": 1265.0}, rows["naive_workers"]) == 2.09
    # a tie on capacity goes to the variant using less CPU per request
    tie = {"a": {"max_rps": 600.0, "cpu_ms_per_request": 3.2}, "b": {"max_rps": 600.0, "cpu_ms_per_request": 2.8},
           "c": {"max_rps": 600.0, "cpu_ms_per_request": None}}
    assert best_variant(tie) == "b"
    assert capacity_ratio({"max_rps": 100.0}, {"max_rps": 0.0}) == 0.0


def test_wrk_agreement_takes_the_best_run_within_the_objective() -> None:
    def run(ok_rps: float, p99_ms: float, non_2xx: int = 0) -> dict:
        return {"ok_rps": ok_rps, "p99_ms": p99_ms, "non_2xx": non_2xx}

    rows = {"4": run(900.0, 8.0), "8": run(1150.0, 20.0), "16": run(1300.0, 49.0, non_2xx=3), "32": run(1320.0, 90.0)}
    agree = wrk_agreement(rows, 1200.0, 50.0)
    assert (agree["wrk_rps"], agree["connections"], agree["ratio"]) == (1150.0, 8, 0.958)
    assert wrk_agreement({"4": run(10.0, 80.0)}, 1200.0, 50.0)["ratio"] is None


def test_wrk_left_out_with_a_reason(monkeypatch) -> None:
    import nimbleml.commands.serve_bench as serve_bench

    assert "--skip-wrk" in wrk_skip_reason(True)
    monkeypatch.setattr(serve_bench, "wrk_available", lambda: None)
    assert "not installed" in wrk_skip_reason(False)
    monkeypatch.setattr(serve_bench, "wrk_available", lambda: "/usr/bin/wrk")
    assert wrk_skip_reason(False) is None
