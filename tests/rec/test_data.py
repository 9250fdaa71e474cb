"""Behaviour logs -> sequences: exact known answers, k-core, the real files, bad input, save/load."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from nimbleml.errors import NimbleError
from nimbleml.rec.data import (
    BEHAVIORS,
    SequenceData,
    _dense,
    leave_last_out,
    prepare,
    read_taobao,
)
from nimbleml.rec.synthetic import write_synthetic_taobao, write_taobao_rows

# Two users, rows out of time order, with ties (same user, same timestamp) that must keep file order.
HAND_LOG = """\
20,500,7,pv,300
20,100,7,cart,100
10,300,9,pv,50
20,500,7,buy,300
10,100,7,fav,50
10,200,9,pv,10
20,300,9,pv,200
10,100,7,buy,60
"""


@pytest.fixture
def shared_data_dir() -> Path:
    """The shared real-data folder (../shared/data from the project root); skips when absent."""
    folder = Path(__file__).resolve().parents[2].parent / "shared" / "data"
    if not folder.is_dir():
        pytest.skip(f"real data not found at {folder} (../shared/data); these tests need the shared data folder")
    return folder


def write(tmp_path: Path, text: str, name: str = "log.csv") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_hand_made_log_gives_exact_sequences(tmp_path):
    data, report = prepare(write(tmp_path, HAND_LOG), "taobao")
    # dense ids follow ascending original ids: users 10, 20; items 100, 200, 300, 500; categories 7, 9
    np.testing.assert_array_equal(data.user_ids, [10, 20])
    np.testing.assert_array_equal(data.item_ids, [-1, 100, 200, 300, 500])
    np.testing.assert_array_equal(data.offsets, [0, 4, 8])
    # user 10 by time: t10 item200 pv, t50 item300 pv (row 3), t50 item100 fav (row 5), t60 item100 buy
    # user 20 by time: t100 item100 cart, t200 item300 pv, t300 item500 pv (row 1), t300 item500 buy (row 4)
    np.testing.assert_array_equal(data.items, [2, 3, 1, 1, 1, 3, 4, 4])
    np.testing.assert_array_equal(data.behaviors, [1, 1, 3, 4, 2, 1, 1, 4])
    np.testing.assert_array_equal(data.categories, [2, 2, 1, 1, 1, 2, 1, 1])
    np.testing.assert_array_equal(data.timestamps, [10, 50, 50, 60, 100, 200, 300, 300])
    np.testing.assert_array_equal(data.item_category, [0, 1, 2, 2, 1])
    assert (data.n_users, data.n_items, data.n_categories) == (2, 4, 2)
    assert data.items.dtype == np.int32 and data.behaviors.dtype == np.int8 and data.offsets.dtype == np.int64
    assert BEHAVIORS[data.behaviors[3] - 1] == "buy"
    assert report.rows_read == 8 and report.rows_kept == 8 and report.skipped == {}
    assert data.check() is None


def test_leave_last_out_exact(tmp_path):
    data, _ = prepare(write(tmp_path, HAND_LOG), "taobao")
    split = leave_last_out(data, max_len=3)
    np.testing.assert_array_equal(split["train_offsets"], [0, 2, 4])
    np.testing.assert_array_equal(split["train_items"], [2, 3, 1, 3])
    np.testing.assert_array_equal(split["valid_input"], [[0, 2, 3], [0, 1, 3]])
    np.testing.assert_array_equal(split["valid_target"], [1, 4])
    np.testing.assert_array_equal(split["test_input"], [[2, 3, 1], [1, 3, 4]])
    np.testing.assert_array_equal(split["test_target"], [1, 4])
    np.testing.assert_array_equal(split["valid_behaviors"], [[0, 1, 1], [0, 2, 1]])
    np.testing.assert_array_equal(split["test_behaviors"], [[1, 1, 3], [2, 1, 1]])
    np.testing.assert_array_equal(split["valid_categories"], [[0, 2, 2], [0, 1, 2]])
    np.testing.assert_array_equal(split["test_categories"], [[2, 2, 1], [1, 2, 1]])
    assert split.valid_input.dtype == np.int64 and split.max_len == 3
    short = leave_last_out(data, max_len=2)  # truncation keeps the most recent events
    np.testing.assert_array_equal(short["test_input"], [[3, 1], [3, 4]])
    # training popularity never sees validation or test targets
    np.testing.assert_array_equal(data.item_popularity(), [0, 1, 1, 2, 0])
    np.testing.assert_array_equal(data.item_popularity("all"), [0, 3, 1, 2, 2])


@pytest.mark.parametrize("high", [50, 10**12])  # lookup-table path, hashing path
def test_dense_ids_match_numpy_unique(high):
    values = np.random.default_rng(0).integers(0, high, size=2_000)
    codes, uniques = _dense(values)
    expected_uniques, expected_codes = np.unique(values, return_inverse=True)
    np.testing.assert_array_equal(uniques, expected_uniques)
    np.testing.assert_array_equal(codes, expected_codes)


def test_item_with_two_categories_takes_its_first_events(tmp_path):
    # item 100 is filed under category 7 at t=1 and category 9 later: the earliest event decides
    log = "1,100,9,pv,5\n1,100,7,pv,1\n1,200,9,pv,3\n"
    data, _ = prepare(write(tmp_path, log), "taobao")
    np.testing.assert_array_equal(data.categories, [1, 2, 2])
    np.testing.assert_array_equal(data.item_category, [0, 1, 2])


def test_short_user_dropped_and_counted(tmp_path):
    data, report = prepare(write(tmp_path, HAND_LOG + "30,200,9,pv,5\n31,100,7,pv,1\n31,200,9,pv,2\n"), "taobao")
    assert report.skipped == {"short_user": 3}
    assert report.rows_read == 11 and report.rows_kept == 8
    np.testing.assert_array_equal(data.user_ids, [10, 20])


def test_history_cap_keeps_latest_events(tmp_path):
    data, report = prepare(write(tmp_path, HAND_LOG), "taobao", max_len=3)
    np.testing.assert_array_equal(data.offsets, [0, 3, 6])
    np.testing.assert_array_equal(data.items, [2, 1, 1, 2, 3, 3])  # item ids re-densified: item 100 -> 1 ... 500 -> 3
    np.testing.assert_array_equal(data.item_ids, [-1, 100, 300, 500])
    assert report.skipped == {"history_cap": 2}


def test_k_core_cascades(tmp_path):
    # k=2: user D (1 event) goes, then item 300 has one event left, then user C has one event left.
    log = "1,100,1,pv,1\n1,200,1,pv,2\n2,100,1,pv,1\n2,200,1,pv,2\n3,200,1,pv,1\n3,300,1,pv,2\n4,300,1,pv,1\n"
    data, report = prepare(write(tmp_path, log), "taobao", k_core=2, min_events=1)
    np.testing.assert_array_equal(data.user_ids, [1, 2])
    np.testing.assert_array_equal(data.item_ids, [-1, 100, 200])
    assert report.skipped == {"kcore_filtered": 3}
    assert np.all(np.bincount(data.items)[1:] >= 2) and np.all(data.lengths >= 2)


def test_malformed_rows_counted_by_reason(tmp_path):
    bad = "abc,100,7,pv,5\n10,-3,7,pv,5\n10,100,7,click,5\n10,100,7,pv,yesterday\n10,100,7,pv,5,extra\n10,100,7,pv\n"
    not_utf8 = b"\xff\xfe,100,7,pv,5\n10,100,7,p\xffv,5\n10,100,7,pv,\xff\n"  # one bad byte spoils one row, not the file
    path = tmp_path / "log.csv"
    path.write_bytes((HAND_LOG + bad).encode() + not_utf8)
    data, report = prepare(path, "taobao")
    assert report.skipped == {
        "non_numeric_id": 3,
        "unknown_behavior": 2,
        "bad_timestamp": 2,
        "extra_columns": 1,
        "truncated_row": 1,
    }
    assert report.rows_read == 17 and report.rows_kept == 8
    np.testing.assert_array_equal(data.items, [2, 3, 1, 1, 1, 3, 4, 4])


@pytest.mark.parametrize("fmt", ["taobao", "sasrec"])
def test_truncated_non_utf8_row_is_counted_not_fatal(tmp_path, fmt):
    """pyarrow decodes a malformed row strictly before our handler sees it: `\\xff\\xfe,,` once
    aborted the whole prepare with a UnicodeDecodeError."""
    good = HAND_LOG if fmt == "taobao" else "1 5\n1 6\n1 7\n1 8\n2 5\n2 6\n2 7\n"
    bad = b"\xff\xfe,,\n" if fmt == "taobao" else b"\xff\n"
    path = tmp_path / "log.txt"
    path.write_bytes(good.encode() + bad + "é\n".encode())  # valid multi-byte text stays a row of its own
    data, report = prepare(path, fmt)
    assert report.skipped == {"truncated_row": 2}
    assert report.rows_kept == len(good.splitlines()) == data.n_events


def test_small_blocks_stream_the_same(tmp_path):
    path = write_synthetic_taobao(tmp_path / "syn.csv", n_users=60, n_items=300, n_categories=12, seed=3)
    skipped: Counter = Counter()
    chunks = list(read_taobao(path, chunk_bytes=4 << 10, skipped=skipped))
    assert len(chunks) > 10 and not skipped
    whole, _ = prepare(path, "taobao")
    blocky, _ = prepare(path, "taobao", chunk_bytes=4 << 10)
    assert sum(len(c["user"]) for c in chunks) == whole.n_events
    for name in ("offsets", "items", "behaviors", "categories", "timestamps", "item_ids", "user_ids"):
        np.testing.assert_array_equal(getattr(whole, name), getattr(blocky, name))


@pytest.mark.parametrize(
    ("make", "fmt", "match"),
    [
        (lambda d: d / "missing.csv", "taobao", "file not found"),
        (lambda d: write(d, "", "empty.csv"), "taobao", "empty"),
        (lambda d: d, "taobao", "not a file"),
        (lambda d: write(d, HAND_LOG), "parquet", "unknown format"),
        (lambda d: write(d, "a,b,c,pv,1\nx,y,z,pv,2\n"), "taobao", "no usable rows.*2 non_numeric_id"),
        (lambda d: write(d, "1,2\n3,4\n"), "taobao", "no usable rows.*2 truncated_row"),
        (lambda d: write(d, "1,2,3,pv,4\n5,6,7,pv,8\n"), "taobao", "no user left.*2 short_user"),
        (lambda d: write(d, "1 2 3\n"), "sasrec", "no usable rows.*1 extra_columns"),
    ],
)
def test_bad_input_raises_naming_file_and_fix(tmp_path, make, fmt, match):
    path = make(tmp_path)
    with pytest.raises(NimbleError, match=match) as info:
        prepare(path, fmt)
    assert str(path) in str(info.value) and "fix:" in str(info.value)


def test_save_load_round_trip(tmp_path):
    data, _ = prepare(write(tmp_path, HAND_LOG), "taobao")
    data.save(tmp_path / "prepared")
    loaded = SequenceData.load(tmp_path / "prepared")
    for name in ("offsets", "items", "behaviors", "categories", "timestamps", "item_ids", "user_ids", "item_category"):
        original, restored = getattr(data, name), getattr(loaded, name)
        assert restored.dtype == original.dtype
        np.testing.assert_array_equal(restored, original)
    assert (loaded.n_users, loaded.n_items, loaded.n_categories) == (2, 4, 2)


def test_load_missing_or_corrupt_names_file_and_fix(tmp_path):
    with pytest.raises(NimbleError, match="nimbleml rec prepare") as info:
        SequenceData.load(tmp_path / "nowhere")
    assert "meta.json" in str(info.value)
    data, _ = prepare(write(tmp_path, HAND_LOG), "taobao")
    data.save(tmp_path / "prepared")
    (tmp_path / "prepared" / "sequences.npz").write_bytes(b"not a zip file")
    with pytest.raises(NimbleError, match="sequences.npz.*corrupt"):
        SequenceData.load(tmp_path / "prepared")


def test_synthetic_log_is_taobao_like_with_sequential_signal(tmp_path):
    path = write_synthetic_taobao(tmp_path / "syn.csv", n_users=300, seed=1)
    first_row = path.read_text().split("\n", 1)[0].split(",")
    assert len(first_row) == 5 and first_row[3] in BEHAVIORS
    data, report = prepare(path, "taobao")
    assert report.skipped == {} and data.n_users == 300
    mix = np.bincount(data.behaviors, minlength=5)[1:] / data.n_events
    np.testing.assert_allclose(mix, [0.89, 0.055, 0.03, 0.025], atol=0.02)
    # sessions: consecutive events share a category far more often than independent draws would
    same_user = np.diff(np.repeat(np.arange(data.n_users), data.lengths)) == 0
    same_category = (np.diff(data.categories) == 0)[same_user].mean()
    share = np.bincount(data.categories) / data.n_events
    assert same_category > 0.5 > 2 * float(np.sum(share**2))
    # like the real file: times are not fully sorted within a user in the file itself
    times = np.loadtxt(path, delimiter=",", usecols=4, dtype=np.int64)
    assert np.any(np.diff(times) < 0)


def test_benchmark_rows_generator_writes_exact_count(tmp_path):
    path = write_taobao_rows(tmp_path / "rows.csv", n_rows=25_000, seed=2, chunk_rows=10_000)
    data, report = prepare(path, "taobao", min_events=1)
    assert report.rows_read == 25_000 and report.rows_kept == 25_000 and report.skipped == {}
    assert np.all(np.diff(data.timestamps)[np.diff(np.repeat(np.arange(data.n_users), data.lengths)) == 0] >= 0)


def test_real_taobao_slice(shared_data_dir):
    path = shared_data_dir / "rec" / "taobao" / "UserBehavior_head.csv"
    data, report = prepare(path, "taobao")
    assert report.rows_read == 84_476  # 84,475 complete rows + the truncated last line
    assert report.skipped == {"truncated_row": 1}
    assert data.n_events == 84_475 and data.n_users == 815 and data.n_items == 55_368
    assert data.check() is None
    same_user = np.diff(np.repeat(np.arange(data.n_users), data.lengths)) == 0
    assert np.all(np.diff(data.timestamps)[same_user] >= 0)
    split = leave_last_out(data, max_len=100)
    assert split["test_input"].shape == (815, 100)
    np.testing.assert_array_equal(split["test_input"][:, -1], split["valid_target"])


def test_real_sasrec_video(shared_data_dir):
    path = shared_data_dir / "rec" / "amazon_video" / "Video.txt"
    everyone, report = prepare(path, "sasrec", min_events=1)
    assert (everyone.n_users, everyone.n_items, everyone.n_events) == (31_013, 23_715, 287_107)
    np.testing.assert_array_equal(everyone.item_ids[1:], np.arange(1, 23_716))  # 1-based ids are already dense
    np.testing.assert_array_equal(everyone.items[:3], [6393, 13504, 14087])  # user 1's first lines, in file order
    assert everyone.n_categories == 0 and np.all(everyone.behaviors == 1)
    data, report = prepare(path, "sasrec")  # default min_events=3: 112 users have 1 or 2 events
    assert report.skipped == {"short_user": 194}
    assert (data.n_users, data.n_items) == (30_901, 23_698)
