"""Several front ends on one port (``serve/frontends.py``): each runs its model in process, they
share the rate buckets, repeat admin calls on each other, and a dead or hung one is replaced."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import httpx
import pytest

from nimbleml.serve.frontends import default_frontends
from tests.serve.conftest import KEYS, start_server, worker_pids
from tests.serve.test_faults import NO_SHEDDING, _free_port, _start_redis

BODY = {"history": list(range(1, 101)), "candidates": list(range(1, 51))}


def test_default_is_one_per_core_only_where_the_front_ends_can_share_state():
    cores = len(os.sched_getaffinity(0))
    assert default_frontends(None, "recommend") == 1  # the in-process history store is one per process
    assert default_frontends("redis://127.0.0.1:6379/0", "recommend") == cores
    assert default_frontends(None, "risk") == cores


@pytest.mark.parametrize("extra, words", [((), "--redis"), (("--workers", "2", "--redis", "redis://127.0.0.1:1/0"),
                                                            "--workers")])
def test_several_front_ends_refuse_what_they_cannot_do(rec_bundle, extra, words):
    done = subprocess.run([sys.executable, "-m", "nimbleml.cli", "serve", "--model", str(rec_bundle), "--port", "0",
                           "--frontends", "2", *extra], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and words in done.stderr, done.stderr[-2000:]


def _fresh(url: str, path: str, headers: dict, n: int = 12) -> list[httpx.Response]:
    """``n`` GETs, each on a new connection (the kernel spreads connections over the front ends)."""
    out = []
    for _ in range(n):
        with httpx.Client(base_url=url, headers=headers, timeout=30) as client:
            out.append(client.get(path))
    return out


def _metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    values = [float(line.split()[-1]) for line in text.splitlines() if line.startswith(name)]
    return sum(values)


def _wait_for(check, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def test_front_ends_answer_repeat_admin_calls_and_are_replaced(rec_bundle, second_bundle, tmp_path):
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (Debian package redis-server)")
    port = _free_port()
    redis_proc = _start_redis(port, tmp_path)
    server = start_server(rec_bundle, tmp_path, "--frontends", "2", "--workers", "0", "--batch-timeout-s", "2",
                          "--redis", f"redis://127.0.0.1:{port}/0", *NO_SHEDDING)
    standard, admin = {"x-api-key": KEYS["standard"]}, {"x-api-key": KEYS["admin"]}
    try:
        frontends = worker_pids(server.process.pid)
        assert len(frontends) == 2
        for _ in range(8):
            with httpx.Client(base_url=server.url, headers=standard, timeout=30) as client:
                assert client.post("/v1/recommend", json=BODY).status_code == 200
        _wait_for(lambda: _metric(server.url, "nimbleml_workers_ready") == 2)  # summed over both processes
        assert _metric(server.url, 'nimbleml_requests_total{route="recommend",status="200"') == 8

        loaded = httpx.post(f"{server.url}/v1/admin/models", headers=admin, timeout=120,
                            json={"model": str(second_bundle), "share": 0.5})
        assert loaded.status_code == 200, loaded.text
        assert {r.json()["candidate"] for r in _fresh(server.url, "/v1/models", standard)} == {"tiny-v2"}

        os.kill(frontends[0], signal.SIGKILL)  # a dead front end is replaced, with the versions its siblings serve
        _wait_for(lambda: len(set(worker_pids(server.process.pid)) - set(frontends)) == 1)
        _wait_for(lambda: _metric(server.url, "nimbleml_workers_ready") == 2)
        assert {r.json()["candidate"] for r in _fresh(server.url, "/v1/models", standard)} == {"tiny-v2"}
        assert _metric(server.url, "nimbleml_worker_restarts_total") == 1

        stopped = frontends[1]
        os.kill(stopped, signal.SIGSTOP)  # a hung one stops its heartbeat: killed and replaced
        _wait_for(lambda: stopped not in worker_pids(server.process.pid))
        _wait_for(lambda: len(worker_pids(server.process.pid)) == 2)
        _wait_for(lambda: _metric(server.url, "nimbleml_workers_ready") == 2)
        assert all(r.status_code == 200 for r in _fresh(server.url, "/v1/models", standard))
    finally:
        assert server.stop() == 0, server.log.read_text()[-3000:]
        redis_proc.kill()
        redis_proc.wait(10)
    assert worker_pids(server.process.pid) == []
