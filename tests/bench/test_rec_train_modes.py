"""`bench/rec_train_modes.py` end to end on a tiny log (timings are reported, never asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.rec.test_train import make_data

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "rec_train_modes.py"
ROW_KEYS = {"variant", "precision", "processes", "threads", "train_seconds", "seconds_per_epoch", "speedup",
            "valid_ndcg@10", "valid_hr@10", "valid_sampled100_ndcg@10"}


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300)


def test_modes_run_side_by_side_and_write_stable_keys(tmp_path: Path) -> None:
    make_data(n_users=240, n_items=130).save(tmp_path / "data")
    done = _run("--data", str(tmp_path / "data"), "--epochs", "1", "--variants", "fp32-1proc,bf16-1proc",
                "--out", str(tmp_path / "out"))
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((tmp_path / "out" / "train_modes.json").read_text())
    assert report["epochs"] == 1 and "environment" in report
    rows = report["rows"]
    assert [(r["variant"], r["precision"], r["processes"]) for r in rows] == [("fp32-1proc", "fp32", 1),
                                                                               ("bf16-1proc", "bf16", 1)]
    for row in rows:
        assert ROW_KEYS <= set(row)
        assert row["train_seconds"] > 0 and 0.0 <= row["valid_ndcg@10"] <= 1.0
    assert rows[0]["speedup"] == 1.0
    assert rows[1]["speedup"] == round(rows[0]["train_seconds"] / rows[1]["train_seconds"], 2)


def test_unknown_variant_is_a_clear_error(tmp_path: Path) -> None:
    make_data().save(tmp_path / "data")
    done = _run("--data", str(tmp_path / "data"), "--variants", "fp32-1proc,fp8-9proc", "--out", str(tmp_path / "out"))
    assert done.returncode == 2
    assert "unknown variant 'fp8-9proc'" in done.stderr
    assert not (tmp_path / "out").exists()  # refused before the valid first variant trained


def test_missing_data_is_one_message(tmp_path: Path) -> None:
    done = _run("--data", str(tmp_path / "nowhere"), "--variants", "fp32-1proc", "--out", str(tmp_path / "out"))
    assert done.returncode == 2
    assert "prepared sequence data not found" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()
