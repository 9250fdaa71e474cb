"""Evaluation protocols: which samples train, validate and test a forecaster.

- ``chronological`` (default): 70/15/15 by date with a gap: a sample belongs to a period only
  if its whole target (t+1..t+h) ends before the next period starts, so no training target
  overlaps a validation or test day.
- ``walk-forward``: expanding window, one refit per calendar year of the test period.
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


def chronological_split(
    dates: np.ndarray, target_end: np.ndarray, fractions: tuple[float, float] = (0.70, 0.15)
) -> Split:
    """70/15/15 by the calendar of sample dates, with gaps so no target crosses into a later period.

    dates, target_end : (n,) datetime64, each sample's origin t and the date of day t+h.
    """
    calendar = np.unique(dates)
    n = len(calendar)
    val_start = calendar[int(round(fractions[0] * n))]
    test_start = calendar[int(round((fractions[0] + fractions[1]) * n))]
    train = np.flatnonzero((dates < val_start) & (target_end < val_start))
    val = np.flatnonzero((dates >= val_start) & (dates < test_start) & (target_end < test_start))
    test = np.flatnonzero(dates >= test_start)
    return _check_nonempty(Split("chronological", train, val, test), "the chronological split")


def walk_forward_splits(
    dates: np.ndarray, target_end: np.ndarray, initial_fraction: float = 0.70, val_fraction: float = 0.15
) -> list[Split]:
    """Expanding-window refits, one per calendar year after the initial training span.

    Fold k tests on year Y_k; it trains on everything whose target ends before the
    validation block, which is the last ``val_fraction`` of the dates before Y_k.
    """
    calendar = np.unique(dates)
    first_test = calendar[int(round(initial_fraction * len(calendar)))]
    years = sorted({pd.Timestamp(d).year for d in calendar if d >= first_test})
    splits = []
    for k, year in enumerate(years):
        start = max(np.datetime64(f"{year}-01-01", "ns"), first_test) if k == 0 else np.datetime64(f"{year}-01-01", "ns")
        end = np.datetime64(f"{year + 1}-01-01", "ns")
        past = calendar[calendar < start]
        val_start = past[int(round((1.0 - val_fraction) * len(past)))]
        train = np.flatnonzero((dates < val_start) & (target_end < val_start))
        val = np.flatnonzero((dates >= val_start) & (dates < start) & (target_end < start))
        test = np.flatnonzero((dates >= start) & (dates < end))
        if len(test):
            splits.append(_check_nonempty(Split(f"walk-forward {year}", train, val, test), "walk-forward"))
    if not splits:
        raise NimbleError("walk-forward found no test year", fix="load more history")
    return splits


def paper_random_split(n: int, seed: int = 0, fractions: tuple[float, float] = (0.70, 0.15)) -> Split:
    """The paper's random split of samples. LEAKY: overlapping windows and targets straddle the periods."""
    order = np.random.default_rng(seed).permutation(n)
    a, b = int(round(fractions[0] * n)), int(round((fractions[0] + fractions[1]) * n))
    split = Split("paper-random (LEAKY)", np.sort(order[:a]), np.sort(order[a:b]), np.sort(order[b:]), leaky=True)
    return _check_nonempty(split, "paper-random")


def make_splits(protocol: str, dates: np.ndarray, target_end: np.ndarray, seed: int = 0) -> list[Split]:
    """The splits of a named protocol."""
    if protocol == "chronological":
        return [chronological_split(dates, target_end)]
    if protocol == "walk-forward":
        return walk_forward_splits(dates, target_end)
    if protocol == "paper-random":
        return [paper_random_split(len(dates), seed)]
    raise NimbleError(f"unknown protocol {protocol!r}", fix=f"use one of {', '.join(PROTOCOLS)}")
