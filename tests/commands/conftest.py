"""A tiny trained recommender folder, made once per session from a synthetic log."""

from __future__ import annotations

from pathlib import Path

import pytest

from nimbleml.cli import main
from nimbleml.rec.synthetic import write_synthetic_taobao


@pytest.fixture(scope="session")
def tiny_rec(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(data_dir, model_dir) of a 1-epoch small-preset model on 150 synthetic users."""
    root = tmp_path_factory.mktemp("tiny_rec")
    log_path = write_synthetic_taobao(root / "log.csv", n_users=150, n_items=300, events_per_user=(8, 30))
    data_dir, model_dir = root / "data", root / "model"
    assert main(["rec", "prepare", "--data", str(log_path), "--format", "taobao", "--out", str(data_dir)]) == 0
    assert main(["rec", "train", "--data", str(data_dir), "--preset", "small", "--epochs", "1", "--threads", "1",
                 "--out", str(model_dir)]) == 0
    return data_dir, model_dir
