"""Exogenous inputs (the paper's macro and sentiment features), aligned by date with no look-ahead.

Sets (``FeatureConfig.exogenous``):

- ``rates``: 3-month and 10-year Treasury constant-maturity yields and the term spread
  (10y - 3m), in percent, from FRED CSVs (``DGS3MO.csv``, ``DGS10.csv``; ``.`` marks a holiday).
- ``vix``: log of the CBOE VIX close from ``arch.data.vix`` (it ships 2014-01-03 .. 2019-01-03
  only, so a run with it keeps just the samples whose windows fall in that span).

Publication lag: a value dated t is known after the close of t, so it enters the feature row
of the first trading day strictly after t (``align_causal``). A value older than
``MAX_STALE_DAYS`` calendar days is treated as missing (the window is then incomplete and the
sample is left out) rather than carried forward indefinitely.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from nimbleml.errors import NimbleError

EXOGENOUS_SETS: dict[str, tuple[str, ...]] = {
    "rates": ("dgs3mo", "dgs10", "term_spread"),
    "vix": ("log_vix",),
}
MAX_STALE_DAYS = 10  # calendar days a published value may be carried forward (long weekends, FRED holidays)


def _fred(path: Path) -> pd.Series:
    if not path.is_file():
        raise NimbleError("FRED series not found", path=path, fix="point --rates-dir at ../shared/data/market/rates")
    frame = pd.read_csv(path, na_values=["."])
    series = pd.Series(pd.to_numeric(frame.iloc[:, 1], errors="coerce").to_numpy(), index=pd.to_datetime(frame.iloc[:, 0]))
    return series.dropna().sort_index()


def load_exogenous(sets: tuple[str, ...], rates_dir: Path | None) -> pd.DataFrame:
    """(dates, columns) of the requested sets' published values, indexed by publication date."""
    unknown = [s for s in sets if s not in EXOGENOUS_SETS]
    if unknown:
        raise NimbleError(f"unknown exogenous set(s) {unknown}", fix=f"use {', '.join(EXOGENOUS_SETS)}")
    parts = []
    if "rates" in sets:
        if rates_dir is None:
            raise NimbleError("the rates inputs need a folder of FRED yields", fix="pass --rates-dir ../shared/data/market/rates")
        short, long = _fred(Path(rates_dir) / "DGS3MO.csv"), _fred(Path(rates_dir) / "DGS10.csv")
        both = pd.concat({"dgs3mo": short, "dgs10": long}, axis=1).dropna()
        both["term_spread"] = both["dgs10"] - both["dgs3mo"]
        parts.append(both)
    if "vix" in sets:
        from arch.data import vix

        parts.append(np.log(vix.load()["vix"]).rename("log_vix").to_frame())
    return pd.concat(parts, axis=1).sort_index()


def align_causal(exog: pd.DataFrame, dates: np.ndarray) -> np.ndarray:
    """(T, k) values for trading dates ``dates``: the latest value published strictly before each date.

    Per column, missing (NaN) where nothing was published in the ``MAX_STALE_DAYS`` days before.
    """
    d = pd.DatetimeIndex(dates)
    out = np.full((len(d), exog.shape[1]), np.nan)
    for j, col in enumerate(exog.columns):
        series = exog[col].dropna()
        pos = np.searchsorted(series.index.values, d.values, side="left") - 1  # strictly before
        ok = pos >= 0
        values = np.where(ok, series.to_numpy()[np.maximum(pos, 0)], np.nan)
        age = (d.values - series.index.values[np.maximum(pos, 0)]).astype("timedelta64[D]").astype(float)
        out[:, j] = np.where(ok & (age <= MAX_STALE_DAYS), values, np.nan)
    return out
