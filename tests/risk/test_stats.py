"""Forecast-comparison statistics against hand computations, scipy and the dieboldmariano package."""

from __future__ import annotations

import numpy as np
import pytest
from dieboldmariano import dm_test
from scipy import stats as sps

from nimbleml.errors import NimbleError
import statsmodels.api as sm

from nimbleml.risk.stats import automatic_lags, diebold_mariano, ks_test, mincer_zarnowitz, newey_west_lags, paired_t_test, qlike, squared_error


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


def test_fixed_lag_rule_of_n_is_at_least_h_minus_1() -> None:
    assert newey_west_lags(100, 1) == 4  # floor(4 * 1^(2/9))
    assert newey_west_lags(3500, 5) == int(np.floor(4 * 35 ** (2 / 9)))  # 8 > h - 1
    assert newey_west_lags(3500, 22) == 21


@pytest.mark.parametrize("horizon", [1, 5, 22])
def test_diebold_mariano_newey_west_matches_statsmodels_hac(horizon: int) -> None:
    """The DM variance is the Newey-West variance of the mean loss differential (statsmodels HAC, no small-sample factor)."""
    a, b = ma_losses(600, horizon, 0.05, seed=7)
    ours = diebold_mariano(a, b, horizon, hln=False)
    assert ours.variance == "newey-west" and ours.lags == automatic_lags(a - b, horizon) >= horizon - 1
    assert ours.lag_rule == "newey-west-1994"
    d = a - b
    ref = sm.OLS(d, np.ones_like(d)).fit(cov_type="HAC", cov_kwds={"maxlags": ours.lags, "use_correction": False})
    assert ours.statistic == pytest.approx(ref.params[0] / ref.bse[0], rel=1e-9)
    hln = diebold_mariano(a, b, horizon)
    n = 600
    assert hln.statistic == pytest.approx(ours.statistic * np.sqrt((n + 1 - 2 * horizon + horizon * (horizon - 1) / n) / n), rel=1e-12)


def test_diebold_mariano_lag_is_chosen_from_the_data() -> None:
    """Issue 25.7: the lag was a fixed rule of n (4 at h=5 for ~200 dates, whatever the losses);
    it is Newey-West 1994's automatic bandwidth now (arch's Bartlett), at least h-1, and recorded."""
    from arch.covariance.kernel import Bartlett

    rng = np.random.default_rng(3)
    white = rng.standard_normal(400)
    persistent = np.convolve(rng.standard_normal(420), np.ones(21) / 21, "valid")[:400]
    quiet = diebold_mariano(white + 0.1, np.zeros(400), horizon=5)
    sticky = diebold_mariano(persistent + 0.1, np.zeros(400), horizon=5)
    assert quiet.lag_rule == sticky.lag_rule == "newey-west-1994"
    assert sticky.lags > quiet.lags >= 4  # same n, same h: more autocorrelation, more lags
    assert sticky.lags == int(Bartlett(persistent + 0.1, force_int=True).bandwidth)
    assert diebold_mariano(white, np.zeros(400), horizon=5, lags=7).lag_rule == "given"


def test_mincer_zarnowitz_driscoll_kraay_is_statsmodels_groupsum_and_wider_under_common_shocks() -> None:
    """Issue 25.7: pooled MZ errors by asset (hac-panel) ignore that every asset moves on one date."""
    rng = np.random.default_rng(5)
    n_dates, n_assets = 300, 20
    common = rng.standard_normal(n_dates)
    date = np.repeat(np.arange(n_dates), n_assets)
    forecast = 1.0 + 0.3 * rng.standard_normal(n_dates * n_assets)
    realised = forecast + common[date] + 0.2 * rng.standard_normal(n_dates * n_assets)
    dk = mincer_zarnowitz(realised, forecast, hac_lags=2, time=date)
    ref = sm.OLS(realised, sm.add_constant(forecast)).fit(cov_type="hac-groupsum", cov_kwds={"time": date, "maxlags": 2})
    assert dk.covariance == "driscoll-kraay" and dk.alpha_se == pytest.approx(ref.bse[0])
    asset = np.tile(np.arange(n_assets), n_dates)
    order = np.lexsort((date, asset))
    by_asset = mincer_zarnowitz(realised[order], forecast[order], hac_lags=2, groups=asset[order])
    assert dk.alpha_se > 1.3 * by_asset.alpha_se  # the common date shock is one draw per date, not 20
    assert by_asset.wald_pvalue < 0.01 and dk.wald_pvalue > 0.05  # the forecast is unbiased: only DK says so
    with pytest.raises(NimbleError, match="sorted by time"):
        mincer_zarnowitz(realised[order], forecast[order], hac_lags=2, time=date[order])
