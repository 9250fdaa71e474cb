"""History stores: last N events, versions, atomic appends; Redis when NIMBLEML_TEST_REDIS is set."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from nimbleml.serve.history import InProcessHistory, RedisHistory, StoreUnavailable
from tests.serve.conftest import redis_url


async def _exercise(store, user: str) -> None:
    assert (await store.get(user)).version == 0
    for i in range(1, 8):
        assert await store.append(user, item=i, behavior=1 + i % 4, ts=1000 + i) == i
    history = await store.get(user)
    assert history.items.tolist() == [3, 4, 5, 6, 7]  # the last 5, oldest first
    assert history.behaviors.tolist() == [1 + i % 4 for i in range(3, 8)]
    assert history.version == 7
    # concurrent appends of one user: none lost from the version, list still bounded
    await asyncio.gather(*(store.append(user, item=100 + i, behavior=1, ts=0) for i in range(50)))
    history = await store.get(user)
    assert history.version == 57 and len(history.items) == 5
    assert set(history.items.tolist()) <= set(range(100, 150))


def test_in_process_store():
    asyncio.run(_exercise(InProcessHistory(max_events=5), "u1"))


def test_redis_store():
    url = redis_url()

    async def main():
        # a generous timeout: this test checks the store, not latency (a busy CI box can stall 0.5 s)
        store = RedisHistory(url, max_events=5, prefix=f"test:{uuid.uuid4().hex}:", timeout_s=5.0)
        try:
            await _exercise(store, "u1")
            await store.clear("u1")
        finally:
            await store.close()

    asyncio.run(main())


def test_unreachable_redis_is_an_error_not_an_empty_history():
    async def main():
        store = RedisHistory("redis://127.0.0.1:1/0", timeout_s=0.2)  # port 1: nothing listens there
        try:
            with pytest.raises(StoreUnavailable):
                await store.get("u1")
            with pytest.raises(StoreUnavailable):
                await store.append("u1", 1, 1, 0)
        finally:
            await store.close()

    asyncio.run(main())
