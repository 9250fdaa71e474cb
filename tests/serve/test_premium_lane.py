"""`nimbleml serve --premium-port`: a second process for premium callers, at normal CPU priority."""

from __future__ import annotations

import json
import os
import signal
import time

import httpx
import pytest

from nimbleml.cli import main
from nimbleml.serve.loadgen import LoadPlan, http_request, loopback_target, run_load
from tests.serve.conftest import KEYS, child_pids, redis_url, start_server, worker_pids

CANDIDATES = list(range(1, 51))


def test_a_recommender_lane_without_a_shared_store_is_refused(rec_bundle, capsys):
    code = main(["serve", "--model", str(rec_bundle), "--port", "0", "--premium-port", "0"])
    assert code != 0
    assert "--redis" in capsys.readouterr().err


@pytest.fixture(scope="module")
def laned(rec_bundle, tmp_path_factory):
    """One main server with its lane for the module; the last test kills it."""
    url = redis_url()
    folder = tmp_path_factory.mktemp("laned")
    server = start_server(rec_bundle, folder, "--premium-port", "0", "--redis", url)
    lane = json.loads(next(folder.glob("ready-*.json")).read_text())["premium"]
    yield server, f"http://127.0.0.1:{lane}"
    server.stop()


def test_lane_serves_premium_only_and_shares_histories(laned):
    server, lane = laned
    body = {"history": [3, 4, 5], "candidates": CANDIDATES}
    assert httpx.post(f"{lane}/v1/recommend", json=body, headers={"x-api-key": KEYS["premium"]}).status_code == 200
    for tier in ("standard", "free"):
        answer = httpx.post(f"{lane}/v1/recommend", json=body, headers={"x-api-key": KEYS[tier]})
        assert answer.status_code == 403 and "main port" in answer.json()["error"]
    assert httpx.post(f"{lane}/v1/recommend", json=body).status_code == 401
    user = f"lane-{time.monotonic_ns()}"
    for ts, item in enumerate((7, 8, 9), start=1):  # clicks on the main port ...
        ok = httpx.post(f"{server.url}/v1/ingest", json={"user_id": user, "item_id": item, "ts": ts},
                        headers={"x-api-key": KEYS["standard"]})
        assert ok.status_code == 200, ok.text
    # ... are the history a premium Recommend by user_id sees on the lane (the full forward on both)
    by_user = httpx.post(f"{lane}/v1/recommend", json={"user_id": user, "candidates": CANDIDATES},
                         headers={"x-api-key": KEYS["premium"]}).json()
    by_history = httpx.post(f"{server.url}/v1/recommend", json={"history": [7, 8, 9], "candidates": CANDIDATES},
                            headers={"x-api-key": KEYS["premium"]}).json()
    assert [i["item"] for i in by_user["items"]] == [i["item"] for i in by_history["items"]]


def test_main_server_runs_niced_and_the_lane_does_not(laned):
    server, lane = laned
    lane_front = _lane_pid(server)
    lane_worker = worker_pids(lane_front)[0]
    ours = os.getpriority(os.PRIO_PROCESS, os.getpid())
    main_nice = os.getpriority(os.PRIO_PROCESS, server.process.pid)
    assert main_nice == min(19, ours + 10)
    assert all(os.getpriority(os.PRIO_PROCESS, pid) == main_nice for pid in server.worker_pids())
    assert os.getpriority(os.PRIO_PROCESS, lane_front) == os.getpriority(os.PRIO_PROCESS, lane_worker) == ours


def test_admin_model_operations_reach_the_lane(laned, second_bundle):
    server, lane = laned
    admin = {"x-api-key": KEYS["admin"]}
    loaded = httpx.post(f"{server.url}/v1/admin/models", json={"model": str(second_bundle), "share": 0.0},
                        headers=admin, timeout=120)
    assert loaded.status_code == 200, loaded.text
    assert httpx.get(f"{lane}/v1/models", headers=admin).json()["candidate"] == "tiny-v2"
    assert httpx.post(f"{server.url}/v1/admin/promote", headers=admin, timeout=60).status_code == 200
    for url in (server.url, lane):
        assert httpx.get(f"{url}/v1/models", headers=admin).json()["stable"] == "tiny-v2"


def test_load_generator_sends_each_tier_to_its_own_port(laned):
    server, lane = laned
    main_target, lane_target = loopback_target(f"{server.url}/v1/recommend"), loopback_target(f"{lane}/v1/recommend")
    body = json.dumps({"history": [1, 2, 3], "candidates": CANDIDATES}).encode()
    plan = LoadPlan(main_target, 60, 1.5, {"premium": [http_request(lane_target, body, KEYS["premium"])],
                                          "standard": [http_request(main_target, body, KEYS["standard"])]},
                    {"premium": 0.5, "standard": 0.5}, processes=1, timeout_s=10.0, targets={"premium": lane_target})
    summary = run_load(plan).summary()
    assert summary["sent"] == summary["answered"] > 30
    # a standard key sent to the lane would get 403 (an error); 429 (shed by the busy main) is allowed
    assert summary["errors"] == 0, summary
    assert summary["by_tier"]["premium"]["ok"] == summary["by_tier"]["premium"]["sent"] > 0


def test_the_lane_stops_with_its_main_server(laned):
    server, lane = laned
    lane_pid = worker_pids(_lane_pid(server))[0]
    server.process.send_signal(signal.SIGKILL)  # no clean-up in the main: the lane notices it is orphaned
    server.process.wait(10)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            httpx.get(f"{lane}/healthz", timeout=1)
        except httpx.HTTPError:
            break
        time.sleep(0.5)
    else:
        pytest.fail("the premium lane outlived its main server")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and _alive(lane_pid):
        time.sleep(0.5)
    assert not _alive(lane_pid), "the lane's worker outlived it"


def _lane_pid(server) -> int:
    """The lane process: the main server's child started with --lane."""
    return next(pid for pid in child_pids(server.process.pid)
                if b"--lane" in open(f"/proc/{pid}/cmdline", "rb").read())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
