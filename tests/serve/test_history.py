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


def test_in_process_store_keeps_the_most_recently_used_users_and_counts_evictions():
    evicted = []

    async def main():
        store = InProcessHistory(max_events=5, max_users=2, on_evict=lambda: evicted.append(1))
        await store.append("a", 1, 1, 0)
        await store.append("b", 2, 1, 0)
        assert (await store.get("a")).version == 1  # a read makes "a" recent: "b" goes first
        await store.append("c", 3, 1, 0)
        assert (await store.get("b")).version == 0
        assert (await store.get("a")).items.tolist() == [1] and (await store.get("c")).items.tolist() == [3]
        await store.get("nobody")  # an unknown user is not stored by a read
        await store.append("a", 4, 1, 0)
        assert store.evictions == 1 and len(evicted) == 1
        await store.append("d", 5, 1, 0)
        assert store.evictions == 2 and (await store.get("c")).version == 0

    asyncio.run(main())
    with pytest.raises(ValueError):
        InProcessHistory(max_users=0)


@pytest.mark.parametrize("user", ["a:version", "a b", "{a}", "a}", "é", "a\n", "x" * 129, ""])
def test_user_ids_are_validated(user):
    import msgspec

    from nimbleml.serve.schemas import IngestRequest, RecommendRequest

    with pytest.raises(msgspec.ValidationError):
        msgspec.json.decode(msgspec.json.encode({"user_id": user, "item_id": 1, "ts": 0}), type=IngestRequest)
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"user_id": user}, RecommendRequest)
    assert msgspec.convert({"user_id": "team-a.user_42@x+y=z"}, RecommendRequest).user_id


def test_redis_keys_of_two_users_never_collide():
    """``u`` and ``u:version`` once shared a key (u's version counter was u:version's event list)."""
    url = redis_url()

    async def main():
        store = RedisHistory(url, max_events=5, prefix=f"test:{uuid.uuid4().hex}:", timeout_s=5.0)
        try:
            users = ["u", "u:version", "{u}", "v:{u}", "e:{u}"]  # ids the schema refuses: the store is safe anyway
            for n, user in enumerate(users, start=1):
                for i in range(n):
                    assert await store.append(user, item=10 * n + i, behavior=1, ts=0) == i + 1
            for n, user in enumerate(users, start=1):
                history = await store.get(user)
                assert history.version == n and history.items.tolist() == [10 * n + i for i in range(n)], user
            events, version = store._keys("u")
            assert events.endswith("{u}") and version.endswith("{u}")  # one cluster slot per user
            for user in users:
                await store.clear(user)
        finally:
            await store.close()

    asyncio.run(main())


def test_a_redis_error_is_a_503_counted_in_the_5xx_metric(rec_bundle):
    """Not only a dead Redis: one that answers an error (here WRONGTYPE) is a 503, never a 500 or an empty history."""
    import httpx
    import redis

    from nimbleml.serve.app import build_app
    from nimbleml.serve.bundle import Bundle
    from nimbleml.serve.keys import KeyRing, parse_env
    from nimbleml.serve.service import Service
    from tests.serve.conftest import KEYS, KEYS_ENV

    url = redis_url()
    prefix = f"test:{uuid.uuid4().hex}:"
    store = RedisHistory(url, prefix=prefix, timeout_s=5.0)
    redis.Redis.from_url(url).set(store._keys("broken")[0], "not a list")

    async def main():
        service = Service(Bundle.load(rec_bundle), KeyRing(parse_env(KEYS_ENV), {"free", "standard", "premium"}),
                          store=store)
        transport = httpx.ASGITransport(app=build_app(service))
        try:
            async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
                headers = {"x-api-key": KEYS["standard"]}
                for path, body in (("/v1/ingest", {"user_id": "broken", "item_id": 1, "ts": 0}),
                                   ("/v1/recommend", {"user_id": "broken", "candidates": list(range(1, 51))})):
                    answer = await client.post(path, json=body, headers=headers)
                    assert answer.status_code == 503, answer.text
                    assert "history store" in answer.json()["error"] and answer.headers["retry-after"]
            text = service.render_metrics().decode()
            assert 'nimbleml_requests_total{route="ingest",status="503",tier="standard"} 1.0' in text
            assert 'nimbleml_requests_total{route="recommend",status="503",tier="standard"} 1.0' in text
            assert "nimbleml_history_store_errors_total 2.0" in text
        finally:
            await store.clear("broken")
            await store.close()

    asyncio.run(main())


def test_evictions_reach_the_metric(rec_bundle):
    from nimbleml.serve.bundle import Bundle
    from nimbleml.serve.keys import KeyRing
    from nimbleml.serve.service import Service

    async def main():
        service = Service(Bundle.load(rec_bundle), KeyRing({}, {"free", "standard", "premium"}),
                          store=InProcessHistory(max_users=1))
        await service.store.append("a", 1, 1, 0)
        await service.store.append("b", 1, 1, 0)
        assert "nimbleml_history_evictions_total 1.0" in service.render_metrics().decode()

    asyncio.run(main())
