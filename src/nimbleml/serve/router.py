"""Worker processes, least-loaded routing, crash restarts, and model versions (grey release).

``WorkerPool`` spawns N worker processes (``serve/worker.py``), each with its own runtime
session, and waits until each has loaded and warmed its bundles before routing to it. Each
batch goes to the live worker with the fewest batches in flight. When a worker dies, every
batch it held is answered with ``WorkerCrashed`` (never silence) and a replacement is started.

``ModelVersions`` holds the stable version and an optional candidate that gets a share of
traffic (grey release); promote and roll back only switch which version new requests pick,
and the old version's sessions are unloaded once its in-flight batches are done, so no
request fails during a swap.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing as mp
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from nimbleml.errors import NimbleError
from nimbleml.serve.worker import worker_main

log = logging.getLogger(__name__)


class WorkerCrashed(Exception):
    """The worker holding this request died, or none is ready: answer 503 and let the client retry."""


class WorkerError(Exception):
    """The worker answered this request with an error (a bug or a bad input that passed validation)."""


@dataclass
class PoolConfig:
    """How many workers, on which runtime, with how many threads each."""

    workers: int = 1  # worker processes; on 2 cores one worker beside the front end keeps both busy
    backend: str = "onnxruntime"  # a file backend of nimbleml.runtime.backends
    threads: int = 1  # intra-op threads per worker session
    warm_batches: tuple[int, ...] = (1, 16)  # dummy batch sizes run at load, before traffic
    start_timeout_s: float = 180.0  # loading + warming one worker, seconds
    ready_wait_s: float = 5.0  # how long a request waits for a ready worker when none is, seconds


class _Worker:
    """One worker process and its two pipes, as seen from the front end."""

    _ids = itertools.count()

    def __init__(self, ctx, config: PoolConfig, bundles: dict[str, str], on_exit: Callable[[_Worker], None]):
        self.index = next(self._ids)
        inbox_r, self.inbox = ctx.Pipe(duplex=False)
        self.outbox, outbox_w = ctx.Pipe(duplex=False)
        self.process = ctx.Process(
            target=worker_main, name=f"nimbleml-worker-{self.index}", daemon=True,
            args=(inbox_r, outbox_w, dict(bundles), config.backend, config.threads, config.warm_batches),
        )
        self.process.start()
        inbox_r.close()  # the child holds these; closing ours makes a dead child read as EOF
        outbox_w.close()
        self.inflight: dict[int, tuple[asyncio.Future, str]] = {}
        self.ready: asyncio.Future = asyncio.get_running_loop().create_future()
        self.alive = True
        self.draining = False
        self._on_exit = on_exit
        asyncio.get_running_loop().add_reader(self.outbox.fileno(), self._readable)

    @property
    def pid(self) -> int | None:
        return self.process.pid

    def _readable(self) -> None:
        try:
            while self.outbox.poll():
                self._handle(self.outbox.recv())
        except (EOFError, OSError):
            self._died("the worker process exited")

    def _handle(self, message: tuple) -> None:
        kind = message[0]
        if kind == "ready":
            if not self.ready.done():
                self.ready.set_result(message[1])
            return
        if kind == "fatal":
            if not self.ready.done():
                self.ready.set_exception(NimbleError(f"worker could not load its models: {message[1]}"))
            return
        entry = self.inflight.pop(message[1], None)
        if entry is None or entry[0].done():
            return
        if kind == "ok":
            entry[0].set_result(message[2])
        else:
            entry[0].set_exception(WorkerError(message[2]))

    def _died(self, why: str) -> None:
        if not self.alive:
            return
        self.alive = False
        asyncio.get_running_loop().remove_reader(self.outbox.fileno())
        error = WorkerCrashed(f"worker {self.index} (pid {self.pid}) died: {why}")
        for future, _ in self.inflight.values():
            if not future.done():
                future.set_exception(error)
        self.inflight.clear()
        if not self.ready.done():
            self.ready.set_exception(error)
        self._on_exit(self)

    def send(self, message: tuple, rid: int, version: str) -> asyncio.Future:
        future = asyncio.get_running_loop().create_future()
        self.inflight[rid] = (future, version)
        try:
            self.inbox.send(message)
        except (BrokenPipeError, OSError):
            self._died("its pipe broke")
        return future

    def stop(self) -> None:
        self.ask_to_stop()
        self.join()

    def ask_to_stop(self) -> None:
        """Stop reading its pipe and tell it to exit; on the event loop's thread."""
        if self.alive:
            self.alive = False
            asyncio.get_running_loop().remove_reader(self.outbox.fileno())
            try:
                self.inbox.send(("stop",))
            except OSError:
                pass

    def join(self) -> None:
        """Wait for the process to exit (killed after 5 s) and close the pipes; blocks, any thread."""
        self.process.join(5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)
        self.inbox.close()
        self.outbox.close()


class WorkerPool:
    """N warmed worker processes; ``run`` routes a batch to the least-loaded one."""

    def __init__(self, config: PoolConfig | None = None, on_restart: Callable[[], None] | None = None):
        self.config = config or PoolConfig()
        self.bundles: dict[str, str] = {}  # version -> bundle folder, loaded in every worker
        self.workers: list[_Worker] = []
        self.restarts = 0
        self._on_restart = on_restart
        self._ctx = mp.get_context("spawn")  # no fork of a process that runs an event loop and threads
        self._rids = itertools.count()
        self._closing = False
        self._tasks: set[asyncio.Task] = set()

    async def start(self, bundles: dict[str, str]) -> None:
        self.bundles = dict(bundles)
        starting = [self._spawn() for _ in range(self.config.workers)]
        try:
            await asyncio.wait_for(asyncio.gather(*(w.ready for w in starting)), self.config.start_timeout_s)
        except BaseException:
            await self.close()
            raise
        log.info("%d workers ready on %s: pids %s", len(starting), self.config.backend, [w.pid for w in starting])

    def _spawn(self) -> _Worker:
        worker = _Worker(self._ctx, self.config, self.bundles, self._exited)
        self.workers.append(worker)
        return worker

    def _exited(self, worker: _Worker) -> None:
        """A worker died: drop it and start a replacement (it joins once warmed)."""
        if worker in self.workers:
            self.workers.remove(worker)
        if self._closing:
            return
        self.restarts += 1
        if self._on_restart is not None:
            self._on_restart()
        log.warning("worker %d (pid %s) died; starting a replacement", worker.index, worker.pid)
        task = asyncio.get_running_loop().create_task(self._replace(worker))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _replace(self, dead: _Worker) -> None:
        await asyncio.get_running_loop().run_in_executor(None, dead.process.join, 5)
        dead.inbox.close()
        dead.outbox.close()
        fresh = self._spawn()
        try:
            await asyncio.wait_for(asyncio.shield(fresh.ready), self.config.start_timeout_s)
        except Exception as exc:  # it died too or timed out: _exited already handles a death
            log.error("replacement worker %d failed to start: %s", fresh.index, exc)

    def ready_workers(self) -> list[_Worker]:
        return [w for w in self.workers if w.alive and not w.draining and w.ready.done() and not w.ready.exception()]

    def inflight(self, version: str | None = None) -> int:
        """Batches in flight, all or of one version."""
        return sum(1 for w in self.workers for _, v in w.inflight.values() if version is None or v == version)

    async def _pick(self) -> _Worker:
        """The ready worker with the fewest batches in flight; waits briefly if none is ready."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.ready_wait_s
        while True:
            ready = self.ready_workers()
            if ready:
                return min(ready, key=lambda w: len(w.inflight))
            if loop.time() > deadline or self._closing:
                raise WorkerCrashed("no worker is ready (restarting after a crash?)")
            await asyncio.sleep(0.01)

    async def run(self, version: str, graph: str, inputs: dict[str, np.ndarray], priority: int = 1) -> np.ndarray:
        """Run one batch; a worker runs its waiting batches lowest ``priority`` first."""
        worker = await self._pick()
        rid = next(self._rids)
        return await worker.send(("run", rid, version, graph, inputs, priority), rid, version)

    async def _broadcast(self, message_of: Callable[[int], tuple], version: str) -> None:
        futures = []
        for worker in self.ready_workers() + [w for w in self.workers if w.draining and w.alive]:
            rid = next(self._rids)
            futures.append(worker.send(message_of(rid), rid, version))
        await asyncio.gather(*futures)

    async def load(self, version: str, folder: str) -> None:
        """Load and warm a bundle in every worker (and in every future replacement)."""
        await self._broadcast(lambda rid: ("load", rid, version, folder), version)
        self.bundles[version] = folder

    async def unload(self, version: str) -> None:
        """Unload once this version's in-flight batches are done (so none of them fails)."""
        self.bundles.pop(version, None)
        while self.inflight(version):
            await asyncio.sleep(0.01)
        await self._broadcast(lambda rid: ("unload", rid, version), version)

    async def drain(self, index: int) -> int:
        """Stop routing to a worker, let its batches finish, then replace it; returns the new worker's index."""
        worker = next((w for w in self.workers if w.index == index), None)
        if worker is None:
            raise NimbleError(f"no worker {index}", fix=f"use one of {[w.index for w in self.workers]}")
        worker.draining = True
        fresh = self._spawn()
        await asyncio.wait_for(asyncio.shield(fresh.ready), self.config.start_timeout_s)
        while worker.inflight:
            await asyncio.sleep(0.01)
        self.workers.remove(worker)
        worker.ask_to_stop()
        await asyncio.get_running_loop().run_in_executor(None, worker.join)
        return fresh.index

    async def close(self) -> None:
        self._closing = True
        for task in list(self._tasks):
            task.cancel()
        workers, self.workers = list(self.workers), []
        for worker in workers:
            worker.stop()


@dataclass
class ModelVersions:
    """The stable version, an optional candidate and the candidate's share of traffic (grey release)."""

    stable: str
    candidate: str | None = None
    share: float = 0.0  # fraction of requests (0..1) the candidate answers
    folders: dict[str, str] = field(default_factory=dict)  # version -> bundle folder
    _rng: random.Random = field(default_factory=lambda: random.Random(0))

    def pick(self) -> str:
        if self.candidate is not None and self._rng.random() < self.share:
            return self.candidate
        return self.stable

    def to_dict(self) -> dict:
        """What callers may see: versions and the share (no folders: paths say too much about the host)."""
        return {"stable": self.stable, "candidate": self.candidate, "candidate_share": self.share}
