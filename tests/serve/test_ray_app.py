"""The same Recommend through a local Ray Serve deployment (one replica, no HTTP proxy)."""

from __future__ import annotations

import httpx
import pytest

from tests.serve.conftest import KEYS

CANDIDATES = list(range(1, 51))


def test_ray_serve_answers_like_our_server(rec_bundle, server):
    ray = pytest.importorskip("ray")
    from ray import serve

    from nimbleml.serve.ray_app import build_app
    from nimbleml.serve.schemas import RecommendRequest

    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        serve.start(proxy_location="Disabled")
        handle = serve.run(build_app({"bundle": str(rec_bundle)}), name="nimbleml-test", route_prefix=None)
        answer = handle.recommend.remote(RecommendRequest(history=[5, 6, 7], candidates=CANDIDATES)).result(timeout_s=120)
    finally:
        serve.shutdown()
        ray.shutdown()
    ours = httpx.post(f"{server.url}/v1/recommend", json={"history": [5, 6, 7], "candidates": CANDIDATES},
                      headers={"x-api-key": KEYS["standard"]}).json()
    assert [i.item for i in answer.items] == [i["item"] for i in ours["items"]]
    assert answer.model_version == ours["model_version"]
