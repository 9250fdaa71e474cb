"""`bench serve`'s own logic: the naive servers, the answer check, the ratio against the best naive
variant and the wrk agreement. Nothing here is timed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from nimbleml.commands.serve_bench import (NAIVE_ENV, NAIVE_VARIANTS, best_variant, capacity_ratio, capacity_row,
                                           check_ranking, compressed_parent, matched_connections, model_variant,
                                           naive_app, naive_factory, wrk_agreement, wrk_ratio, wrk_skip_reason)

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
    assert NAIVE_VARIANTS["naive_workers"] == ("async", 1, 0, False)  # one torch thread, one process per core
    monkeypatch.setenv(NAIVE_ENV, f"{rec_model}|async|1|0")
    with TestClient(naive_factory()) as client:
        answer = client.post("/v1/recommend", json=BODY)
        assert check_ranking(json.dumps(BODY).encode(), answer.content) is None


def test_the_int8_naive_server_ranks_close_to_the_fp32_one(rec_model: Path) -> None:
    """naive_workers_int8: torch's dynamic int8 on the Linear layers, the same answers' shape and
    nearly the same order as fp32."""
    assert NAIVE_VARIANTS["naive_workers_int8"] == ("async", 1, 0, True)
    with TestClient(naive_app(rec_model, "async", threads=1, int8=True)) as client:
        quantised = client.post("/v1/recommend", json=BODY)
    with TestClient(naive_app(rec_model, "async", threads=1)) as client:
        exact = client.post("/v1/recommend", json=BODY)
    assert quantised.status_code == 200 and check_ranking(json.dumps(BODY).encode(), quantised.content) is None
    top = [[item["item"] for item in answer.json()["items"][:10]] for answer in (quantised, exact)]
    assert len(set(top[0]) & set(top[1])) >= 7


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


def test_wrk_agreement_compares_at_the_concurrency_our_run_held_and_keeps_the_best_run() -> None:
    def run(ok_rps: float, p99_ms: float, non_2xx: int = 0) -> dict:
        return {"ok_rps": ok_rps, "p99_ms": p99_ms, "non_2xx": non_2xx}

    rows = {"4": run(900.0, 8.0), "8": run(1150.0, 20.0), "13": run(1250.0, 30.0), "16": run(1300.0, 49.0, non_2xx=3),
            "32": run(1320.0, 90.0)}
    agree = wrk_agreement(rows, 1200.0, 50.0, matched=13)
    assert (agree["wrk_rps"], agree["connections"], agree["ratio"]) == (1250.0, 13, 1.042)
    assert (agree["best"]["wrk_rps"], agree["best"]["connections"], agree["best"]["ratio"]) == (1250.0, 13, 1.042)
    # without a matched run there is no agreement figure, only the best run within the objective
    agree = wrk_agreement(rows, 1200.0, 50.0)
    assert agree["ratio"] is None and agree["best"]["connections"] == 13
    # a matched run with refusals does not count as agreeing
    assert wrk_agreement(rows, 1200.0, 50.0, matched=16)["ratio"] is None
    none = wrk_agreement({"4": run(10.0, 80.0)}, 1200.0, 50.0, matched=4)
    assert none["best"]["ratio"] is None and none["ratio"] == round(10.0 / 1200.0, 3)


def test_matched_connections_is_littles_law_at_the_capacity_point() -> None:
    from nimbleml.bench.capacity import Capacity, Step

    def step(rate: float, mean_ms: float | None, phase: str = "repeat") -> Step:
        return Step(rate, rate, 100, 100, 5.0, 20.0, True, phase, {"mean_ms": mean_ms, "cpu_ms_per_request": 1.0})

    steps = [step(3000.0, 200.0, "grid"), step(1000.0, 9.0), step(1010.0, 10.0), step(990.0, 11.0)]
    row = capacity_row(Capacity(1000.0, 1000.0, [1000.0, 1010.0, 990.0], 0.02, 3, 20.0, (1000.0, 1030.0), steps))
    assert row["in_flight"] == 10.1  # median of 9.0, 10.1 and 10.89 requests in flight; the grid step is left out
    assert matched_connections(row) == 10
    assert matched_connections({"in_flight": 0.2}) == 1
    assert matched_connections({"in_flight": None}) is None


def test_wrk_ratio_takes_the_best_naive_variant() -> None:
    result = {"naive_variants": ["a", "b"], "wrk_agreement": {
        "a": {"best": {"wrk_rps": 400.0}}, "b": {"best": {"wrk_rps": 800.0}}, "nimbleml": {"best": {"wrk_rps": 3000.0}}}}
    assert wrk_ratio(result) == 3.75
    assert wrk_ratio({"naive_variants": ["a"], "wrk_agreement": {}}) is None


def test_a_compressed_model_names_its_parent(tmp_path: Path, rec_model: Path) -> None:
    child = tmp_path / "int8"
    child.mkdir()
    (child / "variant.json").write_text(json.dumps({"recipes": ["quantize-dynamic"], "precision": "int8",
                                                    "parent": str(rec_model), "valid_before": {"ndcg@10": 0.1}}))
    assert compressed_parent(child) == rec_model
    assert model_variant(child)["recipes"] == ["quantize-dynamic"]
    assert compressed_parent(rec_model) is None and model_variant(rec_model) is None
    (child / "variant.json").write_text(json.dumps({"parent": str(tmp_path / "gone")}))
    assert compressed_parent(child) is None  # a parent that is no longer there: no fp32 row


def test_wrk_left_out_with_a_reason(monkeypatch) -> None:
    import nimbleml.commands.serve_bench as serve_bench

    assert "--skip-wrk" in wrk_skip_reason(True)
    monkeypatch.setattr(serve_bench, "wrk_available", lambda: None)
    assert "not installed" in wrk_skip_reason(False)
    monkeypatch.setattr(serve_bench, "wrk_available", lambda: "/usr/bin/wrk")
    assert wrk_skip_reason(False) is None


def test_tool_agreement_compares_the_same_connection_counts() -> None:
    from nimbleml.commands.serve_bench import tool_agreement

    wrk = {"4": {"ok_rps": 880.0}, "8": {"ok_rps": 1300.0}, "32": {"ok_rps": 2400.0}}
    ours = {"4": {"rps": 800.0}, "8": {"rps": 1300.0}, "16": {"rps": 1700.0}}
    agree = tool_agreement(wrk, ours)
    assert agree == {"ratios": {"4": 1.1, "8": 1.0}, "max_deviation": 0.1}
    assert tool_agreement(wrk, {"16": {"rps": 1.0}}) == {"ratios": {}, "max_deviation": None}
