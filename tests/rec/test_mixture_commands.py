"""`rec train --repeat-mode mixture --targets valid` end to end, and the named synthetic logs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from nimbleml.rec import commands
from nimbleml.rec.data import leave_last_out, prepare
from nimbleml.rec.evaluate import repeat_targets
from nimbleml.rec.synthetic import SYNTHETIC_LOGS, write_named_log
from tests.rec.test_commands import parse


def test_mixture_trains_and_scores_the_validation_targets_split_by_target(tmp_path) -> None:
    log_path = write_named_log("short-repeat", tmp_path / "log.csv", n_users=150)
    data_dir, model_dir, eval_dir = tmp_path / "data", tmp_path / "model", tmp_path / "eval"
    args = parse(["rec", "prepare", "--data", str(log_path), "--format", "taobao", "--out", str(data_dir)])
    assert args.func(args) == 0
    args = parse(["rec", "train", "--data", str(data_dir), "--preset", "small", "--epochs", "1", "--threads", "1",
                  "--repeat-mode", "mixture", "--targets", "valid", "--out", str(model_dir)])  # fmt: skip
    assert args.func(args) == 0
    metrics = json.loads((model_dir / "metrics.json").read_text())
    assert metrics["targets"] == "valid" and metrics["repeat_mode"] == "mixture"
    assert json.loads((model_dir / "config.json").read_text())["model"]["repeat_mode"] == "mixture"
    for scores in [metrics] + [metrics["baselines"][name] for name in ("recent", "cooccurrence")]:
        for protocol in ("full", "sampled100", "candidates50"):
            repeat, novel = scores[protocol]["repeat"], scores[protocol]["novel"]
            assert repeat["n_users"] + novel["n_users"] == scores[protocol]["n_users"]
            assert set(repeat) == set(novel) == set(scores[protocol]) - {"repeat", "novel"}
    share = metrics["full"]["repeat"]["n_users"] / metrics["full"]["n_users"]
    assert share == pytest.approx(metrics["repeat_target_share"])
    args = parse(["rec", "evaluate", "--model", str(model_dir), "--data", str(data_dir), "--targets", "valid",
                  "--out", str(eval_dir)])  # fmt: skip
    assert args.func(args) == 0
    assert json.loads((eval_dir / "metrics.json").read_text())["full"] == metrics["full"]


def test_short_repeat_log_is_repeat_heavy_with_short_histories(tmp_path) -> None:
    spec = SYNTHETIC_LOGS["short-repeat"]
    data, _ = prepare(write_named_log("short-repeat", tmp_path / "log.csv", n_users=400), "taobao")
    lengths = np.diff(data.offsets)
    assert spec.n_items == 1000 and lengths.min() >= 10 and lengths.max() <= 30
    split = leave_last_out(data, max_len=30)
    seen = [data.items[start : end - 1] for start, end in zip(data.offsets[:-1], data.offsets[1:])]
    assert 0.7 < repeat_targets(split.test_target, seen).mean() < 0.9  # ~80% at 3,000 users
    with pytest.raises(ValueError, match="short-repeat"):
        write_named_log("nope", tmp_path / "x.csv")
