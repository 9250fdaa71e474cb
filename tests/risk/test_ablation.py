"""`risk ablate` on a tiny generated market: each variant scored on validation only, per asset class."""

import json

import pytest

from nimbleml.errors import NimbleError
from nimbleml.risk.ablation import parse_variants, run_ablation
from nimbleml.risk.experiment import RiskRunConfig

from .panel_factory import generated_panel


@pytest.fixture(scope="module")
def ablation(tmp_path_factory):
    out = tmp_path_factory.mktemp("ablate")
    panel = generated_panel(900, seed=4, classes=("equity", "equity", "bond", "fx"))
    small = {"filters": 8, "n_conv": 3, "fc": (16, 8)}  # a small CNN keeps the test fast
    base = RiskRunConfig(epochs=1, max_train_samples=300, max_val_samples=300, cnn_overrides=small, test_start="2013-01-01")
    return out, run_ablation(base, ("class_scale", "pca", "class_calibration"), (0, 1), out, panel=panel)


def test_every_variant_is_scored_per_class_on_validation_before_the_test_start(ablation):
    out, summary = ablation
    saved = json.loads((out / "ablation.json").read_text())
    assert list(saved["variants"]) == ["base", "class_scale", "pca", "class_calibration"]  # base comes first
    assert (out / "ablation.png").stat().st_size > 0
    assert saved["windows"]["first_test_date"] == "2013-01-01"
    for name, r in saved["variants"].items():
        assert r["val_dates"][1] < "2013-01-01"  # the test period is never built
        w = r["windows"]  # issue 25.3/25.4: the windows are recorded; early stopping and scoring are apart
        assert w["last_target_end"] < "2013-01-01" and w["train"][1] < w["validation"][0]
        assert w["validation"][1] < w["scoring"][0] == r["val_dates"][0] and r["n_scored"] > 0
        assert set(r["val_qlike_by_class"]) == set(r["har_val_qlike_by_class"]) == {"equity", "bond", "fx"}
        assert len(r["val_qlike_per_seed"]) == 2 and r["val_qlike"] > 0
    assert saved["variants"]["base"]["val_qlike_change_vs_base"] == 0
    assert saved["variants"]["class_scale"]["changes"] == {"scale_scope": "class"}
    assert saved["variants"]["class_calibration"]["changes"] == {"cnn_calibration": "class"}
    # same rows for a variant that changes only the inputs' scaling: HAR (which ignores the images) is unchanged
    assert saved["variants"]["class_scale"]["har_val_qlike"] == pytest.approx(saved["variants"]["base"]["har_val_qlike"])


def test_unknown_variant_is_a_clear_error():
    with pytest.raises(NimbleError, match="unknown ablation variant"):
        parse_variants("base,sentiment")


def test_a_validation_window_over_the_test_period_is_refused(tmp_path):
    panel = generated_panel(400, seed=4, classes=("equity", "fx"))
    base = RiskRunConfig(epochs=1, protocol="walk-forward", test_start="2011-01-03")
    with pytest.raises(NimbleError, match="first test date 2011-01-03"):
        run_ablation(base, ("base",), (0,), tmp_path, panel=panel, val_start="2010-06-01", val_end="2011-03-01")
