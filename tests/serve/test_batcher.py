"""DynamicBatcher: batching by size and delay, the priority lane, bounded queues, deadlines."""

from __future__ import annotations

import asyncio
import time

import pytest

from nimbleml.serve.batcher import BatcherConfig, DeadlineExceeded, DynamicBatcher, QueueFull


def run(coro):
    return asyncio.run(coro)


def test_batches_form_by_size_and_each_caller_gets_its_own_result():
    sizes: list[int] = []

    async def double(items, priority, deadlines=None):
        sizes.append(len(items))
        return [2 * x for x in items]

    async def main():
        batcher = DynamicBatcher(double, BatcherConfig(max_batch_size=4, max_queue_delay_ms=200))
        results = await asyncio.gather(*(batcher.submit(i, priority=1) for i in range(8)))
        await batcher.close()
        return results

    assert run(main()) == [2 * i for i in range(8)]
    assert sizes == [4, 4]  # full batches leave without waiting out the 200 ms delay


def test_a_lone_request_leaves_after_the_delay():
    async def echo(items, priority, deadlines=None):
        return items

    async def main():
        batcher = DynamicBatcher(echo, BatcherConfig(max_batch_size=64, max_queue_delay_ms=1))
        value = await asyncio.wait_for(batcher.submit("x"), 2.0)
        await batcher.close()
        return value, batcher.stats.batches

    assert run(main()) == ("x", 1)


def test_preferred_sizes_cut_batches():
    sizes: list[int] = []

    async def echo(items, priority, deadlines=None):
        sizes.append(len(items))
        return items

    async def main():
        cfg = BatcherConfig(max_batch_size=8, max_queue_delay_ms=50, preferred_batch_sizes=(2, 4))
        batcher = DynamicBatcher(echo, cfg)
        await asyncio.gather(*(batcher.submit(i) for i in range(6)))
        await batcher.close()

    run(main())
    assert sizes[0] == 4 and sum(sizes) == 6 and set(sizes) <= {2, 4}


def test_priority_lane_bypasses_a_busy_batcher():
    order: list[str] = []
    priorities: list[int] = []
    release = None

    async def slow(items, priority, deadlines=None):
        priorities.append(priority)
        if items[0].startswith("low"):
            await release.wait()
        order.extend(items)
        return items

    async def main():
        nonlocal release
        release = asyncio.Event()
        cfg = BatcherConfig(max_batch_size=2, max_queue_delay_ms=1, max_inflight_batches=1)
        batcher = DynamicBatcher(slow, cfg)
        lows = [asyncio.ensure_future(batcher.submit(f"low{i}", priority=2)) for i in range(6)]
        await asyncio.sleep(0.05)  # the first low batch holds the only slot; the rest queue
        high = await asyncio.wait_for(batcher.submit("high", priority=0), 2.0)
        release.set()
        await asyncio.gather(*lows)
        await batcher.close()
        return high

    assert run(main()) == "high"
    assert order[0] == "high"  # answered while the low-priority batches were stuck
    assert priorities[:2] == [2, 0]  # run_batch learns each batch's lane


def test_full_lane_rejects_at_once():
    async def never(items, priority, deadlines=None):
        await asyncio.Event().wait()

    async def main():
        cfg = BatcherConfig(max_batch_size=1, max_queue_size=2, max_inflight_batches=1, max_queue_delay_ms=0)
        batcher = DynamicBatcher(never, cfg)
        waiting = [asyncio.ensure_future(batcher.submit(0))]
        await asyncio.sleep(0.05)  # it runs (and never ends) ...
        waiting += [asyncio.ensure_future(batcher.submit(i)) for i in (1, 2)]
        await asyncio.sleep(0.05)  # ... so these two fill the lane
        with pytest.raises(QueueFull):
            await batcher.submit(99)
        for task in waiting:
            task.cancel()
        for task in list(batcher._tasks):
            task.cancel()
        await batcher.close()
        return batcher.stats.rejected_full

    assert run(main()) == 1


def test_deadline_rejects_instead_of_answering_late():
    async def slow(items, priority, deadlines=None):
        await asyncio.sleep(0.3)
        return items

    async def main():
        cfg = BatcherConfig(max_batch_size=1, max_inflight_batches=1, max_queue_delay_ms=0)
        batcher = DynamicBatcher(slow, cfg)
        first = asyncio.ensure_future(batcher.submit("a"))
        await asyncio.sleep(0.01)
        with pytest.raises(DeadlineExceeded):
            await batcher.submit("b", timeout_s=0.05)
        assert await first == "a"
        await batcher.close()

    run(main())


def test_a_failing_batch_fails_every_caller():
    async def boom(items, priority, deadlines=None):
        raise RuntimeError("worker died")

    async def main():
        batcher = DynamicBatcher(boom, BatcherConfig(max_batch_size=4, max_queue_delay_ms=5))
        results = await asyncio.gather(*(batcher.submit(i) for i in range(3)), return_exceptions=True)
        await batcher.close()
        return results

    results = run(main())
    assert all(isinstance(r, RuntimeError) for r in results)


def test_config_rejects_bad_sizes():
    with pytest.raises(ValueError):
        BatcherConfig(max_batch_size=4, preferred_batch_sizes=(8,))


def test_queued_requests_of_similar_size_share_a_batch_and_the_oldest_goes_first():
    batches: list[list[int]] = []

    async def record(items, priority, deadlines=None):
        batches.append(list(items))
        return items

    async def main(size_of):
        batcher = DynamicBatcher(record, BatcherConfig(max_batch_size=4, max_queue_delay_ms=200, group_window=4),
                                 size_of=size_of)
        lengths = [50, 1, 49, 2, 48, 3, 47, 4, 46, 5, 45, 6, 44, 7, 43, 8]
        results = await asyncio.gather(*(batcher.submit(n, priority=1) for n in lengths))
        await batcher.close()
        return results, lengths

    results, lengths = run(main(lambda n: n))
    assert results == lengths  # each caller still gets its own answer
    assert batches == [[50, 49, 48, 47], [1, 2, 3, 4], [46, 45, 44, 43], [5, 6, 7, 8]]
    batches.clear()
    run(main(None))  # no size: plain FIFO
    assert batches[0] == [50, 1, 49, 2]


def test_priority_lane_has_its_own_queue_bound_and_slot_budget():
    """A premium flood gets at most ``priority_slots`` batches running and ``priority_queue_size`` queued."""
    running, most = 0, 0
    release = None

    async def slow(items, priority, deadlines=None):
        nonlocal running, most
        running += 1
        most = max(most, running)
        await release.wait()
        running -= 1
        return items

    async def main():
        nonlocal release
        release = asyncio.Event()
        config = BatcherConfig(max_batch_size=2, priority_queue_size=4, priority_slots=2)
        batcher = DynamicBatcher(slow, config)
        flood = [asyncio.ensure_future(batcher.submit(i, priority=0)) for i in range(4)]
        await asyncio.sleep(0.05)  # two batches of 2 running: both priority slots taken
        flood += [asyncio.ensure_future(batcher.submit(i, priority=0)) for i in range(4, 8)]
        await asyncio.sleep(0.05)  # 4 queued behind them: the priority queue is full
        with pytest.raises(QueueFull):
            await batcher.submit(99, priority=0)
        low = asyncio.ensure_future(batcher.submit("low", priority=1))  # the batched lanes still take work
        await asyncio.sleep(0.05)
        assert most == 3  # 2 priority batches + the standard one: never a third priority batch
        release.set()
        assert sorted(await asyncio.gather(*flood)) == list(range(8))
        assert await low == "low"
        await batcher.close()

    asyncio.run(main())
    assert most == 3


def test_deadlines_reach_run_batch_and_a_skipped_row_fails_alone():
    seen = []

    async def skip_late(items, priority, deadlines):
        seen.append(deadlines)
        return [DeadlineExceeded("skipped") if d < 0 else item for item, d in zip(items, deadlines)]

    async def main():
        batcher = DynamicBatcher(skip_late, BatcherConfig(max_batch_size=4, max_queue_delay_ms=20))
        ok = asyncio.ensure_future(batcher.submit("ok", timeout_s=5.0))
        free = asyncio.ensure_future(batcher.submit("free"))
        results = await asyncio.gather(ok, free, return_exceptions=True)
        await batcher.close()
        return results

    results = asyncio.run(main())
    assert results == ["ok", "free"]
    deadlines = seen[0]
    assert deadlines[0] > time.monotonic() and deadlines[1] == float("inf")

    async def expire_first():
        batcher = DynamicBatcher(lambda items, p, d: _answer([DeadlineExceeded("late"), items[1]]),
                                 BatcherConfig(max_batch_size=2, max_queue_delay_ms=20))
        out = await asyncio.gather(batcher.submit("a"), batcher.submit("b"), return_exceptions=True)
        stats = batcher.stats
        await batcher.close()
        return out, stats

    out, stats = asyncio.run(expire_first())
    assert isinstance(out[0], DeadlineExceeded) and out[1] == "b" and stats.expired == 1


async def _answer(value):
    return value


def test_worker_skips_rows_past_their_deadline():
    import numpy as np

    from nimbleml.serve.worker import run_in_time

    class Doubler:
        def __init__(self):
            self.rows = []

        def run(self, graph, inputs):
            self.rows.append(len(inputs["x"]))
            return inputs["x"] * 2

    x = np.arange(4)
    now = time.monotonic()
    model = Doubler()
    out, live = run_in_time(model, "g", {"x": x}, np.array([now + 60, now - 1, now + 60, now - 1]))
    assert out.tolist() == [0, 4] and live.tolist() == [True, False, True, False]
    out, live = run_in_time(model, "g", {"x": x}, np.full(4, now - 1))
    assert len(out) == 0 and not live.any()
    out, live = run_in_time(model, "g", {"x": x}, np.full(4, np.inf))
    assert out.tolist() == [0, 2, 4, 6] and live is None
    assert model.rows == [2, 4]  # the all-late batch never ran
