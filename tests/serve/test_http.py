"""The HTTP and gRPC front ends of a real `nimbleml serve` process: answers, keys, bad input, metrics."""

from __future__ import annotations

import time

import httpx
import pytest

from tests.serve.conftest import KEYS, N_ITEMS

CANDIDATES = list(range(1, 51))


def post(server, path: str, body, key: str | None = KEYS["standard"], **kwargs) -> httpx.Response:
    headers = {"x-api-key": key} if key else {}
    if isinstance(body, (bytes, str)):
        headers["content-type"] = "application/json"
        return httpx.post(f"{server.url}{path}", content=body, headers=headers, **kwargs)
    return httpx.post(f"{server.url}{path}", json=body, headers=headers, **kwargs)


def test_recommend_by_history_ranks_every_candidate(server):
    answer = post(server, "/v1/recommend", {"history": [5, 6, 7], "candidates": CANDIDATES})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert sorted(i["item"] for i in body["items"]) == CANDIDATES
    scores = [i["score"] for i in body["items"]]
    finite = [s for s in scores if s is not None]
    assert finite == sorted(finite, reverse=True)
    assert scores.count(None) == 3  # the model excludes items already in the history: 5, 6, 7
    assert body["path"] == "full" and body["model_version"]


def test_ingest_then_cached_state_matches_the_full_forward(server):
    user = f"user-{time.monotonic_ns()}"
    for ts, item in enumerate([11, 12, 13]):
        answer = post(server, "/v1/ingest", {"user_id": user, "item_id": item, "ts": ts})
        assert answer.status_code == 200, answer.text
    assert answer.json()["history_length"] == 3
    full = post(server, "/v1/recommend", {"history": [11, 12, 13], "candidates": CANDIDATES}).json()
    cached = None
    for _ in range(50):  # the state is computed in the background after the Ingest
        cached = post(server, "/v1/recommend", {"user_id": user, "candidates": CANDIDATES}).json()
        if cached["path"] == "cached":
            break
        time.sleep(0.05)
    assert cached["path"] == "cached"
    assert [i["item"] for i in cached["items"]] == [i["item"] for i in full["items"]]
    for a, b in zip(cached["items"], full["items"]):
        assert (a["score"] is None and b["score"] is None) or abs(a["score"] - b["score"]) < 1e-4


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        (b"{not json", 400, "malformed JSON"),
        ({"history": "abc", "candidates": CANDIDATES}, 422, "invalid request"),
        ({"history": [1], "candidates": CANDIDATES[:49]}, 422, "exactly 50"),
        ({"history": [1], "candidates": CANDIDATES + [51]}, 422, "exactly 50"),
        ({"history": [1], "candidates": [N_ITEMS + 1] + CANDIDATES[1:]}, 422, "unknown id"),
        ({"history": [N_ITEMS + 5], "candidates": CANDIDATES}, 422, "unknown id"),
        ({"candidates": CANDIDATES}, 422, "user_id"),
        ({"history": [1], "candidates": CANDIDATES, "tier": "premium"}, 422, "unknown field"),
        (b"x" * 70_000, 413, "limit"),
    ],
)
def test_bad_recommend_requests_get_a_4xx_with_a_message(server, body, status, words):
    answer = post(server, "/v1/recommend", body)
    assert answer.status_code == status, answer.text
    assert words in answer.json()["error"]


def test_bad_ingest_requests(server):
    assert post(server, "/v1/ingest", {"user_id": "u", "item_id": 3, "ts": -1}).status_code == 422
    assert post(server, "/v1/ingest", {"user_id": "u", "item_id": N_ITEMS + 1, "ts": 0}).status_code == 422
    assert post(server, "/v1/ingest", {"user_id": "", "item_id": 3, "ts": 0}).status_code == 422


def test_keys_decide_who_may_do_what(server):
    body = {"history": [1], "candidates": CANDIDATES}
    assert post(server, "/v1/recommend", body, key=None).status_code == 401
    assert post(server, "/v1/recommend", body, key="wrong").status_code == 401
    bearer = httpx.post(f"{server.url}/v1/recommend", json=body, headers={"authorization": f"Bearer {KEYS['premium']}"})
    assert bearer.status_code == 200
    denied = post(server, "/v1/admin/promote", b"", key=KEYS["free"])
    assert denied.status_code == 403 and "admin" in denied.json()["error"]
    assert post(server, "/v1/admin/promote", b"", key=KEYS["admin"]).status_code == 409  # nothing to promote
    # the server keeps serving after all of that
    assert post(server, "/v1/recommend", body).status_code == 200


def test_risk_route_on_a_recommend_server_is_404(server):
    answer = post(server, "/v1/risk", {"asset": "SPX", "window": [[0.1, 0.2]]})
    assert answer.status_code == 404


def test_health_docs_metrics(server):
    assert httpx.get(f"{server.url}/healthz").status_code == 200
    assert httpx.get(f"{server.url}/readyz").json() == {"ready": True}
    spec = httpx.get(f"{server.url}/openapi.json").json()
    assert "/v1/recommend" in spec["paths"] and "RecommendRequest" in spec["components"]["schemas"]
    assert httpx.get(f"{server.url}/docs").status_code == 200
    text = httpx.get(f"{server.url}/metrics").text
    for name in ("nimbleml_requests_total", "nimbleml_request_latency_seconds_bucket", "nimbleml_batch_size_bucket",
                 "nimbleml_queue_depth", "nimbleml_worker_restarts_total", "nimbleml_model_version_info",
                 'status="401"', 'status="422"'):
        assert name in text


def test_grpc_recommend_health_and_errors(server):
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from nimbleml.serve.proto import serving_pb2, serving_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{server.grpc}") as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        stub = serving_pb2_grpc.ServingStub(channel)
        meta = (("x-api-key", KEYS["standard"]),)
        answer = stub.Recommend(serving_pb2.RecommendRequest(history=[5, 6, 7], has_history=True, candidates=CANDIDATES),
                                metadata=meta, timeout=5)
        http = post(server, "/v1/recommend", {"history": [5, 6, 7], "candidates": CANDIDATES}).json()
        assert [i.item for i in answer.items] == [i["item"] for i in http["items"]]
        assert sum(i.excluded for i in answer.items) == 3
        with pytest.raises(grpc.RpcError) as err:
            stub.Recommend(serving_pb2.RecommendRequest(history=[1], candidates=[1, 2]), metadata=meta, timeout=5)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as err:
            stub.Recommend(serving_pb2.RecommendRequest(history=[1], candidates=CANDIDATES), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        ingest = stub.Ingest(serving_pb2.IngestRequest(user_id="g1", item_id=4, ts=1), metadata=meta, timeout=5)
        assert ingest.history_length == 1


def test_fastapi_mode_answers_like_the_default(rec_bundle, server, tmp_path):
    """``--http fastapi`` (every route through FastAPI, kept for comparison in the benchmark) gives the
    default's answers, within the same HTTP limits."""
    from tests.serve.conftest import start_server

    other = start_server(rec_bundle, tmp_path, "--http", "fastapi")
    try:
        body = {"history": [5, 6, 7], "candidates": CANDIDATES}
        ours = post(server, "/v1/recommend", body).json()
        theirs = post(other, "/v1/recommend", body)
        assert theirs.status_code == 200 and theirs.json()["items"] == ours["items"]
        assert post(other, "/v1/recommend", {"history": [1], "candidates": CANDIDATES[:3]}).status_code == 422
        assert post(other, "/v1/recommend", body, key=None).status_code == 401
        assert post(other, "/v1/recommend", b"x" * 70_000).status_code == 413
    finally:
        assert other.stop() == 0


def test_grpc_validates_like_http(server):
    """The same msgspec limits on gRPC: a 100k-character user id and an out-of-range behaviour are refused."""
    import grpc

    from nimbleml.serve.proto import serving_pb2, serving_pb2_grpc

    huge = "u" * 100_000
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc}", options=[("grpc.max_send_message_length", 1 << 22)]) as channel:
        stub = serving_pb2_grpc.ServingStub(channel)
        meta = (("x-api-key", KEYS["standard"]),)
        bad = [
            ("Ingest", serving_pb2.IngestRequest(user_id=huge, item_id=4, ts=1), "user_id"),
            ("Ingest", serving_pb2.IngestRequest(user_id="g2", item_id=4, ts=1, behavior=300), "behavior"),
            ("Ingest", serving_pb2.IngestRequest(user_id="a:version", item_id=4, ts=1), "user_id"),
            ("Ingest", serving_pb2.IngestRequest(user_id="g2", item_id=4, ts=-1), "ts"),
            ("Recommend", serving_pb2.RecommendRequest(user_id=huge, candidates=CANDIDATES), "user_id"),
            ("Recommend", serving_pb2.RecommendRequest(history=[1, 2], behaviors=[1, 256], candidates=CANDIDATES),
             "behaviors"),
        ]
        for method, request, field in bad:
            with pytest.raises(grpc.RpcError) as err:
                getattr(stub, method)(request, metadata=meta, timeout=10)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, field, err.value.details()[:200])
            assert field in err.value.details(), err.value.details()[:200]
        # and HTTP says the same about the same ingest
        answer = post(server, "/v1/ingest", {"user_id": "g2", "item_id": 4, "ts": 1, "behavior": 300})
        assert answer.status_code == 422 and "behavior" in answer.json()["error"]
        assert stub.Ingest(serving_pb2.IngestRequest(user_id="g2", item_id=4, ts=1), metadata=meta,
                           timeout=10).history_length == 1
