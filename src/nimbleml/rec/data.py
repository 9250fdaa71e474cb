"""Behaviour logs -> per-user event sequences with dense ids, and the leave-last-out split.

Two input formats:

- ``taobao``: Alibaba's UserBehavior CSV, no header,
  ``user_id,item_id,category_id,behavior_type,timestamp`` (behaviour in pv/cart/fav/buy,
  Unix seconds). The full file has 100M rows, so it is streamed block by block with
  pyarrow; malformed rows are counted by reason and skipped, never silently.
- ``sasrec``: ``user item`` per line (the SASRec authors' preprocessed files), each
  user's lines in time order; the line number stands in for the timestamp.

Sequences are sorted per user by (timestamp, original row order), stably. Dense ids
start at 1; 0 is padding everywhere.
"""

from __future__ import annotations

import codecs
import io
import json
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from nimbleml.errors import NimbleError
from nimbleml.progress import make_progress

log = logging.getLogger(__name__)

BEHAVIORS = ("pv", "cart", "fav", "buy")  # codes 1..4; 0 = padding
FORMATS = ("taobao", "sasrec")
TAOBAO_COLUMNS = ("user", "item", "category", "behavior", "timestamp")
SASREC_COLUMNS = ("user", "item")
ARRAYS_FILE = "sequences.npz"
META_FILE = "meta.json"
FILE_VERSION = 1
PREPARE_FIX = "run `nimbleml rec prepare` first"

_BEHAVIOR_CODES = {name: code for code, name in enumerate(BEHAVIORS, start=1)}
_INTEGER = r"^[0-9]{1,18}$"  # non-negative decimal that fits int64
_DIRECT_TABLE_LIMIT = 1 << 26  # ids below this are densified with a lookup table (<= 512 MiB of int64)


@dataclass
class PrepareReport:
    """What `prepare` read, kept and dropped, and how fast (seconds are wall-clock)."""

    rows_read: int  # data rows seen in the file, malformed ones included
    rows_kept: int  # events in the resulting SequenceData
    seconds: float  # wall-clock time of the whole prepare (read + build)
    rows_per_second: float  # rows_read / seconds
    skipped: dict[str, int]  # reason -> rows dropped for it
    n_users: int
    n_items: int
    n_categories: int
    n_events: int

    def to_dict(self) -> dict:
        """Plain JSON-ready dict."""
        return asdict(self)


@dataclass
class SequenceData:
    """Per-user time-ordered event sequences in CSR form, dense ids (0 = padding)."""

    offsets: np.ndarray  # (n_users + 1,) int64; user u's events are [offsets[u], offsets[u+1])
    items: np.ndarray  # (n_events,) int32 in 1..n_items
    behaviors: np.ndarray  # (n_events,) int8 in 1..4 (all 1 for the sasrec format)
    categories: np.ndarray  # (n_events,) int32 in 1..n_categories (0 when the format has none)
    timestamps: np.ndarray  # (n_events,) int64 Unix seconds (sasrec format: the line order 0,1,2..)
    n_items: int
    n_categories: int
    item_ids: np.ndarray  # (n_items + 1,) int64 original id of each dense id (index 0 = -1)
    user_ids: np.ndarray  # (n_users,) int64 original user ids
    item_category: np.ndarray  # (n_items + 1,) int32 category of each dense item (0 for padding/unknown)

    @property
    def n_users(self) -> int:
        """Number of users (sequences)."""
        return len(self.offsets) - 1

    @property
    def n_events(self) -> int:
        """Number of events over all users."""
        return len(self.items)

    @property
    def lengths(self) -> np.ndarray:
        """(n_users,) int64 events per user."""
        return np.diff(self.offsets)

    def save(self, directory: Path) -> None:
        """Write `sequences.npz` (np.savez, no pickle) and `meta.json` into directory."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        np.savez(directory / ARRAYS_FILE, **{name: getattr(self, name) for name in _ARRAY_FIELDS})
        meta = {
            "file_version": FILE_VERSION,
            "n_users": self.n_users,
            "n_items": self.n_items,
            "n_categories": self.n_categories,
            "n_events": self.n_events,
        }
        (directory / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")

    @classmethod
    def load(cls, directory: Path) -> SequenceData:
        """Read what `save` wrote; NimbleError naming the file if it is missing or corrupt."""
        directory = Path(directory)
        meta_path, arrays_path = directory / META_FILE, directory / ARRAYS_FILE
        for required in (meta_path, arrays_path):
            if not required.is_file():
                raise NimbleError("prepared sequence data not found", path=required, fix=PREPARE_FIX)
        try:
            meta = json.loads(meta_path.read_text())
            n_items, n_categories = int(meta["n_items"]), int(meta["n_categories"])
        except (ValueError, KeyError, TypeError) as exc:
            raise NimbleError(f"corrupt metadata ({exc})", path=meta_path, fix=f"delete it and {PREPARE_FIX}") from exc
        try:
            with np.load(arrays_path, allow_pickle=False) as npz:
                arrays = {name: npz[name] for name in _ARRAY_FIELDS}
        except (OSError, ValueError, KeyError, EOFError) as exc:
            raise NimbleError(f"corrupt array file ({exc})", path=arrays_path, fix=f"delete it and {PREPARE_FIX}") from exc
        data = cls(n_items=n_items, n_categories=n_categories, **arrays)
        problem = data.check()
        if problem:
            raise NimbleError(f"inconsistent arrays: {problem}", path=arrays_path, fix=f"delete it and {PREPARE_FIX}")
        return data

    def check(self) -> str | None:
        """Describe the first broken invariant (shapes, dtypes, id ranges, ordering), or None."""
        expected = {
            "offsets": np.int64, "items": np.int32, "behaviors": np.int8, "categories": np.int32,
            "timestamps": np.int64, "item_ids": np.int64, "user_ids": np.int64, "item_category": np.int32,
        }  # fmt: skip
        for name, dtype in expected.items():
            array = getattr(self, name)
            if array.ndim != 1 or array.dtype != dtype:
                return f"{name} should be 1-d {np.dtype(dtype).name}, got {array.ndim}-d {array.dtype}"
        n = self.n_events
        if len(self.offsets) < 1 or self.offsets[0] != 0 or self.offsets[-1] != n or np.any(np.diff(self.offsets) < 0):
            return "offsets must start at 0, never decrease and end at the number of events"
        for name in ("behaviors", "categories", "timestamps"):
            if len(getattr(self, name)) != n:
                return f"{name} has {len(getattr(self, name))} entries for {n} events"
        if len(self.user_ids) != self.n_users:
            return f"user_ids has {len(self.user_ids)} entries for {self.n_users} users"
        if len(self.item_ids) != self.n_items + 1 or len(self.item_category) != self.n_items + 1:
            return "item_ids and item_category need n_items + 1 entries"
        if n and (self.items.min() < 1 or self.items.max() > self.n_items):
            return f"items outside 1..{self.n_items}"
        if n and (self.behaviors.min() < 1 or self.behaviors.max() > len(BEHAVIORS)):
            return f"behaviours outside 1..{len(BEHAVIORS)}"
        if n and (self.categories.min() < 0 or self.categories.max() > self.n_categories):
            return f"categories outside 0..{self.n_categories}"
        return None

    def item_popularity(self, upto: str = "train") -> np.ndarray:
        """(n_items + 1,) int64 event counts per dense item; index 0 (padding) is 0.

        upto="train" counts all but the last 2 events of each user (no leakage into
        validation or test), "valid" all but the last 1, "all" every event.
        """
        drop = {"train": 2, "valid": 1, "all": 0}
        if upto not in drop:
            raise NimbleError(f"unknown popularity window {upto!r}", fix=f"use one of {sorted(drop)}")
        mask = _position_from_end(self.offsets) >= drop[upto]
        return np.bincount(self.items[mask], minlength=self.n_items + 1).astype(np.int64)


_ARRAY_FIELDS = tuple(f.name for f in fields(SequenceData) if f.name not in ("n_items", "n_categories"))


def _position_from_end(offsets: np.ndarray) -> np.ndarray:
    """(n_events,) 0 for each user's last event, 1 for the one before, and so on."""
    lengths = np.diff(offsets)
    ends = np.repeat(offsets[1:], lengths)
    return ends - 1 - np.arange(offsets[-1], dtype=np.int64)


# --------------------------------------------------------------------------- reading


def _check_input_file(path: Path, fmt: str) -> None:
    """Fail early, naming the file and the fix, for a missing, empty or non-file path."""
    if not path.exists():
        raise NimbleError("file not found", path=path, fix=f"pass the path of a {fmt}-format behaviour log")
    if not path.is_file():
        raise NimbleError("not a file (a directory?)", path=path, fix=f"pass the path of a {fmt}-format file, not a folder")
    if path.stat().st_size == 0:
        raise NimbleError("file is empty", path=path, fix=f"pass a non-empty {fmt}-format file")


class _Tally:
    """Thread-safe skip counter: pyarrow may call the invalid-row handler from its reader threads."""

    def __init__(self, counts: Counter):
        self.counts = counts
        self._lock = threading.Lock()

    def add(self, reason: str, n: int = 1) -> None:
        if n:
            with self._lock:
                self.counts[reason] += n

    def invalid_row(self, row: pacsv.InvalidRow) -> str:
        """pyarrow's invalid_row_handler: count the row by reason and skip it."""
        self.add("truncated_row" if row.actual_columns < row.expected_columns else "extra_columns")
        return "skip"


class _Utf8Repairing(io.RawIOBase):
    """A binary file whose bytes that are not valid UTF-8 come out as U+FFFD.

    Why: pyarrow decodes a malformed row's text strictly before calling the invalid-row
    handler, so one truncated row of non-UTF-8 bytes (``\\xff\\xfe,,``) would abort the whole
    read instead of being counted and skipped. Valid input passes through unchanged; an
    incremental decoder keeps characters split across reads intact.
    """

    def __init__(self, path: Path):
        self._raw = open(path, "rb")  # noqa: SIM115 - closed by close()
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending = bytearray()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:
        while len(self._pending) < len(buffer):
            block = self._raw.read(max(len(buffer), 1 << 16))
            self._pending += self._decoder.decode(block, final=not block).encode("utf-8")
            if not block:
                break
        n = min(len(buffer), len(self._pending))
        buffer[:n] = self._pending[:n]
        del self._pending[:n]
        return n

    def close(self) -> None:
        self._raw.close()
        super().close()


def _open_stream(
    path: Path, columns: tuple[str, ...], types: dict, delimiter: str, chunk_bytes: int, tally: _Tally
) -> pacsv.CSVStreamingReader:
    """A pyarrow streaming CSV reader with explicit names and types; unquoted, no header.
    Bytes that are not UTF-8 are replaced (see :class:`_Utf8Repairing`), so a row made of
    them is counted by the usual reasons instead of stopping the read."""
    try:
        return pacsv.open_csv(
            io.BufferedReader(_Utf8Repairing(path), buffer_size=1 << 20),
            read_options=pacsv.ReadOptions(block_size=chunk_bytes, column_names=list(columns)),
            parse_options=pacsv.ParseOptions(delimiter=delimiter, quote_char=False, invalid_row_handler=tally.invalid_row),
            convert_options=pacsv.ConvertOptions(column_types=types, strings_can_be_null=False, check_utf8=False),
        )
    except (pa.ArrowInvalid, OSError) as exc:
        raise NimbleError(f"cannot read as CSV ({exc})", path=path, fix="check the file format and encoding") from exc


def _batches(reader: pacsv.CSVStreamingReader, path: Path) -> Iterator[pa.RecordBatch]:
    """Iterate a streaming reader, turning parse failures into NimbleError."""
    while True:
        try:
            batch = reader.read_next_batch()
        except StopIteration:
            return
        except (pa.ArrowInvalid, OSError) as exc:
            raise NimbleError(f"cannot parse ({exc})", path=path, fix="check the file format and encoding (UTF-8 text)") from exc
        yield batch


def _parse_int64(column: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Parse a string column as non-negative int64; returns (values, ok mask). Bad cells -> 0, ok False."""
    try:
        values = pc.cast(column, pa.int64()).to_numpy()
        return values, values >= 0
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        ok = pc.match_substring_regex(column, _INTEGER)
        values = pc.cast(pc.if_else(ok, column, "0"), pa.int64()).to_numpy()
        return values, ok.to_numpy(zero_copy_only=False)


def _behavior_codes(column: pa.DictionaryArray) -> np.ndarray:
    """int8 codes 1..4 for pv/cart/fav/buy (case and surrounding spaces ignored), 0 for anything else."""
    names = column.dictionary.cast(pa.binary()).to_pylist()  # bytes: the reader does not check UTF-8
    lookup = np.array(
        [_BEHAVIOR_CODES.get(name.decode("utf-8", "replace").strip().lower(), 0) for name in names] or [0], dtype=np.int8
    )
    return lookup[column.indices.to_numpy(zero_copy_only=False)]


def read_taobao(
    path: str | Path, chunk_bytes: int = 64 << 20, skipped: Counter | None = None
) -> Iterator[dict[str, np.ndarray]]:
    """Stream a Taobao UserBehavior CSV as dicts of numpy arrays, one per block of about chunk_bytes.

    Keys: user, item, category (int64 original ids), behavior (int8 codes 1..4),
    timestamp (int64 Unix seconds). Rows that cannot be used are dropped and counted in
    `skipped` by reason: truncated_row / extra_columns (wrong field count),
    non_numeric_id (an id is not a non-negative integer), unknown_behavior, bad_timestamp.
    """
    path = Path(path)
    _check_input_file(path, "taobao")
    tally = _Tally(skipped if skipped is not None else Counter())
    types = {name: pa.string() for name in TAOBAO_COLUMNS} | {"behavior": pa.dictionary(pa.int32(), pa.string())}
    reader = _open_stream(path, TAOBAO_COLUMNS, types, ",", chunk_bytes, tally)
    for batch in _batches(reader, path):
        user, ok_user = _parse_int64(batch.column("user"))
        item, ok_item = _parse_int64(batch.column("item"))
        category, ok_category = _parse_int64(batch.column("category"))
        behavior = _behavior_codes(batch.column("behavior"))
        timestamp, ok_time = _parse_int64(batch.column("timestamp"))
        ok_ids = ok_user & ok_item & ok_category
        ok_behavior = behavior > 0
        tally.add("non_numeric_id", int(np.count_nonzero(~ok_ids)))
        tally.add("unknown_behavior", int(np.count_nonzero(ok_ids & ~ok_behavior)))
        tally.add("bad_timestamp", int(np.count_nonzero(ok_ids & ok_behavior & ~ok_time)))
        keep = ok_ids & ok_behavior & ok_time
        chunk = {"user": user, "item": item, "category": category, "behavior": behavior, "timestamp": timestamp}
        if not keep.all():
            chunk = {name: values[keep] for name, values in chunk.items()}
        yield chunk


def read_sasrec(
    path: str | Path, chunk_bytes: int = 64 << 20, skipped: Counter | None = None
) -> Iterator[dict[str, np.ndarray]]:
    """Stream a SASRec-style ``user item`` file as dicts of numpy arrays (same keys as read_taobao).

    There is no category (0) and one behaviour (1, "pv"); timestamp is the row's position
    among the file's parsed rows (0, 1, 2, ...), so the file's line order is the time order.
    """
    path = Path(path)
    _check_input_file(path, "sasrec")
    tally = _Tally(skipped if skipped is not None else Counter())
    types = {name: pa.string() for name in SASREC_COLUMNS}
    reader = _open_stream(path, SASREC_COLUMNS, types, " ", chunk_bytes, tally)
    position = 0
    for batch in _batches(reader, path):
        user, ok_user = _parse_int64(batch.column("user"))
        item, ok_item = _parse_int64(batch.column("item"))
        timestamp = np.arange(position, position + batch.num_rows, dtype=np.int64)
        position += batch.num_rows
        keep = ok_user & ok_item
        tally.add("non_numeric_id", int(np.count_nonzero(~keep)))
        n = int(np.count_nonzero(keep))
        yield {
            "user": user[keep],
            "item": item[keep],
            "category": np.zeros(n, dtype=np.int64),
            "behavior": np.ones(n, dtype=np.int8),
            "timestamp": timestamp[keep],
        }


_READERS: dict[str, Callable[..., Iterator[dict[str, np.ndarray]]]] = {"taobao": read_taobao, "sasrec": read_sasrec}


# --------------------------------------------------------------------------- building


def _filter_counts(
    user_codes: np.ndarray, item_codes: np.ndarray, k_core: int, min_events: int, skipped: Counter
) -> np.ndarray:
    """Keep mask after iterative k-core (users and items with >= k_core events) and min_events per user.

    Dropped rows are counted: "short_user" when the user has fewer than min_events,
    otherwise "kcore_filtered".
    """
    keep = np.ones(len(user_codes), dtype=bool)
    user_floor = max(k_core, min_events)
    n_users, n_items = int(user_codes.max()) + 1, int(item_codes.max()) + 1
    while True:
        user_count = np.bincount(user_codes[keep], minlength=n_users)
        item_count = np.bincount(item_codes[keep], minlength=n_items) if k_core else np.ones(n_items, dtype=np.int64)
        short_user = user_count < min_events
        bad_user = user_count < user_floor
        bad_item = item_count < k_core
        if not (np.any(bad_user & (user_count > 0)) or np.any(bad_item & (item_count > 0))):
            return keep
        drop = keep & (bad_user[user_codes] | bad_item[item_codes])
        as_short = drop & short_user[user_codes]
        skipped["short_user"] += int(np.count_nonzero(as_short))
        skipped["kcore_filtered"] += int(np.count_nonzero(drop & ~as_short))
        keep &= ~drop


def _sort_order(user: np.ndarray, timestamp: np.ndarray) -> np.ndarray:
    """Row order sorting by (user, timestamp, original row); stable, so ties keep file order."""
    t_min, t_max = int(timestamp.min()), int(timestamp.max())
    span = t_max - t_min + 1
    if (int(user.max()) + 1) * span < 2**62:
        key = user.astype(np.int64) * span + (timestamp - t_min)
        return np.argsort(key, kind="stable")
    return np.lexsort((np.arange(len(user)), timestamp, user))


def _dense(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Dense int32 codes 0..n-1 in ascending value order, and the sorted unique values (int64).

    When the ids are small (below _DIRECT_TABLE_LIMIT and 8x the row count; Taobao's are
    < 6M) they go through a lookup table, a scatter and a gather, several times faster
    than hashing; otherwise they are hashed.
    """
    if len(values) == 0:
        return np.zeros(0, dtype=np.int32), np.zeros(0, dtype=np.int64)
    high = int(values.max())
    if int(values.min()) >= 0 and high < min(_DIRECT_TABLE_LIMIT, 8 * len(values)):
        present = np.zeros(high + 1, dtype=bool)
        present[values] = True
        uniques = np.flatnonzero(present)
        lookup = np.cumsum(present, dtype=np.int32) - 1
        return lookup[values], uniques.astype(np.int64)
    codes, uniques = pd.factorize(values, sort=True)
    return codes.astype(np.int32), np.asarray(uniques, dtype=np.int64)


def _compress(codes: np.ndarray, uniques: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Renumber codes to 0..m-1 over the values still present, keeping ascending value order."""
    present = np.bincount(codes, minlength=len(uniques)) > 0
    if present.all():
        return codes, uniques
    return (np.cumsum(present, dtype=np.int32) - 1)[codes], uniques[present]


def build_sequences(
    columns: dict[str, np.ndarray],
    k_core: int = 0,
    max_len: int | None = None,
    min_events: int = 3,
    skipped: Counter | None = None,
    has_categories: bool = True,
) -> SequenceData:
    """Turn event columns in file row order (user, item, category, behavior, timestamp) into SequenceData.

    Rows removed by k-core, min_events or the max_len cap are counted in `skipped`.
    Every column is gathered once, through `rows`: the original row index of each
    kept event in final (user, time, file order) order.
    """
    skipped = skipped if skipped is not None else Counter()
    user_codes, user_ids = _dense(columns["user"])
    item_codes, item_ids = _dense(columns["item"])
    keep = _filter_counts(user_codes, item_codes, k_core, min_events, skipped)
    if not keep.any():
        return _empty_sequences()
    rows = np.flatnonzero(keep)
    user_codes, user_ids = _compress(user_codes[rows], user_ids)
    rows = rows[_sort_order(user_codes, columns["timestamp"][rows])]
    lengths = np.bincount(user_codes, minlength=len(user_ids))
    if max_len is not None and lengths.max() > max_len:
        capped = _position_from_end(_offsets(lengths)) < max_len
        skipped["history_cap"] += int(np.count_nonzero(~capped))
        rows = rows[capped]
        lengths = np.minimum(lengths, max_len)
    item_codes, item_ids = _compress(item_codes[rows], item_ids)
    items = (item_codes + 1).astype(np.int32)
    if has_categories:
        category_codes, category_ids = _dense(columns["category"][rows])
        categories = (category_codes + 1).astype(np.int32)
    else:
        category_ids = np.zeros(0, dtype=np.int64)
        categories = np.zeros(len(items), dtype=np.int32)
    item_category = _item_category(items, categories, len(item_ids))
    return SequenceData(
        offsets=_offsets(lengths),
        items=items,
        behaviors=columns["behavior"][rows].astype(np.int8, copy=False),
        categories=categories,
        timestamps=columns["timestamp"][rows].astype(np.int64, copy=False),
        n_items=len(item_ids),
        n_categories=len(category_ids),
        item_ids=np.concatenate([[-1], item_ids]).astype(np.int64),
        user_ids=user_ids,
        item_category=item_category,
    )


def _item_category(items: np.ndarray, categories: np.ndarray, n_items: int) -> np.ndarray:
    """(n_items + 1,) int32 category of each item: the one of its first event when an item has several."""
    table = np.zeros(n_items + 1, dtype=np.int32)
    table[items] = categories
    if not np.array_equal(table[items], categories):  # some item has more than one category
        first = ~pd.Series(items).duplicated().to_numpy()
        table[items[first]] = categories[first]
    return table


def _offsets(lengths: np.ndarray) -> np.ndarray:
    """(len(lengths) + 1,) int64 CSR offsets from per-user lengths."""
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return offsets


def _empty_sequences() -> SequenceData:
    """A SequenceData with no users (what filtering left)."""
    empty32, empty64 = np.zeros(0, dtype=np.int32), np.zeros(0, dtype=np.int64)
    return SequenceData(
        offsets=np.zeros(1, dtype=np.int64), items=empty32, behaviors=np.zeros(0, dtype=np.int8),
        categories=empty32, timestamps=empty64, n_items=0, n_categories=0,
        item_ids=np.full(1, -1, dtype=np.int64), user_ids=empty64, item_category=np.zeros(1, dtype=np.int32),
    )  # fmt: skip


def _describe(skipped: Mapping[str, int]) -> str:
    """'3 truncated_row, 1 non_numeric_id' (largest first), or 'none'."""
    parts = [f"{n:,} {reason}" for reason, n in sorted(skipped.items(), key=lambda kv: -kv[1]) if n]
    return ", ".join(parts) or "none"


def read_events(
    path: str | Path, fmt: str, chunk_bytes: int = 64 << 20, skipped: Counter | None = None
) -> dict[str, np.ndarray]:
    """Stream a whole log into concatenated numpy columns (file row order); bad rows counted in `skipped`."""
    if fmt not in _READERS:
        raise NimbleError(f"unknown format {fmt!r}", path=path, fix=f"use one of {', '.join(FORMATS)}")
    path = Path(path)
    skipped = skipped if skipped is not None else Counter()
    parts: dict[str, list[np.ndarray]] = {name: [] for name in TAOBAO_COLUMNS}
    total = path.stat().st_size if path.is_file() else None
    with make_progress() as progress:
        task = progress.add_task(f"reading {path.name}", total=total, info="")
        for done, chunk in enumerate(_READERS[fmt](path, chunk_bytes=chunk_bytes, skipped=skipped), start=1):
            for name, values in chunk.items():
                parts[name].append(values)
            progress.update(task, completed=min(done * chunk_bytes, total or 0))
    columns = {}
    for name in TAOBAO_COLUMNS:  # one column at a time, freeing its chunks, to bound peak memory
        arrays = parts.pop(name)
        columns[name] = np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int8 if name == "behavior" else np.int64)
        del arrays
    if len(columns["user"]) == 0:
        raise NimbleError(
            f"no usable rows (skipped: {_describe(skipped)})",
            path=path,
            fix=f"check that the file is in the {fmt} format"
            + (": user_id,item_id,category_id,behavior_type,timestamp" if fmt == "taobao" else ": 'user item' per line"),
        )
    return columns


def prepare(
    path: str | Path,
    fmt: str,
    k_core: int = 0,
    max_len: int | None = None,
    min_events: int = 3,
    chunk_bytes: int = 64 << 20,
) -> tuple[SequenceData, PrepareReport]:
    """Read a behaviour log (streaming) and build per-user sequences, with a report of what was dropped.

    k_core: iteratively drop users and items with fewer than k_core events (0 = off).
    min_events: drop users with fewer events (3 = enough for train + validation + test).
    max_len: keep only each user's last max_len events (None = all).
    chunk_bytes: block size of the streaming CSV reader, in bytes.
    """
    if k_core < 0 or min_events < 1:
        raise NimbleError(f"k_core={k_core}, min_events={min_events}", path=path, fix="use k_core >= 0 and min_events >= 1")
    if max_len is not None and max_len < min_events:
        raise NimbleError(f"max_len={max_len} < min_events={min_events}", path=path, fix="use max_len >= min_events")
    start = time.perf_counter()
    skipped: Counter = Counter()
    columns = read_events(path, fmt, chunk_bytes=chunk_bytes, skipped=skipped)
    rows_read = len(columns["user"]) + sum(skipped.values())
    data = build_sequences(columns, k_core, max_len, min_events, skipped, has_categories=fmt == "taobao")
    if data.n_users == 0:
        raise NimbleError(
            f"no user left after filtering (skipped: {_describe(skipped)})",
            path=path,
            fix=f"lower k_core (now {k_core}) or min_events (now {min_events})",
        )
    seconds = time.perf_counter() - start
    report = PrepareReport(
        rows_read=rows_read,
        rows_kept=data.n_events,
        seconds=seconds,
        rows_per_second=rows_read / seconds if seconds > 0 else float("inf"),
        skipped={reason: int(n) for reason, n in sorted(skipped.items()) if n},
        n_users=data.n_users,
        n_items=data.n_items,
        n_categories=data.n_categories,
        n_events=data.n_events,
    )
    log.info(
        "%s: %d rows read, %d kept (%d users, %d items) in %.2f s (%.0f rows/s); skipped: %s",
        path, rows_read, data.n_events, data.n_users, data.n_items, seconds, report.rows_per_second, _describe(skipped),
    )  # fmt: skip
    return data, report


# --------------------------------------------------------------------------- split


def left_padded(values: np.ndarray, starts: np.ndarray, ends: np.ndarray, max_len: int) -> np.ndarray:
    """(n, max_len) int64: row i holds values[max(starts[i], ends[i]-max_len):ends[i]], right-aligned, 0-padded."""
    index = ends[:, None] - max_len + np.arange(max_len, dtype=np.int64)[None, :]
    valid = index >= starts[:, None]
    out = np.zeros(index.shape, dtype=np.int64)
    out[valid] = values[index[valid]]
    return out


@dataclass(eq=False)
class LeaveLastOut(Mapping):
    """Leave-last-out split: per user, train = events[:-2], validation target = events[-2], test target = events[-1].

    Dense inputs are the last max_len events before the target, left-padded with 0, so
    `test_input` includes the validation item. Also reads like a dict: split["valid_input"].
    """

    train_offsets: np.ndarray  # (n_users + 1,) int64 CSR offsets into the train_* arrays
    train_items: np.ndarray  # (n_train_events,) int32 every user's events[:-2], time order
    train_behaviors: np.ndarray  # (n_train_events,) int8
    train_categories: np.ndarray  # (n_train_events,) int32
    valid_input: np.ndarray  # (n_users, max_len) int64 items before the validation target
    valid_behaviors: np.ndarray  # (n_users, max_len) int64
    valid_categories: np.ndarray  # (n_users, max_len) int64
    valid_target: np.ndarray  # (n_users,) int64
    test_input: np.ndarray  # (n_users, max_len) int64 items before the test target
    test_behaviors: np.ndarray  # (n_users, max_len) int64
    test_categories: np.ndarray  # (n_users, max_len) int64
    test_target: np.ndarray  # (n_users,) int64

    @property
    def max_len(self) -> int:
        """Width of the dense input matrices."""
        return self.valid_input.shape[1]

    def __getitem__(self, key: str) -> np.ndarray:
        if key not in _SPLIT_KEYS:
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return iter(_SPLIT_KEYS)

    def __len__(self) -> int:
        return len(_SPLIT_KEYS)


_SPLIT_KEYS = tuple(f.name for f in fields(LeaveLastOut))


def leave_last_out(data: SequenceData, max_len: int = 100) -> LeaveLastOut:
    """Split every user's sequence into training prefix, validation target and test target.

    Every user needs at least 3 events (prepare's min_events=3 guarantees it).
    """
    lengths = data.lengths
    if data.n_users == 0 or lengths.min() < 3:
        raise NimbleError(
            "leave-last-out needs at least 3 events per user",
            fix="prepare the data with min_events >= 3 (the default)",
        )
    if max_len < 1:
        raise NimbleError(f"max_len={max_len}", fix="use max_len >= 1")
    starts, ends = data.offsets[:-1], data.offsets[1:]
    train_mask = _position_from_end(data.offsets) >= 2
    valid_at, test_at = ends - 2, ends - 1
    return LeaveLastOut(
        train_offsets=_offsets(lengths - 2),
        train_items=data.items[train_mask],
        train_behaviors=data.behaviors[train_mask],
        train_categories=data.categories[train_mask],
        valid_input=left_padded(data.items, starts, valid_at, max_len),
        valid_behaviors=left_padded(data.behaviors, starts, valid_at, max_len),
        valid_categories=left_padded(data.categories, starts, valid_at, max_len),
        valid_target=data.items[valid_at].astype(np.int64),
        test_input=left_padded(data.items, starts, test_at, max_len),
        test_behaviors=left_padded(data.behaviors, starts, test_at, max_len),
        test_categories=left_padded(data.categories, starts, test_at, max_len),
        test_target=data.items[test_at].astype(np.int64),
    )
