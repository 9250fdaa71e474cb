"""Token buckets and load shedding: free tier goes first, premium keeps going."""

from __future__ import annotations

from nimbleml.serve.limiter import AdmissionController, SharedBuckets, ShedConfig, TierPolicy, TokenBucket


def test_bucket_grants_burst_then_refills_at_rate():
    bucket = TokenBucket(rate=10.0, burst=3)
    t = 100.0
    assert [bucket.take(t) for _ in range(3)] == [0.0, 0.0, 0.0]
    wait = bucket.take(t)
    assert 0.09 < wait <= 0.1  # one token per 100 ms
    assert bucket.take(t + 0.11) == 0.0


def test_tier_bucket_refuses_with_retry_after():
    tiers = {"free": TierPolicy(rate_rps=1.0, burst=1, priority=2, shed_rank=0)}
    ctl = AdmissionController(tiers)
    assert ctl.admit("free", 0, now=5.0).admitted
    decision = ctl.admit("free", 0, now=5.0)
    assert not decision.admitted and decision.reason == "rate" and decision.retry_after_s > 0


def test_shedding_by_queue_depth_goes_up_the_tiers():
    ctl = AdmissionController(shed=ShedConfig(soft_queue_depth=10, hard_queue_depth=20))
    assert ctl.admit("free", 5).admitted
    assert not ctl.admit("free", 10).admitted and ctl.admit("free", 10).reason == "overload"
    assert ctl.admit("standard", 10).admitted
    assert not ctl.admit("standard", 25).admitted
    assert ctl.admit("premium", 1000).admitted


def test_shedding_by_recent_p99():
    ctl = AdmissionController(shed=ShedConfig(target_p99_ms=50, window_s=1.0))
    for _ in range(100):
        ctl.latency.add(80.0, now=10.0)
    assert ctl.overload_level(10, now=10.1) == 1
    assert not ctl.admit("free", 10, now=10.1).admitted
    assert ctl.overload_level(0, now=10.1) == 0  # nothing queued: a slow second gone by refuses nothing
    assert ctl.overload_level(10, now=12.0) == 0  # the slow requests aged out of the window


def test_a_slow_lowest_tier_does_not_shed_the_tier_above() -> None:
    ctl = AdmissionController(shed=ShedConfig(target_p99_ms=50, window_s=1.0))
    for _ in range(100):  # free requests wait behind standard by design: slow, but nobody else is
        ctl.latency.add(300.0, rank=0, now=10.0)
        ctl.latency.add(5.0, rank=1, now=10.0)
    assert ctl.overload_level(10, now=10.1) == 0
    for _ in range(100):
        ctl.latency.add(120.0, rank=1, now=10.2)
    assert ctl.overload_level(10, now=10.3) == 2  # standard itself is slow: shed free and standard
    assert ctl.admit("premium", 10, now=10.3).admitted


def test_a_lagging_event_loop_sheds_lower_tiers_first() -> None:
    ctl = AdmissionController(shed=ShedConfig(soft_loop_lag_ms=4.0, hard_loop_lag_ms=10.0))
    ctl.loop_lag.record(0.5, now=1.0)
    assert ctl.overload_level(0, now=1.0) == 0
    for tick in range(20):  # the front end falls 6 ms behind, again and again
        ctl.loop_lag.record(6.0, now=1.0 + tick * 0.01)
    assert ctl.overload_level(0, now=1.2) == 1
    assert not ctl.admit("free", 0, now=1.2).admitted and ctl.admit("premium", 0, now=1.2).admitted
    for tick in range(20):
        ctl.loop_lag.record(30.0, now=1.2 + tick * 0.01)
    assert ctl.overload_level(0, now=1.4) == 2
    assert not ctl.admit("standard", 0, now=1.4).admitted and ctl.admit("premium", 0, now=1.4).admitted
    assert ctl.overload_level(0, now=3.0) == 0  # the monitor stopped: no stale shedding


def test_one_stall_does_not_shed() -> None:
    ctl = AdmissionController(shed=ShedConfig(soft_loop_lag_ms=4.0))
    for tick in range(10):
        ctl.loop_lag.record(0.2, now=tick * 0.005)
    ctl.loop_lag.record(15.0, now=0.06)  # a garbage-collection pause
    assert ctl.overload_level(0, now=0.06) == 0


def test_one_key_cannot_spend_its_whole_tier() -> None:
    """Per-key buckets inside a tier: a greedy free key is refused while another free key still gets through."""
    tiers = {"free": TierPolicy(rate_rps=10.0, burst=10, priority=2, shed_rank=0, key_rate_rps=1.0, key_burst=3)}
    ctl = AdmissionController(tiers)
    greedy = [ctl.admit("free", 0, now=1.0, key="greedy") for _ in range(10)]
    assert sum(d.admitted for d in greedy) == 3
    assert greedy[-1].reason == "key_rate" and greedy[-1].retry_after_s > 0
    assert all(ctl.admit("free", 0, now=1.0, key="polite").admitted for _ in range(3))
    assert ctl.admit("free", 0, now=2.1, key="greedy").admitted  # its own bucket refilled
    # the tier's bucket still caps the sum of its keys
    many = [ctl.admit("free", 0, now=2.1, key=f"k{i}").admitted for i in range(20)]
    assert sum(many) < 20 and ctl.admit("free", 0, now=2.1, key="k99").reason == "rate"


def test_default_tiers_have_per_key_limits_below_the_tier() -> None:
    from nimbleml.serve.limiter import default_tiers

    for name, policy in default_tiers().items():
        assert policy.key_rate_rps is not None and policy.key_rate_rps < policy.rate_rps, name


def _spend_in_child(buckets, tier: str, key: str, tries: int, out) -> None:
    """Another process's admission controller on the same shared buckets (spawned)."""
    ctl = AdmissionController(shared=buckets)
    out.value = sum(ctl.admit(tier, 0, key=key).admitted for _ in range(tries))


def test_front_ends_share_one_bucket_per_tier_and_key() -> None:
    """Two processes on SharedBuckets: a key's burst is spent once for both, not once each."""
    import multiprocessing as mp

    tiers = {"free": TierPolicy(rate_rps=0.001, burst=100, priority=2, shed_rank=0, key_rate_rps=0.001, key_burst=5)}
    ctx = mp.get_context("spawn")
    buckets = SharedBuckets(tiers, [("free", "k1")], ctx)
    here = AdmissionController(shared=buckets)
    assert sum(here.admit("free", 0, key="k1").admitted for _ in range(3)) == 3
    granted = ctx.Value("i", -1)
    child = ctx.Process(target=_spend_in_child, args=(buckets, "free", "k1", 10, granted))
    child.start()
    child.join(60)
    assert granted.value == 2  # 5 for the key across both processes: 3 here, 2 there
    assert here.admit("free", 0, key="k1").reason == "key_rate"
    assert sum(here.admit("free", 0, key="k2").admitted for _ in range(10)) == 5  # an unknown key: a bucket of its own

