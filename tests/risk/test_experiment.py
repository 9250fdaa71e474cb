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
        # HAR chooses its form on validation and refits on train + val (issue 25): its record says so
        assert split["fit_data_end"]["har"] == split["val"]["end"]
        assert split["har_filtered_test_forecasts"] >= 0
    metrics = result.metrics()
    in_test = {fold: set(g["asset"]) for fold, g in result.predictions.groupby("fold")}
    folds_with_eq1 = sum("EQ1" in assets for assets in in_test.values())
    assert metrics["fallbacks"]["garch"]["EQ1"] == folds_with_eq1 > 0  # < 500 returns: EWMA, counted
    assert "EQ0" not in metrics["fallbacks"]["garch"]
    assert set(metrics["protocol"]) >= {"name", "test_start", "test_end", "refit", "fit_windows"}
    # issue 25.6: what each model sees, stated per model (experts: train + validation, as fit_data_end shows)
    assert set(metrics["protocol"]["fit_windows"]) == set(cfg.models)
    assert "train + validation" in metrics["protocol"]["fit_windows"]["garch"]


def _report():
    return SimpleNamespace(to_dict=lambda: {"counts": {}})


def test_one_floor_per_fold_for_every_model_and_the_rows_it_touched_are_reported():
    """Issue 25.2: predictions carry each row's floor; no model forecasts below it; metrics count the floored rows."""
    panel = generated_panel(900, seed=5, classes=("equity", "bond", "fx"))
    frame = panel.frame.copy()
    bond = frame["asset"] == "BO1"
    late = np.sort(frame.loc[bond, "date"].unique())[800:812]
    frame.loc[bond & frame["date"].isin(late), "close"] = 2.0  # a flat yield for 12 days: zero targets in the test period
    cfg = RiskRunConfig(models=("linear", "ewma", "har"), mcs_reps=50, features=FeatureConfig(span="all"))
    result = run_risk_evaluation(cfg, SimpleNamespace(frame=frame, source="generated", report=_report()))
    p = result.predictions
    assert (p["var_floor"] > 0).all() and p.groupby("asset")["var_floor"].nunique().eq(1).all()
    for m in cfg.models:
        assert (p[m] ** 2 >= p["var_floor"] * (1 - 1e-9)).all()
    metrics = result.metrics()
    floored = int((p["target"] ** 2 < p["var_floor"]).sum())
    assert floored > 0
    assert metrics["variance_floor"]["target_rows_floored"] == floored == metrics["models"]["har"]["n_target_floored"]
    zero_bond = int(((p["asset_class"] == "bond") & (p["target"] == 0)).sum())
    assert zero_bond >= 5 and metrics["variance_floor"]["target_rows_floored_by_class"]["bond"] >= zero_bond
    assert metrics["models"]["har"]["qlike_unfloored"] != metrics["models"]["har"]["qlike"]
