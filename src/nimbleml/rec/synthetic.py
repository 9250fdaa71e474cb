"""SYNTHETIC behaviour logs in the exact Taobao UserBehavior format, for tests, demos and benchmarks.

Nothing written here is real data. The files mimic the real one's *format and shape*:
no header, ``user_id,item_id,category_id,behavior_type,timestamp``, behaviour in
{pv, cart, fav, buy}, Unix seconds, rows grouped by user (users in string order, as in
the real file), times mostly but not fully sorted within a user.

Two generators (and :data:`SYNTHETIC_LOGS`, named settings of the first):

- :func:`write_synthetic_taobao`: small, realistic logs with Zipf item popularity,
  category structure, the real behaviour mix and *sessions* (bursts on one category,
  revisits, cart/fav/buy on items just viewed), so a sequence model has signal to find
  and can beat a popularity ranking.
- :func:`write_taobao_rows`: a fast, numpy-vectorised writer of N rows for loader
  benchmarks; popularity is skewed but there is no sequential structure.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

log = logging.getLogger(__name__)

BEHAVIOR_NAMES = ("pv", "cart", "fav", "buy")
BEHAVIOR_MIX = (0.89, 0.055, 0.03, 0.025)  # share of pv, cart, fav, buy (real Taobao: ~0.90/0.05/0.03/0.02)
WINDOW_START = 1511539200  # 2017-11-25 00:00 UTC+0, start of the real dataset's nine days (Unix seconds)
WINDOW_SECONDS = 9 * 86400  # the real dataset spans nine days


@dataclass
class SessionConfig:
    """How synthetic users browse (write_synthetic_taobao); defaults give Taobao-like logs."""

    zipf_items: float = 1.05  # Zipf exponent of item popularity within the catalogue
    zipf_categories: float = 0.9  # Zipf exponent of category size / popularity
    favourite_categories: tuple[int, int] = (2, 6)  # each user has this many favourite categories (min, max)
    p_favourite: float = 0.8  # chance a session is about one of the user's favourite categories
    mean_session_events: float = 8.0  # mean events per session (geometric)
    p_revisit: float = 0.35  # chance a pv goes back to an item already seen in the session
    mean_gap_seconds: float = 75.0  # mean time between events within a session (exponential)
    p_out_of_order: float = 0.03  # share of adjacent row pairs swapped, so times are not fully sorted


@dataclass
class SyntheticLog:
    """A named synthetic log (:data:`SYNTHETIC_LOGS`): catalogue, history lengths, browsing."""

    n_items: int
    events_per_user: tuple[int, int]  # events per user (min, max), uniform
    session: SessionConfig


# The logs the repeat-heavy comparisons use (docs/recommendation.md). Test-target repeat shares
# at 2,000 users, seed 0: "no-revisit" 74.8% (cart/fav/buy still fall on viewed items),
# "revisit-0.35" 79.7%, "revisit-0.7" 84.5% (bench/rec_repeat_sweep.py's logs), "short-repeat"
# ~80% with short histories, 10-30 events (issue 26's repeat-heavy log with 1,000 items).
SYNTHETIC_LOGS: dict[str, SyntheticLog] = {
    "no-revisit": SyntheticLog(1000, (20, 150), SessionConfig(p_revisit=0.0)),
    "revisit-0.35": SyntheticLog(1000, (20, 150), SessionConfig(p_revisit=0.35)),
    "revisit-0.7": SyntheticLog(1000, (20, 150), SessionConfig(p_revisit=0.7)),
    "short-repeat": SyntheticLog(1000, (10, 30), SessionConfig(p_revisit=0.75)),
}


def write_named_log(name: str, path: str | Path, n_users: int = 2000, seed: int = 0) -> Path:
    """Write the SYNTHETIC log ``name`` of :data:`SYNTHETIC_LOGS` with ``n_users`` users; returns the path."""
    if name not in SYNTHETIC_LOGS:
        raise ValueError(f"unknown synthetic log {name!r}; use one of {', '.join(SYNTHETIC_LOGS)}")
    spec = SYNTHETIC_LOGS[name]
    return write_synthetic_taobao(path, n_users=n_users, n_items=spec.n_items, events_per_user=spec.events_per_user,
                                  seed=seed, config=spec.session)


def _zipf_weights(n: int, exponent: float, rng: np.random.Generator) -> np.ndarray:
    """Probabilities proportional to 1 / rank**exponent, assigned to a random order of n things."""
    weights = 1.0 / np.arange(1, n + 1, dtype=np.float64) ** exponent
    weights = weights[rng.permutation(n)]
    return weights / weights.sum()


def _sparse_ids(n: int, high: int, rng: np.random.Generator) -> np.ndarray:
    """n distinct sorted ids in 1..high, like the real dataset's sparse ids."""
    return np.sort(rng.choice(high, size=n, replace=False).astype(np.int64) + 1)


def _string_order(ids: np.ndarray) -> np.ndarray:
    """Positions that sort ids as strings ('1' < '100' < '1000001' < '2'), the real file's user order."""
    return np.argsort(ids.astype(str), kind="stable")


def _swap_some_neighbours(n: int, share: float, rng: np.random.Generator) -> np.ndarray:
    """A row order 0..n-1 with about share*n adjacent pairs swapped."""
    order = np.arange(n)
    if n < 2:
        return order
    for i in np.flatnonzero(rng.random(n - 1) < share):
        order[i], order[i + 1] = order[i + 1], order[i]
    return order


def _write_rows(writer: pacsv.CSVWriter, columns: dict[str, np.ndarray]) -> None:
    """Append rows (no header, no quotes) to an open CSV writer; behaviour given as codes 0..3."""
    behavior = pa.DictionaryArray.from_arrays(
        pa.array(columns["behavior"], type=pa.int8()), pa.array(BEHAVIOR_NAMES)
    ).cast(pa.string())
    table = pa.table(
        {
            "user_id": columns["user"],
            "item_id": columns["item"],
            "category_id": columns["category"],
            "behavior_type": behavior,
            "timestamp": columns["timestamp"],
        }
    )
    writer.write_table(table)


def _open_writer(path: Path) -> pacsv.CSVWriter:
    """A CSV writer in the Taobao layout: no header, no quoting."""
    schema = pa.schema(
        [
            ("user_id", pa.int64()),
            ("item_id", pa.int64()),
            ("category_id", pa.int64()),
            ("behavior_type", pa.string()),
            ("timestamp", pa.int64()),
        ]
    )
    options = pacsv.WriteOptions(include_header=False, quoting_style="none")
    return pacsv.CSVWriter(str(path), schema, write_options=options)


def write_synthetic_taobao(
    path: str | Path,
    n_users: int = 2000,
    n_items: int = 5000,
    n_categories: int = 100,
    events_per_user: tuple[int, int] = (20, 150),
    seed: int = 0,
    config: SessionConfig | None = None,
) -> Path:
    """Write a SYNTHETIC Taobao-format behaviour log with session structure; returns the path.

    Users browse in sessions: each session is about one category (usually one of the
    user's favourites), picks items by Zipf popularity within it, often revisits items
    it has just shown, and puts cart/fav/buy events on items already viewed. Rows are
    grouped by user, users in string order, times mostly sorted within a user.
    """
    config = config or SessionConfig()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)

    category_ids = _sparse_ids(n_categories, 5_162_429, rng)
    item_ids = _sparse_ids(n_items, 5_163_070, rng)
    user_ids = _sparse_ids(n_users, 1_018_011, rng)
    category_weights = _zipf_weights(n_categories, config.zipf_categories, rng)
    item_category = rng.choice(n_categories, size=n_items, p=category_weights)
    item_weights = _zipf_weights(n_items, config.zipf_items, rng)
    category_items = [np.flatnonzero(item_category == c) for c in range(n_categories)]
    category_cdf = []
    for items in category_items:
        w = item_weights[items]
        category_cdf.append(np.cumsum(w) / w.sum() if len(items) else w)
    nonempty = np.array([len(items) > 0 for items in category_items])
    session_weights = np.where(nonempty, category_weights, 0.0)
    session_weights /= session_weights.sum()
    behavior_cdf = np.cumsum(BEHAVIOR_MIX)

    writer = _open_writer(path)
    n_rows = 0
    try:
        for user_index in _string_order(user_ids):
            n_events = int(rng.integers(events_per_user[0], events_per_user[1] + 1))
            n_fav = int(rng.integers(config.favourite_categories[0], config.favourite_categories[1] + 1))
            n_fav = min(n_fav, int(nonempty.sum()))
            favourites = rng.choice(n_categories, size=n_fav, replace=False, p=session_weights)
            items = np.empty(n_events, dtype=np.int64)
            behaviors = np.empty(n_events, dtype=np.int8)
            times = np.empty(n_events, dtype=np.int64)
            session_starts = np.sort(rng.integers(0, WINDOW_SECONDS, size=n_events))
            pos = 0
            session = 0
            while pos < n_events:
                length = min(int(rng.geometric(1.0 / config.mean_session_events)), n_events - pos)
                if rng.random() < config.p_favourite:
                    category = int(rng.choice(favourites))
                else:
                    category = int(rng.choice(n_categories, p=session_weights))
                pool, cdf = category_items[category], category_cdf[category]
                fresh = pool[np.minimum(np.searchsorted(cdf, rng.random(length)), len(pool) - 1)]
                kinds = np.searchsorted(behavior_cdf, rng.random(length) * behavior_cdf[-1]).astype(np.int8)
                revisit = rng.random(length) < config.p_revisit
                pick = rng.random(length)
                gaps = rng.exponential(config.mean_gap_seconds, size=length).astype(np.int64)
                seen: list[int] = []
                for j in range(length):
                    if seen and (kinds[j] > 0 or revisit[j]):
                        item = seen[int(pick[j] * len(seen))]
                    else:
                        item = int(fresh[j])
                    seen.append(item)
                    items[pos + j] = item
                    behaviors[pos + j] = kinds[j]
                times[pos : pos + length] = WINDOW_START + session_starts[session] + np.cumsum(gaps)
                pos += length
                session += 1
            order = np.argsort(times, kind="stable")
            order = order[_swap_some_neighbours(n_events, config.p_out_of_order, rng)]
            _write_rows(
                writer,
                {
                    "user": np.full(n_events, user_ids[user_index], dtype=np.int64),
                    "item": item_ids[items[order]],
                    "category": category_ids[item_category[items[order]]],
                    "behavior": behaviors[order],
                    "timestamp": times[order],
                },
            )
            n_rows += n_events
    finally:
        writer.close()
    log.info("wrote %d synthetic Taobao-format rows (%d users, %d items) to %s", n_rows, n_users, n_items, path)
    return path


def write_taobao_rows(
    path: str | Path,
    n_rows: int,
    seed: int = 0,
    n_items: int = 1_000_000,
    n_categories: int = 5_000,
    mean_events_per_user: float = 100.0,
    chunk_rows: int = 1_000_000,
) -> Path:
    """Write n_rows SYNTHETIC Taobao-format rows fast (numpy-vectorised, in chunks); returns the path.

    For loader benchmarks: Zipf item popularity, the real behaviour mix, users of about
    mean_events_per_user rows each, grouped by user, times shuffled within the nine-day
    window. No sequential structure: do not train on it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    item_ids = _sparse_ids(n_items, 5_163_070, rng)
    category_ids = _sparse_ids(n_categories, 5_162_429, rng)
    item_category = category_ids[rng.choice(n_categories, size=n_items, p=_zipf_weights(n_categories, 0.9, rng))]
    item_cdf = np.cumsum(_zipf_weights(n_items, 1.05, rng))
    item_cdf /= item_cdf[-1]
    behavior_cdf = np.cumsum(BEHAVIOR_MIX)
    behavior_cdf /= behavior_cdf[-1]

    writer = _open_writer(path)
    next_user = 1
    written = 0
    try:
        while written < n_rows:
            size = min(chunk_rows, n_rows - written)
            lengths = rng.geometric(1.0 / mean_events_per_user, size=size // 2 + 2)
            lengths = lengths[: int(np.searchsorted(np.cumsum(lengths), size)) + 1]
            users = np.repeat(np.arange(next_user, next_user + len(lengths), dtype=np.int64), lengths)[:size]
            next_user += len(lengths)
            items = np.minimum(np.searchsorted(item_cdf, rng.random(size)), n_items - 1)
            _write_rows(
                writer,
                {
                    "user": users,
                    "item": item_ids[items],
                    "category": item_category[items],
                    "behavior": np.searchsorted(behavior_cdf, rng.random(size)).astype(np.int8),
                    "timestamp": WINDOW_START + rng.integers(0, WINDOW_SECONDS, size=size, dtype=np.int64),
                },
            )
            written += size
    finally:
        writer.close()
    log.info("wrote %d synthetic Taobao-format rows to %s", written, path)
    return path
