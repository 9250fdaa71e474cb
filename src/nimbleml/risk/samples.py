"""RiskSamples: the one table every risk forecaster (CNN and baselines) fits and predicts on.

One row is one (asset, forecast origin t) pair. Inputs use data dated <= t only; the
target covers days t+1 .. t+h. Units: daily, fractions (a 1% daily return is 0.01);
bonds use yield changes in decimal (a 10 bp move is 0.001) unless configured otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

ASSET_CLASSES: tuple[str, ...] = ("equity", "bond", "commodity", "fx")


@dataclass
class RiskSamples:
    """Windows, targets and the per-asset return history they were cut from.

    windows : (n, n_features, window) float32, scaled features; the last column is day t.
    target : (n,) float64, realised volatility over t+1..t+h, sqrt(mean r^2), daily fraction.
    dates : (n,) datetime64[ns], forecast origin t (last day of the window).
    asset : (n,) int64, index into ``asset_names``.
    asset_class : (n,) int64, index into ``ASSET_CLASSES``.
    har : (n, 3) float64, close-to-close realised variance averaged over the 1, 5 and 22
        trading days ending at t (unscaled, daily variance).
    har_range : (n, 3) float64, the same from the Garman-Klass range estimator where OHLC
        exists, else equal to ``har``.
    returns : one pd.Series per asset (index = trading dates, unscaled daily returns over the
        whole loaded span). A forecaster may only use values dated <= a sample's date to
        predict that sample, and <= max(train.dates) to fit.
    var_floor : (n_assets,) daily-variance floor of each asset (``evaluate.VarianceFloor``),
        fitted on a fold's training rows and attached to its train, validation and test samples
        so every model floors targets and forecasts alike; None: each model fits it on its train.
    """

    windows: np.ndarray
    target: np.ndarray
    dates: np.ndarray
    asset: np.ndarray
    asset_class: np.ndarray
    har: np.ndarray
    har_range: np.ndarray
    returns: list[pd.Series]
    feature_names: list[str]
    asset_names: list[str]
    horizon: int
    leaky: bool = False  # True under protocol=paper-random: every output that shows it says so
    meta: dict = field(default_factory=dict)
    var_floor: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.target)

    @property
    def flat(self) -> np.ndarray:
        """(n, n_features * window) flattened windows, the paper's input to LR, SVR and trees."""
        return self.windows.reshape(len(self.windows), -1)

    @property
    def target_variance(self) -> np.ndarray:
        """(n,) the target squared: mean squared daily return over t+1..t+h."""
        return self.target**2

    def subset(self, index: np.ndarray) -> RiskSamples:
        """Rows selected by an integer or boolean index; the return history is shared."""
        return RiskSamples(
            windows=self.windows[index],
            target=self.target[index],
            dates=self.dates[index],
            asset=self.asset[index],
            asset_class=self.asset_class[index],
            har=self.har[index],
            har_range=self.har_range[index],
            returns=self.returns,
            feature_names=self.feature_names,
            asset_names=self.asset_names,
            horizon=self.horizon,
            leaky=self.leaky,
            meta=dict(self.meta),
            var_floor=self.var_floor,
        )


def concat_samples(first: RiskSamples, second: RiskSamples) -> RiskSamples:
    """Rows of ``first`` then ``second`` (same panel, e.g. train + validation for a refit on all past data)."""
    return RiskSamples(
        windows=np.concatenate([first.windows, second.windows]),
        target=np.concatenate([first.target, second.target]),
        dates=np.concatenate([first.dates, second.dates]),
        asset=np.concatenate([first.asset, second.asset]),
        asset_class=np.concatenate([first.asset_class, second.asset_class]),
        har=np.concatenate([first.har, second.har]),
        har_range=np.concatenate([first.har_range, second.har_range]),
        returns=first.returns,
        feature_names=first.feature_names,
        asset_names=first.asset_names,
        horizon=first.horizon,
        leaky=first.leaky or second.leaky,
        meta=dict(first.meta),
        var_floor=first.var_floor,
    )
