"""Worker processes, least-loaded routing, crash restarts, and model versions (grey release).

``WorkerPool`` spawns N worker processes (``serve/worker.py``), each with its own runtime
session, and waits until each has loaded and warmed its bundles before routing to it. Each
batch goes to the live worker with the fewest batches in flight. When a worker dies, every
batch it held is answered with ``WorkerCrashed`` (never silence) and a replacement is started.

A worker that hangs (stopped, deadlocked) is found by a watchdog: an idle worker is pinged
every ``heartbeat_s``, and one that leaves a batch or a ping unanswered for ``batch_timeout_s``
is killed and handled like a crash (its requests answered 503, a replacement started). The
front end writes to a worker's pipe without ever blocking: messages wait in a buffer of its
own while the pipe is full, and a worker whose buffer passes ``max_buffered_bytes`` counts as
hung. Admin broadcasts (load, unload) and drains give up after ``admin_timeout_s``.

``InProcessPool`` has the same face with no worker process: the front end runs each batch on
its own runtime sessions, in its own thread (``--workers 0``). That is what several front
ends on one port use (``serve/frontends.py``): no pickling, no pipe, no second process on the
hot path; a hung model stalls its whole front end, which the front ends' supervisor finds by
its heartbeat and replaces.

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
import os
import queue
import random
import signal
import struct
import threading
import time
from multiprocessing.reduction import ForkingPickler
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from nimbleml.errors import NimbleError
from nimbleml.serve.worker import LoadedBundle, run_in_time, worker_main

log = logging.getLogger(__name__)


class WorkerCrashed(Exception):
    """The worker holding this request died, or none is ready: answer 503 and let the client retry."""


class WorkerError(Exception):
    """The worker answered this request with an error (a bug or a bad input that passed validation)."""


@dataclass
class PoolConfig:
    """How many workers, on which runtime, with how many threads each."""

    workers: int = 1  # worker processes; 0 = none, the front end runs the model itself (InProcessPool)
    backend: str = "onnxruntime"  # a file backend of nimbleml.runtime.backends
    threads: int = 1  # intra-op threads per worker session
    warm_batches: tuple[int, ...] = (1, 16)  # dummy batch sizes run at load, before traffic
    start_timeout_s: float = 180.0  # loading + warming one worker, seconds
    ready_wait_s: float = 5.0  # how long a request waits for a ready worker when none is, seconds
    batch_timeout_s: float = 5.0  # a batch or ping unanswered this long: the worker is hung, killed, replaced
    heartbeat_s: float = 1.0  # an idle worker is pinged this often, seconds
    admin_timeout_s: float = 300.0  # a load/unload broadcast or a drain gives up after this, seconds
    max_buffered_bytes: int = 64 << 20  # unsent bytes to one worker past which it counts as hung


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
        os.set_blocking(self.inbox.fileno(), False)  # a full pipe buffers in _pending, never blocks the loop
        self._pending = bytearray()
        self._writing = False
        self.max_buffered_bytes = config.max_buffered_bytes
        # rid -> (future, version, sent at (monotonic s) or None for messages the watchdog does not time)
        self.inflight: dict[int, tuple[asyncio.Future, str, float | None]] = {}
        self.last_heard = time.monotonic()
        self.ready: asyncio.Future = asyncio.get_running_loop().create_future()
        self.alive = True
        self.draining = False
        self.replaceable = True  # False for a drain's replacement until it is ready: its failure is the drain's
        self._on_exit = on_exit
        asyncio.get_running_loop().add_reader(self.outbox.fileno(), self._readable)

    @property
    def pid(self) -> int | None:
        return self.process.pid

    def _readable(self) -> None:
        try:
            while self.outbox.poll():
                self.last_heard = time.monotonic()
                self._handle(self.outbox.recv())
        except (EOFError, OSError):
            self._died("the worker process exited")

    def oldest_timed(self) -> float | None:
        """When the oldest timed message (a batch, a ping) still unanswered was sent (monotonic s)."""
        sent = [entry[2] for entry in self.inflight.values() if entry[2] is not None]
        return min(sent) if sent else None

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
        loop = asyncio.get_running_loop()
        loop.remove_reader(self.outbox.fileno())
        if self._writing:
            loop.remove_writer(self.inbox.fileno())
            self._writing = False
        error = WorkerCrashed(f"worker {self.index} (pid {self.pid}) died: {why}")
        for future, *_ in self.inflight.values():
            if not future.done():
                future.set_exception(error)
        self.inflight.clear()
        if not self.ready.done():
            self.ready.set_exception(error)
        self._on_exit(self)

    def send(self, message: tuple, rid: int, version: str, timed: bool = True) -> asyncio.Future:
        """Send a message that the worker answers; timed: the watchdog counts its wait (batches, pings)."""
        future = asyncio.get_running_loop().create_future()
        self.inflight[rid] = (future, version, time.monotonic() if timed else None)
        self._write(message)
        return future

    def _write(self, message: tuple) -> None:
        """Frame as ``Connection.send`` does (the worker reads with ``recv``) and write without blocking."""
        payload = ForkingPickler.dumps(message)
        self._pending += struct.pack("!i", len(payload)) + payload
        if len(self._pending) > self.max_buffered_bytes:
            self.kill(f"{len(self._pending)} bytes wait for its pipe: it stopped reading")
            return
        self._flush()

    def _flush(self) -> None:
        try:
            while self._pending:
                written = os.write(self.inbox.fileno(), self._pending)
                del self._pending[:written]
        except BlockingIOError:
            if not self._writing:  # the pipe is full: write the rest when it drains
                asyncio.get_running_loop().add_writer(self.inbox.fileno(), self._flush)
                self._writing = True
            return
        except OSError:
            self._died("its pipe broke")
            return
        if self._writing:
            asyncio.get_running_loop().remove_writer(self.inbox.fileno())
            self._writing = False

    def kill(self, why: str) -> None:
        """Kill a hung worker (SIGKILL ends a stopped process too) and answer its requests as a crash."""
        log.error("worker %d (pid %s) is hung (%s): killing it", self.index, self.pid, why)
        if self.process.is_alive():
            self.process.kill()
        self._died(f"hung ({why}); killed")

    def stop(self) -> None:
        self.ask_to_stop()
        self.join()

    def ask_to_stop(self) -> None:
        """Stop reading its pipe and tell it to exit; on the event loop's thread."""
        if self.alive:
            self._write(("stop",))  # after whatever still waits in the buffer
            self.alive = False
            loop = asyncio.get_running_loop()
            loop.remove_reader(self.outbox.fileno())
            if self._writing:  # the pipe stays full: the stop cannot get through, join() kills it
                loop.remove_writer(self.inbox.fileno())
                self._writing = False

    def join(self, wait_s: float = 5.0) -> None:
        """Wait for the process to exit (killed after ``wait_s``) and close the pipes; blocks, any thread."""
        self.process.join(wait_s)
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
        self.hung = 0  # workers killed by the watchdog

    async def start(self, bundles: dict[str, str]) -> None:
        self.bundles = dict(bundles)
        starting = [self._spawn() for _ in range(self.config.workers)]
        try:
            await asyncio.wait_for(asyncio.gather(*(w.ready for w in starting)), self.config.start_timeout_s)
        except BaseException:
            await self.close()
            raise
        watchdog = asyncio.get_running_loop().create_task(self._watch())
        self._tasks.add(watchdog)
        watchdog.add_done_callback(self._tasks.discard)
        log.info("%d workers ready on %s: pids %s", len(starting), self.config.backend, [w.pid for w in starting])

    def _spawn(self) -> _Worker:
        worker = _Worker(self._ctx, self.config, self.bundles, self._exited)
        self.workers.append(worker)
        return worker

    def _exited(self, worker: _Worker) -> None:
        """A worker died: drop it and start a replacement (it joins once warmed)."""
        if worker in self.workers:
            self.workers.remove(worker)
        if self._closing or not worker.replaceable:
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

    async def _watch(self) -> None:
        """Ping idle workers; kill one that leaves a batch or a ping unanswered past ``batch_timeout_s``."""
        cfg = self.config
        period = min(cfg.heartbeat_s, cfg.batch_timeout_s) / 4
        while not self._closing:
            await asyncio.sleep(period)
            now = time.monotonic()
            for worker in list(self.workers):
                if not worker.alive or not worker.ready.done() or worker.ready.exception():
                    continue
                oldest = worker.oldest_timed()
                if oldest is not None and now - oldest > cfg.batch_timeout_s:
                    self.hung += 1
                    worker.kill(f"no answer for {now - oldest:.1f} s")
                elif oldest is None and now - worker.last_heard > cfg.heartbeat_s:
                    rid = next(self._rids)
                    worker.send(("ping", rid), rid, "")

    def ready_workers(self) -> list[_Worker]:
        return [w for w in self.workers if w.alive and not w.draining and w.ready.done() and not w.ready.exception()]

    def ready_count(self) -> int:
        """Model runners ready for traffic (the workers_ready metric; 0 means nothing can be answered)."""
        return len(self.ready_workers())

    def inflight(self, version: str | None = None) -> int:
        """Batches in flight, all or of one version."""
        return sum(1 for w in self.workers for _, v, sent in w.inflight.values()
                   if (version is None or v == version) and v)

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

    async def run(self, version: str, graph: str, inputs: dict[str, np.ndarray], priority: int = 1,
                  deadlines: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """Run one batch; a worker runs its waiting batches lowest ``priority`` first.

        deadlines: (batch,) ``time.monotonic()`` seconds (one clock for every process of the
        machine); the worker skips rows already past theirs. Returns the outputs of the rows it
        ran and which rows those are ((batch,) bool, or None when it ran all)."""
        worker = await self._pick()
        rid = next(self._rids)
        return await worker.send(("run", rid, version, graph, inputs, priority, deadlines), rid, version)

    async def _broadcast(self, message_of: Callable[[int], tuple], version: str, what: str) -> None:
        """Send to every live worker and wait for all answers, at most ``admin_timeout_s``."""
        futures = []
        for worker in self.ready_workers() + [w for w in self.workers if w.draining and w.alive]:
            rid = next(self._rids)
            futures.append(worker.send(message_of(rid), rid, version, timed=False))
        try:
            await asyncio.wait_for(asyncio.gather(*futures), self.config.admin_timeout_s)
        except asyncio.TimeoutError as exc:
            raise WorkerCrashed(f"{what}: a worker did not answer within {self.config.admin_timeout_s:g} s") from exc

    async def load(self, version: str, folder: str) -> None:
        """Load and warm a bundle in every worker (and in every future replacement)."""
        await self._broadcast(lambda rid: ("load", rid, version, folder), version, f"loading {version}")
        self.bundles[version] = folder

    async def unload(self, version: str) -> None:
        """Unload once this version's in-flight batches are done (so none of them fails), or at the admin timeout."""
        self.bundles.pop(version, None)
        deadline = time.monotonic() + self.config.admin_timeout_s
        while self.inflight(version) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        await self._broadcast(lambda rid: ("unload", rid, version), version, f"unloading {version}")

    async def drain(self, index: int) -> int:
        """Stop routing to a worker, let its batches finish, then replace it; returns the new worker's index.

        If the replacement does not become ready within ``admin_timeout_s``, it is stopped and
        the old worker serves again (WorkerCrashed tells the caller)."""
        worker = next((w for w in self.workers if w.index == index and w.alive), None)
        if worker is None:
            raise NimbleError(f"no worker {index}", fix=f"use one of {[w.index for w in self.workers]}")
        worker.draining = True
        fresh = self._spawn()
        fresh.replaceable = False
        try:
            await asyncio.wait_for(asyncio.shield(fresh.ready), self.config.admin_timeout_s)
        except Exception as exc:  # the replacement failed: the old worker takes traffic again
            worker.draining = False
            if fresh in self.workers:
                self.workers.remove(fresh)
            fresh.ask_to_stop()
            fresh.process.kill()
            await asyncio.get_running_loop().run_in_executor(None, fresh.join, 1.0)
            raise WorkerCrashed(f"draining worker {index}: its replacement did not start ({exc or 'timed out'}); "
                                f"worker {index} serves again") from exc
        fresh.replaceable = True
        deadline = time.monotonic() + self.config.admin_timeout_s
        while worker.inflight and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        if worker in self.workers:
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


def _load_warm(folder: str, config: PoolConfig) -> LoadedBundle:
    bundle = LoadedBundle(folder, config.backend, config.threads)
    bundle.warm(config.warm_batches)
    return bundle


class _ModelThread:
    """One daemon thread that runs batches, lowest priority number first and in order within one
    (ONNX Runtime releases the GIL while it computes, so the event loop keeps parsing and queueing
    the next batch meanwhile; a premium batch waits for the running one only). A daemon: a run
    that never returns cannot keep the process from exiting."""

    def __init__(self) -> None:
        self._jobs: queue.PriorityQueue = queue.PriorityQueue()
        self._order = itertools.count()
        threading.Thread(target=self._serve, name="nimbleml-model", daemon=True).start()

    def submit(self, priority: int, fn: Callable, *args) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._jobs.put((priority, next(self._order), loop, future, fn, args))
        return future

    def _serve(self) -> None:
        while True:
            _, _, loop, future, fn, args = self._jobs.get()
            try:
                outcome, error = fn(*args), None
            except Exception as exc:  # handed to the awaiting coroutine
                outcome, error = None, exc
            try:
                loop.call_soon_threadsafe(_settle, future, outcome, error)
            except RuntimeError:  # the loop has closed (a run that outlived its server): nobody waits
                pass


def _settle(future: asyncio.Future, outcome: object, error: Exception | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(outcome)
    else:
        future.set_exception(error)


class InProcessPool:
    """WorkerPool's face, no worker processes: batches run on this process's own sessions, on a
    model thread of its own, while the event loop keeps serving; no pickling, no pipe.

    A batch unanswered for ``batch_timeout_s`` means a hung model: its callers get 503, and the
    process stops itself (SIGTERM: the others' requests finish or get 503 too), so that its
    supervisor (``serve/frontends.py``) or the orchestrator starts a fresh one."""

    def __init__(self, config: PoolConfig | None = None):
        self.config = config or PoolConfig(workers=0)
        self.bundles: dict[str, str] = {}  # version -> bundle folder
        self.loaded: dict[str, LoadedBundle] = {}
        self.workers: list[_Worker] = []  # none: kept for the callers that list workers
        self.restarts = 0
        self.hung = 0
        self._running = 0  # batches handed to the model thread and not yet back
        self._thread = _ModelThread()

    async def start(self, bundles: dict[str, str]) -> None:
        import torch  # the backends module imports it: keep its thread pool to what the sessions use

        torch.set_num_threads(max(1, self.config.threads))
        for version, folder in bundles.items():
            await self.load(version, folder)
        log.info("model runs in this process (%d) on %s", os.getpid(), self.config.backend)

    def ready_count(self) -> int:
        return 1 if self.loaded and not self.hung else 0

    def inflight(self, version: str | None = None) -> int:
        return self._running

    async def run(self, version: str, graph: str, inputs: dict[str, np.ndarray], priority: int = 1,
                  deadlines: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """As ``WorkerPool.run``: waiting batches run lowest ``priority`` first."""
        bundle = self.loaded.get(version)
        if bundle is None:
            raise WorkerError(f"version {version} is not loaded")
        self._running += 1
        try:
            running = self._thread.submit(priority, run_in_time, bundle, graph, inputs, deadlines)
            return await asyncio.wait_for(running, self.config.batch_timeout_s)
        except asyncio.TimeoutError as exc:
            self._hung()
            raise WorkerCrashed(f"the model did not answer within {self.config.batch_timeout_s:g} s: "
                                f"this front end restarts") from exc
        except Exception as exc:  # answered 500 to this batch's callers, as a worker's error is
            raise WorkerError(f"{type(exc).__name__}: {exc}") from exc
        finally:
            self._running -= 1

    def _hung(self) -> None:
        if not self.hung:
            log.error("a batch ran past %g s: the model is hung; stopping this front end", self.config.batch_timeout_s)
            os.kill(os.getpid(), signal.SIGTERM)
        self.hung += 1

    async def load(self, version: str, folder: str) -> None:
        """Load and warm on a side thread (the loop keeps serving), at most ``admin_timeout_s``."""
        loop = asyncio.get_running_loop()
        try:
            bundle = await asyncio.wait_for(loop.run_in_executor(None, _load_warm, folder, self.config),
                                            self.config.admin_timeout_s)
        except asyncio.TimeoutError as exc:
            raise WorkerCrashed(f"loading {version}: not loaded within {self.config.admin_timeout_s:g} s") from exc
        except Exception as exc:
            raise WorkerError(f"{type(exc).__name__}: {exc}") from exc
        self.loaded[version] = bundle
        self.bundles[version] = folder

    async def unload(self, version: str) -> None:
        self.bundles.pop(version, None)
        self.loaded.pop(version, None)

    async def drain(self, index: int) -> int:
        raise NimbleError("there are no worker processes to drain: the model runs in the front end (--workers 0)",
                          fix="restart the front end instead (with several front ends, stop one: it is replaced)")

    async def close(self) -> None:
        self.loaded.clear()


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
