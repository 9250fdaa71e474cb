"""Baselines: known answers on small simulated series, parity with arch, and no look-ahead."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
from arch import arch_model
from arch.univariate import GARCH, EWMAVariance, Normal, ZeroMean

from nimbleml.errors import NimbleError
from nimbleml.risk.baselines import (
    BASELINES,
    EWMABaseline,
    GARCHBaseline,
    GJRBaseline,
    HARBaseline,
    LinearBaseline,
    SVRBaseline,
    TreeBaseline,
    VarianceRecursion,
    ewma_recursion,
    make_baseline,
)
from nimbleml.risk.samples import RiskSamples

FAST = {  # small grids so every baseline fits in well under a second on the test panels
    "svr": {"max_samples": 300, "grid_samples": 200, "c_grid": (1.0, 3.0), "epsilon_grid": (0.1,)},
    "tree": {"depth_grid": (2, 4), "leaf_grid": (0.02,)},
    "garch": {"dist": "normal"},
    "gjr": {"dist": "normal"},
}


def simulate_returns(params: list[float], nobs: int, seed: int, o: int = 0, scale: float = 0.01) -> pd.Series:
    """A GARCH(1,o,1) path from arch's own simulator (params in percent units), as fractions."""
    model = ZeroMean(None, volatility=GARCH(1, o, 1), distribution=Normal(seed=np.random.default_rng(seed)))
    data = model.simulate(params, nobs, burn=500)["data"].to_numpy()
    return pd.Series(data * scale, index=pd.bdate_range("2005-01-03", periods=nobs))


def make_samples(returns: list[pd.Series], horizon: int = 5, window: int = 10, asset_class: list[int] | None = None) -> RiskSamples:
    """RiskSamples cut from return series: windows of (r, |r|), target over t+1..t+h, HAR from r^2."""
    blocks = []
    for a, series in enumerate(returns):
        r = series.to_numpy()
        cum = np.concatenate([[0.0], np.cumsum(r**2)])
        t = np.arange(max(window, 22) - 1, len(r) - horizon)
        har = np.stack([r[t] ** 2, (cum[t + 1] - cum[t - 4]) / 5, (cum[t + 1] - cum[t - 21]) / 22], axis=1)
        lags = t[:, None] + np.arange(1 - window, 1)
        blocks.append(dict(
            windows=np.stack([r[lags], np.abs(r[lags])], axis=1).astype(np.float32) * 50,
            target=np.sqrt((cum[t + 1 + horizon] - cum[t + 1]) / horizon),
            dates=series.index.values[t].astype("datetime64[ns]"),
            asset=np.full(len(t), a),
            asset_class=np.full(len(t), 0 if asset_class is None else asset_class[a]),
            har=har,
        ))
    cat = {k: np.concatenate([b[k] for b in blocks]) for k in blocks[0]}
    return RiskSamples(**cat, har_range=cat["har"].copy(), returns=list(returns), feature_names=["r", "abs_r"],
                       asset_names=[f"a{i}" for i in range(len(returns))], horizon=horizon)


def split(samples: RiskSamples, end: np.datetime64) -> tuple[RiskSamples, RiskSamples]:
    """(rows dated <= end, rows dated > end)."""
    return samples.subset(samples.dates <= end), samples.subset(samples.dates > end)


@pytest.fixture(scope="module")
def panel() -> RiskSamples:
    """Three small assets (one with bond-sized moves), 900 days."""
    rets = [simulate_returns([0.05, 0.08, 0.9], 900, seed=s, scale=sc) for s, sc in ((1, 0.01), (2, 0.0005), (3, 0.01))]
    return make_samples(rets, asset_class=[0, 1, 0])


def test_registry_and_errors(panel: RiskSamples) -> None:
    assert set(BASELINES) == {"linear", "svr", "tree", "ewma", "garch", "gjr", "har"}
    assert isinstance(make_baseline("garch", dist="normal"), GARCHBaseline)
    with pytest.raises(NimbleError, match="unknown baseline"):
        make_baseline("lstm")
    with pytest.raises(NimbleError, match="bad arguments"):
        make_baseline("ewma", decay=0.9)
    with pytest.raises(NimbleError, match="before fit"):
        EWMABaseline().predict(panel)
    model = EWMABaseline().fit(panel)
    with pytest.raises(NimbleError, match="other assets"):
        model.predict(replace(panel, asset_names=["x", "y", "z"]))


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_every_baseline_gives_positive_finite_forecasts(panel: RiskSamples, name: str) -> None:
    days = np.unique(panel.dates)
    train, rest = split(panel, days[500])
    val, test = split(rest, days[700])
    model = make_baseline(name, **FAST.get(name, {})).fit(train, val)
    pred = model.predict(test)
    assert pred.shape == (len(test),)
    assert np.isfinite(pred).all() and (pred > 0).all()
    assert model.predict(test.subset(np.arange(0))).shape == (0,)


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_no_returns_after_train_end_are_used(panel: RiskSamples, name: str) -> None:
    """Poison every return after the train end: fitted parameters and in-sample forecasts do not move."""
    end = np.unique(panel.dates)[600]
    train, _ = split(panel, end)
    poisoned = [s.where(s.index.values <= end, s * 1e3 + 0.5) for s in panel.returns]
    clean_model = make_baseline(name, **FAST.get(name, {})).fit(train)
    dirty_model = make_baseline(name, **FAST.get(name, {})).fit(replace(train, returns=poisoned))
    np.testing.assert_array_equal(clean_model.predict(train), dirty_model.predict(replace(train, returns=poisoned)))
    if name in ("garch", "gjr"):
        for asset, params in clean_model.params_.items():
            pd.testing.assert_series_equal(params, dirty_model.params_[asset])


def test_variance_recursion_by_hand_on_ten_returns() -> None:
    r = np.array([0.01, -0.02, 0.005, 0.0, 0.03, -0.01, 0.002, -0.004, 0.015, -0.025])
    w = 0.94 ** np.arange(10)
    s = [w @ r**2 / w.sum()]  # arch's backcast: sigma2 of the first day
    for x in r:
        s.append(0.94 * s[-1] + 0.06 * x**2)  # s[t+1], known at the close of day t
    np.testing.assert_allclose(ewma_recursion(0.94).mean_variance(r, horizon=3), s[1:], rtol=1e-12)


def test_ewma_baseline_matches_arch(panel: RiskSamples) -> None:
    a = 1
    r = panel.returns[a].to_numpy()
    res = ZeroMean(r, volatility=EWMAVariance(0.94), rescale=False).fit(disp="off")
    expected = res.forecast(horizon=1, start=0, reindex=False).variance.to_numpy()[:, 0]
    rows = panel.subset(panel.asset == a)
    pos = np.searchsorted(panel.returns[a].index.values, rows.dates)
    np.testing.assert_allclose(EWMABaseline().fit(panel).predict(rows) ** 2, expected[pos], rtol=1e-10)


@pytest.mark.parametrize(
    ("cls", "true", "o"),
    [(GARCHBaseline, {"alpha[1]": 0.08, "beta[1]": 0.90}, 0),
     (GJRBaseline, {"alpha[1]": 0.03, "gamma[1]": 0.10, "beta[1]": 0.88}, 1)],
)
def test_garch_recovers_params_and_matches_arch_forecast(cls: type, true: dict[str, float], o: int) -> None:
    params = [0.05, *true.values()]
    series = simulate_returns(params, 4000, seed=7, o=o)
    samples = make_samples([series], horizon=5)
    end = series.index.values[3500]
    train, test = split(samples, end)
    model = cls(dist="normal", fit_window=None).fit(train)
    assert model.fallbacks_ == 0
    fitted = model.params_["a0"]
    for key, value in true.items():
        assert abs(fitted[key] - value) < 0.05, (key, fitted[key])
    rec = model.recursions_[0]
    scaled = series.to_numpy() * rec.scale
    fixed = arch_model(scaled, mean="Zero", vol="GARCH", p=1, o=o, q=1, dist="normal", rescale=False).fix(fitted.to_numpy())
    for origin in (len(series) - 6, 3700):  # the last sample's origin and one mid-test
        arch_var = fixed.forecast(horizon=5, start=origin, reindex=False).variance.to_numpy()[0].mean()
        row = test.subset(test.dates == series.index.values[origin])
        np.testing.assert_allclose(model.predict(row) ** 2, arch_var / rec.scale**2, rtol=1e-8)


def test_garch_falls_back_to_ewma_when_history_is_short() -> None:
    long = simulate_returns([0.05, 0.08, 0.9], 1500, seed=4)
    short = simulate_returns([0.05, 0.08, 0.9], 700, seed=5)
    short.index = long.index[-700:]
    samples = make_samples([long, short])
    train, test = split(samples, long.index.values[1100])
    model = GARCHBaseline(dist="normal").fit(train)
    assert model.fallback_assets_ == ["a1"] and model.fallbacks_ == 1
    rows = test.subset(test.asset == 1)
    np.testing.assert_allclose(model.predict(rows), EWMABaseline().fit(train).predict(rows), rtol=1e-12)


def test_recursion_forecasts_work_on_shuffled_rows(panel: RiskSamples) -> None:
    perm = np.random.default_rng(0).permutation(len(panel))
    for model in (EWMABaseline().fit(panel), GJRBaseline(dist="normal").fit(panel), HARBaseline().fit(panel)):
        np.testing.assert_array_equal(model.predict(panel.subset(perm)), model.predict(panel)[perm])


def har_panel(true_coef: np.ndarray, form: str, n_assets: int = 2, n: int = 3000, seed: int = 0) -> RiskSamples:
    """Samples whose target variance follows a HAR equation exactly in mean (levels) or in logs."""
    rng = np.random.default_rng(seed)
    base = make_samples([simulate_returns([0.05, 0.08, 0.9], n + 30, seed=seed + a) for a in range(n_assets)])
    m = 1e-4 * np.exp(rng.normal(0, 0.5, len(base)))
    har = np.stack([m * np.exp(rng.normal(0, 0.6, len(base))), m * np.exp(rng.normal(0, 0.3, len(base))), m], axis=1)
    x = np.hstack([np.ones((len(base), 1)), har if form == "levels" else np.log(har)])
    if form == "levels":
        var = (x @ true_coef) * rng.gamma(20.0, 1 / 20.0, len(base))  # mean-one multiplicative noise
    else:
        var = np.exp(x @ true_coef + rng.normal(0, 0.3, len(base)))
    return replace(base, har=har, har_range=har.copy(), target=np.sqrt(var))


@pytest.mark.parametrize(
    ("form", "true_coef", "atol"),
    [("levels", np.array([2e-5, 0.1, 0.4, 0.3]), np.array([1e-5, 0.05, 0.08, 0.1])),
     ("log", np.array([-1.0, 0.3, 0.4, 0.2]), np.array([0.6, 0.03, 0.05, 0.07]))],
)
def test_har_recovers_known_coefficients(form: str, true_coef: np.ndarray, atol: np.ndarray) -> None:
    samples = har_panel(true_coef, form)
    model = HARBaseline(form=form, features="cc").fit(samples)
    assert model.form_ == form and model.selection_ == "fixed"
    for coef in model.coef_.values():
        assert (np.abs(coef - true_coef) <= atol).all(), coef
    if form == "log":
        bias = model.model_.asset[0][1]
        assert abs(bias - np.exp(0.5 * 0.3**2)) < 0.01


def test_har_selection_and_pooled_fallback() -> None:
    samples = har_panel(np.array([-1.0, 0.3, 0.4, 0.2]), "log", n_assets=3, n=1200)
    samples = replace(samples, asset_class=np.where(samples.asset == 2, 1, 0))
    days = np.unique(samples.dates)
    train, val = split(samples, days[900])
    train = train.subset((train.asset != 2) | (train.dates > days[800]))  # asset 2: 100 rows
    model = HARBaseline(min_rows=250).fit(train, val)
    assert model.selection_ == "val" and set(model.scores_) == {"('levels', 'cc')", "('log', 'cc')"}
    assert model.form_ == "log"  # the data are log-HAR
    # chosen on val, refitted on train + val: a2 now has 100 + 300 rows, enough for its own fit
    assert model.pooled_assets_ == [] and "a2" in model.coef_
    assert np.isfinite(model.predict(val)).all()
    short_val = val.subset(val.asset != 2)
    pooled = HARBaseline(min_rows=250).fit(train, short_val)
    assert pooled.pooled_assets_ == ["a2"] and "a2" not in pooled.coef_
    assert HARBaseline().fit(train).selection_ == "train-holdout"


def test_linear_is_exact_on_a_linear_target(panel: RiskSamples) -> None:
    w = np.random.default_rng(1).normal(0, 1e-4, panel.flat.shape[1])
    samples = replace(panel, target=0.02 + panel.flat.astype(np.float64) @ w)
    model = LinearBaseline().fit(samples)
    np.testing.assert_allclose(model._predict(samples), samples.target, rtol=1e-8)
    np.testing.assert_allclose(model.predict(samples), np.maximum(samples.target, model.floor_[samples.asset]), rtol=1e-8)


def test_tree_depth_truncation_equals_a_shallow_fit(panel: RiskSamples) -> None:
    deep = TreeBaseline(max_depth=6, min_samples_leaf=0.01)._tree(6, 0.01, panel)
    shallow = TreeBaseline()._tree(3, 0.01, panel)
    mse = TreeBaseline._depth_mse(deep, panel, [3])[3]
    assert mse == pytest.approx(float(np.mean((shallow.predict(panel.flat) - panel.target) ** 2)), rel=1e-12)


def test_svr_and_tree_record_choices(panel: RiskSamples) -> None:
    svr = SVRBaseline(**FAST["svr"]).fit(panel)
    assert svr.selection_ == "train-holdout" and svr.C_ in (1.0, 3.0) and svr.n_fit_rows_ == 300
    tree = TreeBaseline(**FAST["tree"]).fit(panel)
    assert tree.max_depth_ in (2, 4) and len(tree.scores_) == 2


def test_tree_final_fit_uses_a_bounded_subsample(panel: RiskSamples) -> None:
    capped = TreeBaseline(max_depth=3, min_samples_leaf=0.05, max_fit_samples=100).fit(panel)
    full = TreeBaseline(max_depth=3, min_samples_leaf=0.05, max_fit_samples=None).fit(panel)
    assert capped.fit_rows_ == 100 < len(panel) == full.fit_rows_
    assert capped.model_.tree_.n_node_samples[0] == 100


def test_svr_prediction_in_parallel_chunks_is_identical(panel: RiskSamples) -> None:
    one = SVRBaseline(C=1.0, epsilon=0.1, max_samples=300).fit(panel)
    two = SVRBaseline(C=1.0, epsilon=0.1, max_samples=300, n_jobs=2, parallel_rows=100).fit(panel)
    assert len(panel) >= 100
    np.testing.assert_array_equal(one.predict(panel), two.predict(panel))


@pytest.mark.parametrize("name", ["svr", "tree"])
def test_grid_search_in_worker_processes_chooses_and_scores_as_in_sequence(panel: RiskSamples, name: str) -> None:
    grid = {"svr": dict(c_grid=(0.3, 3.0), epsilon_grid=(0.05, 0.2)), "tree": dict(leaf_grid=(0.01, 0.05))}[name]
    kw = {**FAST[name], **grid}
    one = make_baseline(name, **kw).fit(panel)
    two = make_baseline(name, n_jobs=2, **kw).fit(panel)
    assert len(one.scores_) == 4 and one.scores_ == two.scores_
    np.testing.assert_array_equal(one.predict(panel), two.predict(panel))


def test_every_model_floors_at_the_floor_the_samples_carry(panel: RiskSamples) -> None:
    """Issue 25.2: a fold attaches one per-asset floor; HAR's selection and every forecast use it."""
    from nimbleml.risk.cnn import CNNForecaster
    from nimbleml.risk.evaluate import VarianceFloor
    from nimbleml.risk.imaging import get_encoder
    from nimbleml.risk.model import RiskCNNConfig

    days = np.unique(panel.dates)
    train, val = split(panel, days[int(0.7 * len(days))])
    shared = VarianceFloor.of_samples(train).by_asset * 50  # far above anything a model would fit by itself
    train, val = replace(train, var_floor=shared), replace(val, var_floor=shared)
    for name in ("linear", "har", "ewma"):
        model = make_baseline(name).fit(train, val)
        np.testing.assert_array_equal(model.variance_floor_.by_asset, shared)
        assert (model.predict(val) ** 2 >= shared[val.asset] * (1 - 1e-12)).all()
    assert make_baseline("har").fit(train, val).var_floor_ is not None
    config = RiskCNNConfig(image_size=16, n_conv=2, filters=4, fc=(8,), max_epochs=1, batch_size=256)
    cnn = CNNForecaster(config, get_encoder("heatmap", image_size=16), max_train_samples=500).fit(train, val)
    np.testing.assert_array_equal(cnn.floor_.by_asset, shared)
    assert (cnn.predict(val) ** 2 >= shared[val.asset] * (1 - 1e-6)).all()


@pytest.mark.parametrize(("rule", "scale"), [("floor", -1.0), ("range", -1.0), ("range", 1e3), ("floor", 1e3)])
def test_har_insanity_filter_replaces_forecasts_outside_the_fitted_range(rule: str, scale: float) -> None:
    """Issue 25: a levels fit fed inputs far outside its sample forecasts nonsense (below zero, or
    far above); the filter replaces it with the asset's mean fitted variance ("floor": below the
    variance floor, "range": outside the fitted targets' range, Bollerslev, Patton & Quaedvlieg)."""
    samples = har_panel(np.array([2e-5, 0.1, 0.4, 0.3]), "levels", n=1500)
    days = np.unique(samples.dates)
    train, test = split(samples, days[1000])
    wild = replace(test, har=test.har * np.where(test.asset == 0, scale, 1.0)[:, None], har_range=test.har_range.copy())
    raw = HARBaseline(form="levels", features="cc", insanity_filter="off").fit(train)
    sane = HARBaseline(form="levels", features="cc", insanity_filter=rule).fit(train)
    a0 = wild.asset == 0
    fitted = np.maximum(train.target_variance, sane.var_floor_[train.asset])[train.asset == 0]
    z = raw.model_.asset[0][0]
    ols = np.hstack([np.ones((a0.sum(), 1)), wild.har[a0]]) @ z  # the unfloored OLS forecast
    lo, hi = (sane.var_floor_[0], np.inf) if rule == "floor" else (fitted.min(), fitted.max())
    out = (ols < lo) | (ols > hi)
    assert out.mean() > 0.9 or (scale > 1 and rule == "floor")
    v_raw, v_sane = raw.predict(wild) ** 2, sane.predict(wild) ** 2
    np.testing.assert_allclose(v_sane[a0][out], fitted.mean(), rtol=1e-12)
    np.testing.assert_array_equal(v_sane[a0][~out], v_raw[a0][~out])
    np.testing.assert_array_equal(v_sane[~a0], v_raw[~a0])  # sane inputs are untouched
    assert sane.filtered_ == int(out.sum())


def test_har_records_the_end_of_the_data_its_coefficients_saw() -> None:
    """Issue 25: HAR refits on train + val after choosing its form; metrics.json's fit_data_end must say so."""
    samples = har_panel(np.array([-1.0, 0.3, 0.4, 0.2]), "log", n=1200)
    days = np.unique(samples.dates)
    train, val = split(samples, days[900])
    model = HARBaseline().fit(train, val)
    assert model.selection_ == "val" and model.train_end_ == val.dates.max()
    assert HARBaseline(form="log", features="cc").fit(train, val).train_end_ == train.dates.max()  # nothing chosen, no refit
