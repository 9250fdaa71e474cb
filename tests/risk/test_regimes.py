"""Stress windows and regime labels: parsing errors and the no-look-ahead invariant."""

import numpy as np
import pandas as pd
import pytest

from nimbleml.errors import NimbleError
from nimbleml.risk.regimes import REGIMES, STRESS_WINDOWS, market_index, parse_windows, regime_labels, window_mask


def _index(n=1500, seed=0):
    rng = np.random.default_rng(seed)
    vol = np.where((np.arange(n) > 700) & (np.arange(n) < 800), 0.04, 0.01)
    return pd.Series(rng.normal(0.0003, 1, n) * vol, index=pd.bdate_range("2005-01-03", periods=n))


def test_regime_labels_use_no_future_data():
    """Invariant: the label of every date is the same whether or not later data exist."""
    r = _index()
    full = regime_labels(r)
    for cut in (300, 701, 750, 1100, 1499):
        np.testing.assert_array_equal(regime_labels(r.iloc[:cut]).to_numpy(), full.iloc[:cut].to_numpy())
    # changing the future never changes the past labels
    shocked = r.copy()
    shocked.iloc[1000:] *= 10
    np.testing.assert_array_equal(regime_labels(shocked).iloc[:1000].to_numpy(), full.iloc[:1000].to_numpy())


def test_regimes_partition_and_find_the_volatile_spell():
    labels = regime_labels(_index())
    assert set(labels.unique()) <= set(REGIMES)
    assert (labels.iloc[720:800] == "high_vol").mean() > 0.8
    assert (labels.iloc[1200:] == "high_vol").mean() < 0.3


def test_market_index_averages_equities_only():
    d = pd.bdate_range("2020-01-01", periods=3)
    eq1, eq2, bond = pd.Series([0.01, 0.02, 0.0], d), pd.Series([0.03, np.nan, 0.0], d), pd.Series([9.0, 9.0, 9.0], d)
    idx = market_index([eq1, eq2, bond], ["equity", "equity", "bond"])
    np.testing.assert_allclose(idx.to_numpy(), [0.02, 0.02, 0.0])


def test_windows_parse_and_mask():
    w = parse_windows("gfc=2008-09-01:2009-06-30, covid=2020-02-15:2020-06-30")
    assert w == {"gfc": STRESS_WINDOWS["gfc_2008"], "covid": STRESS_WINDOWS["covid_2020"]}
    dates = pd.to_datetime(["2008-08-29", "2008-09-01", "2009-06-30", "2009-07-01"]).to_numpy()
    assert window_mask(dates, w["gfc"]).tolist() == [False, True, True, False]


@pytest.mark.parametrize("spec", ["gfc", "gfc=2009-01-01:2008-01-01", "gfc=soon:later", ","])
def test_bad_window_is_one_clear_error(spec):
    with pytest.raises(NimbleError, match="window"):
        parse_windows(spec)
