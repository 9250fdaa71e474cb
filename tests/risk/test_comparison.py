"""The comparison battery on a generated prediction table with known truth (issue 25 item 7)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from statsmodels.stats.multitest import multipletests

from nimbleml.risk.comparison import MIN_NONOVERLAPPING, comparison_section, dm_tests


def predictions(n_dates: int = 400, n_assets: int = 6, horizon: int = 5, seed: int = 0) -> pd.DataFrame:
    """Gaussian daily returns with a known variance path; "truth" forecasts it, "low" 0.3x it, "noisy" with noise."""
    rng = np.random.default_rng(seed)
    dates = pd.bdate_range("2008-01-01", periods=n_dates)
    frames = []
    for a in range(n_assets):
        log_var = np.log(1e-4) + np.cumsum(rng.normal(0, 0.02, n_dates))
        var = np.exp(log_var)
        returns = rng.standard_normal((n_dates, horizon)) * np.sqrt(var)[:, None]
        target = np.sqrt((returns**2).mean(axis=1))
        frames.append(pd.DataFrame({
            "date": dates, "asset": f"A{a}", "asset_class": "equity", "target": target, "fold": "f",
            "var_floor": 1e-2 * np.median(var), "truth": np.sqrt(var), "low": np.sqrt(0.3 * var),
            "noisy": np.sqrt(var * np.exp(rng.normal(0, 0.8, n_dates))),
        }))
    return pd.concat(frames, ignore_index=True)


@pytest.fixture(scope="module")
def section():
    p = predictions()
    windows = {"short": ("2008-03-03", "2008-07-31")}  # ~110 dates: 22 non-overlapping 5-day targets
    return p, comparison_section(p, ["truth", "low", "noisy"], 5, windows, None, mcs_size=0.10, mcs_reps=200, seed=0)


def test_dm_records_its_lag_per_table_with_holm_adjusted_pvalues(section):
    _, out = section
    tests = out["tests"]
    assert "Newey-West 1994" in tests["dm_lag_rule"]
    raw = [e["pvalue"] for row in tests["dm"].values() for e in row.values()]
    holm = [e["pvalue_holm"] for row in tests["dm"].values() for e in row.values()]
    np.testing.assert_allclose(holm, multipletests(raw, method="holm")[1])
    assert all(e["lags"] >= 4 and e["lag_rule"] == "newey-west-1994" for row in tests["dm"].values() for e in row.values())
    assert tests["dm_lags"]["all"]["lags"][0] >= 4 and not tests["dm_lags"]["all"]["indicative"]


def test_short_stress_window_uses_non_overlapping_targets_and_says_indicative(section):
    _, out = section
    window = out["tests"]["dm_windows"]["short"]["truth"]["low"]
    assert window["indicative"] and window["non_overlapping"]
    assert window["effective_n"] == window["n"] < MIN_NONOVERLAPPING  # every 5th date only
    assert out["tests"]["dm_lags"]["short"]["indicative"]
    daily = pd.DataFrame({"a": np.random.default_rng(1).random(200), "b": np.random.default_rng(2).random(200)})
    assert not dm_tests(daily, 5, [("a", "b")])["a"]["b"]["indicative"]  # 40 non-overlapping targets: a full test


def test_mz_is_driscoll_kraay_and_ks_tests_standardised_residuals(section):
    _, out = section
    mz = out["tests"]["mz"]
    assert all(r["covariance"] == "driscoll-kraay" for r in mz.values())
    assert mz["truth"]["pvalue"] > 0.01 and mz["low"]["beta"] > 2  # realised = 1/0.3 x the low forecast
    ks = out["tests"]["ks"]["equity"]
    assert ks["truth"]["pvalue"] > 0.01 and ks["low"]["pvalue"] < 1e-6  # chi2(h) holds for the true variance only
    assert ks["truth"]["n"] == 6 * 80


def test_mcs_on_a_robust_second_loss_beside_qlike(section):
    _, out = section
    tests = out["tests"]
    assert set(tests["mcs_log_mse"]) == set(tests["mcs"])
    assert "truth" in tests["mcs_log_mse"]["all"]["included"] and "low" not in tests["mcs_log_mse"]["all"]["included"]
