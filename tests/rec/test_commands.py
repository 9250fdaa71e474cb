"""End to end through the command functions on a small synthetic Taobao log."""

from __future__ import annotations

import argparse
import json

import pytest

from nimbleml.errors import NimbleError
from nimbleml.rec import commands
from nimbleml.rec.synthetic import write_synthetic_taobao
from tests.rec.test_train import make_data


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    commands.add_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_prepare_train_evaluate(tmp_path) -> None:
    log_path = write_synthetic_taobao(tmp_path / "log.csv", n_users=150, n_items=300, events_per_user=(8, 30))
    data_dir, model_dir, eval_dir = tmp_path / "data", tmp_path / "model", tmp_path / "eval"

    args = parse(["rec", "prepare", "--data", str(log_path), "--format", "taobao", "--out", str(data_dir)])
    assert args.func(args) == 0
    report = json.loads((data_dir / "prepare_report.json").read_text())
    assert report["rows_read"] > 0 and report["n_users"] > 0

    args = parse(["rec", "train", "--data", str(data_dir), "--preset", "small", "--epochs", "2",
                  "--threads", "1", "--out", str(model_dir)])  # fmt: skip
    assert args.func(args) == 0
    assert {p.name for p in model_dir.iterdir()} >= {"model.safetensors", "config.json", "metrics.json"}
    metrics = json.loads((model_dir / "metrics.json").read_text())
    assert set(metrics["full"]) >= {"hr@10", "hr@50", "ndcg@10", "ndcg@50", "mrr"}
    assert set(metrics["sampled100"]) >= {"hr@10", "ndcg@10"}
    assert set(metrics["candidates50"]) >= {"hr@10", "ndcg@10", "mrr"}
    protocols = {"full", "sampled100", "candidates50", "candidates50_novel"}
    assert set(metrics["candidates50_novel"]) >= {"hr@10", "ndcg@10", "mrr"}
    for name in ("popular", "cooccurrence", "itemknn", "ease", "recent"):
        assert set(metrics["baselines"][name]) == protocols | {"selected"}
    assert metrics["baselines"]["itemknn"]["selected"]["params"]["neighbours"] > 0
    # the synthetic log repeats items, so history is kept for the model and for every baseline
    assert metrics["exclude_history"] is False and 0.0 < metrics["repeat_target_share"] < 1.0
    assert metrics["epochs"] == 2 and metrics["train_seconds"] > 0
    assert 0.0 <= metrics["full"]["hr@10"] <= metrics["full"]["hr@50"] <= 1.0

    args = parse(["rec", "evaluate", "--model", str(model_dir), "--data", str(data_dir), "--out", str(eval_dir)])
    assert args.func(args) == 0
    again = json.loads((eval_dir / "metrics.json").read_text())
    assert again["full"] == metrics["full"] and again["candidates50"] == metrics["candidates50"]


def test_train_on_missing_data_is_a_nimble_error(tmp_path) -> None:
    args = parse(["rec", "train", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "m")])
    with pytest.raises(NimbleError):
        args.func(args)


def test_history_exclusion_follows_the_repeat_share() -> None:
    data = make_data()  # walks i, i+1, ...: shorter than the catalogue, so no user repeats an item
    assert commands.repeat_share(data) == 0.0
    config = commands.model_config("small", data)
    assert config.exclude_history and not config.repeat_scores
    data.items[data.offsets[0] + 1] = data.items[data.offsets[0]]  # one repeat among the training events
    for u in range(1, data.n_users):
        data.items[data.offsets[u] + 1] = data.items[data.offsets[u]]
    assert commands.repeat_share(data) > 0.05
    config = commands.model_config("small", data)
    assert not config.exclude_history and config.repeat_scores and config.repeat_counts and config.repeat_decay  # scored, not masked


def test_rare_inputs_follow_the_singleton_share() -> None:
    dense = make_data()  # 30 items walked by 60 users: every item seen many times
    assert commands.singleton_share(dense) == 0.0 and commands.model_config("small", dense).min_input_count == 0
    sparse = make_data(n_users=20, n_items=400)  # short walks over a big catalogue: most items seen once
    counts = sparse.item_popularity("train")
    assert commands.singleton_share(sparse) == pytest.approx(counts[counts == 1].sum() / counts.sum())
    assert commands.singleton_share(sparse) > 0.5 and commands.model_config("small", sparse).min_input_count == 2
    # the default preset: a wide embedding where items have events to fill it, narrow on a long tail
    assert commands.model_config("default", dense).dim == commands.DEFAULT_DIM == 128
    assert commands.model_config("default", sparse).dim == commands.LONG_TAIL_DIM == 64
    # and the unknown-item vector learnt by input dropout where rare inputs do not already share it
    assert commands.model_config("default", dense).unknown_input_alpha == commands.UNKNOWN_INPUT_ALPHA > 0
    assert commands.model_config("default", sparse).unknown_input_alpha == 0.0
    assert commands.model_config("small", dense).unknown_input_alpha == 0.0
