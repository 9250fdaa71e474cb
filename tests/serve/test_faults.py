"""Faults under load: a worker killed, Redis restarted, the model swapped; every request answered."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import threading
import time

import httpx
import numpy as np
import pytest

from nimbleml.serve.loadgen import LoadPlan, http_request, loopback_target, run_load
from tests.serve.conftest import KEYS, start_server

CANDIDATES = list(range(1, 51))


# these tests are about faults, not shedding: on a busy shared machine the standard tier would be
# shed (429) by design, so the servers here shed nothing and give requests a generous deadline
NO_SHEDDING = ("--shed-queue", "100000,100000", "--shed-loop-lag-ms", "100000,100000", "--target-p99-ms", "100000",
               "--deadline-ms", "10000")


def load_in_background(url: str, rps: float, duration_s: float) -> tuple[threading.Thread, dict]:
    """Open-loop Recommend load in a thread; the outcome lands in the returned dict.

    It uses a standard key, so every request goes through the batched lanes (a premium one
    would ride the priority bypass and leave the batcher's slots and queues untested)."""
    target = loopback_target(f"{url}/v1/recommend")
    rng = np.random.default_rng(0)
    bodies = [f'{{"history":{rng.integers(1, 300, 100).tolist()},"candidates":{CANDIDATES}}}'.encode() for _ in range(16)]
    plan = LoadPlan(target, rps, duration_s, {"standard": [http_request(target, b, KEYS["standard"]) for b in bodies]},
                    {"standard": 1.0}, processes=1, timeout_s=20.0)
    out: dict = {}
    thread = threading.Thread(target=lambda: out.update(result=run_load(plan)))
    thread.start()
    return thread, out


def signal_under_load(server, sig: int, rps: float, duration_s: float):
    """Send ``sig`` to the first worker 2 s into ``duration_s`` of load: (the workers before, the load's result)."""
    before = server.worker_pids()
    thread, out = load_in_background(server.url, rps=rps, duration_s=duration_s)
    time.sleep(2.0)
    os.kill(before[0], sig)
    thread.join(90)
    return before, out["result"]


def test_killed_worker_is_restarted_and_every_request_answered(rec_bundle, tmp_path):
    server = start_server(rec_bundle, tmp_path, "--workers", "2", *NO_SHEDDING)
    try:
        before, result = signal_under_load(server, signal.SIGKILL, rps=60, duration_s=5)
        statuses = set(result.status.tolist())
        assert 0 not in statuses, "a request got no answer"
        assert statuses <= {200, 503}, statuses  # in-flight requests of the dead worker: 503, never silence
        assert (result.status == 200).mean() > 0.8
        deadline = time.monotonic() + 60
        while len(server.worker_pids()) < 2 and time.monotonic() < deadline:
            time.sleep(0.5)
        after = server.worker_pids()
        assert len(after) == 2 and before[0] not in after
        models = httpx.get(f"{server.url}/v1/models", headers={"x-api-key": KEYS["standard"]}).json()
        assert models["worker_restarts"] == 1
        assert "nimbleml_worker_restarts_total 1.0" in httpx.get(f"{server.url}/metrics").text
    finally:
        assert server.stop() == 0


def answered_versions(url: str, n: int = 24) -> set[str]:
    """The model versions that answer ``n`` Recommends now."""
    with httpx.Client(base_url=url, headers={"x-api-key": KEYS["standard"]}, timeout=30) as client:
        answers = [client.post("/v1/recommend", json={"history": [1, 2], "candidates": CANDIDATES}) for _ in range(n)]
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers if a.status_code != 200][:3]
    return {a.json()["model_version"] for a in answers}


def test_model_swap_under_load_fails_no_request(rec_bundle, second_bundle, tmp_path):
    server = start_server(rec_bundle, tmp_path, *NO_SHEDDING)
    admin = {"x-api-key": KEYS["admin"]}
    try:
        first = httpx.get(f"{server.url}/v1/models", headers={"x-api-key": KEYS["standard"]}).json()["stable"]
        assert answered_versions(server.url, 4) == {first}
        thread, out = load_in_background(server.url, rps=50, duration_s=6)
        time.sleep(1.0)
        loaded = httpx.post(f"{server.url}/v1/admin/models", json={"model": str(second_bundle), "share": 0.5},
                            headers=admin, timeout=60)
        assert loaded.status_code == 200, loaded.text
        assert loaded.json()["candidate"] == "tiny-v2"
        assert answered_versions(server.url) == {first, "tiny-v2"}  # the share really splits the answers
        assert httpx.post(f"{server.url}/v1/admin/rollback", headers=admin, timeout=60).status_code == 200
        assert answered_versions(server.url) == {first}
        again = httpx.post(f"{server.url}/v1/admin/models", json={"model": str(second_bundle), "share": 0.2},
                           headers=admin, timeout=60)
        assert again.status_code == 200, again.text
        promoted = httpx.post(f"{server.url}/v1/admin/promote", headers=admin, timeout=60)
        assert promoted.status_code == 200 and promoted.json()["stable"] == "tiny-v2"
        assert answered_versions(server.url) == {"tiny-v2"}
        thread.join(60)
        result = out["result"]
        assert (result.status == 200).all(), np.unique(result.status, return_counts=True)
    finally:
        assert server.stop() == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_redis(port: int, folder) -> subprocess.Popen:
    process = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(folder), "--appendonly", "yes",
         "--appendfsync", "always", "--save", ""], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import redis

    client = redis.Redis(port=port, socket_connect_timeout=0.2)
    for _ in range(100):
        try:
            client.ping()
            return process
        except redis.exceptions.ConnectionError:
            time.sleep(0.05)
    process.kill()
    raise RuntimeError("redis-server did not start")


def test_redis_restart_gives_clear_503s_then_recovers_without_losing_acknowledged_clicks(rec_bundle, tmp_path):
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (Debian package redis-server)")
    port = _free_port()
    redis_proc = _start_redis(port, tmp_path)
    server = start_server(rec_bundle, tmp_path, "--redis", f"redis://127.0.0.1:{port}/0", *NO_SHEDDING)
    key = {"x-api-key": KEYS["standard"]}
    acknowledged, refused = [], []
    try:
        with httpx.Client(base_url=server.url, headers=key, timeout=10) as client:
            for i in range(1, 121):
                if i == 40:
                    redis_proc.terminate()  # SIGTERM: redis finishes its append-only file and exits
                    redis_proc.wait(10)
                if i == 80:
                    redis_proc = _start_redis(port, tmp_path)
                answer = client.post("/v1/ingest", json={"user_id": "u1", "item_id": i, "ts": i})
                if answer.status_code == 200:
                    acknowledged.append(i)
                else:
                    assert answer.status_code == 503, answer.text
                    assert "history store" in answer.json()["error"]
                    refused.append(i)
            assert refused and set(range(40, 80)) >= set(refused)  # 503s only while Redis was down
            assert acknowledged[-1] == 120  # and recovery after it came back
            stored = [int(v.split(b":")[0]) for v in reversed(
                __import__("redis").Redis(port=port).lrange("nimbleml:history:e:{u1}", 0, -1))]
            assert stored == acknowledged[-100:]  # every acknowledged click is there, in order
            answer = client.post("/v1/recommend", json={"user_id": "u1", "candidates": CANDIDATES})
            assert answer.status_code == 200
    finally:
        assert server.stop() == 0
        redis_proc.terminate()
        redis_proc.wait(10)


def _stopped(pid: int) -> bool:
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] == "T"
    except OSError:
        return False


def test_a_hung_worker_is_killed_and_the_front_end_never_blocks_on_its_pipe(rec_bundle):
    """SIGSTOP a worker, then send it more than a pipe holds: the loop stays free, the watchdog kills it,
    its batches fail as a crash (503), and a replacement serves."""
    import asyncio

    from nimbleml.serve.router import PoolConfig, WorkerCrashed, WorkerPool

    async def main():
        pool = WorkerPool(PoolConfig(workers=1, batch_timeout_s=1.5, heartbeat_s=0.5))
        await pool.start({"v": str(rec_bundle)})
        try:
            worker = pool.workers[0]
            os.kill(worker.pid, signal.SIGSTOP)
            big = {"history": np.zeros((4096, 100), dtype=np.int64), "candidates": np.ones((4096, 50), dtype=np.int64)}
            started = time.monotonic()
            runs = [asyncio.ensure_future(pool.run("v", "ranker", big, 1)) for _ in range(3)]  # ~15 MB: no pipe holds it
            await asyncio.sleep(0.05)
            ticks = time.monotonic()
            await asyncio.sleep(0.01)
            assert time.monotonic() - ticks < 0.5, "the event loop is blocked on the pipe"
            assert len(worker._pending) > 0  # the rest waits in the buffer, not in a blocked write
            results = await asyncio.wait_for(asyncio.gather(*runs, return_exceptions=True), 30)
            assert all(isinstance(r, WorkerCrashed) and "hung" in str(r) for r in results), results
            assert time.monotonic() - started < 15
            assert pool.hung == 1 and pool.restarts == 1
            deadline = time.monotonic() + 60
            while not pool.ready_workers() and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            out, live = await pool.run("v", "ranker", {"history": np.zeros((1, 100), dtype=np.int64),
                                                      "candidates": np.arange(1, 51).reshape(1, 50)}, 1)
            assert out.shape[0] == 1 and live is None
            assert not worker.process.is_alive()
        finally:
            await pool.close()

    asyncio.run(main())


def test_sigstopped_worker_under_load_answers_503_then_recovers(rec_bundle, tmp_path):
    server = start_server(rec_bundle, tmp_path, "--batch-timeout-s", "1", *NO_SHEDDING)
    try:
        before, result = signal_under_load(server, signal.SIGSTOP, rps=30, duration_s=8)
        statuses = result.status
        assert set(statuses.tolist()) <= {200, 503}, np.unique(statuses, return_counts=True)
        assert (statuses == 503).any() and (statuses[-20:] == 200).all()  # the replacement serves the tail
        after = server.worker_pids()
        assert len(after) == 1 and after != before and not _stopped(before[0])
        assert "nimbleml_worker_restarts_total 1.0" in httpx.get(f"{server.url}/metrics").text
    finally:
        for pid in server.worker_pids():
            os.kill(pid, signal.SIGCONT)
        assert server.stop() == 0


def test_admin_calls_time_out_release_their_lock_and_a_failed_drain_restores_the_worker(rec_bundle, second_bundle,
                                                                                        tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(rec_bundle, bundle)
    server = start_server(bundle, tmp_path, "--admin-timeout-s", "3", "--batch-timeout-s", "600", *NO_SHEDDING)
    admin = {"x-api-key": KEYS["admin"]}
    body = {"history": [1, 2], "candidates": CANDIDATES}
    try:
        (pid,) = server.worker_pids()
        os.kill(pid, signal.SIGSTOP)
        started = time.monotonic()
        loaded = httpx.post(f"{server.url}/v1/admin/models", json={"model": str(second_bundle), "share": 0.5},
                            headers=admin, timeout=60)
        assert loaded.status_code == 503 and "did not answer within 3" in loaded.text, loaded.text
        assert time.monotonic() - started < 20
        os.kill(pid, signal.SIGCONT)
        # the lock is free again: the next admin call is answered at once (nothing to roll back)
        assert httpx.post(f"{server.url}/v1/admin/rollback", headers=admin, timeout=10).status_code == 409
        # a drain whose replacement cannot start (its bundle's graphs are gone) gives the old worker back
        for graph in bundle.glob("*.onnx"):
            graph.rename(graph.with_suffix(".gone"))
        workers = httpx.get(f"{server.url}/v1/models", headers=admin).json()["workers"]
        drained = httpx.post(f"{server.url}/v1/admin/drain", json={"worker": workers[0]["index"]}, headers=admin,
                             timeout=60)
        assert drained.status_code == 503 and "serves again" in drained.text, drained.text
        after = httpx.get(f"{server.url}/v1/models", headers=admin).json()["workers"]
        assert [(w["index"], w["ready"]) for w in after] == [(workers[0]["index"], True)]
        assert server.worker_pids() == [pid]
        answer = httpx.post(f"{server.url}/v1/recommend", json=body, headers={"x-api-key": KEYS["standard"]})
        assert answer.status_code == 200, answer.text
    finally:
        for pid in server.worker_pids():
            os.kill(pid, signal.SIGCONT)
        assert server.stop() == 0
