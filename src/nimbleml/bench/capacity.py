"""A server's capacity as a measurement: the highest offered rate it serves within an objective.

The search knows nothing about HTTP or models: it calls ``measure(rate, duration_s, warmup_s)``
and reads back a :class:`Step`. First a geometric grid (rate x ``factor``) brackets the capacity
between the last passing and the first failing rate; then bisection narrows the bracket to
``tolerance``, each step a full ``step_s`` after a warm-up at its own rate; then the capacity
point is measured ``repeats`` times and the median throughput is the capacity, with every run
kept so the spread can be read. A repeat that misses the objective moves the point down (the
point's remaining repeats are not run) and starts the repeats again: by ``tolerance``, then twice
that, four times... (at most ``retreats`` times), so the reported capacity is normally a rate
every repeat passed; ``repeats_passed`` says when it is not.

A step passes only when *every* request got a 2xx and the p99 over every request (a timeout
counted as infinite) is within the objective: shedding cannot remove the slow tail from p99.

Units: requests per second for rates, milliseconds for latency, seconds for durations.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np

log = logging.getLogger(__name__)


@dataclass
class SearchConfig:
    """How the capacity is searched; the defaults are what ``nimbleml bench serve`` runs."""

    start_rps: float = 25.0  # first rate of the grid
    factor: float = 1.25  # grid step: rate x factor
    max_rps: float = 6000.0  # the grid stops above this rate
    misses: int = 3  # the grid stops after this many failing rates in a row (one miss can be noise)
    grid_s: float = 3.0  # seconds of arrivals per grid step (the grid only brackets)
    tolerance: float = 0.03  # bisect until first failing / last passing <= 1 + tolerance
    step_s: float = 10.0  # seconds of arrivals per bisection step and per repeat
    warmup_s: float = 3.0  # seconds at a step's own rate before it is measured, not counted
    repeats: int = 3  # measurements of the capacity point
    retreats: int = 4  # times the point may move down when a repeat misses (1 x, 2 x, 4 x, 8 x tolerance)
    slo_ms: float = 50.0  # p99 objective over every request


@dataclass
class Step:
    """One measured rate."""

    offered_rps: float  # the arrival rate asked for
    throughput_rps: float  # 2xx answers per second of arrivals
    sent: int
    ok: int  # answered 2xx
    p50_ms: float | None
    p99_ms: float | None  # over every request, a timeout as infinite (None: it landed on a timeout)
    passed: bool = False
    phase: str = ""  # "grid", "bisect" or "repeat", set by the search
    extra: dict = field(default_factory=dict)  # whatever else the measure function records (CPU, checks)

    def to_dict(self) -> dict:
        out = asdict(self)
        extra = out.pop("extra")
        return {**out, **extra}


def passes(step: Step, slo_ms: float) -> bool:
    """Every request answered 2xx and p99 over all of them within the objective."""
    return step.sent > 0 and step.ok == step.sent and step.p99_ms is not None and step.p99_ms <= slo_ms


@dataclass
class Capacity:
    """The search's result: the capacity, its repeats, and every step on the way."""

    max_rps: float  # median 2xx throughput of the repeats at the capacity point (0: no grid rate passed)
    offered_rps: float | None  # the capacity point's offered rate
    max_rps_runs: list[float]  # throughput of each repeat at the capacity point
    spread: float | None  # (max - min) / median of ``max_rps_runs``
    repeats_passed: int  # how many of those repeats met the objective (all of them, unless retreats ran out)
    p99_ms: float | None  # median p99 of the repeats
    bracket: tuple[float, float | None]  # (last passing, first failing) offered rate after bisection
    steps: list[Step]

    def to_dict(self) -> dict:
        return {"max_rps": self.max_rps, "offered_rps": self.offered_rps, "max_rps_runs": self.max_rps_runs,
                "spread": self.spread, "repeats_passed": self.repeats_passed, "p99_ms": self.p99_ms,
                "bracket": list(self.bracket),
                "steps": [s.to_dict() for s in self.steps]}


Measure = Callable[[float, float, float], Step]  # (offered rate, seconds measured, seconds of warm-up) -> Step


def find_capacity(measure: Measure, config: SearchConfig, label: str = "") -> Capacity:
    """Grid, bisection, repeats (see the module docstring). Bounded: at most
    ``log(max/start)/log(factor) + 1`` grid steps, ``log2(log(factor)/log(1+tolerance)) + 1``
    bisection steps and ``repeats * (retreats + 1)`` repeats."""
    steps: list[Step] = []

    def run(rate: float, duration_s: float, warmup_s: float, phase: str) -> Step:
        step = measure(rate, duration_s, warmup_s)
        step.passed, step.phase = passes(step, config.slo_ms), phase
        steps.append(step)
        log.info("%s %s: offered %.0f req/s -> %.0f ok/s, p99 %s ms, %d/%d 2xx %s", label, phase, rate,
                 step.throughput_rps, step.p99_ms, step.ok, step.sent, "pass" if step.passed else "MISS")
        return step

    low, high, misses, rate = None, None, 0, config.start_rps
    while rate <= config.max_rps and misses < config.misses:
        # the first grid step warms the server up (first-call costs); later ones ride on the previous load
        if run(rate, config.grid_s, config.warmup_s if not steps else 0.0, "grid").passed:
            low, high, misses = rate, None, 0
        else:
            high = rate if high is None else high
            misses += 1
        rate *= config.factor
    if low is None:
        return Capacity(0.0, None, [], None, 0, None, (0.0, high), steps)
    while high is not None and high / low > 1 + config.tolerance:
        mid = math.sqrt(low * high)
        if run(mid, config.step_s, config.warmup_s, "bisect").passed:
            low = mid
        else:
            high = mid
    bracket = (round(low, 1), round(high, 1) if high is not None else None)

    point = low
    for retreat in range(config.retreats + 1):
        if retreat:
            point /= (1 + config.tolerance) ** (2 ** (retreat - 1))
        runs: list[Step] = []
        while len(runs) < config.repeats and (not runs or runs[-1].passed):  # a miss ends this point's repeats
            runs.append(run(point, config.step_s, config.warmup_s, "repeat"))
        if all(r.passed for r in runs):
            break
    if not all(r.passed for r in runs):
        log.warning("%s: no repeat point passed every repeat down to %.0f req/s: the capacity is unconfirmed",
                    label, point)
    throughputs = [r.throughput_rps for r in runs]
    median = float(np.median(throughputs))
    p99s = [r.p99_ms for r in runs if r.p99_ms is not None]
    return Capacity(
        max_rps=round(median, 1),
        offered_rps=round(point, 1),
        max_rps_runs=[round(t, 1) for t in throughputs],
        spread=round((max(throughputs) - min(throughputs)) / median, 4) if median > 0 else None,
        repeats_passed=sum(r.passed for r in runs),
        p99_ms=round(float(np.median(p99s)), 3) if p99s else None,
        bracket=bracket,
        steps=steps,
    )


def recheck_capacity(measure: Measure, around: float, config: SearchConfig, width: float = 0.15,
                     label: str = "") -> dict:
    """One short re-measurement of a capacity already found: bisect between ``around / (1 + width)``
    and ``around * (1 + width)`` to ``config.tolerance``, each step a full ``step_s`` after its
    warm-up. Returns ``{"max_rps", "offered_rps", "censored", "steps"}``: ``max_rps`` is the 2xx
    throughput at the highest passing rate (0 when even the low end missed: ``censored`` "below"),
    ``censored`` "above" when the high end passed too (the capacity is at least that). Bounded:
    2 + log2(log((1 + width)^2) / log(1 + tolerance)) + 1 steps."""
    steps: list[Step] = []

    def run(rate: float) -> Step:
        step = measure(rate, config.step_s, config.warmup_s)
        step.passed, step.phase = passes(step, config.slo_ms), "recheck"
        steps.append(step)
        log.info("%s recheck: offered %.0f req/s -> %.0f ok/s, p99 %s ms, %s", label, rate, step.throughput_rps,
                 step.p99_ms, "pass" if step.passed else "MISS")
        return step

    low, high = around / (1 + width), around * (1 + width)
    best = run(low)
    if not best.passed:
        return {"max_rps": 0.0, "offered_rps": round(low, 1), "censored": "below", "steps": [s.to_dict() for s in steps]}
    top = run(high)
    if top.passed:
        return {"max_rps": round(top.throughput_rps, 1), "offered_rps": round(high, 1), "censored": "above",
                "steps": [s.to_dict() for s in steps]}
    while high / low > 1 + config.tolerance:
        mid = math.sqrt(low * high)
        step = run(mid)
        if step.passed:
            low, best = mid, step
        else:
            high = mid
    return {"max_rps": round(best.throughput_rps, 1), "offered_rps": round(low, 1), "censored": None,
            "steps": [s.to_dict() for s in steps]}


def interleaved_rechecks(servers: dict[str, Callable[[], object]], capacities: dict[str, float],
                         config: SearchConfig, rounds: int = 3, width: float = 0.15,
                         numerator: str | None = None, denominator: str | None = None) -> dict:
    """Re-measure several servers' capacities in interleaved rounds, so that a drift of the machine
    between one server's search and the next one's lands on every server alike.

    ``servers[name]()`` is a context manager that starts the server and yields its ``Measure``
    (stopped on exit); each round visits every server once, the order rotated by one each round.
    With ``numerator``/``denominator`` names, the per-round ratio of their capacities and its
    median, geometric mean and range are added: ``{"order", "<name>": {"runs", "median",
    "censored", "steps"}, "ratio": {"numerator", "denominator", "runs", "median", "geomean",
    "min", "max"}}``."""
    names = list(servers)
    out: dict = {"rounds": rounds, "width": width, "order": []}
    runs: dict[str, list[dict]] = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        out["order"].append(order)
        for name in order:
            with servers[name]() as measure:
                runs[name].append(recheck_capacity(measure, capacities[name], config, width, f"{name} round {r + 1}"))
    for name in names:
        values = [x["max_rps"] for x in runs[name]]
        out[name] = {"runs": values, "median": round(float(np.median(values)), 1),
                     "censored": [x["censored"] for x in runs[name]], "steps": [x["steps"] for x in runs[name]]}
    if numerator in runs and denominator in runs:
        ratios = [round(a["max_rps"] / b["max_rps"], 3) if b["max_rps"] > 0 else None
                  for a, b in zip(runs[numerator], runs[denominator])]
        valid = [x for x in ratios if x is not None]
        out["ratio"] = {"numerator": numerator, "denominator": denominator, "runs": ratios,
                        "median": round(float(np.median(valid)), 3) if valid else None,
                        # a drift that is linear in time enters rotated rounds' ratios in opposite directions
                        "geomean": round(float(np.exp(np.mean(np.log(valid)))), 3) if valid else None,
                        "min": min(valid) if valid else None, "max": max(valid) if valid else None}
    return out
