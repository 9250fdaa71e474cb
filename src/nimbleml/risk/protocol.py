"""Evaluation protocols: which samples train, validate and test a forecaster.

- ``chronological`` (default): 70/15/15 by date with a gap: a sample belongs to a period only
  if its whole target (t+1..t+h) ends before the next period starts, so no training target
  overlaps a validation or test day.
- ``walk-forward``: expanding window, one refit every ``refit_months`` (default 12) from the test
  start, each on all data before its fold (the last year of it for early stopping).
- ``paper-random``: the paper's random 70/15/15 split of samples. It leaks the future
  (neighbouring, overlapping windows land on both sides) and every output labels it leaky.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from nimbleml.errors import NimbleError

PROTOCOLS: tuple[str, ...] = ("chronological", "walk-forward", "paper-random")


@dataclass
class Split:
    """Indices into the candidate samples for one fit/evaluate round."""

    name: str  # e.g. "chronological", "walk-forward 2017"
    train: np.ndarray  # (n_train,) int64
    val: np.ndarray  # (n_val,) int64
    test: np.ndarray  # (n_test,) int64
    leaky: bool = False

    def describe(self, dates: np.ndarray) -> dict:
        """Date ranges and sizes of each period (ISO dates)."""

        def span(idx: np.ndarray) -> dict:
            if len(idx) == 0:
                return {"n": 0, "start": None, "end": None}
            d = dates[idx]
            return {"n": int(len(idx)), "start": str(pd.Timestamp(d.min()).date()), "end": str(pd.Timestamp(d.max()).date())}

        return {"name": self.name, "leaky": self.leaky, "train": span(self.train), "val": span(self.val), "test": span(self.test)}


def _check_nonempty(split: Split, hint: str) -> Split:
    for part in ("train", "val", "test"):
        if len(getattr(split, part)) == 0:
            raise NimbleError(
                f"the {split.name} split leaves no {part} samples",
                fix=f"load more history or use a shorter --horizon ({hint})",
            )
    return split


def _day(value: str | np.datetime64 | None) -> np.datetime64 | None:
    """An ISO date (or None) as datetime64[ns]; a bad string is a user error."""
    if value is None:
        return None
    try:
        return np.datetime64(pd.Timestamp(value).normalize().to_datetime64(), "ns")
    except (ValueError, TypeError) as exc:
        raise NimbleError(f"not a date: {value!r}", fix="write dates as YYYY-MM-DD") from exc


def _test_bounds(calendar: np.ndarray, test_start, test_end, default_fraction: float) -> tuple[np.datetime64, np.datetime64]:
    """[start, end) of the test period: the given dates, else ``default_fraction`` of the calendar .. its end."""
    start = _day(test_start) if test_start is not None else calendar[int(round(default_fraction * len(calendar)))]
    end = _day(test_end) if test_end is not None else calendar[-1] + np.timedelta64(1, "D")
    if not start < end:
        raise NimbleError(f"test start {pd.Timestamp(start).date()} is not before test end {pd.Timestamp(end).date()}",
                          fix="pass --test-start earlier than --test-end")
    if start <= calendar[0] or start > calendar[-1]:
        raise NimbleError(f"test start {pd.Timestamp(start).date()} is outside the data "
                          f"({pd.Timestamp(calendar[0]).date()} .. {pd.Timestamp(calendar[-1]).date()})",
                          fix="pass a --test-start inside the loaded history, after enough training data")
    return start, end


def chronological_split(
    dates: np.ndarray,
    target_end: np.ndarray,
    fractions: tuple[float, float] = (0.70, 0.15),
    test_start: str | None = None,
    test_end: str | None = None,
) -> Split:
    """70/15/15 by the calendar of sample dates, with gaps so no target crosses into a later period.

    dates, target_end : (n,) datetime64, each sample's origin t and the date of day t+h.
    With ``test_start`` (ISO date) the test period starts there (and ends before ``test_end``),
    and the days before it are split train/validation in the ratio fractions[0] : fractions[1].
    """
    calendar = np.unique(dates)
    start, end = _test_bounds(calendar, test_start, test_end, fractions[0] + fractions[1])
    past = calendar[calendar < start]
    val_start = past[min(int(round(fractions[0] / (fractions[0] + fractions[1]) * len(past))), len(past) - 1)]
    train = np.flatnonzero((dates < val_start) & (target_end < val_start))
    val = np.flatnonzero((dates >= val_start) & (dates < start) & (target_end < start))
    test = np.flatnonzero((dates >= start) & (dates < end))
    return _check_nonempty(Split("chronological", train, val, test), "the chronological split")


def walk_forward_splits(
    dates: np.ndarray,
    target_end: np.ndarray,
    initial_fraction: float = 0.70,
    val_days: int = 252,
    test_start: str | None = None,
    test_end: str | None = None,
    refit_months: int = 12,
) -> list[Split]:
    """Expanding-window refits every ``refit_months`` from the test start (default: 70% of the calendar).

    Each fold tests on [fold start, next refit) and is fitted on **all** samples before the
    fold: training rows are those whose target ends before the validation slice, and the
    validation slice (early stopping, model choice) is the most recent ``val_days`` trading
    days before the fold whose targets end before it. No fold trains on its own test dates.
    """
    if refit_months < 1:
        raise NimbleError(f"refit cadence {refit_months} months < 1", fix="pass --refit-months 12 (yearly) or 3 (quarterly)")
    calendar = np.unique(dates)
    first, stop = _test_bounds(calendar, test_start, test_end, initial_fraction)
    splits = []
    start = first
    while start < stop and start <= calendar[-1]:
        end = min(np.datetime64(pd.Timestamp(start) + pd.DateOffset(months=refit_months), "ns"), stop)
        past = calendar[calendar < start]
        val_start = past[max(len(past) - val_days, len(past) // 2)]  # at least half the past trains
        train = np.flatnonzero((dates < val_start) & (target_end < val_start))
        val = np.flatnonzero((dates >= val_start) & (dates < start) & (target_end < start))
        test = np.flatnonzero((dates >= start) & (dates < end))
        if len(test):
            name = f"walk-forward {pd.Timestamp(start).date()}"
            splits.append(_check_nonempty(Split(name, train, val, test), "walk-forward"))
        start = end
    if not splits:
        raise NimbleError("walk-forward found no test dates", fix="load more history or move --test-start")
    return splits


def paper_random_split(n: int, seed: int = 0, fractions: tuple[float, float] = (0.70, 0.15)) -> Split:
    """The paper's random split of samples. LEAKY: overlapping windows and targets straddle the periods."""
    order = np.random.default_rng(seed).permutation(n)
    a, b = int(round(fractions[0] * n)), int(round((fractions[0] + fractions[1]) * n))
    split = Split("paper-random (LEAKY)", np.sort(order[:a]), np.sort(order[a:b]), np.sort(order[b:]), leaky=True)
    return _check_nonempty(split, "paper-random")


def make_splits(
    protocol: str,
    dates: np.ndarray,
    target_end: np.ndarray,
    seed: int = 0,
    test_start: str | None = None,
    test_end: str | None = None,
    refit_months: int = 12,
) -> list[Split]:
    """The splits of a named protocol; ``test_start``/``test_end`` (ISO dates) bound the test period."""
    if protocol == "chronological":
        return [chronological_split(dates, target_end, test_start=test_start, test_end=test_end)]
    if protocol == "walk-forward":
        return walk_forward_splits(dates, target_end, test_start=test_start, test_end=test_end, refit_months=refit_months)
    if protocol == "paper-random":
        return [paper_random_split(len(dates), seed)]
    raise NimbleError(f"unknown protocol {protocol!r}", fix=f"use one of {', '.join(PROTOCOLS)}")


@dataclass
class DesignSplit:
    """Rows a design choice (``risk tune``, ``risk ablate``) may look at: all dated before the run's first test date.

    train fits the scaler and the models; ``val`` early-stops and calibrates the CNN and picks
    HAR's form (both models then fit on train + val's information); ``score`` is a later slice
    neither has seen, where the choice is judged. No target of any row reaches ``first_test``.
    """

    train: np.ndarray  # (n,) int64 sample indices
    val: np.ndarray
    score: np.ndarray
    first_test: np.datetime64  # the run's first test date: the end of everything here
    windows: dict  # ISO [first, last] origin date of each part, the first test date and the rule

    def to_dict(self) -> dict:
        return dict(self.windows)


def first_test_date(dates: np.ndarray, protocol: str, test_start: str | None) -> np.datetime64:
    """The first test date of a run: ``test_start``, else the protocol's default share of the calendar."""
    if protocol == "paper-random":
        raise NimbleError("the paper-random protocol tests on dates spread over the whole history: "
                          "no validation window can avoid them", fix="tune or ablate with --protocol walk-forward or chronological")
    fraction = 0.70 if protocol == "walk-forward" else 0.85
    return _test_bounds(np.unique(dates), test_start, None, fraction)[0]


def pinned_test_start(dates: np.ndarray, protocol: str, test_start: str | None) -> str:
    """The run's first test date as an ISO string, to pin on every config a design search derives
    (a trial's window length shifts the calendar, and with it a default share of it, by days)."""
    return str(pd.Timestamp(first_test_date(dates, protocol, test_start)).date())


def design_split(
    dates: np.ndarray,
    target_end: np.ndarray,
    protocol: str,
    test_start: str | None = None,
    val_start: str | None = None,
    val_end: str | None = None,
    score_fraction: float = 0.5,
) -> DesignSplit:
    """Train / validation / scoring rows for a design choice, all before the run's first test date.

    The validation window is [val_start, val_end) (default: the last 15/85 of the days before the
    first test date, ending at it). A window that reaches past the first test date is refused. Its
    last ``score_fraction`` of days (after an h-day gap, as targets span h days) is the scoring
    slice; the rest early-stops and calibrates. ``score_fraction=0``: no scoring slice.
    """
    first_test = first_test_date(dates, protocol, test_start)
    calendar = np.unique(dates)
    past = calendar[calendar < first_test]
    end = _day(val_end) if val_end is not None else first_test
    if end > first_test:
        raise NimbleError(f"the validation window ends {pd.Timestamp(end).date()}, after the run's first test date "
                          f"{pd.Timestamp(first_test).date()}: a design choice would see test data",
                          fix=f"pass --val-end {pd.Timestamp(first_test).date()} or earlier (or move --test-start)")
    start = _day(val_start) if val_start is not None else past[min(int(round(0.70 / 0.85 * len(past))), len(past) - 1)]
    if not start < end:
        raise NimbleError(f"validation window [{pd.Timestamp(start).date()}, {pd.Timestamp(end).date()}) is empty",
                          fix="pass --val-start before --val-end and the first test date")
    train = np.flatnonzero((dates < start) & (target_end < start))
    window = np.flatnonzero((dates >= start) & (dates < end) & (target_end < end))
    val, score = window, np.empty(0, np.int64)
    if score_fraction > 0 and len(window):
        days = np.unique(dates[window])
        cut = days[min(int(round((1.0 - score_fraction) * len(days))), len(days) - 1)]
        val = window[target_end[window] < cut]  # early-stopping rows' targets end before scoring starts
        score = window[dates[window] >= cut]
    for part, rows in (("train", train), ("validation", val), ("scoring", score)):
        if len(rows) == 0 and (part != "scoring" or score_fraction > 0):
            raise NimbleError(f"no {part} samples before the first test date {pd.Timestamp(first_test).date()}",
                              fix="load more history, move --val-start, or use a shorter --horizon")

    def span(rows: np.ndarray) -> list[str] | None:
        return [str(pd.Timestamp(dates[rows].min()).date()), str(pd.Timestamp(dates[rows].max()).date())] if len(rows) else None

    windows = {"protocol": protocol, "first_test_date": str(pd.Timestamp(first_test).date()), "train": span(train),
               "validation": span(val), "scoring": span(score),
               "last_target_end": str(pd.Timestamp(target_end[np.concatenate([train, val, score])].max()).date()),
               "rule": "every row and every target ends before the run's first test date"}
    return DesignSplit(train, val, score, first_test, windows)
