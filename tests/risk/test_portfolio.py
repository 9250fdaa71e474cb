import numpy as np
import pandas as pd
import pytest
from scipy import stats

from nimbleml.errors import NimbleError
from nimbleml.risk.portfolio import (
    VAR_LEVELS,
    fit_student_nu,
    load_weights,
    pairwise_correlation,
    portfolio_paths,
    portfolio_vol,
    standardised_residuals,
    tail_multipliers,
    tail_risk_summary,
    var_backtest,
)


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
    assert bt.kupiec_pvalue == pytest.approx(stats.chi2.sf(lr, 1))
    assert bt.christoffersen_pvalue > 0.05  # spread out: no clustering


def test_christoffersen_detects_clustered_exceedances():
    hits = np.zeros(500, bool)
    hits[100:110] = True
    assert var_backtest(hits, 0.02).christoffersen_pvalue < 0.01


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


@pytest.mark.parametrize(
    ("n", "accepted", "rejected"),
    [(255, [1, 6], [7, 8]), (510, [2, 10], [1, 11]), (1000, [5, 16], [4, 17])],
)
def test_kupiec_matches_jorions_non_rejection_regions(n, accepted, rejected):
    """Jorion, *Value at Risk* (3rd ed.), Table 6-3, 99% VaR at the 5% test level:
    N < 7 for 255 days (no lower bound given there, so N = 0 is left out), 1 < N < 11 for 510 days, 4 < N < 17 for 1000 days."""
    for x in accepted + rejected:
        hits = np.zeros(n, bool)
        hits[np.linspace(0, n - 1, x).astype(int) if x else []] = True
        assert (var_backtest(hits, 0.01).kupiec_pvalue > 0.05) == (x in accepted), x


def test_christoffersen_and_cc_against_the_likelihood_by_hand():
    """LR_ind from binomial likelihoods of the transition counts (Christoffersen 1998), LR_cc = LR_pof + LR_ind ~ chi2(2)."""
    hits = np.zeros(400, bool)
    hits[[20, 21, 80, 81, 82, 200, 300]] = True
    bt = var_backtest(hits, 0.01)
    prev, cur = hits[:-1], hits[1:]
    n01, n00 = int((~prev & cur).sum()), int((~prev & ~cur).sum())
    n11, n10 = int((prev & cur).sum()), int((prev & ~cur).sum())
    p01, p11, p = n01 / (n00 + n01), n11 / (n10 + n11), (n01 + n11) / (n00 + n01 + n10 + n11)
    restricted = stats.binom.logpmf(n01, n00 + n01, p) + stats.binom.logpmf(n11, n10 + n11, p)
    free = stats.binom.logpmf(n01, n00 + n01, p01) + stats.binom.logpmf(n11, n10 + n11, p11)
    assert bt.christoffersen_lr == pytest.approx(2 * (free - restricted), rel=1e-10)
    assert bt.cc_lr == pytest.approx(bt.kupiec_lr + bt.christoffersen_lr)
    assert bt.cc_pvalue == pytest.approx(stats.chi2.sf(bt.cc_lr, 2))
    assert bt.expected == pytest.approx(4.0) and bt.christoffersen_pvalue < 0.01


def test_tail_multipliers_normal_t_and_fhs():
    rng = np.random.default_rng(0)
    normal = tail_multipliers(rng.standard_normal(20_000), 5, rng)
    assert normal[("normal", 0.01, 1)][0] == pytest.approx(stats.norm.ppf(0.99))
    assert normal[("normal", 0.01, 5)][0] == pytest.approx(stats.norm.ppf(0.99) * np.sqrt(5))
    assert normal[("fhs", 0.01, 1)][0] == pytest.approx(stats.norm.ppf(0.99), rel=0.05)  # FHS recovers the normal
    assert normal[("t", 0.01, 1)][0] == pytest.approx(stats.norm.ppf(0.99), rel=0.05)  # a t with large nu
    fat = tail_multipliers(stats.t.rvs(4, size=20_000, random_state=1) / np.sqrt(2), 5, rng)
    nu4 = -stats.t.ppf(0.01, 4) / np.sqrt(2)  # unit-variance t(4) quantile
    assert fat[("t", 0.01, 1)][0] == pytest.approx(nu4, rel=0.06)
    assert fat[("t", 0.01, 1)][0] > fat[("normal", 0.01, 1)][0]  # fat tails: larger 99% VaR
    for level in VAR_LEVELS:
        for method in ("normal", "t", "fhs"):
            var, es = fat[(method, level, 1)]
            assert es > var > 0


def test_standardised_residuals_are_causal():
    r = np.random.default_rng(2).normal(0, 0.01, 300)
    z = standardised_residuals(r)
    changed = r.copy()
    changed[200:] *= 5
    np.testing.assert_allclose(standardised_residuals(changed)[:200], z[:200])


def _panel(n_assets=3, seed=1):
    rng = np.random.default_rng(seed)
    dates = pd.bdate_range("2015-01-01", periods=700)
    common = rng.normal(0, 0.01, 700)
    returns = [pd.Series(common + rng.normal(0, 0.005, 700), index=dates, name=f"A{k}") for k in range(n_assets)]
    test_dates = dates[500:690]
    sd = np.std(returns[0].to_numpy())
    preds = pd.DataFrame([(d, f"A{k}", sd, sd) for d in test_dates for k in range(n_assets)], columns=["date", "asset", "m", "n"])
    return returns, preds, dates


def test_paper_formula_understates_correlated_risk_and_backtests_run():
    returns, preds, _ = _panel()
    path = portfolio_paths(preds, returns, ["m"], horizon=5)["m"]
    assert len(path.dates) == 190
    assert np.all(path.cov_vol > path.paper_vol)
    summary = tail_risk_summary(path, 5)
    assert 0.2 < summary["understatement"] < 0.5  # rho ~ 0.8: sqrt(1/3) / sqrt(~0.87) ~ 0.62 of the true vol
    v = summary["var"]["normal"]["99"]
    assert v["n"] == 190 and v["h_day"]["n"] == 38  # non-overlapping 5-day origins
    assert set(summary["var"]) == {"normal", "t", "fhs"} and set(summary["es"]["t"]) == {"95", "99"}
    assert summary["paper_formula_var99_normal"]["exceedances"] >= v["exceedances"]


def test_portfolio_holds_the_assets_forecast_at_each_origin():
    returns, preds, dates = _panel()
    late = (preds["asset"] == "A2") & (preds["date"] < dates[600])  # A2 listed later: no forecast yet
    preds = preds[~late]
    out = portfolio_paths(preds, returns, ["m", "n"], horizon=5)
    assert list(out["m"].dates) == list(out["n"].dates) and len(out["m"].dates) == 190
    before = out["m"].dates < dates[600]
    sd = preds["m"].iloc[0]
    # paper formula, equal weights over the held assets: sqrt(n * (vol / n)^2) = vol / sqrt(n)
    np.testing.assert_allclose(out["m"].paper_vol[before], sd / np.sqrt(2))
    np.testing.assert_allclose(out["m"].paper_vol[~before], sd / np.sqrt(3))


def test_weights_file_is_used_and_validated(tmp_path):
    returns, preds, _ = _panel()
    good = tmp_path / "w.csv"
    good.write_text("asset,weight\nA0,0.7\nA1,0.3\n")
    w = load_weights(good, ["A0", "A1", "A2"])
    path = portfolio_paths(preds, returns, ["m"], 5, weights=w)["m"]
    sd = preds["m"].iloc[0]
    np.testing.assert_allclose(path.paper_vol, sd * np.sqrt(0.7**2 + 0.3**2))
    for text, words in [("asset,weight\nA0,0.7\nZZZ,0.3\n", "unknown ticker"), ("asset,weight\nA0,0.7\nA1,0.2\n", "sum to"),
                        ("asset,weight\nA0,x\nA1,0.3\n", "not numbers"), ("ticker,w\nA0,1\n", "columns")]:
        bad = tmp_path / "bad.csv"
        bad.write_text(text)
        with pytest.raises(NimbleError, match=words):
            load_weights(bad, ["A0", "A1", "A2"])


def test_student_nu_matches_scipy_mle_with_unit_variance():
    z = stats.t.rvs(5, size=5000, random_state=3) * np.sqrt(3 / 5)  # unit-variance t(5)
    nu = fit_student_nu(z)
    ref = stats.t.fit(z, floc=0.0)[0]  # free-scale MLE: close to ours on unit-variance data
    assert nu == pytest.approx(5.0, rel=0.2) and nu == pytest.approx(ref, rel=0.1)


def test_each_asset_trades_on_its_own_calendar_and_the_var_basis_is_labelled():
    """Issue 25.8: on a day only FX traded, the equities' missing returns were zeros of a portfolio trial."""
    returns, preds, dates = _panel()
    holiday = dates[550]
    returns = [r.drop(holiday) if r.name != "A2" else r for r in returns]  # A0, A1 closed; A2 (say FX) traded
    preds = preds[~((preds["date"] == holiday) & (preds["asset"] != "A2"))]
    path = portfolio_paths(preds, returns, ["m"], horizon=5)["m"]
    assert holiday not in set(pd.DatetimeIndex(path.dates)) and path.skipped_partial_days == 1
    before = int(np.flatnonzero(pd.DatetimeIndex(path.dates) == dates[549])[0])
    own_next = [returns[0][dates[551]], returns[1][dates[551]], returns[2][holiday]]  # each asset's next trading day
    assert path.ret_1d[before] == pytest.approx(np.mean(own_next))
    own_h = [returns[0][dates[551:556]].sum(), returns[1][dates[551:556]].sum(), returns[2][dates[550:555]].sum()]
    assert path.ret_h[before] == pytest.approx(np.mean(own_h))
    summary = tail_risk_summary(path, 5)
    assert "flat variance" in summary["var_basis"]["one_day"] and summary["skipped_partial_days"] == 1
    halted = dates[600]  # A1 alone misses a day (a third of the weight): a trial of A0 and A2
    returns = [r.drop(halted) if r.name == "A1" else r for r in returns]
    path = portfolio_paths(preds, returns, ["m"], horizon=5)["m"]
    at = int(np.flatnonzero(pd.DatetimeIndex(path.dates) == halted)[0])
    assert path.ret_1d[at] == pytest.approx(np.mean([returns[0][dates[601]], returns[2][dates[601]]]))
    assert "1-day forecast" in tail_risk_summary(portfolio_paths(preds, returns, ["m"], horizon=1)["m"], 1)["var_basis"]["one_day"]
