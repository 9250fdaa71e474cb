"""The capacity search against fake measure functions with a known capacity: nothing is timed."""

from __future__ import annotations

import contextlib

import pytest

from nimbleml.bench.capacity import SearchConfig, Step, find_capacity, interleaved_rechecks, passes, recheck_capacity

FAST = SearchConfig(start_rps=25.0, factor=1.25, max_rps=6000.0, grid_s=1.0, step_s=10.0, warmup_s=3.0, repeats=3)


def fake_server(capacity: float, shed_above: float | None = None):
    """A server that keeps p99 at 10 ms up to ``capacity`` req/s and 500 ms above it; above
    ``shed_above`` it answers 1 % of requests 503 quickly (p99 stays low: shedding hides the tail)."""
    calls: list[tuple[float, float, float]] = []

    def measure(rate: float, duration_s: float, warmup_s: float) -> Step:
        calls.append((rate, duration_s, warmup_s))
        sent = max(1, round(rate * duration_s))
        shed = round(0.01 * sent) if shed_above is not None and rate > shed_above else 0
        p99 = 10.0 if rate <= capacity else 500.0
        return Step(offered_rps=rate, throughput_rps=(sent - shed) / duration_s, sent=sent, ok=sent - shed,
                    p50_ms=2.0, p99_ms=p99)

    return measure, calls


@pytest.mark.parametrize("capacity", [60.0, 294.0, 612.5, 1265.0, 4000.0])
def test_finds_a_known_capacity_within_3_percent(capacity: float) -> None:
    measure, calls = fake_server(capacity)
    found = find_capacity(measure, FAST)
    assert capacity / 1.03 <= found.max_rps <= capacity
    assert found.bracket[0] <= capacity < found.bracket[1]
    assert found.bracket[1] / found.bracket[0] <= 1.03
    assert len(found.max_rps_runs) == 3 and found.repeats_passed == 3 and found.spread == 0.0
    # every bisection step and repeat is a full step after a warm-up at its own rate
    for step, (rate, duration_s, warmup_s) in zip(found.steps, calls):
        assert step.offered_rps == rate
        if step.phase in ("bisect", "repeat"):
            assert (duration_s, warmup_s) == (10.0, 3.0)
    assert [s.phase for s in found.steps].count("repeat") == 3


def test_shedding_cannot_pass_a_step() -> None:
    """Above 500 req/s the fake server sheds 1 % with a fine p99: the capacity is 500, not 900."""
    measure, _ = fake_server(900.0, shed_above=500.0)
    found = find_capacity(measure, FAST)
    assert 500 / 1.03 <= found.max_rps <= 500


def test_a_timeout_at_p99_fails_the_step() -> None:
    step = Step(offered_rps=100, throughput_rps=100, sent=1000, ok=1000, p50_ms=1.0, p99_ms=None)
    assert not passes(step, 50.0)
    assert passes(Step(100, 100, 1000, 1000, 1.0, 49.0), 50.0)
    assert not passes(Step(100, 99.9, 1000, 999, 1.0, 10.0), 50.0)  # one non-2xx
    assert not passes(Step(100, 0, 0, 0, None, None), 50.0)  # nothing sent


def test_a_missed_repeat_moves_the_point_down() -> None:
    """The first repeat at the point misses (noise): the point retreats by the tolerance and all
    repeats are measured again there."""
    clean, _ = fake_server(300.0)
    first_repeat = [s.phase for s in find_capacity(clean, FAST).steps].index("repeat")
    measure, calls = fake_server(300.0)

    def noisy(rate: float, duration_s: float, warmup_s: float) -> Step:
        step = measure(rate, duration_s, warmup_s)
        if len(calls) - 1 == first_repeat:
            step.p99_ms = 80.0
        return step

    found = find_capacity(noisy, FAST)
    repeats = [s for s in found.steps if s.phase == "repeat"]
    assert len(repeats) == 4 and not repeats[0].passed  # the missed point's other repeats are not run
    assert found.offered_rps == pytest.approx(repeats[0].offered_rps / 1.03, abs=0.1)
    assert found.repeats_passed == 3 and 300 / 1.03**2 <= found.max_rps <= 300


def test_retreats_double_until_every_repeat_passes() -> None:
    """A server that passes a rate once but not twice in a row above 850 req/s (it tires): the
    point retreats by 3 %, 6 %, 12 %... until three repeats in a row pass."""
    measure, calls = fake_server(1000.0)

    def tiring(rate: float, duration_s: float, warmup_s: float) -> Step:
        step = measure(rate, duration_s, warmup_s)
        if rate > 850 and len(calls) > 1 and calls[-2][0] == rate:
            step.p99_ms = 200.0
        return step

    found = find_capacity(tiring, FAST)
    points = sorted({s.offered_rps for s in found.steps if s.phase == "repeat"}, reverse=True)
    assert [round(a / b, 4) for a, b in zip(points, points[1:])] == [1.03, round(1.03**2, 4), round(1.03**4, 4)]
    assert found.offered_rps == pytest.approx(points[-1], abs=0.1) and points[-1] <= 850
    assert found.repeats_passed == 3


def test_nothing_passes() -> None:
    measure, calls = fake_server(10.0)
    found = find_capacity(measure, FAST)
    assert found.max_rps == 0.0 and found.offered_rps is None and found.max_rps_runs == []
    assert len(calls) == FAST.misses  # the grid stops after the misses in a row


def test_the_grid_is_bounded_by_max_rps() -> None:
    measure, calls = fake_server(1e9)
    found = find_capacity(measure, SearchConfig(start_rps=100.0, max_rps=200.0, grid_s=1.0, repeats=2))
    assert max(rate for rate, _, _ in calls) <= 200.0
    assert found.bracket[1] is None and found.offered_rps == pytest.approx(195.3, abs=0.1)


def test_recheck_bisects_around_a_known_capacity() -> None:
    measure, calls = fake_server(1000.0)
    found = recheck_capacity(measure, 950.0, FAST, width=0.15)
    assert found["censored"] is None
    assert 1000 / 1.03 <= found["max_rps"] <= 1000
    assert all((d, w) == (10.0, 3.0) for _, d, w in calls)
    assert len(calls) <= 2 + 4  # both ends, then bisection to 3 %


def test_recheck_says_when_the_capacity_left_its_bracket() -> None:
    above = recheck_capacity(fake_server(2000.0)[0], 1000.0, FAST, width=0.15)
    assert above["censored"] == "above" and above["max_rps"] == pytest.approx(1150.0, rel=0.01)
    below = recheck_capacity(fake_server(500.0)[0], 1000.0, FAST, width=0.15)
    assert below["censored"] == "below" and below["max_rps"] == 0.0


def test_interleaved_rounds_cancel_a_drift_that_sequential_searches_do_not() -> None:
    """The machine slows down 5 % with every server start. Two sequential searches read the drift
    into the ratio; with the order rotated each round, the drift enters the two rounds' ratios in
    opposite directions, so their geometric mean is the true ratio (4) within the tolerance."""
    starts = {"n": 0}

    def server(capacity: float):
        @contextlib.contextmanager
        def started():
            starts["n"] += 1
            yield fake_server(capacity * (1 - 0.05 * starts["n"]))[0]
        return started

    true = {"ours": 2000.0, "naive": 500.0}
    sequential = {n: find_capacity(fake_server(c * (1 - 0.05 * (i + 1)))[0], FAST).max_rps
                  for i, (n, c) in enumerate(true.items())}
    assert sequential["ours"] / sequential["naive"] / 4.0 > 1.04  # the drift shows in a sequential ratio
    out = interleaved_rechecks({n: server(c) for n, c in true.items()}, {"ours": 1900.0, "naive": 480.0}, FAST,
                               rounds=2, width=0.3, numerator="ours", denominator="naive")
    assert out["order"] == [["ours", "naive"], ["naive", "ours"]]
    assert len(out["ours"]["runs"]) == 2 and out["ours"]["censored"] == [None, None]
    first, second = out["ratio"]["runs"]
    assert first > 4.0 > second  # ours first in round 1, last in round 2
    assert (first * second) ** 0.5 == pytest.approx(4.0, rel=0.035)
    assert out["ratio"]["min"] <= out["ratio"]["median"] <= out["ratio"]["max"]
