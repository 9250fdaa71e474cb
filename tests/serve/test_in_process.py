"""The model in the front end's own process (``--workers 0``, ``InProcessPool``): the same
answers as a worker process, a hung model answered 503 and the process stopped, no drain."""

from __future__ import annotations

import asyncio
import signal
import time

import numpy as np
import pytest

import nimbleml.serve.router as router
from nimbleml.errors import NimbleError
from nimbleml.serve.router import InProcessPool, PoolConfig, WorkerCrashed, WorkerError
from tests.serve.conftest import KEYS, start_server

BODY = {"history": [5, 6, 7, 40, 41], "candidates": list(range(1, 51))}


def test_in_process_answers_as_the_worker_process_does(rec_bundle, server, tmp_path):
    import httpx

    key = {"x-api-key": KEYS["standard"]}
    local = start_server(rec_bundle, tmp_path, "--workers", "0")
    try:
        ours = httpx.post(f"{local.url}/v1/recommend", json=BODY, headers=key, timeout=30)
        theirs = httpx.post(f"{server.url}/v1/recommend", json=BODY, headers=key, timeout=30)
        assert ours.status_code == theirs.status_code == 200, ours.text
        assert ours.json()["items"] == theirs.json()["items"]
        assert local.worker_pids() == []  # no worker process
    finally:
        assert local.stop() == 0


def test_a_hung_model_is_answered_503_and_stops_the_process(rec_bundle, monkeypatch):
    killed = []
    monkeypatch.setattr(router.os, "kill", lambda pid, sig: killed.append(sig))
    monkeypatch.setattr(router, "run_in_time", lambda *args: time.sleep(1.0))

    async def main() -> None:
        pool = InProcessPool(PoolConfig(workers=0, batch_timeout_s=0.2, warm_batches=(1,)))
        await pool.start({"v1": str(rec_bundle)})
        assert pool.ready_count() == 1
        with pytest.raises(WorkerCrashed, match="did not answer within 0.2 s"):
            await pool.run("v1", "ranker", {"history": np.zeros((1, 100), dtype=np.int64)})
        assert killed == [signal.SIGTERM] and pool.ready_count() == 0  # not ready while it stops
        with pytest.raises(WorkerError, match="not loaded"):
            await pool.run("v2", "ranker", {})
        with pytest.raises(NimbleError, match="no worker processes"):
            await pool.drain(0)

    asyncio.run(main())


def test_waiting_batches_run_premium_first(rec_bundle, monkeypatch):
    """The model thread takes the lowest priority number first: a premium batch waits for the
    running batch only, not for the bulk batches queued before it."""
    import threading

    ran, started, release = [], threading.Event(), threading.Event()

    def record(bundle, graph, inputs, deadlines):
        if graph == "running":
            started.set()
            release.wait(10)
        ran.append(graph)
        return np.zeros(1, dtype=np.float32), None

    monkeypatch.setattr(router, "run_in_time", record)

    async def main() -> None:
        pool = InProcessPool(PoolConfig(workers=0, warm_batches=(1,)))
        await pool.start({"v1": str(rec_bundle)})
        runs = [asyncio.ensure_future(pool.run("v1", "running", {}, 1))]
        while not started.is_set():
            await asyncio.sleep(0.01)
        runs += [asyncio.ensure_future(pool.run("v1", name, {}, priority))
                 for name, priority in (("bulk-1", 1), ("bulk-2", 2), ("premium", 0))]
        await asyncio.sleep(0.1)  # the three wait behind the running one
        release.set()
        await asyncio.gather(*runs)

    asyncio.run(main())
    assert ran == ["running", "premium", "bulk-1", "bulk-2"]
