"""SYNTHETIC market data: a tiny folder in the exact formats of ``../shared/data/market``.

Nothing written here is real. It exists so that end-to-end tests and users without the
shared data folder can run the risk workload: equities (OHLCV with GARCH(1,1) volatility
clustering), one Treasury yield (``rates/DGS10.csv``, percent, ``.`` on holidays), EUR/USD
(``fx/DEXUSEU.csv``) and WTI crude (``commodities/wti-daily.csv``, with one negative
price as on 2020-04-20). ``messy=True`` adds the broken rows listed in ``MESSY_ROWS``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from nimbleml.errors import NimbleError

log = logging.getLogger(__name__)

# Cleaning rule -> rows injected into the first equity file when messy=True (one each).
MESSY_ROWS: dict[str, int] = {
    "nan_close": 1,  # a row with every field empty, as AAP.csv on 2010-05-28
    "nonpositive_volume": 1,  # volume 0, as AAL.csv on 2017-07-03
    "high_below_low": 1,  # high and low swapped, as AMGN.csv on 2017-07-03
    "malformed_row": 1,  # a line cut short after the high
}
# Format quirks present whatever ``messy`` says, as in the real files.
NEGATIVE_WTI_PRICE = -36.98  # USD/barrel, one day, as on 2020-04-20
HOLIDAY_EVERY = 25  # every 25th business day is '.' in the FRED files (rates, fx)


@dataclass
class GarchConfig:
    """Daily GARCH(1,1) for synthetic returns; defaults give about 1.2 % daily volatility."""

    omega: float = 2.9e-6  # daily variance intercept (fraction^2)
    alpha: float = 0.08  # weight of yesterday's squared shock
    beta: float = 0.9  # weight of yesterday's variance (alpha + beta < 1: clustering that decays)


def write_synthetic_market(
    root: Path, n_equities: int = 3, n_days: int = 900, seed: int = 0, messy: bool = True
) -> Path:
    """Write a SYNTHETIC market folder under ``root`` and return ``root``.

    n_equities : equity files ``equities/SYN00.csv`` ... (OHLCV).
    n_days : business days from 2015-01-02 in every file.
    messy : inject the rows in ``MESSY_ROWS`` into ``equities/SYN00.csv``.
    """
    if n_equities < 1 or n_days < 50:
        raise NimbleError(
            f"synthetic market needs n_equities >= 1 and n_days >= 50, got {n_equities} and {n_days}",
            fix="pass larger values",
        )
    root = Path(root)
    rng = np.random.default_rng(seed)
    dates = pd.bdate_range("2015-01-02", periods=n_days)
    iso = dates.strftime("%Y-%m-%d").to_numpy()
    holidays = np.arange(n_days) % HOLIDAY_EVERY == HOLIDAY_EVERY - 1

    for i in range(n_equities):
        lines = _equity_lines(iso, rng, start_price=20.0 + 30.0 * rng.random())
        if messy and i == 0:
            lines = _inject_messy(lines, n_days)
        _write(root / "equities" / f"SYN{i:02d}.csv", [",open,high,low,close,volume", *lines])

    yields = 2.5 + np.cumsum(rng.normal(0.0, 0.05, n_days))  # percent, 5 bp daily moves
    _write(root / "rates" / "DGS10.csv", ["DATE,DGS10", *_fred_lines(iso, yields, holidays, "{:.2f}")])
    eurusd = 1.1 * np.exp(np.cumsum(rng.normal(0.0, 0.005, n_days)))  # USD per euro
    _write(root / "fx" / "DEXUSEU.csv", ["DATE,DEXUSEU", *_fred_lines(iso, eurusd, holidays, "{:.4f}")])

    wti = 60.0 * np.exp(np.cumsum(_garch_returns(n_days, rng, GarchConfig(omega=1.6e-5))))
    wti_text = [f"{p:.2f}" for p in wti]
    wti_text[n_days // 2] = f"{NEGATIVE_WTI_PRICE:.2f}"
    wti_lines = ["Date,Price", *(f"{d},{p}" for d, p in zip(iso, wti_text, strict=True))]
    _write(root / "commodities" / "wti-daily.csv", wti_lines, newline="\r\n")  # the EIA file uses CRLF
    log.info(
        "wrote SYNTHETIC market data to %s (%d equities, %d days, messy=%s)", root, n_equities, n_days, messy
    )
    return root


def _garch_returns(n: int, rng: np.random.Generator, config: GarchConfig) -> np.ndarray:
    """(n,) daily log returns (fractions) with GARCH(1,1) variance."""
    variance = config.omega / (1.0 - config.alpha - config.beta)
    shocks = rng.standard_normal(n)
    out = np.empty(n)
    for t in range(n):
        out[t] = np.sqrt(variance) * shocks[t]
        variance = config.omega + config.alpha * out[t] ** 2 + config.beta * variance
    return out


def _equity_lines(iso: np.ndarray, rng: np.random.Generator, start_price: float) -> list[str]:
    """OHLCV rows ``date,open,high,low,close,volume``; high >= max(open, close), low <= min."""
    n = len(iso)
    returns = _garch_returns(n, rng, GarchConfig())
    close = start_price * np.exp(np.cumsum(returns))
    previous = np.concatenate([[start_price], close[:-1]])
    open_ = previous * np.exp(rng.normal(0.0, 0.3 * np.abs(returns).mean(), n))
    spread = np.abs(rng.normal(0.0, np.abs(returns) + 0.002, (2, n)))
    high = np.maximum(open_, close) * np.exp(spread[0])
    low = np.minimum(open_, close) * np.exp(-spread[1])
    # shares traded, busier on volatile days
    volume = 1e6 * np.exp(rng.normal(0.0, 0.3, n)) * (1.0 + 50.0 * np.abs(returns))
    volume = np.round(volume).astype(np.int64)
    return [
        f"{d},{o:.4f},{h:.4f},{lo:.4f},{c:.4f},{v}"
        for d, o, h, lo, c, v in zip(iso, open_, high, low, close, volume, strict=True)
    ]


def _inject_messy(lines: list[str], n_days: int) -> list[str]:
    """Break four distinct rows, one per entry of MESSY_ROWS."""
    lines = list(lines)
    rows = {rule: (k + 1) * n_days // 6 for k, rule in enumerate(MESSY_ROWS)}
    date, open_, high, low, close, _ = lines[rows["nan_close"]].split(",")
    lines[rows["nan_close"]] = f"{date},,,,,"
    date, open_, high, low, close, _ = lines[rows["nonpositive_volume"]].split(",")
    lines[rows["nonpositive_volume"]] = f"{date},{open_},{high},{low},{close},0"
    date, open_, high, low, close, volume = lines[rows["high_below_low"]].split(",")
    lines[rows["high_below_low"]] = f"{date},{open_},{low},{high},{close},{volume}"
    date, open_, high, *_ = lines[rows["malformed_row"]].split(",")
    lines[rows["malformed_row"]] = f"{date},{open_},{high}"
    return lines


def _fred_lines(iso: np.ndarray, values: np.ndarray, holidays: np.ndarray, fmt: str) -> list[str]:
    """FRED rows ``DATE,VALUE`` with ``.`` on holidays."""
    return [f"{d},{'.' if h else fmt.format(v)}" for d, v, h in zip(iso, values, holidays, strict=True)]


def _write(path: Path, lines: list[str], newline: str = "\n") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes((newline.join(lines) + newline).encode())
