"""The user behaviour store: the last N events per user, in process or in Redis.

An Ingest appends atomically per user: Redis runs LPUSH + LTRIM + INCR in one Lua script, so
two clicks of one user never interleave and the list never exceeds N. Each user also has a
version counter (events ever appended); the state cache compares it to know a cached user
state is stale. A store that cannot be reached or answers an error raises ``StoreUnavailable``
(the front ends answer 503), it never answers an empty history in its place.

User ids reach the stores validated (``schemas.UserId``: letters, digits and ``._@+=-``). The
in-process store keeps at most ``max_users`` users (least recently used go first, counted).
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

MAX_EVENTS = 100  # the serving contract: the last 100 behaviours per user
MAX_USERS = 1_000_000  # users the in-process store keeps (~2 KiB each at 100 events: ~2 GiB at most)


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
    """Bounded deques per user, at most ``max_users`` users (LRU): the default, lost when the server stops.

    An evicted user comes back as unknown (version 0); ``evictions`` counts them and ``on_evict``
    is called for each (the server's metric)."""

    name = "memory"

    def __init__(self, max_events: int = MAX_EVENTS, max_users: int = MAX_USERS,
                 on_evict: Callable[[], None] | None = None):
        super().__init__(max_events)
        if max_users < 1:
            raise ValueError(f"max_users must be >= 1, got {max_users}")
        self.max_users = max_users
        self.on_evict = on_evict
        self.evictions = 0
        self._users: OrderedDict[str, tuple[deque, int]] = OrderedDict()  # user -> (events, version)

    async def append(self, user: str, item: int, behavior: int, ts: int) -> int:
        events, version = self._users.pop(user, None) or (deque(maxlen=self.max_events), 0)
        events.append((item, behavior))
        self._users[user] = (events, version + 1)  # re-inserted: now the most recently used
        while len(self._users) > self.max_users:
            self._users.popitem(last=False)
            self.evictions += 1
            if self.on_evict is not None:
                self.on_evict()
        return version + 1

    async def get(self, user: str) -> History:
        events, version = self._users.get(user) or ((), 0)
        if version:
            self._users.move_to_end(user)
        items = np.fromiter((e[0] for e in events), dtype=np.int64, count=len(events))
        behaviors = np.fromiter((e[1] for e in events), dtype=np.int64, count=len(events))
        return History(items, behaviors, version)


# KEYS[1] = the user's event list (newest first), KEYS[2] = its version counter;
# ARGV[1] = "item:behaviour:ts", ARGV[2] = how many events to keep. One script = one atomic step.
_APPEND_LUA = """
redis.call('LPUSH', KEYS[1], ARGV[1])
redis.call('LTRIM', KEYS[1], 0, tonumber(ARGV[2]) - 1)
return redis.call('INCR', KEYS[2])
"""


class RedisHistory(HistoryStore):
    """Events in a Redis list per user, trimmed to ``max_events``, behind one Lua script.

    Keys: ``{prefix}e:{USER}`` (the events) and ``{prefix}v:{USER}`` (the version): two key spaces,
    so no user id can name another user's key whatever it holds, and the ``{USER}`` hash tag puts
    both keys of a user in one Redis Cluster slot (the script touches both)."""

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
        return f"{self.prefix}e:{{{user}}}", f"{self.prefix}v:{{{user}}}"

    async def _call(self, awaitable):
        import redis.exceptions

        try:
            return await awaitable
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError, asyncio.TimeoutError) as exc:
            raise StoreUnavailable(f"history store at {self.url} unreachable: {exc}") from exc
        except redis.exceptions.RedisError as exc:  # OOM, READONLY, WRONGTYPE...: not a history, not a 500
            raise StoreUnavailable(f"history store at {self.url} answered an error: {exc}") from exc

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


def open_store(redis_url: str | None, max_events: int = MAX_EVENTS, max_users: int = MAX_USERS) -> HistoryStore:
    """In process (at most ``max_users`` users) without a URL, Redis with one."""
    return RedisHistory(redis_url, max_events) if redis_url else InProcessHistory(max_events, max_users)
