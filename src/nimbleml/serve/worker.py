"""The worker process: its own runtime sessions for every loaded bundle, warmed before traffic.

It speaks a small message protocol over two pipes (pickled tuples, numpy arrays inside):

- in:  ``("run", rid, version, graph, inputs, priority, deadlines)`` (waiting batches run lowest
  priority first; rows past their deadline, ``time.monotonic()`` seconds, are skipped),
  ``("load", rid, version, folder)`` (loaded on a side thread while the loop keeps serving),
  ``("unload", rid, version)``, ``("ping", rid)`` (the heartbeat), ``("stop",)``
- out: ``("ready", pid)`` once the first bundles are loaded and warmed, then
  ``("ok", rid, array_or_None)`` or ``("err", rid, message)`` per message; a run answers
  ``("ok", rid, (outputs of the rows it ran, which rows or None for all))``.

A reader thread drains the input pipe while the main thread computes, so the front end's
writes never block on a busy worker.
"""

from __future__ import annotations

import itertools
import logging
import os
import queue
import threading
import time
from multiprocessing.connection import Connection

import numpy as np

from nimbleml.runtime.padding import trim_left_padding

log = logging.getLogger(__name__)


class LoadedBundle:
    """A bundle's graphs, each on the chosen runtime backend."""

    def __init__(self, folder: str, backend: str, threads: int):
        from nimbleml.runtime.backends import get_backend
        from nimbleml.serve.bundle import Bundle

        self.bundle = Bundle.load(folder)
        runtime = get_backend(backend)
        self.graphs = {name: runtime.load(self.bundle.graph_path(name), threads=threads) for name in self.bundle.graphs}
        self.trim = {name: ([i.name for i in spec.inputs if i.trim], next((i.pad for i in spec.inputs if i.trim), 0))
                     for name, spec in self.bundle.graphs.items()}

    def warm(self, batch_sizes: tuple[int, ...]) -> float:
        """Run every graph on dummy batches so the first real request pays no first-run cost; seconds."""
        start = time.perf_counter()
        for name, graph in self.graphs.items():
            spec = self.bundle.graphs[name]
            for size in batch_sizes:
                graph.predict({i.name: i.dummy(size) for i in spec.inputs})
        return time.perf_counter() - start

    def run(self, graph: str, inputs: dict[str, np.ndarray]) -> np.ndarray:
        names, pad = self.trim[graph]
        if names:  # only the history columns some request of the batch uses
            inputs = trim_left_padding(inputs, names, pad)
        return self.graphs[graph].predict(inputs)


def run_in_time(bundle: LoadedBundle, graph: str, inputs: dict[str, np.ndarray],
                deadlines: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    """Run the rows still before their deadline: (their outputs, which rows or None for all).
    A row past it was already answered 504 by the front end: computing it is wasted."""
    if deadlines is None:
        return bundle.run(graph, inputs), None
    live = deadlines > time.monotonic()
    if live.all():
        return bundle.run(graph, inputs), None
    if not live.any():
        return np.zeros(0, dtype=np.float32), live
    return bundle.run(graph, {name: value[live] for name, value in inputs.items()}), live


CONTROL = -1  # load/unload/stop go before any batch
_ORDER = itertools.count()  # FIFO within a priority (and no comparison of the messages themselves)


def _reader(conn: Connection, inbox: queue.PriorityQueue) -> None:
    """Drain the pipe into a priority queue: a premium batch waits behind at most the running one."""
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):  # the front end went away: stop the worker
            inbox.put((CONTROL, next(_ORDER), ("stop",)))
            return
        priority = message[5] if message[0] == "run" else CONTROL
        inbox.put((priority, next(_ORDER), message))


def _load_beside(rid: int, version: str, folder: str, backend: str, threads: int, warm_batches: tuple[int, ...],
                 inbox: queue.PriorityQueue) -> None:
    """Build and warm a bundle on a side thread; the main loop registers it when it arrives."""
    try:
        bundle = LoadedBundle(folder, backend, threads)
        bundle.warm(warm_batches)
        inbox.put((CONTROL, next(_ORDER), ("loaded", rid, version, bundle)))
    except Exception as exc:  # reported to the front end as this load's error
        inbox.put((CONTROL, next(_ORDER), ("loaded", rid, version, exc)))


def worker_main(inbox_conn: Connection, outbox_conn: Connection, bundles: dict[str, str], backend: str,
                threads: int, warm_batches: tuple[int, ...]) -> None:
    """Entry point of a worker process (spawned; everything it gets is picklable)."""
    import torch  # the backends module imports it; keep its own thread pool out of our way

    torch.set_num_threads(max(1, threads))
    loaded: dict[str, LoadedBundle] = {}
    try:
        for version, folder in bundles.items():
            loaded[version] = LoadedBundle(folder, backend, threads)
            loaded[version].warm(warm_batches)
    except Exception as exc:  # the front end reports it and stops the server: a bad bundle is not transient
        outbox_conn.send(("fatal", f"{type(exc).__name__}: {exc}"))
        return
    inbox: queue.PriorityQueue = queue.PriorityQueue()
    threading.Thread(target=_reader, args=(inbox_conn, inbox), daemon=True).start()
    outbox_conn.send(("ready", os.getpid()))
    while True:
        message = inbox.get()[2]
        kind = message[0]
        if kind == "stop":
            return
        rid = message[1]
        try:
            if kind == "run":
                _, _, version, graph, inputs, _, deadlines = message
                outbox_conn.send(("ok", rid, run_in_time(loaded[version], graph, inputs, deadlines)))
            elif kind == "load":  # load and warm beside the serving loop: traffic keeps flowing meanwhile
                _, _, version, folder = message
                threading.Thread(target=_load_beside, args=(rid, version, folder, backend, threads, warm_batches,
                                                            inbox), daemon=True).start()
            elif kind == "loaded":
                _, _, version, bundle = message
                if isinstance(bundle, Exception):
                    raise bundle
                loaded[version] = bundle
                outbox_conn.send(("ok", rid, None))
            elif kind == "ping":  # the front end's heartbeat: this loop is alive
                outbox_conn.send(("ok", rid, None))
            elif kind == "unload":
                loaded.pop(message[2], None)
                outbox_conn.send(("ok", rid, None))
            else:
                outbox_conn.send(("err", rid, f"unknown message {kind!r}"))
        except Exception as exc:  # answer the request with the error; the worker keeps serving
            outbox_conn.send(("err", rid, f"{type(exc).__name__}: {exc}"))
