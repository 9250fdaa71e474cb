"""Several front-end processes on one port, each batching and running its model in process.

One front end is one event loop on one core: past ~1 core of HTTP, JSON and batching work it
is the ceiling, however many worker processes stand behind it, and every batch to a worker is
pickled through a pipe and back. Here ``--frontends N`` starts N processes (default: one per
core where they can share the state that matters, see ``default_frontends``), each with:

- its own listening socket on the same port (``SO_REUSEPORT``: the kernel spreads new
  connections over them) and its own gRPC listener on the gRPC port (gRPC sets it too);
- its own dynamic batcher and runtime sessions (``InProcessPool``, one intra-op thread, on a
  model thread beside the event loop): a request never leaves the process that parsed it;
- a private loopback port that its siblings repeat admin model operations on.

What is per process and how it stays right across them:

- **Rate limits**: the tier and key buckets live in shared memory (``SharedBuckets``), so a
  key's rate is the server's whatever process its connections land on. The shedder is per
  process (its queue and its loop are).
- **History**: the in-process store would be one per process, so a recommender needs
  ``--redis`` for more than one front end (the default is then one per core, else one). The
  user-state cache is per process (a cache: a miss costs a full forward, never a wrong answer).
- **Admin model operations** (load, share, promote, roll back) are repeated on every sibling
  (and the premium lane) before the call is answered; the forwarded calls carry a per-run
  token so they are not repeated again. The versions are written to ``versions.json`` so that a
  restarted front end serves what its siblings serve. ``drain`` has no workers to drain.
- **Metrics**: prometheus_client's multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``, set here
  for the children): any front end's ``/metrics`` shows the sum over all of them (gauges: the
  live ones' sum, the loop lag their maximum).
- **Watchdog**: a batch that runs past ``--batch-timeout-s`` is answered 503 and its front end
  stops itself (``InProcessPool``); the supervisor (this parent process) restarts a front end
  that exits, and kills and restarts one whose heartbeat (a time stamp its event loop writes to
  shared memory every 0.25 s) is older than ``--batch-timeout-s`` (a stopped or deadlocked
  process: the requests it held get a dropped connection, nobody else holds them). A restart
  counts in ``nimbleml_worker_restarts_total``.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import os
import secrets
import shutil
import signal
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from nimbleml.errors import NimbleError

log = logging.getLogger(__name__)

HEARTBEAT_S = 0.25  # how often a front end stamps its heartbeat, seconds
METRICS_ENV = "PROMETHEUS_MULTIPROC_DIR"


def default_frontends(redis: str | None, operation: str) -> int:
    """One per core where the front ends can share users' histories (Redis) or need none (risk); else one."""
    if redis is None and operation == "recommend":
        return 1
    return len(os.sched_getaffinity(0))


@dataclass
class Shared:
    """What the supervisor hands every front end."""

    folder: Path  # ready files, peers.json, versions.json, metrics
    port: int  # the HTTP port they all listen on
    grpc_port: int | None
    token: str  # marks admin calls repeated from a sibling
    buckets: object  # limiter.SharedBuckets
    beats: object  # RawArray('d'): each front end's last heartbeat, time.monotonic() seconds

    def ready_file(self, index: int) -> Path:
        return self.folder / f"ready-{index}.json"

    @property
    def peers_file(self) -> Path:
        return self.folder / "peers.json"

    @property
    def versions_file(self) -> Path:
        return self.folder / "versions.json"


def _reserve(host: str, port: int) -> socket.socket:
    """Bind (without listening) to hold the port for the front ends, which bind it with SO_REUSEPORT too."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


def frontend_main(args: argparse.Namespace, index: int, shared: Shared, restarted: bool) -> None:
    """Entry point of one front-end process (spawned)."""
    from nimbleml.commands.serve import build_service
    from nimbleml.logs import configure_logging
    from nimbleml.serve.server import ListenConfig, run

    configure_logging(getattr(args, "verbose", 0))
    beats = shared.beats

    def beat() -> None:
        beats[index] = time.monotonic()

    saved = json.loads(shared.versions_file.read_text()) if shared.versions_file.is_file() else None
    if saved is not None:  # a restart after admin calls: serve what the siblings serve
        args.model = Path(saved["stable"])
    service = build_service(args, shared=shared)
    if restarted:
        service.metrics.worker_restarts.inc()
    run(service, ListenConfig(host=args.host, port=shared.port, grpc_port=shared.grpc_port, http=args.http,
                              ready_file=shared.ready_file(index), reuse_port=True, peer_listener=True,
                              heartbeat=beat, restore=saved))


class Supervisor:
    """Start the front ends, tell each its siblings, restart the ones that die or hang."""

    def __init__(self, args: argparse.Namespace, count: int, hung_after_s: float, ready_timeout_s: float = 300.0):
        from nimbleml.serve.keys import load_keyring
        from nimbleml.serve.limiter import SharedBuckets, default_tiers

        self.args, self.count, self.hung_after_s, self.ready_timeout_s = args, count, hung_after_s, ready_timeout_s
        self.ctx = mp.get_context("spawn")
        folder = Path(tempfile.mkdtemp(prefix="nimbleml-frontends-"))
        (folder / "metrics").mkdir()
        os.environ[METRICS_ENV] = str(folder / "metrics")  # the children's prometheus_client reads it at import
        tiers = default_tiers()
        callers = load_keyring(args.keys, set(tiers)).callers()
        self._held = [_reserve(args.host, args.port)]
        port = self._held[0].getsockname()[1]
        grpc_port = None
        if args.grpc_port is not None:
            self._held.append(_reserve(args.host, args.grpc_port))
            grpc_port = self._held[1].getsockname()[1]
        self.shared = Shared(folder, port, grpc_port, secrets.token_hex(16),
                             SharedBuckets(tiers, [(c.tier, c.key_id) for c in callers], self.ctx),
                             self.ctx.RawArray("d", count))
        self.processes: list[mp.process.BaseProcess | None] = [None] * count
        self.restarts = 0
        self._stopping = False

    def _start(self, index: int, restarted: bool = False) -> None:
        self.shared.ready_file(index).unlink(missing_ok=True)
        self.shared.beats[index] = time.monotonic() + self.ready_timeout_s  # no hang check while it loads
        process = self.ctx.Process(target=frontend_main, name=f"nimbleml-frontend-{index}", daemon=False,
                                   args=(self.args, index, self.shared, restarted))
        process.start()
        self.processes[index] = process

    def _ready(self, index: int) -> dict | None:
        path = self.shared.ready_file(index)
        return json.loads(path.read_text()) if path.is_file() else None

    def _write_peers(self) -> None:
        peers = [ready["peer"] for i in range(self.count) if (ready := self._ready(i))]
        partial = self.shared.peers_file.with_suffix(".partial")
        partial.write_text(json.dumps(peers))
        partial.replace(self.shared.peers_file)

    def start(self) -> None:
        for index in range(self.count):
            self._start(index)
        deadline = time.monotonic() + self.ready_timeout_s
        while not all(self._ready(i) for i in range(self.count)):
            for index, process in enumerate(self.processes):
                if process is not None and not process.is_alive():
                    self.stop()
                    raise NimbleError(f"front end {index} exited with status {process.exitcode} before serving",
                                      fix="see its log lines above")
            if time.monotonic() > deadline:
                self.stop()
                raise NimbleError(f"the front ends did not start within {self.ready_timeout_s:g} s",
                                  fix="check the machine's load")
            time.sleep(0.05)
        self._write_peers()
        log.info("%d front ends on port %d (pids %s), each running its model in process", self.count,
                 self.shared.port, [p.pid for p in self.processes if p])

    def check(self) -> None:
        """Restart each front end that exited or whose heartbeat stopped."""
        from prometheus_client import multiprocess

        now = time.monotonic()
        for index, process in enumerate(self.processes):
            if process is None or self._stopping:
                continue
            why = None
            if not process.is_alive():
                why = f"exited with status {process.exitcode}"
            elif now - self.shared.beats[index] > self.hung_after_s:
                why = f"no heartbeat for {now - self.shared.beats[index]:.1f} s: killed"
                process.kill()
                process.join(5)
            if why is None:
                continue
            log.error("front end %d (pid %s) %s; starting a replacement", index, process.pid, why)
            multiprocess.mark_process_dead(process.pid)
            self.restarts += 1
            self._start(index, restarted=True)
        if all(self._ready(i) for i in range(self.count)):
            self._write_peers()

    def stop(self, wait_s: float = 30.0) -> None:
        self._stopping = True
        for process in self.processes:
            if process is not None and process.is_alive():
                os.kill(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + wait_s
        for process in self.processes:
            if process is not None:
                process.join(max(0.0, deadline - time.monotonic()))
                if process.is_alive():
                    process.kill()
                    process.join(5)
        for sock in self._held:
            sock.close()
        shutil.rmtree(self.shared.folder, ignore_errors=True)

    def serve_forever(self, ready_file: Path | None, extra: dict) -> None:
        """Until SIGINT/SIGTERM: write the ready file, watch the front ends, then stop them."""
        stop = []
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.append(True))
        try:
            self.start()
            if ready_file is not None:
                partial = ready_file.with_name(ready_file.name + ".partial")
                partial.write_text(json.dumps({"http": self.shared.port, "grpc": self.shared.grpc_port,
                                               "pid": os.getpid(), **extra}))
                partial.replace(ready_file)
            while not stop:
                time.sleep(HEARTBEAT_S)
                self.check()
        finally:
            self.stop()
