"""`risk tune` on a tiny generated market: trials scored on validation, test scored once for the choice."""

import json

import pytest

from nimbleml.risk.experiment import RiskRunConfig
from nimbleml.risk.tune import TuneConfig, run_tuning

from .panel_factory import generated_panel


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    out = tmp_path_factory.mktemp("tune")
    panel = generated_panel(700, seed=3, classes=("equity", "equity", "fx"))
    panel.report = type("R", (), {"to_dict": staticmethod(lambda: {"counts": {}})})()
    small = {"filters": 8, "n_conv": 3, "fc": (16, 8)}  # a small CNN keeps the test fast; the search is the same
    base = RiskRunConfig(epochs=2, max_train_samples=200, max_val_samples=200, models=("cnn", "har"), mcs_reps=50,
                         cnn_overrides=small)
    tune = TuneConfig(trials=3, exogenous=("none", "pca"))
    return out, run_tuning(base, tune, out, panel=panel), base


def test_tune_searches_on_validation_and_scores_the_test_once(tuned):
    out, res, base = tuned
    summary = json.loads((out / "tune.json").read_text())
    assert summary["n_trials"] == 3 and len(summary["trials"]) == 3
    assert set(summary["best_params"]) == {"exogenous", "window", "kernel", "pool", "lr", "dropout", "encoder"}
    for t in summary["trials"]:
        if t["state"] == "COMPLETE":
            assert set(t["val_qlike_by_class"]) <= {"equity", "fx"}
    # every trial's validation period ends before the test period the final run scores
    test_start = res["result"].predictions["date"].min()
    assert summary["exogenous_on_validation"]
    final = res["result"]
    assert final.config.cnn_overrides["kernel"] == summary["best_params"]["kernel"]
    assert final.config.cnn_overrides["filters"] == 8
    assert set(final.config.models) == set(base.models)
    assert max(t["val_dates"][1] for t in summary["trials"] if t["val_dates"]) < str(test_start.date())
    for t in summary["trials"]:  # issue 25.3: every trial's windows, targets included, end before the first test date
        assert t["windows"]["first_test_date"] == str(test_start.date())
        assert t["windows"]["last_target_end"] < str(test_start.date())
