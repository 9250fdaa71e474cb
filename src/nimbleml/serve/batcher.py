"""Dynamic batching with a priority lane, the knobs of Triton's dynamic batcher.

Requests queue per priority level (0 = highest). A batch leaves when it reaches
``max_batch_size`` (or the largest preferred size), or when its oldest request has waited
``max_queue_delay_ms``; priority-0 requests never wait for a delay: they form their own
batch at once, on slots of their own (``priority_slots``, so a flood of them cannot take
every worker), from a queue of its own bound (``priority_queue_size``). Queues are bounded (a
full lane rejects at once) and every request may carry a deadline: a request whose deadline
has passed before its batch leaves is rejected rather than answered late, and ``run_batch``
gets each item's deadline so that whatever runs the batch can skip rows already too late.

The batcher knows nothing about what it batches (LitServe's ``loops/`` habit): it hands a
list of items to ``run_batch`` and returns each caller its own result.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


class QueueFull(Exception):
    """The request's priority lane is at ``max_queue_size``: reject it now instead of queueing."""


class DeadlineExceeded(Exception):
    """The request's deadline passed before its batch left: it would have been answered late."""


@dataclass
class BatcherConfig:
    """Triton-style dynamic batcher settings."""

    max_batch_size: int = 16  # requests per batch at most: ~10 ms of one core for the default ranker (its cost per row is flat past ~4, so bigger batches only delay the priority lane)
    max_queue_delay_ms: float = 2.0  # longest a request waits for others to join its batch, milliseconds
    preferred_batch_sizes: tuple[int, ...] = ()  # sizes to cut batches at when the queue holds more (Triton's preferred_batch_size)
    max_queue_size: int = 512  # queued requests per priority lane; beyond it requests are rejected at once
    priority_levels: int = 3  # lanes 0..levels-1; 0 is the bypass lane
    max_inflight_batches: int = 2  # batches running at once (excluding priority 0); more waiting lets batches grow
    priority_queue_size: int = 128  # queued priority-0 requests; beyond it they are rejected at once
    priority_slots: int = 2  # priority-0 batches running at once (their own budget, beside max_inflight_batches)
    group_window: int = 4  # with a ``size_of``: a batch is the oldest request plus those nearest its size among
    # the first group_window x max_batch_size queued (0 = plain FIFO). Requests of similar length share a batch,
    # so trimmed padding drops more; the oldest always goes first, so nothing starves

    def __post_init__(self) -> None:
        if min(self.max_batch_size, self.max_queue_size, self.priority_levels, self.priority_queue_size,
               self.priority_slots) < 1:
            raise ValueError("max_batch_size, max_queue_size, priority_levels, priority_queue_size and "
                             "priority_slots must be >= 1")
        if any(s < 1 or s > self.max_batch_size for s in self.preferred_batch_sizes):
            raise ValueError(f"preferred_batch_sizes must lie in 1..{self.max_batch_size}")


@dataclass
class _Pending(Generic[T]):
    item: T
    future: asyncio.Future
    deadline: float | None  # time.monotonic() seconds, or None
    priority: int = 1  # its lane
    enqueued: float = field(default_factory=time.monotonic)


@dataclass
class BatchStats:
    """Counters for /metrics: how many batches of which size left, and what was rejected."""

    batches: int = 0
    items: int = 0
    expired: int = 0
    rejected_full: int = 0
    sizes: deque = field(default_factory=lambda: deque(maxlen=4096))  # recent batch sizes


def _expire(future: asyncio.Future) -> None:
    if not future.done():
        future.set_exception(DeadlineExceeded("deadline passed before the answer was ready"))


class DynamicBatcher(Generic[T, R]):
    """Collect submitted items into batches and run them with ``run_batch(items, priority, deadlines) -> results``.

    ``run_batch`` gets the batch's best (lowest) priority level, so whatever runs it can serve
    urgent batches first, and each item's deadline (``time.monotonic()`` seconds, ``inf`` for
    none); it must return one result per item, in order, where a result that is an exception
    (a row skipped past its deadline) goes to that item's caller as an error; if it raises,
    every item of that batch gets the exception.
    """

    def __init__(
        self,
        run_batch: Callable[[list[T], int, list[float]], Awaitable[Sequence[R]]],
        config: BatcherConfig | None = None,
        on_batch: Callable[[int], None] | None = None,
        size_of: Callable[[T], int] | None = None,
    ):
        self.config = config or BatcherConfig()
        self._run_batch = run_batch
        self._size_of = size_of  # an item's cost size (e.g. its used sequence length), for grouping
        self._on_batch = on_batch  # called with each batch's size (metrics)
        self._lanes: list[deque[_Pending[T]]] = [deque() for _ in range(self.config.priority_levels)]
        self._wakeup = asyncio.Event()
        self._inflight = 0  # running batches that hold a slot
        self._priority_inflight = 0  # running priority-0 batches (slots of their own)
        self._tasks: set[asyncio.Task] = set()
        self._loop_task: asyncio.Task | None = None
        self.stats = BatchStats()

    # ------------------------------------------------------------------ public face
    def start(self) -> None:
        if self._loop_task is None:
            self._loop_task = asyncio.get_running_loop().create_task(self._loop())

    async def close(self) -> None:
        """Stop batching; requests still queued are rejected, running batches finish."""
        if self._loop_task is not None:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
            self._loop_task = None
        for lane in self._lanes:
            while lane:
                pending = lane.popleft()
                if not pending.future.done():
                    pending.future.set_exception(QueueFull("the batcher is shutting down"))
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def depth(self) -> int:
        """Requests queued across all lanes (not counting running batches)."""
        return sum(len(lane) for lane in self._lanes)

    async def submit(self, item: T, priority: int = 1, timeout_s: float | None = None) -> R:
        """Queue ``item`` and wait for its result. priority: 0 (bypass) .. priority_levels-1.
        timeout_s: deadline from now in seconds; past it the request is rejected, not run."""
        if self._loop_task is None:
            self.start()
        level = min(max(priority, 0), self.config.priority_levels - 1)
        lane = self._lanes[level]
        if len(lane) >= (self.config.priority_queue_size if level == 0 else self.config.max_queue_size):
            self.stats.rejected_full += 1
            raise QueueFull(f"priority {level} queue holds {len(lane)} requests")
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        deadline = None
        if timeout_s is not None:
            deadline = time.monotonic() + timeout_s
            timer = loop.call_later(timeout_s, _expire, future)  # reject at the deadline, not after the batch
            future.add_done_callback(lambda _: timer.cancel())
        lane.append(_Pending(item, future, deadline, level))
        self._wakeup.set()
        return await future

    # ------------------------------------------------------------------ the loop
    def _group(self, lane: deque[_Pending[T]], limit: int) -> None:
        """Move the queued requests nearest in size to the lane's oldest one to the lane's front."""
        window = min(len(lane), self.config.group_window * self.config.max_batch_size)
        if self._size_of is None or self.config.group_window <= 0 or window <= limit:
            return
        head = [lane.popleft() for _ in range(window)]
        sizes = [self._size_of(p.item) for p in head]
        target = sizes[0]
        order = sorted(range(1, window), key=lambda i: (abs(sizes[i] - target), i))  # ties: oldest first
        chosen = [0] + order[: limit - 1]
        rest = sorted(set(range(window)) - set(chosen))
        lane.extendleft(reversed([head[i] for i in sorted(chosen)] + [head[i] for i in rest]))

    def _take(self, levels: range, limit: int) -> list[_Pending[T]]:
        """Up to ``limit`` live requests, highest priority first; expired ones are rejected here."""
        now = time.monotonic()
        batch: list[_Pending[T]] = []
        for level in levels:
            lane = self._lanes[level]
            if level > 0:
                self._group(lane, limit - len(batch))
            while lane and len(batch) < limit:
                pending = lane.popleft()
                if pending.future.done():  # the caller went away (cancelled)
                    continue
                if pending.deadline is not None and now > pending.deadline:
                    self.stats.expired += 1
                    pending.future.set_exception(DeadlineExceeded("deadline passed while queued"))
                    continue
                batch.append(pending)
        return batch

    def _cut_size(self, queued: int) -> int:
        """How many to send once a batch is due: the largest preferred size that fits, else all (capped)."""
        fitting = [s for s in self.config.preferred_batch_sizes if s <= queued]
        return max(fitting) if fitting else min(queued, self.config.max_batch_size)

    def _full_size(self) -> int:
        sizes = self.config.preferred_batch_sizes
        return max(sizes) if sizes else self.config.max_batch_size

    async def _loop(self) -> None:
        cfg = self.config
        lower = range(1, cfg.priority_levels)
        while True:
            if self.depth() == 0:
                self._wakeup.clear()
                await self._wakeup.wait()
            if self._lanes[0] and self._priority_inflight < cfg.priority_slots:
                # the priority lane: its own batch, now, on a slot of its own
                batch = self._take(range(0, 1), cfg.max_batch_size)
                if batch:
                    self._launch(batch, slot=False)
                continue
            queued = sum(len(self._lanes[level]) for level in lower)
            if queued == 0:  # only priority requests, all their slots busy: wait for one to finish
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            oldest = min(self._lanes[level][0].enqueued for level in lower if self._lanes[level])
            wait_s = oldest + cfg.max_queue_delay_ms / 1000.0 - time.monotonic()
            if queued < self._full_size() and wait_s > 0:
                self._wakeup.clear()  # a timer, not wait_for: no task per wait on the hot path
                timer = asyncio.get_running_loop().call_later(wait_s, self._wakeup.set)
                await self._wakeup.wait()
                timer.cancel()
                continue
            if self._inflight >= cfg.max_inflight_batches:
                # wait for a batch to finish (or a priority request); meanwhile the queue grows,
                # so batches get bigger exactly when the workers are busy
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            batch = self._take(lower, self._cut_size(queued))
            if batch:
                self._launch(batch, slot=True)

    def _launch(self, batch: list[_Pending[T]], slot: bool) -> None:
        self.stats.batches += 1
        self.stats.items += len(batch)
        self.stats.sizes.append(len(batch))
        if slot:
            self._inflight += 1
        else:
            self._priority_inflight += 1
        if self._on_batch is not None:
            self._on_batch(len(batch))
        task = asyncio.get_running_loop().create_task(self._run(batch, slot))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, batch: list[_Pending[T]], slot: bool) -> None:
        try:
            deadlines = [math.inf if p.deadline is None else p.deadline for p in batch]
            results = await self._run_batch([p.item for p in batch], min(p.priority for p in batch), deadlines)
            if len(results) != len(batch):
                raise RuntimeError(f"run_batch returned {len(results)} results for {len(batch)} items")
            for pending, result in zip(batch, results):
                if isinstance(result, BaseException):
                    self.stats.expired += isinstance(result, DeadlineExceeded)
                    if not pending.future.done():
                        pending.future.set_exception(result)
                elif not pending.future.done():
                    pending.future.set_result(result)
        except Exception as exc:  # every caller of the batch gets the error: never silence
            for pending in batch:
                if not pending.future.done():
                    pending.future.set_exception(exc)
        finally:
            if slot:
                self._inflight -= 1
            else:
                self._priority_inflight -= 1
            self._wakeup.set()
