"""A tiny recommender, its serving bundle, and a real `nimbleml serve` process on a loopback port."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

N_ITEMS = 300
KEYS = {"free": "k-free", "standard": "k-standard", "premium": "k-premium", "admin": "k-admin"}
KEYS_ENV = "k-free=free,k-standard=standard,k-premium=premium,k-admin=premium:admin"


@pytest.fixture(scope="session")
def rec_model(tmp_path_factory) -> Path:
    """An untrained (seeded) SeqRec with the serving contract's 100-event window."""
    import torch

    from nimbleml.rec.model import SeqRec, SeqRecConfig
    from nimbleml.rec.train import save_checkpoint

    torch.manual_seed(0)
    model = SeqRec(SeqRecConfig.small(N_ITEMS, max_len=100, exclude_history=True)).eval()
    return save_checkpoint(model, {"note": "test model"}, tmp_path_factory.mktemp("rec") / "tiny")


@pytest.fixture(scope="session")
def rec_bundle(rec_model: Path) -> Path:
    from nimbleml.rec.serving import prepare_bundle

    return prepare_bundle(rec_model)


@pytest.fixture(scope="session")
def second_bundle(rec_bundle: Path, tmp_path_factory) -> Path:
    """The same graphs under another version name: a model to swap in."""
    folder = tmp_path_factory.mktemp("rec2") / "bundle"
    shutil.copytree(rec_bundle, folder)
    manifest = json.loads((folder / "serving.json").read_text())
    manifest["version"] = "tiny-v2"
    (folder / "serving.json").write_text(json.dumps(manifest))
    return folder


@dataclass
class Server:
    process: subprocess.Popen
    http: int
    grpc: int | None
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http}"

    def worker_pids(self) -> list[int]:
        """The worker processes' pids, from /proc (the API shows no pids)."""
        return worker_pids(self.process.pid)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        return self.process.returncode


def child_pids(pid: int) -> list[int]:
    children = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        children += [int(c) for c in task.read_text().split()]
    return children


def worker_pids(pid: int) -> list[int]:
    """The serving workers among a server process's children (spawned, not the resource tracker)."""
    found = []
    for child in child_pids(pid):
        try:
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
        except OSError:  # exited meanwhile
            continue
        if b"spawn_main" in cmdline:
            found.append(child)
    return sorted(found)


def start_server(model: Path, tmp: Path, *args: str, keys: bool = True, timeout_s: float = 120) -> Server:
    """`nimbleml serve` on random loopback ports; waits until it serves."""
    ready = tmp / f"ready-{time.monotonic_ns()}.json"
    log = ready.with_suffix(".log")
    env = {**os.environ, "NIMBLEML_PROGRESS": "0"}
    env.pop("NIMBLEML_API_KEYS", None)
    if keys:
        env["NIMBLEML_API_KEYS"] = KEYS_ENV
    cmd = [sys.executable, "-m", "nimbleml.cli", "serve", "--model", str(model), "--port", "0",
           "--ready-file", str(ready), "--frontends", "1", "--workers", "1", *args]
    process = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + timeout_s
    while not ready.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"server did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)
    info = json.loads(ready.read_text())
    return Server(process, info["http"], info["grpc"], log)


@pytest.fixture(scope="session")
def server(rec_bundle: Path, tmp_path_factory) -> Iterator[Server]:
    srv = start_server(rec_bundle, tmp_path_factory.mktemp("srv"), "--grpc-port", "0")
    yield srv
    assert srv.stop() == 0, srv.log.read_text()[-3000:]


def redis_url() -> str:
    """The test Redis from NIMBLEML_TEST_REDIS; skip when unset or unreachable."""
    url = os.environ.get("NIMBLEML_TEST_REDIS")
    if not url:
        pytest.skip("NIMBLEML_TEST_REDIS is not set: no Redis server for this test")
    import redis

    try:
        redis.Redis.from_url(url, socket_connect_timeout=0.5).ping()
    except redis.exceptions.RedisError as exc:
        pytest.skip(f"Redis at {url} is unreachable: {exc}")
    return url
