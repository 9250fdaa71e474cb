"""Recommend without candidates (retrieve -> rank) on a real server, and gRPC health that follows readiness."""

from __future__ import annotations

import json
import shutil
import threading
import time

import httpx
import numpy as np
import pytest

from tests.serve.conftest import KEYS, N_ITEMS, start_server
from tests.serve.test_http import post

HISTORY = [int(i) for i in np.random.default_rng(7).choice(np.arange(1, N_ITEMS + 1), 60, replace=False)]


def exact_retrieve_rank(model_dir, history: list[int]) -> tuple[dict[int, float], set[int]]:
    """rec.retrieve's exact reference on the torch model: {item: ranker score} of the top 50, and
    the top 50 by the same state with the history left in (to show the exclusion mattered)."""
    from nimbleml.rec.retrieve import ExactIndex, item_table, recommend, user_states
    from nimbleml.rec.train import load_checkpoint

    model = load_checkpoint(model_dir)
    row = np.zeros((1, 100), dtype=np.int64)
    row[0, -len(history):] = history
    index = ExactIndex(item_table(model))
    (top,) = recommend(model, index, row, k=50, n_candidates=50)
    unexcluded, _ = index.search(user_states(model, row), 50)
    return dict(zip(top.items, top.scores)), set(unexcluded[0].tolist())


def test_recommend_without_candidates_is_exact_retrieve_then_rank(server, rec_model):
    answer = post(server, "/v1/recommend", {"history": HISTORY})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["path"] == "retrieved"
    items = [i["item"] for i in body["items"]]
    scores = [i["score"] for i in body["items"]]
    assert len(items) == 50 and len(set(items)) == 50
    assert not set(items) & set(HISTORY)  # the bundle excludes the history
    assert scores == sorted(scores, reverse=True)
    expected, unexcluded = exact_retrieve_rank(rec_model, HISTORY)
    assert unexcluded & set(HISTORY), "the history should hold items the state alone would retrieve"
    assert set(items) == set(expected)
    np.testing.assert_allclose(scores, [expected[i] for i in items], atol=1e-4)
    null = post(server, "/v1/recommend", {"history": HISTORY, "candidates": None}).json()
    assert [i["item"] for i in null["items"]] == items


def test_recommend_without_candidates_for_a_stored_user(server):
    user = f"retrieve-{time.monotonic_ns()}"
    for ts, item in enumerate(HISTORY):
        assert post(server, "/v1/ingest", {"user_id": user, "item_id": item, "ts": ts}).status_code == 200
    by_history = post(server, "/v1/recommend", {"history": HISTORY}).json()
    for _ in range(3):  # the first may compute the state, later ones use the cached state
        by_user = post(server, "/v1/recommend", {"user_id": user}).json()
        assert by_user["path"] == "retrieved"
        assert [i["item"] for i in by_user["items"]] == [i["item"] for i in by_history["items"]]


@pytest.mark.parametrize(("candidates", "words"), [([], "length >= 1"), ([1, 2, 3], "exactly 50")])
def test_empty_or_short_candidates_are_still_a_422(server, candidates, words):
    answer = post(server, "/v1/recommend", {"history": [1], "candidates": candidates})
    assert answer.status_code == 422 and words in answer.json()["error"]


def test_grpc_without_candidates_answers_as_http(server):
    import grpc

    from nimbleml.serve.proto import serving_pb2, serving_pb2_grpc

    http = post(server, "/v1/recommend", {"history": HISTORY}).json()
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc}") as channel:
        answer = serving_pb2_grpc.ServingStub(channel).Recommend(
            serving_pb2.RecommendRequest(history=HISTORY, has_history=True),
            metadata=(("x-api-key", KEYS["standard"]),), timeout=5)
    assert answer.path == "retrieved"
    assert [i.item for i in answer.items] == [i["item"] for i in http["items"]]
    np.testing.assert_allclose([i.score for i in answer.items], [i["score"] for i in http["items"]], rtol=1e-6)


class HealthWatch:
    """The statuses a gRPC health Watch stream reports, collected on a thread."""

    def __init__(self, port: int, service: str = ""):
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.stream = health_pb2_grpc.HealthStub(self.channel).Watch(health_pb2.HealthCheckRequest(service=service))
        self.seen: list[str] = []
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        import grpc
        from grpc_health.v1 import health_pb2

        try:
            for reply in self.stream:
                self.seen.append(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
        except grpc.RpcError:  # cancelled by close(), or the server went away
            pass

    def wait_for(self, status: str, timeout_s: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.seen and self.seen[-1] == status:
                return True
            time.sleep(0.05)
        return False

    def close(self) -> None:
        self.stream.cancel()
        self.thread.join(5)
        self.channel.close()


def test_grpc_health_follows_a_drain(server):
    from nimbleml.serve.grpc_app import SERVICE_NAME

    admin = {"x-api-key": KEYS["admin"]}
    watches = [HealthWatch(server.grpc), HealthWatch(server.grpc, SERVICE_NAME)]
    try:
        assert all(w.wait_for("SERVING") for w in watches)
        worker = httpx.get(f"{server.url}/v1/models", headers=admin).json()["workers"][0]["index"]
        # the only worker drains: none is ready until its replacement has warmed
        drained = httpx.post(f"{server.url}/v1/admin/drain", json={"worker": worker}, headers=admin, timeout=120)
        assert drained.status_code == 200, drained.text
        for watch in watches:
            assert watch.wait_for("SERVING"), watch.seen
            assert watch.seen[watch.seen.index("NOT_SERVING"):][-1] == "SERVING", watch.seen
    finally:
        for watch in watches:
            watch.close()


def test_a_bundle_without_index_needs_candidates(rec_bundle, tmp_path):
    """A bundle prepared before retrieval existed (no `retrieval` in its manifest) still serves
    candidates, answers a Recommend without them with a 422, and its health ends NOT_SERVING on SIGTERM."""
    old = tmp_path / "old-bundle"
    shutil.copytree(rec_bundle, old)
    manifest = json.loads((old / "serving.json").read_text())
    manifest.pop("retrieval")
    (old / "serving.json").write_text(json.dumps(manifest))
    (old / "item_index.faiss").unlink()
    other = start_server(old, tmp_path, "--grpc-port", "0")
    watch = None
    try:
        assert post(other, "/v1/recommend", {"history": [1], "candidates": list(range(1, 51))}).status_code == 200
        answer = post(other, "/v1/recommend", {"history": [1]})
        assert answer.status_code == 422 and "needs candidates" in answer.json()["error"]
        watch = HealthWatch(other.grpc)
        assert watch.wait_for("SERVING")
    finally:
        assert other.stop() == 0, other.log.read_text()[-3000:]
        if watch is not None:
            watch.close()
    assert watch.seen[-1] == "NOT_SERVING", watch.seen
