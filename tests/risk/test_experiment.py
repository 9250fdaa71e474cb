"""The evaluation loop on a generated panel: experts refit on every fold's data, fallbacks are counted per asset."""

import numpy as np
import pandas as pd
from types import SimpleNamespace

from nimbleml.risk.experiment import RiskRunConfig, run_risk_evaluation
from nimbleml.risk.features import FeatureConfig

from .panel_factory import generated_panel


def test_experts_refit_each_fold_on_all_past_data_and_count_fallbacks():
    panel = generated_panel(1500, seed=4, classes=("equity", "equity", "fx"))
    frame = panel.frame
    late = frame["asset"] == "EQ1"
    first_dates = np.sort(frame.loc[late, "date"].unique())
    frame = frame[~late | (frame["date"] >= first_dates[1150])]  # EQ1 lists late: ~350 days of history
    cfg = RiskRunConfig(protocol="walk-forward", refit_months=6, models=("ewma", "garch", "har"), mcs_reps=100,
                        features=FeatureConfig(span="all"))
    result = run_risk_evaluation(cfg, SimpleNamespace(frame=frame.reset_index(drop=True), source="generated",
                                                      report=_report()))
    assert len(result.splits) >= 2
    for split in result.splits:
        # experts see every sample before the fold (train + validation), as the CNN's fold does
        assert split["fit_data_end"]["garch"] == split["val"]["end"]
        assert split["fit_data_end"]["garch"] < split["test"]["start"]
    metrics = result.metrics()
    in_test = {fold: set(g["asset"]) for fold, g in result.predictions.groupby("fold")}
    folds_with_eq1 = sum("EQ1" in assets for assets in in_test.values())
    assert metrics["fallbacks"]["garch"]["EQ1"] == folds_with_eq1 > 0  # < 500 returns: EWMA, counted
    assert "EQ0" not in metrics["fallbacks"]["garch"]
    assert set(metrics["protocol"]) >= {"name", "test_start", "test_end", "refit"}


def _report():
    return SimpleNamespace(to_dict=lambda: {"counts": {}})
