"""Forecast-comparison statistics against hand computations, scipy and the dieboldmariano package."""

from __future__ import annotations

import numpy as np
import pytest
from dieboldmariano import dm_test
from scipy import stats as sps

from nimbleml.errors import NimbleError
import statsmodels.api as sm

from nimbleml.risk.stats import diebold_mariano, ks_test, mincer_zarnowitz, newey_west_lags, paired_t_test, qlike, squared_error


def ma_losses(n: int, horizon: int, shift: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two loss series whose difference is MA(h-1), like losses of overlapping h-day forecasts."""
    rng = np.random.default_rng(seed)
    common = rng.gamma(2.0, 1.0, n)
    e = rng.normal(0, 1, n + horizon)
    d = np.convolve(e, np.ones(horizon) / horizon, mode="valid")[:n] + shift
    return common + d, common


def test_losses() -> None:
    y = np.array([1.0, 2.0, 0.5])
    np.testing.assert_allclose(qlike(y, y), 0.0)
    assert (qlike(y, y * 1.3) > 0).all() and (qlike(y, y * 0.7) > 0).all()
    assert qlike(np.array([2.0]), np.array([1.0]))[0] == pytest.approx(1.0 - np.log(2.0))
    np.testing.assert_allclose(squared_error(y, [0.0, 0.0, 0.0]), y**2)


@pytest.mark.parametrize(("horizon", "shift"), [(1, 0.0), (5, 0.1), (22, -0.05)])
def test_diebold_mariano_matches_the_package(horizon: int, shift: float) -> None:
    a, b = ma_losses(400, horizon, shift, seed=horizon)
    ours = diebold_mariano(a, b, horizon, variance="acf")
    stat, pvalue = dm_test([0.0] * len(a), list(a), list(b), loss=lambda _u, v: v, h=horizon, harvey_correction=True)
    assert ours.variance == "acf" and ours.hln
    assert ours.statistic == pytest.approx(stat, rel=1e-9)
    assert ours.pvalue == pytest.approx(pvalue, rel=1e-6)
    assert ours.to_dict()["n"] == 400


def test_diebold_mariano_by_hand_at_horizon_one() -> None:
    a, b = ma_losses(50, 1, 0.3, seed=3)
    d = a - b
    stat = d.mean() / np.sqrt(d.var() / len(d))
    res = diebold_mariano(a, b, horizon=1, hln=False, variance="acf")
    assert res.statistic == pytest.approx(stat)
    assert res.pvalue == pytest.approx(2 * sps.norm.sf(abs(stat)))
    assert res.pvalue < 0.05 and res.mean_difference > 0  # b is better


def test_diebold_mariano_rejects_bad_input() -> None:
    a, b = ma_losses(50, 1, 0.0, seed=1)
    with pytest.raises(NimbleError, match="zero variance"):
        diebold_mariano(a, a, 1)
    with pytest.raises(NimbleError, match="lengths differ"):
        diebold_mariano(a, b[:-1], 1)
    with pytest.raises(NimbleError, match="horizon"):
        diebold_mariano(a, b, 0)
    with pytest.raises(NimbleError, match="non-finite"):
        diebold_mariano(np.r_[a[:-1], np.inf], b, 1)


def test_paired_t_test_is_scipys() -> None:
    a, b = ma_losses(200, 1, 0.2, seed=5)
    res = paired_t_test(a, b)
    ref = sps.ttest_rel(a, b)
    assert (res.statistic, res.pvalue) == pytest.approx((ref.statistic, ref.pvalue))


def test_mincer_zarnowitz() -> None:
    rng = np.random.default_rng(0)
    forecast = rng.gamma(4.0, 0.25, 2000)
    realised = forecast + rng.normal(0, 0.3, 2000)
    unbiased = mincer_zarnowitz(realised, forecast, hac_lags=4)
    assert unbiased.wald_pvalue > 0.05
    assert unbiased.beta == pytest.approx(1.0, abs=0.05) and unbiased.alpha == pytest.approx(0.0, abs=0.05)
    biased = mincer_zarnowitz(realised, 0.5 * forecast + 0.2, hac_lags=4)
    assert biased.wald_pvalue < 1e-6 and biased.beta == pytest.approx(2.0, abs=0.1)
    assert set(biased.to_dict()) >= {"alpha", "beta", "wald_statistic", "wald_pvalue", "hac_lags"}


def test_ks_test() -> None:
    rng = np.random.default_rng(1)
    same = ks_test(rng.normal(0, 1, 500), rng.normal(0, 1, 400))
    shifted = ks_test(rng.normal(0, 1, 500), rng.normal(0.5, 1, 400))
    assert same.pvalue > 0.05 and shifted.pvalue < 1e-6 and same.n_b == 400


def test_newey_west_lag_rule_is_data_driven_and_at_least_h_minus_1() -> None:
    assert newey_west_lags(100, 1) == 4  # floor(4 * 1^(2/9))
    assert newey_west_lags(3500, 5) == int(np.floor(4 * 35 ** (2 / 9)))  # 8 > h - 1
    assert newey_west_lags(3500, 22) == 21


@pytest.mark.parametrize("horizon", [1, 5, 22])
def test_diebold_mariano_newey_west_matches_statsmodels_hac(horizon: int) -> None:
    """The DM variance is the Newey-West variance of the mean loss differential (statsmodels HAC, no small-sample factor)."""
    a, b = ma_losses(600, horizon, 0.05, seed=7)
    ours = diebold_mariano(a, b, horizon, hln=False)
    assert ours.variance == "newey-west" and ours.lags == newey_west_lags(600, horizon) >= horizon - 1
    d = a - b
    ref = sm.OLS(d, np.ones_like(d)).fit(cov_type="HAC", cov_kwds={"maxlags": ours.lags, "use_correction": False})
    assert ours.statistic == pytest.approx(ref.params[0] / ref.bse[0], rel=1e-9)
    hln = diebold_mariano(a, b, horizon)
    n = 600
    assert hln.statistic == pytest.approx(ours.statistic * np.sqrt((n + 1 - 2 * horizon + horizon * (horizon - 1) / n) / n), rel=1e-12)
