"""An open-loop HTTP load generator lean enough not to be what is measured.

Arrivals are Poisson at a fixed rate and each request's latency counts from its *scheduled*
time, so a slow server cannot slow the generator down and hide its own queueing (the
coordinated-omission trap of closed-loop tools). Per request the generator does almost
nothing in Python: request bytes are encoded before the run, connections are kept alive and
re-used, responses are parsed by httptools (C), and the load is split over several processes.
A plain asyncio + httpx generator tops out near 230 req/s on 2 cores; this one reaches
several thousand (``nimbleml bench serve`` records its ceiling against a trivial server).

It only targets loopback addresses, and every run is bounded by ``duration_s + timeout_s``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import multiprocessing as mp
import socket
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httptools
import numpy as np

from nimbleml.errors import NimbleError

TIMEOUT_STATUS = 0  # status recorded for a request that got no answer (timeout or broken connection)


@dataclass
class Target:
    host: str
    port: int
    path: str


def loopback_target(url: str) -> Target:
    """Parse ``url``; refuse anything that is not a loopback address."""
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise NimbleError(f"not an http:// URL: {url!r}", fix="pass e.g. http://127.0.0.1:8000")
    try:
        address = ipaddress.ip_address(socket.gethostbyname(parts.hostname))
    except (OSError, ValueError) as exc:
        raise NimbleError(f"cannot resolve {parts.hostname!r}", fix="use 127.0.0.1") from exc
    if not address.is_loopback:
        raise NimbleError(f"{parts.hostname} is not a loopback address: the load generator only targets this machine",
                          fix="run the server locally and pass http://127.0.0.1:PORT")
    return Target(parts.hostname, parts.port or 80, parts.path or "/")


def http_request(target: Target, body: bytes, key: str | None, method: str = "POST") -> bytes:
    """One complete HTTP/1.1 keep-alive request, encoded once before the run."""
    head = [f"{method} {target.path} HTTP/1.1", f"Host: {target.host}:{target.port}", "Connection: keep-alive"]
    if method == "POST":
        head += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    if key:
        head.append(f"x-api-key: {key}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + (body if method == "POST" else b"")


@dataclass
class LoadPlan:
    """What to send: rate, duration, tier mix and pre-encoded requests per tier."""

    target: Target
    rps: float  # mean arrival rate over all processes, requests per second
    duration_s: float  # arrivals are scheduled over this long, seconds
    requests: dict[str, list[bytes]]  # tier -> pre-encoded requests (cycled)
    mix: dict[str, float]  # tier -> share of arrivals (sums to 1)
    processes: int = 2  # generator processes (each its own event loop)
    max_connections: int = 128  # per process; an arrival with none free waits (its wait counts as latency)
    timeout_s: float = 5.0  # no answer after this long counts as an error, seconds
    seed: int = 0
    targets: dict[str, Target] | None = None  # tier -> its own listener (e.g. a premium lane's port); default target
    sample_every: int = 0  # keep the answer to every n-th arrival of each process, to check it (0: keep none)
    # closed loop instead of Poisson arrivals: this many connections in all, each sending its next
    # request as soon as its answer is in (what wrk does), for ``duration_s``; ``rps`` is then only
    # the bound on how many requests a process may send (0: open loop)
    closed_connections: int = 0

    def target_of(self, tier: str) -> Target:
        return (self.targets or {}).get(tier, self.target)


@dataclass
class ResponseSample:
    """One answer kept under load: which pre-encoded request it answered, and what came back."""

    tier: str
    request: int  # position in ``LoadPlan.requests[tier]``
    status: int  # HTTP status, 0 = no answer
    body: bytes


@dataclass
class LoadResult:
    """Per-request outcomes, in arrival order: scheduled time (s from start), tier, status, latency (ms)."""

    scheduled_s: np.ndarray
    tier: np.ndarray  # index into ``tiers``
    status: np.ndarray  # HTTP status, 0 = no answer
    latency_ms: np.ndarray
    tiers: list[str]
    duration_s: float
    generator_cpu_s: float = 0.0  # CPU time the generator processes used
    samples: list[ResponseSample] = field(default_factory=list)  # answers kept (``LoadPlan.sample_every``)

    def after(self, start_s: float) -> LoadResult:
        """Only the arrivals scheduled at or after ``start_s``: a warm-up at the same rate, cut off
        without a pause in the load. The answers kept for checking stay (warm-up answers must be right too)."""
        keep = self.scheduled_s >= start_s
        return LoadResult(self.scheduled_s[keep] - start_s, self.tier[keep], self.status[keep], self.latency_ms[keep],
                          self.tiers, self.duration_s - start_s, self.generator_cpu_s, self.samples)

    def summary(self) -> dict:
        """The stable keys of loadtest.json."""
        return summarise(self.status, self.latency_ms, self.tier, self.tiers, self.duration_s) | {
            "generator_cpu_s": round(self.generator_cpu_s, 3)}


STATUS_CLASSES = ("2xx", "429", "503", "504", "other_5xx", "timeout", "other")  # the status split's keys
REFUSED = (429, 503)  # deliberate refusals (sent with Retry-After): the only answers a tier's p99 leaves out


def status_split(status: np.ndarray) -> dict[str, int]:
    """Counts by what "answered" means: 2xx, 429, 503, 504, any other 5xx, no answer ("timeout":
    nothing within the timeout, or the connection dropped) and anything else (e.g. 4xx)."""
    ok = (status >= 200) & (status < 300)
    other_5xx = (status >= 500) & (status < 600) & (status != 503) & (status != 504)
    counts = {"2xx": ok, "429": status == 429, "503": status == 503, "504": status == 504, "other_5xx": other_5xx,
              "timeout": status == TIMEOUT_STATUS}
    counts["other"] = ~np.logical_or.reduce(list(counts.values())) if len(status) else np.zeros(0, dtype=bool)
    return {name: int(mask.sum()) for name, mask in counts.items()}


def latency_percentile(latency_ms: np.ndarray, status: np.ndarray, q: float) -> float | None:
    """The ``q``-th percentile, a timeout (status 0) counting as infinitely slow: the nearest-rank
    definition (numpy's "inverted_cdf"), an observed value, never interpolated.

    None when there are no requests *or* when the percentile lands on a timeout (JSON has no
    infinity): read it with the status split beside it."""
    if not len(latency_ms):
        return None
    values = np.where(status == TIMEOUT_STATUS, np.inf, latency_ms.astype(np.float64))
    value = float(np.percentile(values, q, method="inverted_cdf"))
    return round(value, 3) if np.isfinite(value) else None


def summarise(status: np.ndarray, latency_ms: np.ndarray, tier: np.ndarray, tiers: list[str], duration_s: float) -> dict:
    """sent / answered / ok / rejected / errors, the status split, throughput and percentiles,
    overall and by tier.

    ``rejected`` = 429 and 503 (refused on purpose, with Retry-After); ``errors`` = no answer or
    any other non-2xx. ``p50_ms``/``p99_ms`` count every request but the deliberate refusals: a
    504 at its latency, a timeout as infinite (so a tier's timeouts raise its p99, never hide).
    ``p99_all_ms`` counts every request, refusals included (the capacity search's criterion)."""
    def block(mask: np.ndarray) -> dict:
        s, lat = status[mask], latency_ms[mask]
        ok = (s >= 200) & (s < 300)
        rejected = np.isin(s, REFUSED)
        kept = ~rejected
        return {
            "sent": int(mask.sum()),
            "answered": int((s != TIMEOUT_STATUS).sum()),
            "ok": int(ok.sum()),
            "rejected": int(rejected.sum()),
            "errors": int((~ok & ~rejected).sum()),
            "status": status_split(s),
            "p50_ms": latency_percentile(lat[kept], s[kept], 50),
            "p99_ms": latency_percentile(lat[kept], s[kept], 99),
            "p99_all_ms": latency_percentile(lat, s, 99),
        }

    overall = block(np.ones(len(status), dtype=bool))
    overall["throughput_rps"] = round(overall["ok"] / duration_s, 1) if duration_s > 0 else 0.0
    overall["duration_s"] = duration_s
    overall["by_tier"] = {name: block(tier == i) for i, name in enumerate(tiers)}
    return overall


class _Connection(asyncio.Protocol):
    """One keep-alive connection, one request at a time; responses parsed by httptools."""

    def __init__(self, gen: _Pool):
        self.gen = gen
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.current = -1  # request index in flight, -1 = idle
        self.body: list[bytes] | None = None  # the answer's body, collected only for a sampled request

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.gen.connected(self)

    def send(self, index: int) -> None:
        self.current = index
        self.body = [] if self.gen.sampled(index) else None
        self.transport.write(self.gen.payload(index))

    def on_body(self, body: bytes) -> None:
        if self.body is not None:
            self.body.append(body)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.close()

    def on_message_complete(self) -> None:
        index, self.current = self.current, -1
        if self.body is not None:
            self.gen.keep(index, self.parser.get_status_code(), b"".join(self.body))
            self.body = None
        self.gen.done(index, self.parser.get_status_code(), self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.gen.lost(self)


class _Pool:
    """Keep-alive connections to one target; an arrival with none idle waits for the next free one."""

    def __init__(self, gen: _Generator, target: Target):
        self.owner, self.target = gen, target
        self.idle: list[_Connection] = []
        self.waiting: list[int] = []
        self.connections = 0

    def payload(self, index: int) -> bytes:
        return self.owner.payload(index)

    def sampled(self, index: int) -> bool:
        return self.owner.sampled(index)

    def keep(self, index: int, status: int, body: bytes) -> None:
        self.owner.samples.append((index, status, body))

    def fire(self, index: int) -> None:
        if self.idle:
            self.idle.pop().send(index)
            return
        self.waiting.append(index)
        if self.connections < self.owner.plan.max_connections:
            self.connections += 1
            self.owner.loop.create_task(self._open())

    async def _open(self) -> None:
        try:
            await self.owner.loop.create_connection(lambda: _Connection(self), self.target.host, self.target.port)
        except OSError:
            self.connections -= 1
            if self.waiting:  # cannot connect: the waiting request fails now rather than hanging
                self.owner.finish(self.waiting.pop(0), TIMEOUT_STATUS)

    def connected(self, conn: _Connection) -> None:
        self._next(conn)

    def _next(self, conn: _Connection) -> None:
        if self.waiting:
            conn.send(self.waiting.pop(0))
        else:
            self.idle.append(conn)

    def done(self, index: int, status: int, conn: _Connection) -> None:
        self.owner.finish(index, status)
        self._next(conn)

    def lost(self, conn: _Connection) -> None:
        self.connections -= 1
        if conn in self.idle:
            self.idle.remove(conn)
        if conn.current >= 0:
            self.owner.finish(conn.current, TIMEOUT_STATUS)
        if self.waiting and self.connections < self.owner.plan.max_connections:
            self.connections += 1
            self.owner.loop.create_task(self._open())


class _Generator:
    """The event-loop side of one generator process: one connection pool per target."""

    def __init__(self, plan: LoadPlan, times: np.ndarray, tiers: np.ndarray, base: float, clock_base: float):
        """base: the run's start on the event loop's clock (what ``call_at`` schedules on);
        clock_base: the same instant on ``time.perf_counter``, which every latency is read from:
        uvloop's ``loop.time()`` is libuv's millisecond clock, cached for a whole loop iteration."""
        self.plan, self.times, self.tiers, self.base, self.clock_base = plan, times, tiers, base, clock_base
        self.loop = asyncio.get_running_loop()
        self.status = np.full(len(times), TIMEOUT_STATUS, dtype=np.int16)
        self.latency = np.full(len(times), np.nan, dtype=np.float32)
        self.finished = 0
        self.samples: list[tuple[int, int, bytes]] = []  # (arrival index, status, body) of sampled answers
        self.all_done = asyncio.Event()
        self.closed: _ClosedLoop | None = None  # set by a closed-loop run
        names = list(plan.mix)
        self.payloads = [plan.requests[names[t]] for t in range(len(names))]
        pools: dict[tuple[str, int], _Pool] = {}
        self.pools = []  # tier index -> its target's pool (tiers sharing a target share connections)
        for name in names:
            target = plan.target_of(name)
            self.pools.append(pools.setdefault((target.host, target.port), _Pool(self, target)))
        if len(times) == 0:
            self.all_done.set()

    def payload(self, index: int) -> bytes:
        options = self.payloads[self.tiers[index]]
        return options[index % len(options)]

    def sampled(self, index: int) -> bool:
        return self.plan.sample_every > 0 and index % self.plan.sample_every == 0

    def fire(self, index: int) -> None:
        self.pools[self.tiers[index]].fire(index)

    def finish(self, index: int, status: int) -> None:
        if self.status[index] != TIMEOUT_STATUS or not np.isnan(self.latency[index]):
            return
        now = time.perf_counter() - self.clock_base
        self.status[index] = status
        self.latency[index] = (now - self.times[index]) * 1000.0
        self.finished += 1
        if self.closed is not None:
            self.closed.answered(now)
        elif self.finished == len(self.times):
            self.all_done.set()

    def expire(self) -> None:
        """Requests still unanswered at the end count as errors (no answer)."""
        for index in np.flatnonzero(np.isnan(self.latency)):
            self.finish(int(index), TIMEOUT_STATUS)


class _ClosedLoop:
    """Closed-loop driving of a ``_Generator``: ``connections`` requests in flight, the next sent
    the moment one is answered, until ``duration_s``; each request's time is when it was sent."""

    def __init__(self, gen: _Generator, connections: int, duration_s: float):
        self.gen, self.connections, self.duration_s = gen, connections, duration_s
        self.sent = 0
        self.in_flight = 0
        gen.closed = self

    def start(self) -> None:
        for _ in range(min(self.connections, len(self.gen.times))):
            self._send(time.perf_counter() - self.gen.clock_base)

    def _send(self, now: float) -> None:
        self.gen.times[self.sent] = now
        self.in_flight += 1
        self.sent += 1
        self.gen.fire(self.sent - 1)

    def answered(self, now: float) -> None:
        self.in_flight -= 1
        if now < self.duration_s and self.sent < len(self.gen.times):
            self._send(now)
        elif self.in_flight == 0:
            self.gen.all_done.set()


async def _generate_closed(plan: LoadPlan, index: int, start_at: float) -> tuple[np.ndarray, ...]:
    share = plan.closed_connections // plan.processes + (index < plan.closed_connections % plan.processes)
    bound = max(1, int(plan.rps * plan.duration_s / plan.processes) + 1)  # arrays sized by the rate bound
    rng = np.random.default_rng(plan.seed * 1000 + index)
    tiers = rng.choice(len(plan.mix), size=bound, p=np.array(list(plan.mix.values())) / sum(plan.mix.values()))
    loop = asyncio.get_running_loop()
    base = loop.time() + (start_at - time.time())
    gen = _Generator(plan, np.full(bound, np.inf), tiers, base, time.perf_counter() + (start_at - time.time()))
    driver = _ClosedLoop(gen, share, plan.duration_s)
    if share == 0:
        gen.all_done.set()
    else:
        loop.call_at(base, driver.start)
    try:
        await asyncio.wait_for(gen.all_done.wait(), max(0.0, base - loop.time()) + plan.duration_s + plan.timeout_s)
    except asyncio.TimeoutError:
        pass
    sent = driver.sent
    gen.closed = None  # what is still unanswered now expires without sending more
    gen.times, gen.tiers = gen.times[:sent], gen.tiers[:sent]
    gen.status, gen.latency = gen.status[:sent], gen.latency[:sent]
    gen.expire()
    names = list(plan.mix)
    samples = [ResponseSample(names[tiers[i]], i % len(plan.requests[names[tiers[i]]]), status, body)
               for i, status, body in gen.samples if i < sent]
    return gen.times, gen.tiers.astype(np.int8), gen.status, gen.latency, samples


async def _generate(plan: LoadPlan, index: int, start_at: float) -> tuple[np.ndarray, ...]:
    if plan.closed_connections > 0:
        return await _generate_closed(plan, index, start_at)
    rng = np.random.default_rng(plan.seed * 1000 + index)
    rate = plan.rps / plan.processes
    n = max(1, int(rate * plan.duration_s * 1.2) + 50)
    times = np.cumsum(rng.exponential(1.0 / rate, size=n))
    times = times[times < plan.duration_s]
    tiers = rng.choice(len(plan.mix), size=len(times), p=np.array(list(plan.mix.values())) / sum(plan.mix.values()))
    loop = asyncio.get_running_loop()
    base = loop.time() + (start_at - time.time())
    gen = _Generator(plan, times, tiers, base, time.perf_counter() + (start_at - time.time()))
    for i, t in enumerate(times):
        loop.call_at(base + t, gen.fire, i)
    try:
        await asyncio.wait_for(gen.all_done.wait(), max(0.0, base - loop.time()) + plan.duration_s + plan.timeout_s)
    except asyncio.TimeoutError:
        pass
    gen.expire()
    names = list(plan.mix)
    samples = [ResponseSample(names[tiers[i]], i % len(plan.requests[names[tiers[i]]]), status, body)
               for i, status, body in gen.samples]
    return times, tiers.astype(np.int8), gen.status, gen.latency, samples


def _process_main(plan: LoadPlan, index: int, conn) -> None:
    import uvloop

    conn.send("ready")  # imports done: the parent hands out one common start time
    start_at = conn.recv()
    started = time.process_time()
    result = uvloop.run(_generate(plan, index, start_at))
    conn.send((*result, time.process_time() - started))
    conn.close()


def run_load(plan: LoadPlan) -> LoadResult:
    """Run the plan in ``plan.processes`` generator processes; blocks for about the duration."""
    if plan.rps <= 0 or plan.duration_s <= 0:
        raise NimbleError("rps and duration must be > 0", fix="e.g. --rps 200 --duration 10")
    ctx = mp.get_context("spawn")
    pipes, procs = [], []
    for i in range(plan.processes):
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_process_main, args=(plan, i, child), daemon=True)
        proc.start()
        child.close()
        pipes.append(parent)
        procs.append(proc)
    for receiver, proc in zip(pipes, procs):
        if not receiver.poll(120):
            proc.kill()
            raise NimbleError("a load generator process did not start", fix="check the machine's load")
        receiver.recv()
    start_at = time.time() + 0.2  # every process starts its clock together
    for sender in pipes:
        sender.send(start_at)
    parts = []
    for receiver, proc in zip(pipes, procs):
        if not receiver.poll(plan.duration_s + plan.timeout_s + 30):
            proc.kill()
            raise NimbleError("a load generator process did not report back", fix="lower --rps or --duration")
        parts.append(receiver.recv())
        proc.join(5)
    order = np.argsort(np.concatenate([p[0] for p in parts]), kind="stable")
    return LoadResult(
        scheduled_s=np.concatenate([p[0] for p in parts])[order],
        tier=np.concatenate([p[1] for p in parts])[order],
        status=np.concatenate([p[2] for p in parts])[order],
        latency_ms=np.concatenate([p[3] for p in parts])[order],
        tiers=list(plan.mix),
        duration_s=plan.duration_s,
        generator_cpu_s=float(sum(p[5] for p in parts)),
        samples=[sample for p in parts for sample in p[4]],
    )


def plot_latency(result: LoadResult, path, title: str) -> None:
    """Latency over time: p50 and p99 per tier in 0.5 s bins, plus rejected counts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True, height_ratios=(3, 1))
    edges = np.arange(0.0, result.duration_s + 0.5, 0.5)
    centres = edges[:-1] + 0.25
    ok = (result.status >= 200) & (result.status < 300)
    for i, name in enumerate(result.tiers):
        mine = result.tier == i
        for q, style in ((50, "--"), (99, "-")):
            values = []
            for lo, hi in zip(edges[:-1], edges[1:]):
                sel = mine & ok & (result.scheduled_s >= lo) & (result.scheduled_s < hi)
                values.append(np.percentile(result.latency_ms[sel], q) if sel.any() else np.nan)
            top.plot(centres, values, style, label=f"{name} p{q}")
        rejected = [(mine & ~ok & (result.scheduled_s >= lo) & (result.scheduled_s < hi)).sum()
                    for lo, hi in zip(edges[:-1], edges[1:])]
        bottom.plot(centres, rejected, label=name)
    top.set_ylabel("latency (ms)")
    top.set_yscale("log")
    top.legend(fontsize=7, ncol=3)
    top.set_title(title)
    bottom.set_ylabel("not ok / 0.5 s")
    bottom.set_xlabel("time since start (s)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def request_bodies(inputs: dict[str, list[dict]], operation: str, n: int, seed: int = 0) -> list[bytes]:
    """``n`` valid JSON bodies for the served operation, drawn from its input specs (``GET /v1/models``)."""
    import msgspec

    rng = np.random.default_rng(seed)
    bodies = []
    if operation == "recommend":
        specs = {s["name"]: s for s in inputs["ranker"]}
        hist, cand = specs["history"], specs["candidates"]
        for _ in range(n):
            body = {"history": rng.integers(hist["low"], hist["high"] + 1, size=hist["shape"][0]).tolist(),
                    "candidates": rng.integers(cand["low"], cand["high"] + 1, size=cand["shape"][0]).tolist()}
            bodies.append(msgspec.json.encode(body))
    else:
        specs = {s["name"]: s for s in inputs["forecast"]}
        for i in range(n):
            window = rng.random(specs["window"]["shape"]).astype(np.float32).tolist()
            body = {"asset": f"asset{i % 8}", "window": window, "asset_class": int(specs["asset_class"]["low"] or 0)}
            bodies.append(msgspec.json.encode(body))
    return bodies
