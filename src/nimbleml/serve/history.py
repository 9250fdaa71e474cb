"""The user behaviour store: the last N events per user, in process or in Redis.

An Ingest appends atomically per user: Redis runs LPUSH + LTRIM + INCR in one Lua script, so
two clicks of one user never interleave and the list never exceeds N. Each user also has a
version counter (events ever appended); the state cache compares it to know a cached user
state is stale. A store that cannot be reached raises ``StoreUnavailable`` (the front ends
answer 503), it never answers an empty history in its place.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections import deque
from dataclasses import dataclass

import numpy as np

MAX_EVENTS = 100  # the serving contract: the last 100 behaviours per user


class StoreUnavailable(Exception):
    """The history store cannot be reached (Redis down): answer 503, retry later."""


@dataclass
class History:
    """A user's recent events, oldest first, and how many events were ever appended."""

    items: np.ndarray  # (n,) int64 item ids, oldest first, n <= MAX_EVENTS
    behaviors: np.ndarray  # (n,) int64 behaviour codes
    version: int  # events ever appended for this user (0 = unknown user)


class HistoryStore(ABC):
    """Append a user's event; read a user's last ``max_events`` events."""

    name = ""

    def __init__(self, max_events: int = MAX_EVENTS):
        self.max_events = max_events

    @abstractmethod
    async def append(self, user: str, item: int, behavior: int, ts: int) -> int:
        """Append one event atomically; returns the user's new version."""

    @abstractmethod
    async def get(self, user: str) -> History:
        """The user's history (empty, version 0, for an unknown user)."""

    async def close(self) -> None:
        return None


class InProcessHistory(HistoryStore):
    """A dict of bounded deques: the default, lost when the server stops."""

    name = "memory"

    def __init__(self, max_events: int = MAX_EVENTS):
        super().__init__(max_events)
        self._events: dict[str, deque] = {}
        self._versions: dict[str, int] = {}

    async def append(self, user: str, item: int, behavior: int, ts: int) -> int:
        self._events.setdefault(user, deque(maxlen=self.max_events)).append((item, behavior))
        self._versions[user] = self._versions.get(user, 0) + 1
        return self._versions[user]

    async def get(self, user: str) -> History:
        events = self._events.get(user, ())
        items = np.fromiter((e[0] for e in events), dtype=np.int64, count=len(events))
        behaviors = np.fromiter((e[1] for e in events), dtype=np.int64, count=len(events))
        return History(items, behaviors, self._versions.get(user, 0))


# KEYS[1] = the user's event list (newest first), KEYS[2] = its version counter;
# ARGV[1] = "item:behaviour:ts", ARGV[2] = how many events to keep. One script = one atomic step.
_APPEND_LUA = """
redis.call('LPUSH', KEYS[1], ARGV[1])
redis.call('LTRIM', KEYS[1], 0, tonumber(ARGV[2]) - 1)
return redis.call('INCR', KEYS[2])
"""


class RedisHistory(HistoryStore):
    """Events in a Redis list per user, trimmed to ``max_events``, behind one Lua script."""

    name = "redis"

    def __init__(self, url: str, max_events: int = MAX_EVENTS, prefix: str = "nimbleml:history:",
                 timeout_s: float = 0.5):
        super().__init__(max_events)
        import redis.asyncio as aioredis

        self.url = url
        self.prefix = prefix
        self._client = aioredis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        self._append = self._client.register_script(_APPEND_LUA)

    def _keys(self, user: str) -> tuple[str, str]:
        return f"{self.prefix}{user}", f"{self.prefix}{user}:version"

    async def _call(self, awaitable):
        import redis.exceptions

        try:
            return await awaitable
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError, asyncio.TimeoutError) as exc:
            raise StoreUnavailable(f"history store at {self.url} unreachable: {exc}") from exc

    async def ping(self) -> bool:
        await self._call(self._client.ping())
        return True

    async def append(self, user: str, item: int, behavior: int, ts: int) -> int:
        events, version = self._keys(user)
        return int(await self._call(self._append(keys=[events, version], args=[f"{item}:{behavior}:{ts}", self.max_events])))

    async def get(self, user: str) -> History:
        events, version = self._keys(user)
        pipe = self._client.pipeline(transaction=True)  # MULTI/EXEC: list and version read together
        pipe.lrange(events, 0, self.max_events - 1)
        pipe.get(version)
        raw, count = await self._call(pipe.execute())
        parsed = [entry.split(b":") for entry in reversed(raw)]  # stored newest first
        items = np.array([int(p[0]) for p in parsed], dtype=np.int64)
        behaviors = np.array([int(p[1]) for p in parsed], dtype=np.int64)
        return History(items, behaviors, int(count or 0))

    async def clear(self, user: str) -> None:
        await self._call(self._client.delete(*self._keys(user)))

    async def close(self) -> None:
        await self._client.aclose()


def open_store(redis_url: str | None, max_events: int = MAX_EVENTS) -> HistoryStore:
    """In process without a URL, Redis with one."""
    return RedisHistory(redis_url, max_events) if redis_url else InProcessHistory(max_events)
