"""Forecast losses: the paper's RMSE and R², plus QLIKE, MSE on variance and MAE, and the variance floor.

Volatility losses (RMSE, R², MAE) compare daily vol forecasts with the realised vol target;
variance losses (QLIKE, MSE on variance) compare their squares. QLIKE is robust to the noise
in a realised-variance proxy (Patton 2011): it ranks forecasts as the true variance would.

The variance floor (``VarianceFloor``) is the one rule every model and every stage uses for
targets and forecasts: per asset, ``FLOOR_OF_MEDIAN_VARIANCE`` (1%) of the median h-day target
variance of that asset's training rows (a volatility of a tenth of its median). Treasury
yields move in 1 bp steps, so a 5-day target below it is an exact zero; on equities it is
never reached. QLIKE floors target and forecast at the row's floor; the rows whose target was
floored are counted and QLIKE is also reported without them (``qlike_unfloored``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from nimbleml.errors import NimbleError
from nimbleml.risk.samples import ASSET_CLASSES, RiskSamples

_VAR_FLOOR = 1e-14  # last-resort daily variance floor when no per-asset floor is known (old run folders)
FLOOR_OF_MEDIAN_VARIANCE = 1e-2  # per-asset variance floor as a fraction of the asset's median training target variance
FLOOR_RULE = ("per asset: 1% of the median h-day target variance of the asset's training rows "
              "(its asset class's, then the panel's, when it has none); targets and forecasts are floored at it")


@dataclass
class VarianceFloor:
    """Per-asset daily-variance floor fitted on training targets (the rule in the module docstring).

    by_asset : (n_assets,) floor of each asset (an asset without training rows gets its class's).
    by_class : (n_classes,) the lowest asset floor of each class: what a caller that knows only
        the class (the served graph) floors at.
    """

    by_asset: np.ndarray
    by_class: np.ndarray

    @classmethod
    def fit(cls, target: np.ndarray, asset: np.ndarray, asset_class: np.ndarray, n_assets: int,
            n_classes: int = len(ASSET_CLASSES)) -> VarianceFloor:
        """Floors from (n,) training targets (realised vol, daily fraction) and their asset / class ids."""
        variance = np.asarray(target, dtype=np.float64) ** 2
        if len(variance) == 0 or not np.median(variance) > 0:
            raise NimbleError("at least half the training targets are zero volatility",
                              fix="drop assets or days without price changes before building RiskSamples")
        pooled = FLOOR_OF_MEDIAN_VARIANCE * float(np.median(variance))
        class_floor = np.full(n_classes, pooled)
        for c in np.unique(asset_class):
            median = float(np.median(variance[asset_class == c]))
            class_floor[c] = FLOOR_OF_MEDIAN_VARIANCE * median if median > 0 else pooled
        by_asset = np.full(n_assets, np.nan)
        for a in np.unique(asset):
            median = float(np.median(variance[asset == a]))
            by_asset[a] = FLOOR_OF_MEDIAN_VARIANCE * median if median > 0 else class_floor[asset_class[asset == a][0]]
        unseen = np.isnan(by_asset)
        by_asset[unseen] = pooled
        by_class = class_floor.copy()
        for c in np.unique(asset_class):
            by_class[c] = float(by_asset[np.unique(asset[asset_class == c])].min())
        return cls(by_asset=np.maximum(by_asset, np.finfo(float).tiny), by_class=np.maximum(by_class, np.finfo(float).tiny))

    @classmethod
    def of_samples(cls, train: RiskSamples) -> VarianceFloor:
        """The floor fitted on a RiskSamples table's rows (a fold's training rows)."""
        return cls.fit(train.target, train.asset, train.asset_class, len(train.asset_names))

    @classmethod
    def for_training(cls, train: RiskSamples) -> VarianceFloor:
        """The floor a model fitted on ``train`` uses: the fold's shared one when attached
        (``train.var_floor``), else the rule applied to these rows."""
        if train.var_floor is None:
            return cls.of_samples(train)
        by_asset = np.asarray(train.var_floor, dtype=np.float64)
        by_class = np.full(len(ASSET_CLASSES), float(by_asset.min()))
        for c in np.unique(train.asset_class):
            by_class[c] = float(by_asset[np.unique(train.asset[train.asset_class == c])].min())
        return cls(by_asset=by_asset, by_class=by_class)

    def rows(self, asset: np.ndarray) -> np.ndarray:
        """(n,) the floor of each row's asset."""
        return self.by_asset[np.asarray(asset, dtype=np.int64)]

    def to_dict(self) -> dict:
        return {"by_asset": [float(v) for v in self.by_asset], "by_class": [float(v) for v in self.by_class]}

    @classmethod
    def from_dict(cls, values: dict) -> VarianceFloor:
        return cls(np.asarray(values["by_asset"], dtype=np.float64), np.asarray(values["by_class"], dtype=np.float64))


def qlike_loss(y_var: np.ndarray, f_var: np.ndarray, floor: np.ndarray | float | None = None) -> np.ndarray:
    """Elementwise QLIKE: y/f - log(y/f) - 1 (zero when the forecast is exact), on variances.

    ``floor``: (n,) or scalar daily variance each row's target and forecast are floored at (the
    ``VarianceFloor`` rule); None: the last-resort 1e-14.
    """
    floor = _VAR_FLOOR if floor is None else np.maximum(floor, _VAR_FLOOR)
    ratio = np.maximum(y_var, floor) / np.maximum(f_var, floor)
    return ratio - np.log(ratio) - 1.0


@dataclass
class ForecastScores:
    """Losses of one forecaster on one set of samples; vol in daily fractions."""

    n: int
    rmse: float  # on volatility
    r2: float  # on volatility, 1 - SSE/SST around the evaluated sample's mean
    qlike: float  # on variance, target and forecast floored per asset (VarianceFloor)
    mse_var: float  # on variance
    mae: float  # on volatility
    qlike_unfloored: float  # QLIKE on the rows whose target is above its floor only
    n_target_floored: int  # rows whose target variance was below its floor
    n_forecast_floored: int  # rows whose forecast variance was below its floor

    def to_dict(self) -> dict:
        return asdict(self)


def score_forecasts(target_vol: np.ndarray, forecast_vol: np.ndarray, floor: np.ndarray | None = None) -> ForecastScores:
    """All losses for (n,) realised vols and (n,) forecast vols; ``floor``: (n,) variance floor per row."""
    y, f = np.asarray(target_vol, float), np.asarray(forecast_vol, float)
    err = f - y
    sst = float(((y - y.mean()) ** 2).sum())
    loss = qlike_loss(y**2, f**2, floor)
    floored = y**2 < (_VAR_FLOOR if floor is None else floor)
    return ForecastScores(
        n=int(len(y)),
        rmse=float(np.sqrt(np.mean(err**2))),
        r2=float(1.0 - (err**2).sum() / sst) if sst > 0 else float("nan"),
        qlike=float(loss.mean()),
        mse_var=float(np.mean((f**2 - y**2) ** 2)),
        mae=float(np.mean(np.abs(err))),
        qlike_unfloored=float(loss[~floored].mean()) if (~floored).any() else float("nan"),
        n_target_floored=int(floored.sum()),
        n_forecast_floored=int((f**2 < (_VAR_FLOOR if floor is None else floor)).sum()),
    )


def score_by_class(target_vol: np.ndarray, forecast_vol: np.ndarray, asset_class: np.ndarray,
                   floor: np.ndarray | None = None) -> dict[str, ForecastScores]:
    """Scores per asset class present in the samples, keyed by class name."""
    out = {}
    for k, name in enumerate(ASSET_CLASSES):
        m = asset_class == k
        if m.any():
            out[name] = score_forecasts(target_vol[m], forecast_vol[m], None if floor is None else floor[m])
    return out
