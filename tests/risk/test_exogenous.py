"""Exogenous inputs: publication lag t+1, stale values dropped, PCA fitted on training rows only."""

import numpy as np
import pandas as pd
import pytest
from sklearn.decomposition import PCA

from nimbleml.errors import NimbleError
from nimbleml.risk.exogenous import MAX_STALE_DAYS, align_causal, load_exogenous
from nimbleml.risk.features import FeatureScaler


def test_a_value_published_at_t_is_used_from_t_plus_1():
    exog = pd.DataFrame({"x": [1.0, 2.0, 3.0]}, index=pd.to_datetime(["2020-01-02", "2020-01-03", "2020-01-06"]))
    dates = pd.to_datetime(["2020-01-02", "2020-01-03", "2020-01-06", "2020-01-07", "2020-02-20"]).to_numpy()
    out = align_causal(exog, dates)[:, 0]
    assert np.isnan(out[0])  # nothing published before the first date
    np.testing.assert_array_equal(out[1:4], [1.0, 2.0, 3.0])  # yesterday's value, never today's
    assert np.isnan(out[4])  # older than MAX_STALE_DAYS: missing, not carried forward
    assert MAX_STALE_DAYS < 45


def test_rates_from_the_shared_fred_files(shared_data):
    frame = load_exogenous(("rates",), shared_data / "market" / "rates")
    row = frame.loc["2008-10-15"]
    assert row["term_spread"] == pytest.approx(row["dgs10"] - row["dgs3mo"])
    assert frame.index.is_monotonic_increasing and frame.notna().all().all()


def test_unknown_set_and_missing_rates_folder_are_clear_errors(tmp_path):
    with pytest.raises(NimbleError, match="unknown exogenous"):
        load_exogenous(("sentiment",), None)
    with pytest.raises(NimbleError, match="FRED"):
        load_exogenous(("rates",), tmp_path)


def test_pca_is_fitted_on_training_rows_only():
    rng = np.random.default_rng(0)
    train = rng.normal(size=(400, 6)) @ rng.normal(size=(6, 6))
    scaler = FeatureScaler(kind="minmax", outliers="none", pca_components=3).fit(train)
    scaled = (train - scaler.center_) / scaler.scale_
    ref = PCA(n_components=3, random_state=0).fit(scaled)
    np.testing.assert_allclose(np.abs(scaler.pca_.components_), np.abs(ref.components_), atol=1e-8)
    out = scaler.transform(train)
    assert out.shape == (400, 3) and out.min() >= -1e-6 and out.max() <= 1 + 1e-6
    assert scaler.output_names(["a"] * 6) == ["pc1", "pc2", "pc3"]
    crisis = scaler.transform(train * 5)  # test rows never refit the projection
    np.testing.assert_allclose(scaler.pca_.components_, ref.components_ * np.sign(ref.components_ * scaler.pca_.components_))
    assert crisis.shape == (400, 3)


def test_features_gain_the_rates_columns_without_look_ahead(shared_data):
    from nimbleml.risk.features import FeatureConfig, compute_features

    from .panel_factory import generated_panel

    panel = generated_panel(400, classes=("equity", "fx"))
    cfg = FeatureConfig(exogenous=("rates",), rates_dir=str(shared_data / "market" / "rates"))
    fp = compute_features(panel, cfg)
    assert fp.feature_names[-3:] == ["dgs3mo", "dgs10", "term_spread"]
    a = fp.assets[0]
    rates = load_exogenous(("rates",), shared_data / "market" / "rates")
    t = 200
    previous = rates[rates.index < pd.Timestamp(a.dates[t])].iloc[-1]
    np.testing.assert_allclose(a.features[t, -3:], previous.to_numpy())
