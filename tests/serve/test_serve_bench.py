"""The naive server `bench serve` compares against: both route styles answer, and agree."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from nimbleml.commands.serve_bench import naive_app


@pytest.mark.parametrize("endpoint", ["async", "sync"])
def test_naive_server_ranks_the_candidates(rec_model: Path, endpoint: str) -> None:
    body = {"history": [3, 1, 4, 1, 5], "candidates": list(range(1, 51))}
    with TestClient(naive_app(rec_model, endpoint)) as client:
        answer = client.post("/v1/recommend", json=body)
        assert answer.status_code == 200, answer.text
        items = answer.json()["items"]
        assert sorted(i["item"] for i in items) == body["candidates"]
        scores = [i["score"] for i in items if i["score"] is not None]
        assert scores == sorted(scores, reverse=True)
        assert client.post("/v1/recommend", json={"history": "x"}).status_code == 422
