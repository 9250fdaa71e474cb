"""`bench/rec_repeat_diagnostic.py` end to end on a tiny log and a briefly trained model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from nimbleml.rec.commands import build_model
from nimbleml.rec.data import leave_last_out
from nimbleml.rec.evaluate import SeqRecScorer, evaluate_full
from nimbleml.rec.train import TrainConfig, save_checkpoint, train
from tests.rec.test_train import make_data

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "rec_repeat_diagnostic.py"


def test_groups_partition_the_users_and_match_the_evaluation(tmp_path: Path) -> None:
    data = make_data(n_users=240, n_items=130)
    data.save(tmp_path / "data")
    model = build_model("small", data)
    train(model, data, TrainConfig(epochs=1, threads=1, max_valid_users=50))
    save_checkpoint(model, {}, tmp_path / "model")
    done = subprocess.run([sys.executable, str(SCRIPT), "--model", str(tmp_path / "model"), "--data",
                           str(tmp_path / "data"), "--sampled", "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((tmp_path / "out" / "repeat_diagnostic.json").read_text())
    split = leave_last_out(data, max_len=model.config.max_len)
    expected = evaluate_full(SeqRecScorer(model), split.test_input, split.test_target,
                             exclude_history=model.config.exclude_history, ks=(10,)).to_dict()["ndcg@10"]  # fmt: skip
    for part in ("valid", "test"):
        groups = report[part]["model"]
        share = report[part]["last_input_unseen_share"]
        # the two last-input groups split the users: their NDCG@10s average back to "all"
        parts = [(share, groups["last_input_unseen"]), (1 - share, groups["last_input_seen"])]
        assert np.isclose(sum(w * v for w, v in parts if v is not None), groups["all"])
        sampled = report[part]["model_sampled100"]
        assert set(sampled) == set(groups) and 0.0 <= sampled["all"] <= 1.0
    assert report["test"]["model"]["all"] == expected  # the same number `rec train` reports


def test_missing_folders_are_one_message(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(SCRIPT), "--model", str(tmp_path / "no-model"), "--data",
                           str(tmp_path / "no-data"), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 2
    assert "prepared sequence data not found" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()
