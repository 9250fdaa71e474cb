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


def _long_dates(h=5, n_assets=2):
    days = pd.bdate_range("2001-01-02", "2021-01-04").to_numpy()
    return np.tile(days[:-h], n_assets), np.tile(days[h:], n_assets)


def test_walk_forward_test_start_puts_both_crises_out_of_sample():
    dates, ends = _long_dates()
    splits = make_splits("walk-forward", dates, ends, test_start="2007-01-01")
    tested = np.concatenate([dates[s.test] for s in splits])
    assert tested.min() >= np.datetime64("2007-01-01")
    for crisis in ("2008-10-15", "2020-03-16"):
        assert np.datetime64(crisis) in set(tested)
    assert len(splits) == 14  # yearly 2007 .. 2020


@pytest.mark.parametrize("refit_months", [12, 3])
def test_every_fold_trains_on_all_past_data_and_never_on_its_own_test_dates(refit_months):
    dates, ends = _long_dates(h=22)
    splits = walk_forward_splits(dates, ends, test_start="2007-01-01", test_end="2012-01-01", refit_months=refit_months)
    assert len(splits) == 5 * 12 // refit_months
    for s in splits:
        first_test = dates[s.test].min()
        # invariant: no training or validation target reaches the fold's test dates
        assert ends[s.train].max() < first_test and ends[s.val].max() < first_test
        assert ends[s.train].max() < dates[s.val].min()
        # all data before the fold is used: every sample whose target ends before the
        # validation slice trains, and the validation slice is the most recent year
        past = (ends < dates[s.val].min())
        assert len(s.train) == past.sum()
        assert (first_test - dates[s.val].max()) < np.timedelta64(40, "D")
    assert dates[splits[-1].test].max() < np.datetime64("2012-01-01")


def test_chronological_test_start_and_end():
    dates, ends = _long_dates()
    s = chronological_split(dates, ends, test_start="2008-01-01", test_end="2010-01-01")
    assert dates[s.test].min() >= np.datetime64("2008-01-01") and dates[s.test].max() < np.datetime64("2010-01-01")
    assert ends[s.val].max() < np.datetime64("2008-01-01")


@pytest.mark.parametrize("bad", [{"test_start": "2030-01-01"}, {"test_start": "yesterday-ish"}, {"test_start": "2010-01-01", "test_end": "2009-01-01"}])
def test_bad_test_dates_are_one_clear_error(bad):
    dates, ends = _long_dates()
    with pytest.raises(NimbleError, match="test|date"):
        make_splits("walk-forward", dates, ends, **bad)


def test_design_split_ends_before_the_walk_forwards_first_test_date():
    """Issue 25.3: tune/ablate used to split at 85% while the walk-forward tests from 70%."""
    from nimbleml.risk.protocol import design_split

    dates, ends = _dates()
    first = walk_forward_splits(dates, ends)[0]
    first_test = dates[first.test].min()
    d = design_split(dates, ends, "walk-forward")
    assert d.first_test == first_test
    rows = np.concatenate([d.train, d.val, d.score])
    assert ends[rows].max() < first_test  # no row and no target reaches a test date
    assert ends[d.train].max() < dates[d.val].min() and ends[d.val].max() < dates[d.score].min()
    assert d.windows["first_test_date"] == str(pd.Timestamp(first_test).date())
    assert d.windows["last_target_end"] < d.windows["first_test_date"]
    given = design_split(dates, ends, "walk-forward", test_start="2009-01-01", val_start="2007-01-01")
    assert given.windows["validation"][0] == "2007-01-01" and given.windows["scoring"][1] < "2009-01-01"


def test_design_split_refuses_a_validation_window_over_a_test_date():
    from nimbleml.risk.protocol import design_split

    dates, ends = _dates()
    with pytest.raises(NimbleError, match="after the run's first test date"):
        design_split(dates, ends, "walk-forward", test_start="2009-01-01", val_start="2008-01-01", val_end="2009-06-01")
    with pytest.raises(NimbleError, match="paper-random"):
        design_split(dates, ends, "paper-random")
