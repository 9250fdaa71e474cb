import numpy as np
import pandas as pd
import pytest

from nimbleml.errors import NimbleError
from nimbleml.risk.features import FeatureConfig, FeatureScaler, build_samples, compute_features, fit_scaler, zscore_keep
from nimbleml.risk.protocol import chronological_split

from .panel_factory import generated_panel


def test_target_is_future_realised_vol():
    panel = generated_panel(300)
    fp = compute_features(panel, FeatureConfig(horizon=5))
    a = next(x for x in fp.assets if x.asset_class == "equity")
    close = panel.frame[panel.frame.asset == a.name].close.to_numpy()
    r = np.diff(np.log(close))  # r[k] is the return of day k+1
    t = 100
    assert a.target[t] == pytest.approx(np.sqrt(np.mean(r[t : t + 5] ** 2)))
    assert a.har[t, 2] == pytest.approx(np.mean(r[t - 22 : t] ** 2))
    assert a.target_end[t] == a.dates[t + 5]


def test_windows_end_at_origin_and_scaled_in_unit_range_on_train():
    panel = generated_panel(400)
    fp = compute_features(panel, FeatureConfig())
    split = chronological_split(fp.sample_date, fp.sample_target_end)
    scaler = fit_scaler(fp, split.train)
    train = build_samples(fp, scaler, split.train)
    assert train.windows.shape[1:] == (len(fp.feature_names), 10)
    day_t = train.windows[:, :, -1]  # the scaler is fitted on the training origins' rows
    assert day_t.min() >= -1e-6 and day_t.max() <= 1 + 1e-6
    # the last column of a window is day t: compare with the scaled feature row of that day
    i = 17
    a = fp.assets[train.asset[i]]
    row = np.flatnonzero(a.dates == train.dates[i])[0]
    np.testing.assert_allclose(train.windows[i][:, -1], scaler.transform(a.features[row : row + 1])[0], rtol=1e-6)


def test_class_scope_scales_each_asset_class_to_its_own_training_range():
    panel = generated_panel(800)  # every class needs MIN_CLASS_SCALER_ROWS training rows
    fp = compute_features(panel, FeatureConfig(scale_scope="class"))
    split = chronological_split(fp.sample_date, fp.sample_target_end)
    scaler = fit_scaler(fp, split.train)
    assert set(scaler.by_class_) == {"equity", "bond", "fx", "commodity"}
    train = build_samples(fp, scaler, split.train)
    ret = list(fp.feature_names).index("ret")
    for c in np.unique(train.asset_class):
        day_t = train.windows[train.asset_class == c][:, :, -1]
        assert day_t[:, ret].min() == pytest.approx(0, abs=1e-6) and day_t[:, ret].max() == pytest.approx(1, abs=1e-6)
    pooled = fit_scaler(compute_features(panel, FeatureConfig()), split.train)
    bond = next(a for a in fp.assets if a.asset_class == "bond")
    assert pooled.by_class_ is None and pooled.for_class("bond") is pooled
    assert not np.allclose(scaler.for_class("bond").transform(bond.features), pooled.transform(bond.features), equal_nan=True)


def test_nothing_in_train_touches_data_past_its_boundary():
    """Poison every price after the training boundary: training windows, targets and the scaler must not change."""
    panel = generated_panel(500, seed=3)
    cfg = FeatureConfig(horizon=5)
    fp = compute_features(panel, cfg)
    split = chronological_split(fp.sample_date, fp.sample_target_end)
    boundary = fp.sample_target_end[split.train].max()
    assert boundary < fp.sample_date[split.val].min()
    assert fp.sample_target_end[split.val].max() < fp.sample_date[split.test].min()

    poisoned = generated_panel(500, seed=3)
    late = poisoned.frame.date > boundary
    poisoned.frame.loc[late, ["open", "high", "low", "close"]] *= np.exp(np.random.default_rng(9).normal(0, 0.5, (late.sum(), 1)))
    fp2 = compute_features(poisoned, cfg)
    np.testing.assert_array_equal(fp.sample_date, fp2.sample_date)
    s1, s2 = fit_scaler(fp, split.train), fit_scaler(fp2, split.train)
    np.testing.assert_array_equal(s1.center_, s2.center_)
    np.testing.assert_array_equal(s1.scale_, s2.scale_)
    t1, t2 = build_samples(fp, s1, split.train), build_samples(fp2, s2, split.train)
    np.testing.assert_array_equal(t1.windows, t2.windows)
    np.testing.assert_array_equal(t1.target, t2.target)
    np.testing.assert_array_equal(t1.har, t2.har)


def test_zscore_rule_only_drops_training_windows():
    panel = generated_panel(400)
    fp = compute_features(panel, FeatureConfig(outliers="zscore"))
    split = chronological_split(fp.sample_date, fp.sample_target_end)
    kept = zscore_keep(fp, fit_scaler(fp, split.train), split.train)
    assert 0 < len(kept) < len(split.train)
    assert set(kept) <= set(split.train)


def test_horizon_longer_than_data_is_a_clear_error():
    with pytest.raises(NimbleError, match="horizon"):
        compute_features(generated_panel(60), FeatureConfig(horizon=40))


def test_bad_config_values():
    with pytest.raises(NimbleError):
        FeatureConfig(horizon=0)
    with pytest.raises(NimbleError):
        FeatureConfig(scaler="zscore")


def test_default_transform_does_not_cap_crisis_inputs():
    """A test-time value far beyond the training range reaches the model uncapped (fix 3)."""
    rng = np.random.default_rng(0)
    train = np.log(rng.gamma(2.0, 1e-4, (500, 3)))
    default = FeatureConfig()
    scaler = FeatureScaler(kind=default.scaler, outliers=default.outliers).fit(train)
    calm, crisis = scaler.transform(train.max(axis=0, keepdims=True)), scaler.transform(train.max(axis=0, keepdims=True) + 3.0)
    assert (crisis > calm + 0.1).all()
    capped = FeatureScaler(kind="minmax", outliers="winsorize").fit(train)
    np.testing.assert_array_equal(capped.transform(train.max(axis=0, keepdims=True) + 3.0), capped.transform(train.max(axis=0, keepdims=True)))


def test_a_bad_print_day_is_forecast_from_the_data_as_of_that_day(tmp_path):
    """Issue 25.9: the two-sided bad-print rule looks at the next close. History keeps it (the
    spike is dropped), but the sample dated on the spike day is built as a live feed saw it: its
    window equals the one computed from the file cut at that day, spike as the last close."""
    from nimbleml.risk.data import load_market
    from tests.risk.test_data import _bars, write

    rng = np.random.default_rng(0)
    closes = list(100 * np.exp(np.cumsum(rng.normal(0, 0.01, 400))))
    spike = 300
    closes[spike] *= 3.0  # a bad tick, undone by the next close
    write(tmp_path / "full", "equities/X.csv", _bars(closes))
    write(tmp_path / "asof", "equities/X.csv", _bars(closes[: spike + 1]))  # the data a live feed had on that day
    full, asof = load_market(tmp_path / "full"), load_market(tmp_path / "asof")
    assert full.report.per_asset["X"] == {"bad_print": 1} and len(full.bad_prints) == 1
    assert asof.report.per_asset["X"] == {} and asof.frame["close"].iloc[-1] == pytest.approx(closes[spike])  # the last day is kept
    config = FeatureConfig(span="all")
    fp, live = compute_features(full, config), compute_features(asof, config)
    day = np.datetime64(pd.bdate_range("2020-01-01", periods=400)[spike], "ns")
    at = np.flatnonzero(fp.sample_date == day)
    assert len(at) == 1  # the spike day is a forecast origin, as it was in real time
    scaler = fit_scaler(fp, np.flatnonzero(fp.sample_date < day))
    sample = build_samples(fp, scaler, at)
    expected = scaler.transform(live.assets[0].features[-config.window:]).T
    np.testing.assert_allclose(sample.windows[0], expected, rtol=1e-6)
    assert abs(sample.windows[0][0, -1] - scaler.transform(live.assets[0].features[-1:])[0, 0]) < 1e-6
    before = np.flatnonzero(fp.sample_date < day)[-1]
    assert sample.target[0] == build_samples(fp, scaler, np.array([before])).target[0]  # the cleaned next h returns
    after = build_samples(fp, scaler, np.flatnonzero(fp.sample_date > day)[:1])  # the reversal is known: history is clean
    raw_after = fp.assets[0].features[fp.sample_row[np.flatnonzero(fp.sample_date > day)[0]] - config.window + 1:][:config.window]
    assert np.abs(raw_after[:, 0]).max() < np.log(1.5) and len(after) == 1
