"""Generated multi-asset panels for risk tests (synthetic, GARCH-like volatility clustering)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd


def generated_panel(n_days: int = 600, seed: int = 0, classes=("equity", "equity", "bond", "fx", "commodity")) -> SimpleNamespace:
    """A long-format panel with the MarketPanel columns; prices follow a GARCH(1,1)-like walk."""
    rng = np.random.default_rng(seed)
    dates = pd.bdate_range("2010-01-04", periods=n_days)
    rows = []
    for k, cls in enumerate(classes):
        var, r = 1e-4, np.empty(n_days)
        for t in range(n_days):
            r[t] = np.sqrt(var) * rng.standard_normal()
            var = 2e-6 + 0.08 * r[t] ** 2 + 0.9 * var
        close = 2.0 + np.cumsum(r * 10) if cls == "bond" else 100 * np.exp(np.cumsum(r))
        frame = pd.DataFrame({"date": dates, "asset": f"{cls[:2].upper()}{k}", "asset_class": cls, "close": close})
        if cls == "equity":
            spread = np.abs(r) + 0.002
            frame["open"] = close * np.exp(-r / 2)
            frame["high"] = close * np.exp(spread)
            frame["low"] = close * np.exp(-spread)
            frame["volume"] = rng.integers(1_000, 10_000, n_days).astype(float)
        else:
            frame[["open", "high", "low", "volume"]] = np.nan
        rows.append(frame)
    frame = pd.concat(rows, ignore_index=True)[["date", "asset", "asset_class", "open", "high", "low", "close", "volume"]]
    return SimpleNamespace(frame=frame.sort_values(["asset", "date"], ignore_index=True), source="generated")
