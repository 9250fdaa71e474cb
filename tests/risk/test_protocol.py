import numpy as np
import pandas as pd
import pytest

from nimbleml.errors import NimbleError
from nimbleml.risk.protocol import chronological_split, make_splits, paper_random_split, walk_forward_splits


def _dates(n_days=2000, n_assets=3, h=5):
    days = pd.bdate_range("2005-01-03", periods=n_days).to_numpy()
    dates = np.tile(days[:-h], n_assets)
    ends = np.tile(days[h:], n_assets)
    return dates, ends


def test_chronological_periods_are_ordered_with_gap():
    dates, ends = _dates()
    s = chronological_split(dates, ends)
    assert ends[s.train].max() < dates[s.val].min()
    assert ends[s.val].max() < dates[s.test].min()
    assert abs(len(s.train) / len(dates) - 0.70) < 0.01
    assert not s.leaky


def test_walk_forward_refits_yearly_and_never_trains_on_the_test_year():
    dates, ends = _dates()
    splits = walk_forward_splits(dates, ends)
    years = [pd.Timestamp(dates[s.test].min()).year for s in splits]
    assert years == sorted(set(years)) and len(years) >= 2
    for s in splits:
        assert ends[s.train].max() < dates[s.val].min()
        assert ends[s.val].max() < dates[s.test].min()
    assert len(splits[1].train) > len(splits[0].train)  # expanding


def test_paper_random_is_labelled_leaky():
    s = paper_random_split(1000, seed=1)
    assert s.leaky and "LEAKY" in s.name
    assert len(set(s.train) | set(s.val) | set(s.test)) == 1000


def test_unknown_protocol():
    dates, ends = _dates(300)
    with pytest.raises(NimbleError, match="protocol"):
        make_splits("random", dates, ends)
