"""Forecast losses: the paper's RMSE and R², plus QLIKE, MSE on variance and MAE.

Volatility losses (RMSE, R², MAE) compare daily vol forecasts with the realised vol target;
variance losses (QLIKE, MSE on variance) compare their squares. QLIKE is robust to the noise
in a realised-variance proxy (Patton 2011): it ranks forecasts as the true variance would.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from nimbleml.risk.samples import ASSET_CLASSES

_VAR_FLOOR = 1e-14  # daily variance floor so QLIKE stays finite on a zero-return week


def qlike_loss(y_var: np.ndarray, f_var: np.ndarray) -> np.ndarray:
    """Elementwise QLIKE: y/f - log(y/f) - 1 (zero when the forecast is exact), on variances."""
    ratio = np.maximum(y_var, _VAR_FLOOR) / np.maximum(f_var, _VAR_FLOOR)
    return ratio - np.log(ratio) - 1.0


@dataclass
class ForecastScores:
    """Losses of one forecaster on one set of samples; vol in daily fractions."""

    n: int
    rmse: float  # on volatility
    r2: float  # on volatility, 1 - SSE/SST around the evaluated sample's mean
    qlike: float  # on variance
    mse_var: float  # on variance
    mae: float  # on volatility

    def to_dict(self) -> dict:
        return asdict(self)


def score_forecasts(target_vol: np.ndarray, forecast_vol: np.ndarray) -> ForecastScores:
    """All losses for (n,) realised vols and (n,) forecast vols."""
    y, f = np.asarray(target_vol, float), np.asarray(forecast_vol, float)
    err = f - y
    sst = float(((y - y.mean()) ** 2).sum())
    return ForecastScores(
        n=int(len(y)),
        rmse=float(np.sqrt(np.mean(err**2))),
        r2=float(1.0 - (err**2).sum() / sst) if sst > 0 else float("nan"),
        qlike=float(qlike_loss(y**2, f**2).mean()),
        mse_var=float(np.mean((f**2 - y**2) ** 2)),
        mae=float(np.mean(np.abs(err))),
    )


def score_by_class(target_vol: np.ndarray, forecast_vol: np.ndarray, asset_class: np.ndarray) -> dict[str, ForecastScores]:
    """Scores per asset class present in the samples, keyed by class name."""
    out = {}
    for k, name in enumerate(ASSET_CLASSES):
        m = asset_class == k
        if m.any():
            out[name] = score_forecasts(target_vol[m], forecast_vol[m])
    return out
