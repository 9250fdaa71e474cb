import numpy as np
import pandas as pd
import pytest
from scipy import stats

from nimbleml.risk.portfolio import equal_weight_portfolio, portfolio_vol, pairwise_correlation, var_backtest


def test_paper_formula_ignores_correlation_and_understates_risk():
    w, v = np.array([0.5, 0.5]), np.array([0.02, 0.02])
    assert portfolio_vol(w, v) == pytest.approx(np.sqrt(2) * 0.01)
    assert portfolio_vol(w, v, np.eye(2)) == pytest.approx(portfolio_vol(w, v))
    assert portfolio_vol(w, v, np.array([[1, 0.8], [0.8, 1]])) > portfolio_vol(w, v)
    assert portfolio_vol(w, v, np.ones((2, 2))) == pytest.approx(0.02)


def test_kupiec_against_hand_computation():
    hits = np.zeros(250, bool)
    hits[[10, 50, 90, 130, 170, 210]] = True  # 6 exceedances where 2.5 are expected at 1%
    bt = var_backtest(hits, 0.01)
    n, x, p = 250, 6, 0.01
    lr = -2 * ((n - x) * np.log(1 - p) + x * np.log(p) - (n - x) * np.log(1 - x / n) - x * np.log(x / n))
    assert bt.kupiec_lr == pytest.approx(lr)
    assert bt.kupiec_p == pytest.approx(stats.chi2.sf(lr, 1))
    assert bt.christoffersen_p > 0.05  # spread out: no clustering


def test_christoffersen_detects_clustered_exceedances():
    hits = np.zeros(500, bool)
    hits[100:110] = True
    assert var_backtest(hits, 0.02).christoffersen_p < 0.01


def test_pairwise_correlation_is_a_correlation():
    r = np.random.default_rng(0).normal(size=(300, 4))
    c = pairwise_correlation(r)
    np.testing.assert_allclose(np.diag(c), 1.0)
    np.testing.assert_allclose(c, np.corrcoef(r.T), atol=1e-12)
    assert np.all(np.linalg.eigvalsh(c) > -1e-12)


def test_correlation_uses_observed_days_only_for_a_late_listing():
    """Days before a listing are missing, not zero returns: they must not dilute the correlation."""
    rng = np.random.default_rng(3)
    common = rng.normal(0, 0.01, 250)
    r = np.column_stack([common + rng.normal(0, 0.003, 250), common + rng.normal(0, 0.003, 250)])
    r[:150, 1] = np.nan  # listed on day 150
    c = pairwise_correlation(r)
    expected = pd.DataFrame(r).corr(min_periods=30).iloc[0, 1]
    assert c[0, 1] == pytest.approx(expected, rel=1e-10)
    assert c[0, 1] > 0.85 > np.corrcoef(np.nan_to_num(r).T)[0, 1]  # zero-filling would drag it down


def test_equal_weight_portfolio_uses_non_overlapping_origins():
    rng = np.random.default_rng(1)
    dates = pd.bdate_range("2015-01-01", periods=600)
    common = rng.normal(0, 0.01, 600)
    returns = [pd.Series(common + rng.normal(0, 0.005, 600), index=dates, name=f"A{k}") for k in range(3)]
    test_dates = dates[400:590]
    preds = pd.DataFrame([(d, f"A{k}", 0.011) for d in test_dates for k in range(3)], columns=["date", "asset", "m"])
    corr = equal_weight_portfolio(preds, returns, ["m"], horizon=5, aggregation="correlated")["m"]
    paper = equal_weight_portfolio(preds, returns, ["m"], horizon=5, aggregation="paper")["m"]
    assert len(corr.dates) == len(test_dates) // 5
    assert np.all(np.diff(corr.dates).astype("timedelta64[D]").astype(int) >= 5)
    # highly correlated assets: the paper's formula understates portfolio risk
    assert np.all(corr.forecast_vol > paper.forecast_vol)
    assert abs(corr.forecast_vol.mean() / corr.realised_vol.mean() - 1) < 0.3


def test_portfolio_holds_the_assets_forecast_at_each_origin():
    rng = np.random.default_rng(2)
    dates = pd.bdate_range("2015-01-01", periods=600)
    returns = [pd.Series(rng.normal(0, 0.01, 600), index=dates, name=f"A{k}") for k in range(3)]
    test_dates = dates[400:590]
    rows = [(d, f"A{k}", 0.01, 0.02) for d in test_dates for k in range(3)]
    preds = pd.DataFrame(rows, columns=["date", "asset", "m", "n"])
    late = (preds["asset"] == "A2") & (preds["date"] < dates[500])  # A2 listed later: no forecast yet
    preds = preds[~late]
    preds.loc[(preds["asset"] == "A1") & (preds["date"] == dates[450]), "n"] = np.nan  # one model misses a day
    out = equal_weight_portfolio(preds, returns, ["m", "n"], horizon=5, aggregation="paper")
    assert len(out["m"].dates) == len(test_dates) // 5  # gaps no longer cost origins
    assert list(out["m"].dates) == list(out["n"].dates)
    before = out["m"].dates < dates[500]
    # paper formula, equal weights over the held assets: sqrt(n * (vol / n)^2) = vol / sqrt(n)
    np.testing.assert_allclose(out["m"].forecast_vol[before & (out["m"].dates != dates[450])], 0.01 / np.sqrt(2))
    np.testing.assert_allclose(out["m"].forecast_vol[~before], 0.01 / np.sqrt(3))
