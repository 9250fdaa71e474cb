"""Stress windows and market regimes: the slices of the test period a validator looks at first.

Stress windows are fixed calendar ranges (defaults: the 2008 crisis and the 2020 crash).
Regimes label each date bull, bear or high-volatility by a rule that uses only data dated
<= that date (so a label never tells a model about the future):

- the market index is the equal-weight mean of the equities' daily returns on each date
  (all price series when the run has no equity);
- ``high_vol`` when the index's trailing ``vol_days`` realised vol exceeds the
  ``vol_quantile`` quantile of that same trailing vol over all dates up to and including t
  (an expanding window, after ``min_history`` dates);
- otherwise ``bull`` when the index's trailing ``trend_days`` cumulative log return is > 0,
  else ``bear``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

from nimbleml.errors import NimbleError

# name -> (first day, last day), ISO, both inclusive: the two crises
STRESS_WINDOWS: dict[str, tuple[str, str]] = {
    "gfc_2008": ("2008-09-01", "2009-06-30"),  # Lehman to the end of the NBER recession
    "covid_2020": ("2020-02-15", "2020-06-30"),  # the COVID crash and rebound
}
REGIMES: tuple[str, ...] = ("bull", "bear", "high_vol")


def parse_windows(spec: str) -> dict[str, tuple[str, str]]:
    """Windows from ``name=YYYY-MM-DD:YYYY-MM-DD,...``; a malformed entry is one clear error."""
    out: dict[str, tuple[str, str]] = {}
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        name, _, span = part.partition("=")
        first, _, last = span.partition(":")
        try:
            start, end = pd.Timestamp(first), pd.Timestamp(last)
        except (ValueError, TypeError):
            start = end = None
        if not name or start is None or end is None or pd.isna(start) or pd.isna(end) or end < start:
            raise NimbleError(f"bad stress window {part!r}", fix="write --windows name=YYYY-MM-DD:YYYY-MM-DD[,...] with start <= end")
        out[name.strip()] = (str(start.date()), str(end.date()))
    if not out:
        raise NimbleError("no stress window given", fix="write --windows name=YYYY-MM-DD:YYYY-MM-DD")
    return out


def window_mask(dates: np.ndarray, window: tuple[str, str]) -> np.ndarray:
    """(n,) True for forecast origins inside the window (both ends inclusive)."""
    d = np.asarray(dates).astype("datetime64[ns]")
    return (d >= np.datetime64(window[0], "ns")) & (d <= np.datetime64(window[1], "ns"))


@dataclass
class RegimeRule:
    """The documented regime rule; every quantity is trailing (data dated <= t)."""

    trend_days: int = 126  # trailing trading days of index return: > 0 bull, <= 0 bear (half a year)
    vol_days: int = 22  # trailing trading days of index realised vol (a month)
    vol_quantile: float = 0.8  # high_vol above this quantile of the trailing vol's own history up to t
    min_history: int = 252  # dates of trailing-vol history before high_vol can be called (a year)

    def to_dict(self) -> dict:
        return asdict(self)


def market_index(returns: list[pd.Series], asset_classes: list[str]) -> pd.Series:
    """Equal-weight mean daily return over the equities available each date (all series if none)."""
    pick = [r for r, c in zip(returns, asset_classes) if c == "equity"] or list(returns)
    wide = pd.concat(pick, axis=1, sort=True)
    return wide.mean(axis=1, skipna=True).dropna()


def regime_labels(index_returns: pd.Series, rule: RegimeRule | None = None) -> pd.Series:
    """One label from ``REGIMES`` per date of ``index_returns`` (daily log returns), causal."""
    rule = rule or RegimeRule()
    r = index_returns.astype(float)
    vol = np.sqrt((r**2).rolling(rule.vol_days, min_periods=rule.vol_days).mean())
    threshold = vol.expanding(min_periods=rule.min_history).quantile(rule.vol_quantile)
    trend = r.rolling(rule.trend_days, min_periods=rule.vol_days).sum()
    labels = np.where(trend > 0, "bull", "bear")
    labels = np.where(vol > threshold, "high_vol", labels)
    return pd.Series(labels, index=r.index, name="regime")
