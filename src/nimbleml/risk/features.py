"""Features, targets, outlier handling and train-only scaling for the risk workload.

Flow: a cleaned ``MarketPanel`` -> ``compute_features`` (per asset, unscaled, causal)
-> a protocol picks training rows -> ``FeatureScaler.fit`` on those rows only ->
``build_samples`` cuts scaled windows into ``RiskSamples``.

Units: returns are daily fractions (log returns; bonds use yield changes in decimal,
a 10 bp move is 0.001, or a duration-approximated price return). Variances are daily.

Bad prints (``data.RULES["bad_print"]``) are dropped from the history by a two-sided rule that
looks at the next close. A forecast made on such a day could not know: the sample dated on it
is built as of that day (``AssetFeatures.as_of_*``), its window computed from the history with
the spike as the last close, the one-sided view a live feed (and the served path) has. Its
target is the cleaned history's next h returns. Samples dated after it see the cleaned history,
as the reversal is known by then.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field

from pathlib import Path

import numpy as np
import pandas as pd
from numpy.lib.stride_tricks import sliding_window_view
from sklearn.decomposition import PCA

from nimbleml.errors import NimbleError
from nimbleml.risk.exogenous import align_causal, load_exogenous
from nimbleml.risk.samples import ASSET_CLASSES, RiskSamples

log = logging.getLogger(__name__)

FEATURE_NAMES: tuple[str, ...] = (
    "ret",  # daily return (log return, or yield change for bonds)
    "log_rv1",  # log squared return of day t
    "log_rv5",  # log mean squared return over the last 5 days
    "log_rv22",  # log mean squared return over the last 22 days
    "log_rv66",  # log mean squared return over the last 66 days (a quarter: slow mean reversion)
    "log_rv252",  # log mean squared return over the last 252 days (the asset's long-run level)
    "log_parkinson",  # log Parkinson range variance (squared return where there is no OHLC)
    "log_gk",  # log Garman-Klass variance (squared return where there is no OHLC)
    "log_gk22",  # log mean Garman-Klass variance over the last 22 days
    "log_volume_ratio",  # log(volume / its 22-day mean); 0 where there is no volume
)
LONG_RUN_DAYS = 252  # window of the long-run variance feature (expanding until it is full)
MIN_LOOKBACK = 66  # trading days of returns needed before day t's features are all defined
_EPS_VAR = 1e-12  # floor on daily variances before taking logs (a zero-return day)
_LN2 = np.log(2.0)


@dataclass
class FeatureConfig:
    """How windows and targets are built. Defaults follow the issue; the paper's choices are noted."""

    horizon: int = 5  # h: target = realised vol over the next h trading days (5 or 22)
    window: int = 10  # days per image; the paper uses the last 10 days
    # "none" (default: features are log variances and ratios, so a crisis value beyond the
    # training range passes through uncapped) | "winsorize" (clips test inputs at training
    # quantiles: blinds the model exactly in a crisis; kept for comparison) | "zscore" (paper:
    # drop training windows with |z| > 3)
    outliers: str = "none"
    winsor_quantiles: tuple[float, float] = (0.005, 0.995)  # clip bounds, fitted on training rows
    zscore_threshold: float = 3.0  # paper's z-score cut, only with outliers="zscore"
    scaler: str = "minmax"  # "minmax" (paper, to [0, 1]) | "robust" (median / IQR)
    # "pooled" (paper: one scaler over every asset's training rows) | "class" (one per asset
    # class, so bond and FX variances are not squeezed into a corner of the equity range)
    scale_scope: str = "pooled"
    bond_returns: str = "yield_change"  # "yield_change" (decimal) | "duration" (-D * dy, par-bond duration)
    span: str = "common"  # "common": sample dates where every loaded asset class has data | "all"
    exogenous: tuple[str, ...] = ()  # extra inputs: "rates" (yields, term spread), "vix" (see risk.exogenous)
    rates_dir: str | None = None  # FRED yields folder for "rates"; None: <market folder>/rates
    pca_components: int | None = None  # project scaled features on this many principal components (fitted on train)

    def __post_init__(self) -> None:
        if self.horizon < 1:
            raise NimbleError(f"horizon must be >= 1, got {self.horizon}", fix="pass --horizon 5 or 22")
        if self.window < 2:
            raise NimbleError(f"window must be >= 2 days, got {self.window}", fix="use the paper's 10")
        if self.outliers not in ("winsorize", "zscore", "none"):
            raise NimbleError(f"unknown outlier rule {self.outliers!r}", fix="use winsorize, zscore or none")
        if self.scaler not in ("minmax", "robust"):
            raise NimbleError(f"unknown scaler {self.scaler!r}", fix="use minmax or robust")
        if self.scale_scope not in ("pooled", "class"):
            raise NimbleError(f"unknown scale scope {self.scale_scope!r}", fix="use pooled or class")
        if self.bond_returns not in ("yield_change", "duration"):
            raise NimbleError(f"unknown bond return {self.bond_returns!r}", fix="use yield_change or duration")
        if self.span not in ("common", "all"):
            raise NimbleError(f"unknown span {self.span!r}", fix="use common or all")
        self.exogenous = tuple(self.exogenous)
        if self.pca_components is not None and self.pca_components < 1:
            raise NimbleError(f"pca_components must be >= 1, got {self.pca_components}", fix="e.g. --pca 5")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class AssetFeatures:
    """One asset's causal features and its forward-looking target, aligned on its trading days."""

    name: str
    asset_class: str
    dates: np.ndarray  # (T,) datetime64[ns]
    features: np.ndarray  # (T, F) unscaled; row t uses data dated <= t
    target: np.ndarray  # (T,) realised vol over t+1..t+h (NaN for the last h days)
    target_end: np.ndarray  # (T,) datetime64[ns] date of day t+h (NaT where it does not exist)
    har: np.ndarray  # (T, 3) close-to-close realised variance, 1/5/22-day means ending at t
    har_range: np.ndarray  # (T, 3) Garman-Klass realised variance, same windows
    returns: pd.Series  # daily returns indexed by date
    # samples dated on a dropped bad print, built as of that day (spike included); k of them
    as_of_windows: np.ndarray | None = None  # (k, window, F) unscaled feature rows, the last one the bad-print day
    as_of_dates: np.ndarray | None = None  # (k,) datetime64[ns]
    as_of_target: np.ndarray | None = None  # (k,) the cleaned history's realised vol over the next h days
    as_of_target_end: np.ndarray | None = None  # (k,)
    as_of_har: np.ndarray | None = None  # (k, 3)
    as_of_har_range: np.ndarray | None = None  # (k, 3)


@dataclass
class FeaturePanel:
    """All assets' features plus the sample candidates (asset, t) that have a full window and target."""

    assets: list[AssetFeatures]
    config: FeatureConfig
    feature_names: list[str] = field(default_factory=lambda: list(FEATURE_NAMES))
    excluded: dict[str, str] = field(default_factory=dict)  # asset -> why it has no samples
    # candidate samples, one row per (asset, t) with a complete window and target:
    sample_asset: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    # row t in that asset's arrays; -(j + 1) for its j-th as-of (bad-print day) sample
    sample_row: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    sample_date: np.ndarray = field(default_factory=lambda: np.zeros(0, "datetime64[ns]"))
    sample_target_end: np.ndarray = field(default_factory=lambda: np.zeros(0, "datetime64[ns]"))

    @property
    def asset_names(self) -> list[str]:
        return [a.name for a in self.assets]

    def __len__(self) -> int:
        return len(self.sample_row)


def _par_bond_duration(yield_pct: np.ndarray, maturity_years: float) -> np.ndarray:
    """Modified duration (years) of a par bond paying annual coupons at the current yield."""
    y = np.clip(yield_pct / 100.0, 1e-4, None)
    return (1.0 - (1.0 + y) ** -maturity_years) / y


_MATURITY_YEARS = {"1MO": 1 / 12, "3MO": 0.25, "6MO": 0.5, "1": 1, "2": 2, "3": 3, "5": 5, "7": 7, "10": 10, "20": 20, "30": 30}


def _bond_maturity(name: str) -> float:
    """Maturity in years from a FRED series name like DGS10 or DGS3MO; 10 years if unknown."""
    key = name.upper().removeprefix("DGS")
    return float(_MATURITY_YEARS.get(key, 10.0))


def _rolling_mean(x: np.ndarray, n: int, min_periods: int | None = None) -> np.ndarray:
    """Trailing mean over n rows ending at each row (NaN until min_periods, default n, values exist)."""
    return pd.Series(x).rolling(n, min_periods=min_periods or n).mean().to_numpy()


def _asset_features(frame: pd.DataFrame, name: str, asset_class: str, config: FeatureConfig) -> AssetFeatures:
    dates = frame["date"].to_numpy("datetime64[ns]")
    close = frame["close"].to_numpy(float)
    if asset_class == "bond":
        dy = np.diff(close, prepend=np.nan) / 100.0
        if config.bond_returns == "duration":
            dur = _par_bond_duration(np.roll(close, 1), _bond_maturity(name))
            ret = -dur * dy
        else:
            ret = dy
    else:
        ret = np.diff(np.log(close), prepend=np.nan)
    r2 = ret**2

    o, h, l = (frame[c].to_numpy(float) for c in ("open", "high", "low"))
    with np.errstate(invalid="ignore", divide="ignore"):
        hl = np.log(h / l)
        co = np.log(close / o)
    parkinson = hl**2 / (4.0 * _LN2)
    gk = 0.5 * hl**2 - (2.0 * _LN2 - 1.0) * co**2
    has_range = np.isfinite(parkinson) & np.isfinite(gk) & (asset_class != "bond")
    parkinson = np.where(has_range, parkinson, r2)
    gk = np.where(has_range & (gk > 0), gk, np.where(has_range, parkinson, r2))

    volume = frame["volume"].to_numpy(float)
    vol_mean = pd.Series(volume).rolling(22, min_periods=5).mean().to_numpy()
    with np.errstate(invalid="ignore", divide="ignore"):
        volume_ratio = np.log(volume / vol_mean)
    volume_ratio = np.where(np.isfinite(volume_ratio), volume_ratio, 0.0)

    har = np.column_stack([r2, _rolling_mean(r2, 5), _rolling_mean(r2, 22)])
    har_range = np.column_stack([gk, _rolling_mean(gk, 5), _rolling_mean(gk, 22)])
    features = np.column_stack(
        [
            ret,
            np.log(r2 + _EPS_VAR),
            np.log(har[:, 1] + _EPS_VAR),
            np.log(har[:, 2] + _EPS_VAR),
            np.log(_rolling_mean(r2, 66) + _EPS_VAR),
            np.log(_rolling_mean(r2, LONG_RUN_DAYS, MIN_LOOKBACK) + _EPS_VAR),
            np.log(parkinson + _EPS_VAR),
            np.log(gk + _EPS_VAR),
            np.log(har_range[:, 2] + _EPS_VAR),
            volume_ratio,
        ]
    )
    hz = config.horizon
    # mean of r^2 over t+1..t+h: a trailing h-mean shifted back by h rows
    future_var = np.full(len(ret), np.nan)
    if len(ret) > hz:
        future_var[:-hz] = _rolling_mean(r2, hz)[hz:]
    target_end = np.full(len(ret), np.datetime64("NaT"), dtype="datetime64[ns]")
    if len(ret) > hz:
        target_end[:-hz] = dates[hz:]
    returns = pd.Series(ret, index=pd.DatetimeIndex(dates), name=name).iloc[1:]
    return AssetFeatures(name, asset_class, dates, features, np.sqrt(future_var), target_end, har, har_range, returns)


def _add_as_of_rows(a: AssetFeatures, frame: pd.DataFrame, bad: pd.DataFrame, config: FeatureConfig, exog) -> None:
    """Fill ``a.as_of_*``: one sample per dropped bad print that has a kept day before and after it,
    its features computed from the cleaned rows before it plus the bad print itself (one-sided)."""
    cols, keep = [], []
    for _, row in bad.sort_values("date").iterrows():
        before = frame[frame["date"] < row["date"]]
        q = len(before) - 1  # the cleaned day before the bad print: its target is the next h cleaned returns
        if q < config.window or q >= len(a.dates) - 1:
            continue
        view = _asset_features(pd.concat([before, row.to_frame().T], ignore_index=True).astype(frame.dtypes.to_dict()),
                               a.name, a.asset_class, config)
        features = view.features
        if exog is not None:
            features = np.hstack([features, align_causal(exog, view.dates)])
        cols.append((features[-config.window:], view.dates[-1], view.har[-1], view.har_range[-1]))
        keep.append(q)
    if not cols:
        return
    q = np.array(keep)
    a.as_of_windows = np.stack([c[0] for c in cols])
    a.as_of_dates = np.array([c[1] for c in cols], dtype="datetime64[ns]")
    a.as_of_har = np.stack([c[2] for c in cols])
    a.as_of_har_range = np.stack([c[3] for c in cols])
    a.as_of_target, a.as_of_target_end = a.target[q], a.target_end[q]


def _as_of(a: AssetFeatures, name: str, rows: np.ndarray) -> np.ndarray:
    """``a.as_of_<name>`` at the as-of rows of ``rows`` (negative entries), any value elsewhere."""
    values = getattr(a, f"as_of_{name}")
    if values is None:
        return np.zeros(len(rows), dtype=getattr(a, name).dtype)
    return values[np.where(rows < 0, -rows - 1, 0)]


def _common_span(assets: list[AssetFeatures]) -> tuple[np.datetime64, np.datetime64]:
    """The date range in which every loaded asset class has data."""
    by_class: dict[str, list[AssetFeatures]] = {}
    for a in assets:
        by_class.setdefault(a.asset_class, []).append(a)
    start = max(min(a.dates[0] for a in group) for group in by_class.values())
    end = min(max(a.dates[-1] for a in group) for group in by_class.values())
    return start, end


def compute_features(panel, config: FeatureConfig) -> FeaturePanel:
    """Per-asset causal features and targets for a cleaned ``MarketPanel``; lists the sample candidates.

    A candidate (asset, t) has ``window`` complete feature rows ending at t (the 66-day
    realised variance needs 66 returns first) and a target over t+1..t+h. An asset without a
    single candidate (too short a history, or outside the common span) is left out and named
    in ``excluded`` with the reason, which the run's data report shows; if none is left, it
    is an error.
    """
    need = config.window + MIN_LOOKBACK + config.horizon
    exog = None
    if config.exogenous:
        rates_dir = config.rates_dir or (str(Path(panel.source) / "rates") if panel.source != "arch" else None)
        exog = load_exogenous(config.exogenous, Path(rates_dir) if rates_dir else None)
    assets: list[AssetFeatures] = []
    excluded: dict[str, str] = {}
    for name, frame in panel.frame.groupby("asset", sort=True):
        asset_class = str(frame["asset_class"].iloc[0])
        if len(frame) < need:
            excluded[str(name)] = (
                f"{len(frame)} usable days, fewer than the {need} that a {config.window}-day window, "
                f"{MIN_LOOKBACK}-day volatility and {config.horizon}-day horizon need"
            )
            continue
        a = _asset_features(frame.reset_index(drop=True), str(name), asset_class, config)
        if exog is not None:
            a.features = np.hstack([a.features, align_causal(exog, a.dates)])
        bad = getattr(panel, "bad_prints", None)
        if bad is not None and len(bad):
            _add_as_of_rows(a, frame.reset_index(drop=True), bad[bad["asset"] == name], config, exog)
        assets.append(a)
    if not assets:
        first = next(iter(excluded.items()))
        raise NimbleError(
            f"no asset has enough history (e.g. {first[0]}: {first[1]})",
            path=panel.source,
            fix="use a shorter --horizon or load longer histories",
        )

    span = _common_span(assets) if config.span == "common" else None
    if span is not None and span[0] >= span[1]:
        raise NimbleError(
            "the loaded asset classes share no common date range",
            path=panel.source,
            fix="pass --span all, or load classes whose histories overlap",
        )
    sample_asset, sample_row, sample_date, sample_end = [], [], [], []
    for i, a in enumerate(assets):
        complete = np.isfinite(a.features).all(axis=1)
        # a window ending at t is complete when all of its `window` rows are
        full = np.zeros(len(complete), dtype=bool)
        if len(complete) >= config.window:
            full[config.window - 1 :] = sliding_window_view(complete, config.window).all(axis=1)
        ok = full & np.isfinite(a.target) & np.isfinite(a.har).all(axis=1) & np.isfinite(a.har_range).all(axis=1)
        if span is not None:
            ok &= (a.dates >= span[0]) & (a.target_end <= span[1])
        rows = np.flatnonzero(ok)
        if a.as_of_dates is not None:
            as_of_ok = (np.isfinite(a.as_of_windows).all(axis=(1, 2)) & np.isfinite(a.as_of_target)
                        & np.isfinite(a.as_of_har).all(axis=1) & np.isfinite(a.as_of_har_range).all(axis=1))
            if span is not None:
                as_of_ok &= (a.as_of_dates >= span[0]) & (a.as_of_target_end <= span[1])
            extra = np.flatnonzero(as_of_ok)
            rows = np.concatenate([rows, -(extra + 1)])
        if len(rows) == 0:
            excluded[a.name] = "no complete window with a target inside the common span (try --span all)"
            continue
        sample_asset.append(np.full(len(rows), i, np.int64))
        sample_row.append(rows)
        sample_date.append(np.where(rows >= 0, a.dates[np.maximum(rows, 0)], _as_of(a, "dates", rows)))
        sample_end.append(np.where(rows >= 0, a.target_end[np.maximum(rows, 0)], _as_of(a, "target_end", rows)))
    if not sample_row:
        raise NimbleError("no asset has a complete window with a target", path=panel.source, fix="use --span all or a shorter --horizon")
    fp = FeaturePanel(
        assets=assets,
        config=config,
        feature_names=list(FEATURE_NAMES) + ([c for c in exog.columns] if exog is not None else []),
        excluded=excluded,
        sample_asset=np.concatenate(sample_asset),
        sample_row=np.concatenate(sample_row),
        sample_date=np.concatenate(sample_date),
        sample_target_end=np.concatenate(sample_end),
    )
    log.info("features: %d assets, %d candidate samples, %s .. %s", len(assets), len(fp), fp.sample_date.min(), fp.sample_date.max())
    return fp


@dataclass
class FeatureScaler:
    """Outlier clipping and scaling fitted on training rows only (never on validation or test)."""

    kind: str = "minmax"  # "minmax" (paper) | "robust"
    outliers: str = "none"  # see FeatureConfig.outliers
    winsor_quantiles: tuple[float, float] = (0.005, 0.995)
    zscore_threshold: float = 3.0
    lower_: np.ndarray | None = None  # (F,) clip bounds
    upper_: np.ndarray | None = None
    center_: np.ndarray | None = None  # (F,) subtracted
    scale_: np.ndarray | None = None  # (F,) divided by
    mean_: np.ndarray | None = None  # (F,) for the z-score rule
    std_: np.ndarray | None = None
    pca_components: int | None = None  # project on this many principal components of the scaled training rows
    pca_: PCA | None = None
    pca_center_: np.ndarray | None = None  # (k,) min of the training projections (rescaled to [0, 1] like the inputs)
    pca_scale_: np.ndarray | None = None
    by_class_: dict[str, FeatureScaler] | None = None  # scale_scope="class": each class's own scaler

    def for_class(self, asset_class: str) -> FeatureScaler:
        """The scaler for one asset class's rows: its own when fitted per class, else this pooled one."""
        return (self.by_class_ or {}).get(asset_class, self)

    def fit(self, rows: np.ndarray) -> FeatureScaler:
        """rows: (n, F) unscaled feature rows of the training samples' days."""
        rows = rows[np.isfinite(rows).all(axis=1)]
        if len(rows) == 0:
            raise NimbleError("no finite training rows to fit the scaler on", fix="load more history")
        if self.outliers == "winsorize":
            self.lower_, self.upper_ = np.quantile(rows, self.winsor_quantiles, axis=0)
        else:
            self.lower_, self.upper_ = rows.min(axis=0), rows.max(axis=0)
        self.mean_, self.std_ = rows.mean(axis=0), rows.std(axis=0) + 1e-12
        clipped = np.clip(rows, self.lower_, self.upper_)
        if self.kind == "minmax":
            self.center_ = clipped.min(axis=0)
            self.scale_ = np.maximum(clipped.max(axis=0) - self.center_, 1e-12)
        else:
            q25, q50, q75 = np.quantile(clipped, [0.25, 0.5, 0.75], axis=0)
            self.center_, self.scale_ = q50, np.maximum(q75 - q25, 1e-12)
        if self.pca_components is not None:
            scaled = self._scale(rows)
            k = min(self.pca_components, rows.shape[1])
            self.pca_ = PCA(n_components=k, random_state=0).fit(scaled)
            z = self.pca_.transform(scaled)
            self.pca_center_ = z.min(axis=0)
            self.pca_scale_ = np.maximum(z.max(axis=0) - self.pca_center_, 1e-12)
        return self

    def _scale(self, rows: np.ndarray) -> np.ndarray:
        x = np.clip(rows, self.lower_, self.upper_) if self.outliers == "winsorize" else rows
        return (x - self.center_) / self.scale_

    def transform(self, rows: np.ndarray) -> np.ndarray:
        """Clip (winsorize mode only), scale and (with PCA) project; float32 (n, F) or (n, k)."""
        x = self._scale(rows)
        if self.pca_ is not None:
            finite = np.isfinite(x).all(axis=1)
            z = np.full((len(x), self.pca_.n_components_), np.nan)
            z[finite] = (self.pca_.transform(x[finite]) - self.pca_center_) / self.pca_scale_
            x = z
        return x.astype(np.float32)

    def output_names(self, names: list[str]) -> list[str]:
        """Names of the transformed columns: the inputs, or pc1..pck with PCA."""
        return [f"pc{i + 1}" for i in range(self.pca_.n_components_)] if self.pca_ is not None else list(names)

    def is_outlier(self, rows: np.ndarray) -> np.ndarray:
        """(n,) True where any feature has |z| above the threshold (training z-score rule)."""
        return (np.abs((rows - self.mean_) / self.std_) > self.zscore_threshold).any(axis=1)


def _raw_rows(fp: FeaturePanel, index: np.ndarray) -> np.ndarray:
    """(n, F) unscaled day-t feature rows of the selected candidates."""
    out = np.empty((len(index), len(fp.feature_names)))
    assets, rows = fp.sample_asset[index], fp.sample_row[index]
    for i in np.unique(assets):
        a = fp.assets[i]
        m, extra = (assets == i) & (rows >= 0), (assets == i) & (rows < 0)
        out[m] = a.features[rows[m]]
        if extra.any():
            out[extra] = a.as_of_windows[-rows[extra] - 1, -1]
    return out


MIN_CLASS_SCALER_ROWS = 250  # training rows a class needs for its own scaler (scale_scope="class"); else pooled


def fit_scaler(fp: FeaturePanel, train_index: np.ndarray) -> FeatureScaler:
    """Fit the configured scaler on the day-t rows of the training candidates only.

    With ``scale_scope="class"`` each asset class with at least MIN_CLASS_SCALER_ROWS training
    rows gets its own scaler; the pooled one (returned) serves the others.
    """
    cfg = fp.config

    def make() -> FeatureScaler:
        return FeatureScaler(cfg.scaler, cfg.outliers, cfg.winsor_quantiles, cfg.zscore_threshold,
                             pca_components=cfg.pca_components)

    rows = _raw_rows(fp, train_index)
    pooled = make().fit(rows)
    if cfg.scale_scope == "class":
        classes = np.array([fp.assets[i].asset_class for i in range(len(fp.assets))])[fp.sample_asset[train_index]]
        pooled.by_class_ = {str(c): make().fit(rows[classes == c]) for c in np.unique(classes)
                            if (classes == c).sum() >= MIN_CLASS_SCALER_ROWS}
    return pooled


def zscore_keep(fp: FeaturePanel, scaler: FeatureScaler, train_index: np.ndarray) -> np.ndarray:
    """The paper's z-score deletion, applied to training candidates only: indices whose window has no outlier.

    It never removes a validation or test day (those are what we score), so crisis days stay in the evaluation.
    """
    keep = np.ones(len(train_index), dtype=bool)
    w = fp.config.window
    assets, rows = fp.sample_asset[train_index], fp.sample_row[train_index]
    for i in np.unique(assets):
        m = np.flatnonzero(assets == i)
        flags = scaler.for_class(fp.assets[i].asset_class).is_outlier(fp.assets[i].features)
        any_in_window = np.zeros(len(flags), dtype=bool)
        any_in_window[w - 1 :] = sliding_window_view(flags, w).any(axis=1)
        scaler_i = scaler.for_class(fp.assets[i].asset_class)
        keep[m] = np.array([~any_in_window[r] if r >= 0 else not scaler_i.is_outlier(fp.assets[i].as_of_windows[-r - 1]).any()
                            for r in rows[m]], dtype=bool)
    return train_index[keep]


def build_samples(fp: FeaturePanel, scaler: FeatureScaler, index: np.ndarray, leaky: bool = False) -> RiskSamples:
    """Scaled windows, targets and HAR lags of the selected candidates, in the order of ``index``."""
    names = scaler.output_names(fp.feature_names)
    w, nf = fp.config.window, len(names)
    n = len(index)
    windows = np.empty((n, nf, w), np.float32)
    target, har, har_range = np.empty(n), np.empty((n, 3)), np.empty((n, 3))
    assets, rows = fp.sample_asset[index], fp.sample_row[index]
    for i in np.unique(assets):
        a = fp.assets[i]
        m = np.flatnonzero((assets == i) & (rows >= 0))
        scaled = scaler.for_class(a.asset_class).transform(a.features)  # (T, F)
        view = sliding_window_view(scaled, w, axis=0)  # (T-w+1, F, w), window ending at row t is view[t-w+1]
        windows[m] = view[rows[m] - (w - 1)]
        target[m] = a.target[rows[m]]
        har[m] = a.har[rows[m]]
        har_range[m] = a.har_range[rows[m]]
        for k in np.flatnonzero((assets == i) & (rows < 0)):  # as of a bad-print day: its own window
            j = -rows[k] - 1
            windows[k] = scaler.for_class(a.asset_class).transform(a.as_of_windows[j]).T
            target[k], har[k], har_range[k] = a.as_of_target[j], a.as_of_har[j], a.as_of_har_range[j]
    class_index = {c: k for k, c in enumerate(ASSET_CLASSES)}
    asset_class = np.array([class_index[fp.assets[i].asset_class] for i in range(len(fp.assets))], np.int64)
    return RiskSamples(
        windows=windows,
        target=target,
        dates=fp.sample_date[index],
        asset=assets.astype(np.int64),
        asset_class=asset_class[assets],
        har=har,
        har_range=har_range,
        returns=[a.returns for a in fp.assets],
        feature_names=names,
        asset_names=fp.asset_names,
        horizon=fp.config.horizon,
        leaky=leaky,
    )
