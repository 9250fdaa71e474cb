"""Hybrid rate limiting: token buckets per tier and per key, plus load shedding by queue depth and recent p99.

The buckets cap what each tier, and each key inside it, may send on average (with a burst):
one free key cannot spend the whole free tier's budget and starve the other free callers. The
shedder protects
latency when the machine is saturated anyway: it refuses the lowest tiers first (HTTP 429 /
gRPC RESOURCE_EXHAUSTED with a Retry-After), so premium and priority traffic keeps its p99.

Several front-end processes on one port (``serve/frontends.py``) share their buckets
(``SharedBuckets``: each bucket's tokens and time stamp in shared memory under one lock), so
a tier's and a key's rates hold for the server as a whole, whichever process a connection
lands on. The shedder stays per process: it guards that process's own queue and loop.
"""

from __future__ import annotations

import asyncio
import threading
import time
from array import array
from collections import deque
from collections.abc import MutableSequence
from dataclasses import dataclass, field

import numpy as np


class TokenBucket:
    """``rate`` tokens per second up to ``burst``; one request takes one token."""

    def __init__(self, rate: float, burst: float, state: MutableSequence[float] | None = None, at: int = 0,
                 lock=None):
        """state, at, lock: where its (tokens, time stamp) pair lives and what guards it (shared
        memory and a process lock for ``SharedBuckets``); default: its own, full."""
        if rate <= 0 or burst < 1:
            raise ValueError(f"token bucket needs rate > 0 and burst >= 1, got {rate}, {burst}")
        self.rate = rate
        self.burst = burst
        self._state = array("d", [burst, time.monotonic()]) if state is None else state
        self._at = at
        self._lock = lock or threading.Lock()  # the gRPC front end takes tokens from its own threads

    def take(self, now: float | None = None) -> float:
        """Take a token: 0.0 when granted, else the seconds until one will be there (Retry-After)."""
        state, at = self._state, self._at
        with self._lock:
            now = time.monotonic() if now is None else now
            tokens = min(self.burst, state[at] + max(0.0, now - state[at + 1]) * self.rate)
            state[at + 1] = now
            if tokens >= 1.0:
                state[at] = tokens - 1.0
                return 0.0
            state[at] = tokens
            return (1.0 - tokens) / self.rate


def _key_policy(policy: TierPolicy) -> tuple[float, float]:
    """One key's (rate, burst) in a tier."""
    rate = policy.key_rate_rps if policy.key_rate_rps is not None else policy.rate_rps
    burst = policy.key_burst if policy.key_burst is not None else policy.burst
    return rate, burst


class SharedBuckets:
    """Every tier's bucket and every known key's, in shared memory for several processes.

    Made in the parent before the front ends start (``ctx``: the multiprocessing context that
    starts them) and handed to each; keys are known at start (the key file), so each gets a slot."""

    def __init__(self, tiers: dict[str, TierPolicy], keys: list[tuple[str, str]], ctx):
        """keys: (tier, key id) pairs that get a bucket of their own."""
        self.tiers = tiers
        self.slots: dict[tuple[str, ...], tuple[int, float, float]] = {}  # name -> (slot, rate, burst)
        for tier, policy in tiers.items():
            self.slots[(tier,)] = (len(self.slots), policy.rate_rps, policy.burst)
        for tier, key in keys:
            self.slots.setdefault((tier, key), (len(self.slots), *_key_policy(tiers[tier])))
        self.state = ctx.RawArray("d", 2 * len(self.slots))
        now = time.monotonic()  # CLOCK_MONOTONIC: one clock for every process of the machine
        for slot, _, burst in self.slots.values():
            self.state[2 * slot], self.state[2 * slot + 1] = burst, now
        self.lock = ctx.Lock()

    def bucket(self, *name: str) -> TokenBucket | None:
        """The shared bucket of a tier (``bucket(tier)``) or a key (``bucket(tier, key)``); None if unknown."""
        found = self.slots.get(name)
        if found is None:
            return None
        slot, rate, burst = found
        return TokenBucket(rate, burst, self.state, 2 * slot, self.lock)


@dataclass
class TierPolicy:
    """What one tier may do. Lower ``shed_rank`` is shed first under load."""

    rate_rps: float  # sustained requests per second for the whole tier
    burst: int  # requests allowed above the rate in a burst
    priority: int  # batcher lane: 0 bypasses the batch queue
    shed_rank: int  # 0 = shed at the first sign of overload, 1 = under heavy overload, 2+ = never shed
    key_rate_rps: float | None = None  # sustained requests per second for one key of the tier (None: the tier's)
    key_burst: int | None = None  # one key's burst (None: the tier's)


def default_tiers() -> dict[str, TierPolicy]:
    """free / standard / premium: free is shed first and premium rides the priority lane."""
    return {
        "free": TierPolicy(rate_rps=500.0, burst=100, priority=2, shed_rank=0, key_rate_rps=100.0, key_burst=50),
        "standard": TierPolicy(rate_rps=5000.0, burst=500, priority=1, shed_rank=1, key_rate_rps=4000.0,
                               key_burst=400),
        "premium": TierPolicy(rate_rps=20000.0, burst=2000, priority=0, shed_rank=2, key_rate_rps=10000.0,
                              key_burst=1000),
    }


@dataclass
class ShedConfig:
    """When the server counts as overloaded."""

    target_p99_ms: float = 50.0  # the latency objective; p99 above it sheds rank 0 (free)
    soft_queue_depth: int = 32  # queued requests past which rank 0 is shed (~20 ms of work at 0.6 ms per row)
    hard_queue_depth: int = 96  # queued requests past which rank 1 is shed too (~60 ms: past the p99 objective)
    window_s: float = 1.0  # how far back "recent p99" looks, seconds
    min_queue_for_latency: int = 8  # the p99 rule sheds only with at least this many requests queued
    # the front end's event-loop lag: how late a 5 ms timer fires. Requests wait in socket buffers
    # before any handler sees them, a wait the latency window cannot show; a lagging loop means
    # the front end's CPU is saturated, so lower tiers go before premium requests queue behind them
    soft_loop_lag_ms: float = 4.0  # lag past which rank 0 is shed
    hard_loop_lag_ms: float = 10.0  # lag past which rank 1 is shed too
    retry_after_s: float = 1.0  # Retry-After given to shed requests, seconds


@dataclass
class Decision:
    """Admit or refuse; ``reason`` is 'rate' (the tier's bucket), 'key_rate' (the key's) or 'overload' (shedding)."""

    admitted: bool
    retry_after_s: float = 0.0
    reason: str = ""


@dataclass
class LatencyWindow:
    """Recent request latencies (ms) with their times and the caller's shed rank, for the
    shedder's rolling p99 over the ranks it protects."""

    window_s: float = 1.0
    _items: deque = field(default_factory=lambda: deque(maxlen=20000))
    _cached: dict = field(default_factory=dict)  # min_rank -> (computed at, p99)

    def add(self, latency_ms: float, rank: int = 1, now: float | None = None) -> None:
        self._items.append((time.monotonic() if now is None else now, latency_ms, rank))

    def p99(self, min_rank: int = 0, now: float | None = None) -> float:
        """p99 in ms over the last window's requests of rank >= ``min_rank`` (0 when none);
        recomputed at most every 50 ms."""
        now = time.monotonic() if now is None else now
        at, value = self._cached.get(min_rank, (-1.0, 0.0))
        if 0 <= now - at < 0.05:
            return value
        while self._items and self._items[0][0] < now - self.window_s:
            self._items.popleft()
        values = [ms for _, ms, rank in self._items if rank >= min_rank]
        value = float(np.percentile(values, 99)) if values else 0.0
        self._cached[min_rank] = (now, value)
        return value


class LoopLag:
    """The event loop's recent lag, ms: an exponential average of how late a ``period_s`` timer
    fires (time constant ``period_s / alpha``, ~25 ms), so a lone stall (a GC pause) does not
    shed anything but a saturated front end does within a few ticks."""

    def __init__(self, period_s: float = 0.005, alpha: float = 0.2):
        self.period_s, self.alpha = period_s, alpha
        self._value, self._at = 0.0, 0.0

    def record(self, lag_ms: float, now: float | None = None) -> None:
        self._value += self.alpha * (lag_ms - self._value)
        self._at = time.monotonic() if now is None else now

    def value(self, now: float | None = None) -> float:
        """The average, or 0 when no tick has come for a second (the monitor is not running)."""
        now = time.monotonic() if now is None else now
        return self._value if now - self._at <= 1.0 else 0.0

    async def run(self) -> None:
        """Measure forever on the running loop (cancel to stop)."""
        while True:
            start = time.monotonic()
            await asyncio.sleep(self.period_s)
            now = time.monotonic()
            self.record(max(0.0, (now - start - self.period_s) * 1000.0), now)


class AdmissionController:
    """Token buckets per tier and per key + load shedding: ``admit(tier, queue_depth, key=...)``."""

    def __init__(self, tiers: dict[str, TierPolicy] | None = None, shed: ShedConfig | None = None,
                 shared: SharedBuckets | None = None):
        """shared: buckets in shared memory (several front-end processes); its tiers are used."""
        self.tiers = shared.tiers if shared is not None else tiers or default_tiers()
        self.shed = shed or ShedConfig()
        self.shared = shared
        self.buckets = {name: (shared and shared.bucket(name)) or TokenBucket(p.rate_rps, p.burst)
                        for name, p in self.tiers.items()}
        self.key_buckets: dict[tuple[str, str], TokenBucket] = {}  # (tier, key id) -> bucket; keys are few and known
        self.latency = LatencyWindow(self.shed.window_s)
        self.loop_lag = LoopLag()

    def overload_level(self, queue_depth: int, now: float | None = None) -> int:
        """0 = fine, 1 = shed rank 0, 2 = shed ranks 0 and 1."""
        lag = self.loop_lag.value(now)
        if queue_depth >= self.shed.hard_queue_depth or lag >= self.shed.hard_loop_lag_ms:
            return 2
        # the latency of the tiers that shedding protects: a slow lowest tier (it waits behind the
        # others by design) must not make the server refuse the tier above it. A backlog is what
        # the latency rule guards against: with (almost) none queued, a slow second that has passed
        # is no reason to refuse work (shedding on it alone idles the workers, then floods them)
        p99 = self.latency.p99(min_rank=1, now=now) if queue_depth >= self.shed.min_queue_for_latency else 0.0
        if p99 > 2 * self.shed.target_p99_ms:
            return 2
        if queue_depth >= self.shed.soft_queue_depth or p99 > self.shed.target_p99_ms or lag >= self.shed.soft_loop_lag_ms:
            return 1
        return 0

    def _key_bucket(self, tier: str, key: str) -> TokenBucket:
        bucket = self.key_buckets.get((tier, key))
        if bucket is None:
            bucket = (self.shared and self.shared.bucket(tier, key)) or TokenBucket(*_key_policy(self.tiers[tier]))
            self.key_buckets[(tier, key)] = bucket
        return bucket

    def admit(self, tier: str, queue_depth: int, now: float | None = None, key: str | None = None) -> Decision:
        """key: the caller's key id; its own bucket is checked before the tier's ('key_rate' when it refuses)."""
        policy = self.tiers[tier]
        if policy.shed_rank < self.overload_level(queue_depth, now):
            return Decision(False, self.shed.retry_after_s, "overload")
        if key is not None:
            wait = self._key_bucket(tier, key).take(now)
            if wait > 0:
                return Decision(False, wait, "key_rate")
        wait = self.buckets[tier].take(now)
        if wait > 0:
            return Decision(False, wait, "rate")
        return Decision(True)
