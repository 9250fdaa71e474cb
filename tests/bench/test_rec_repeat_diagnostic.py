"""`bench/rec_repeat_diagnostic.py` end to end on a tiny log and a briefly trained model."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from nimbleml.rec.commands import build_model
from nimbleml.rec.data import leave_last_out
from nimbleml.rec.evaluate import SeqRecScorer, evaluate_full
from nimbleml.rec.model import SeqRec, SeqRecConfig
from nimbleml.rec.train import TrainConfig, TrainingWindows, save_checkpoint, train
from tests.rec.test_train import make_data, sequences

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "rec_repeat_diagnostic.py"


def test_groups_partition_the_users_and_match_the_evaluation(tmp_path: Path) -> None:
    data = make_data(n_users=240, n_items=130)
    data.save(tmp_path / "data")
    model = build_model("small", data)
    train(model, data, TrainConfig(epochs=1, threads=1, max_valid_users=50))
    save_checkpoint(model, {}, tmp_path / "model")
    done = subprocess.run([sys.executable, str(SCRIPT), "--model", str(tmp_path / "model"), "--data",
                           str(tmp_path / "data"), "--sampled", "--mass", "30", "--out", str(tmp_path / "out")],
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
    mass = report["train_windows"]
    assert mass["n_windows"] == 30 and mass["n_positions"] > 30
    for view in ("targets", "eval", "train"):  # the recency buckets split the history items
        buckets = [v for k, v in mass[view].items() if k.startswith("back_")]
        assert 0.0 <= min(buckets) and np.isclose(sum(buckets), mass[view]["history"]) and mass[view]["history"] <= 1.0


def test_missing_folders_are_one_message(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(SCRIPT), "--model", str(tmp_path / "no-model"), "--data",
                           str(tmp_path / "no-data"), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 2
    assert "prepared sequence data not found" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()


def test_probability_mass_counts_the_targets_by_recency() -> None:
    spec = importlib.util.spec_from_file_location("rec_repeat_diagnostic", SCRIPT)
    diagnostic = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(diagnostic)
    rng = np.random.default_rng(0)
    data = sequences([rng.integers(1, 9, size=n) for n in rng.integers(6, 40, size=50)], 8)  # revisits
    windows = TrainingWindows.from_split(leave_last_out(data, max_len=30), 30)
    torch.manual_seed(0)
    model = SeqRec(SeqRecConfig.small(8, max_len=30, repeat_scores=True, repeat_counts=True, repeat_decay=True))
    rows = np.arange(len(windows))
    mass = diagnostic.probability_mass(model, windows, rows, batch=3)
    counts, n = dict.fromkeys(mass["targets"], 0), 0  # by hand: events since the target was last seen
    for inputs, targets in zip(windows.inputs, windows.targets):
        for t in np.flatnonzero(inputs):
            earlier = np.flatnonzero(inputs[: t + 1] == targets[t])
            back = t - earlier[-1] + 1 if len(earlier) else 0
            n += 1
            counts["history"] += back > 0
            for lo, hi in diagnostic.MASS_BACK:
                counts[f"back_{lo}-{hi}"] += lo <= back <= hi
    assert mass["n_positions"] == n
    assert mass["targets"] == pytest.approx({k: v / n for k, v in counts.items()})
    assert 0.3 < mass["targets"]["history"] < 1.0
    for view in ("eval", "train"):
        buckets = [v for k, v in mass[view].items() if k.startswith("back_")]
        assert np.isclose(sum(buckets), mass[view]["history"]) and 0.0 < mass[view]["history"] < 1.0
    assert mass["eval"] != mass["train"]  # dropout on in the train view
