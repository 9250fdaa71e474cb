"""One risk evaluation run: load -> features -> protocol -> fit every model -> score -> compare.

The CNN and every baseline go through the same ``fit(train, val)`` / ``predict(samples)``
loop on the same samples, so their scores are side by side and comparable.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import pandas as pd

from nimbleml.progress import track
from nimbleml.risk.baselines import make_baseline
from nimbleml.risk.cnn import CNNForecaster
from nimbleml.risk.comparison import comparison_section
from nimbleml.risk.data import MarketPanel, load_panel
from nimbleml.risk.evaluate import FLOOR_RULE, VarianceFloor, qlike_loss, score_by_class, score_forecasts
from nimbleml.risk.features import FeatureConfig, FeatureScaler, build_samples, compute_features, fit_scaler, zscore_keep
from nimbleml.risk.imaging import get_encoder
from nimbleml.risk.model import RiskCNNConfig
from nimbleml.risk.parallel import check_executor
from nimbleml.risk.portfolio import load_weights, portfolio_paths, tail_risk_summary
from nimbleml.risk.protocol import PROTOCOLS, make_splits
from nimbleml.risk.regimes import STRESS_WINDOWS, RegimeRule, market_index, regime_labels
from nimbleml.risk.run_folder import write_state
from nimbleml.risk.samples import ASSET_CLASSES, RiskSamples, concat_samples

log = logging.getLogger(__name__)

PAPER_BASELINES: tuple[str, ...] = ("linear", "svr", "tree")
EXPERT_BASELINES: tuple[str, ...] = ("ewma", "garch", "gjr", "har")
MODEL_NAMES: tuple[str, ...] = ("cnn",) + PAPER_BASELINES + EXPERT_BASELINES

# What each model sees of a fold (metrics.json protocol.fit_windows). "train": samples whose
# targets end before the validation slice; "validation": the last 252 trading days before the
# fold (chronological: the 15% before the test period), targets ending before the test period.
FIT_WINDOWS: dict[str, str] = {
    "cnn": "weights trained on train only; validation early-stops (best epoch kept) and fits the calibration factor(s); "
           "never trained on the validation days (walk-forward: warm-started from the previous fold's weights, "
           "which trained on that fold's train)",
    "linear": "OLS on train only; validation unused",
    "svr": "C and epsilon chosen on validation (candidates fitted on a train subsample); final fit on at most "
           "max_samples train rows; validation not refitted",
    "tree": "depth and leaf size chosen on validation (trees grown on a train subsample); final fit on at most "
            "max_fit_samples train rows; validation not refitted",
    "ewma": "no parameters (lambda 0.94); its recursion runs over every return up to the forecast date",
    "garch": "parameters fitted on the last 2500 returns up to the end of validation (train + validation); "
             "then run over every return up to the forecast date",
    "gjr": "as garch, with the leverage term",
    "har": "form (levels/log, features) chosen on validation; coefficients refitted on train + validation",
}


@dataclass
class RiskRunConfig:
    """Everything a risk evaluation run depends on; written beside its results."""

    data: str = "arch"  # "arch" (series the arch package ships) or a market folder path
    assets: int | None = None  # keep the first N assets in sorted file-path order
    protocol: str = "chronological"  # chronological | walk-forward | paper-random (leaky)
    test_start: str | None = None  # ISO date the test period starts; None: 85% (chronological) / 70% (walk-forward) of the calendar
    test_end: str | None = None  # ISO date the test period ends (exclusive); None: the end of the data
    refit_months: int = 12  # walk-forward refit cadence in months (12: yearly); every model refits each fold
    warm_start: bool = True  # walk-forward: each fold's CNN starts from the previous fold's weights
    warm_epochs: int = 3  # max epochs of a warm-started fold (the first fold trains up to `epochs`)
    n_jobs: int = 1  # parallel per-asset expert fits (-1: all cores)
    executor: str = "joblib"  # where those fits run: joblib (local processes) | ray (a Ray cluster)
    windows: dict[str, tuple[str, str]] = field(default_factory=lambda: dict(STRESS_WINDOWS))  # stress windows scored apart
    mcs_size: float = 0.10  # Model Confidence Set level (Hansen et al. 2011 use 10%)
    mcs_reps: int = 1000  # MCS bootstrap replications
    encoder: str = "heatmap"  # heatmap (paper) | gaf | mtf | recurrence
    per_window_rescale: bool = False  # rescale each window to [0, 1]; off: the vol level is the signal
    epochs: int = 10  # CNN max epochs (early stopping on validation QLIKE); sized for 2 CPU cores
    cnn_target: str = "qlike"  # qlike (train on the evaluation loss) | log_var | vol | var
    tuned: bool = False  # the paper's tuned CNN (5x5 kernels, 3x3 pooling, lr 5e-4)
    linear_skip: bool = True  # ours: linear read-out of the image added to the CNN output; False = paper's CNN
    cnn_overrides: dict = field(default_factory=dict)  # RiskCNNConfig fields set on top (e.g. the tuner's kernel, pool, lr, dropout)
    max_train_samples: int | None = 25_000  # CNN samples drawn per epoch (overlapping windows are redundant); raise on a GPU
    max_val_samples: int | None = 20_000  # CNN validation rows scored per epoch (early stopping and calibration)
    # CNN variance factor fitted on validation: one per asset "class" or one "pooled". "class" since
    # issue 25: lowest QLIKE of the pre-2007 ablation (docs/results/risk-ablate-pre2007-h5.json)
    cnn_calibration: str = "class"
    cnn_class_sampling: str = "proportional"  # an epoch's rows per asset class: "proportional" or "sqrt" (CNNForecaster)
    models: tuple[str, ...] = MODEL_NAMES  # which forecasters to run
    seed: int = 0
    weights: str | None = None  # CSV (asset,weight) of portfolio weights; None: equal weights
    features: FeatureConfig = field(default_factory=FeatureConfig)

    def __post_init__(self) -> None:
        from nimbleml.errors import NimbleError

        if self.protocol not in PROTOCOLS:
            raise NimbleError(f"unknown protocol {self.protocol!r}", fix=f"use one of {', '.join(PROTOCOLS)}")
        check_executor(self.executor, self.n_jobs)
        self.windows = {k: tuple(v) for k, v in self.windows.items()}
        unknown = [m for m in self.models if m not in MODEL_NAMES]
        if unknown:
            raise NimbleError(f"unknown model(s) {unknown}", fix=f"choose from {', '.join(MODEL_NAMES)}")

    @classmethod
    def from_dict(cls, values: dict) -> RiskRunConfig:
        """Rebuild from ``to_dict()`` output (a run's config.json); unknown keys are an error."""
        from nimbleml.errors import NimbleError

        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise NimbleError(f"unknown config keys {unknown}", fix=f"use keys of RiskRunConfig: {', '.join(sorted(known))}")
        values = dict(values)
        if "features" in values:
            feats = dict(values["features"])
            if "winsor_quantiles" in feats:
                feats["winsor_quantiles"] = tuple(feats["winsor_quantiles"])
            values["features"] = FeatureConfig(**feats)
        if "models" in values:
            values["models"] = tuple(values["models"])
        return cls(**values)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["models"] = list(self.models)
        d["windows"] = {k: list(v) for k, v in self.windows.items()}
        return d


@dataclass
class RiskRunResult:
    """Scores, timings, predictions and the data report of one run."""

    config: RiskRunConfig
    data_report: dict
    splits: list[dict]
    predictions: pd.DataFrame  # one row per test sample: date, asset, asset_class, target, fold, <model>...
    fit_seconds: dict[str, float]
    predict_seconds: dict[str, float]
    extras: dict = field(default_factory=dict)
    returns: list[pd.Series] = field(default_factory=list)  # every asset's daily returns (regimes, portfolio)
    example: tuple[np.ndarray, str] | None = None  # one scaled (features, days) input window and its caption
    cnn: CNNForecaster | None = None  # the last fold's fitted CNN (saved to DIR/model/)

    @property
    def leaky(self) -> bool:
        return self.config.protocol == "paper-random"

    def metrics(self) -> dict:
        """The stable metrics.json structure (computed once, then cached)."""
        if "_metrics" not in self.__dict__:
            self.__dict__["_metrics"] = self._metrics()
        return self.__dict__["_metrics"]

    def _metrics(self) -> dict:
        p = self.predictions
        y = p["target"].to_numpy()
        floor = p["var_floor"].to_numpy() if "var_floor" in p else None
        cls = p["asset_class"].map({c: k for k, c in enumerate(ASSET_CLASSES)}).to_numpy()
        models, by_class = {}, {}
        for name in self.config.models:
            s = score_forecasts(y, p[name].to_numpy(), floor).to_dict()
            s["fit_seconds"] = self.fit_seconds[name]
            s["predict_ms"] = 1000.0 * self.predict_seconds[name] / max(len(p), 1)
            models[name] = s
            for cname, cs in score_by_class(y, p[name].to_numpy(), cls, floor).items():
                by_class.setdefault(cname, {})[name] = {"rmse": cs.rmse, "r2": cs.r2, "qlike": cs.qlike, "mae": cs.mae, "n": cs.n,
                                                        "qlike_unfloored": cs.qlike_unfloored, "n_target_floored": cs.n_target_floored}
        classes = dict(zip(p["asset"], p["asset_class"]))
        regimes = None
        if self.returns:
            names = [r.name for r in self.returns]
            regimes = regime_labels(market_index(self.returns, [classes.get(n, "") for n in names]))
        cfg = self.config
        portfolio, self.__dict__["portfolio_path"] = portfolio_section(p, self.returns, cfg) if self.returns else ({}, pd.DataFrame())
        comparison = comparison_section(p, list(cfg.models), cfg.features.horizon, cfg.windows, regimes,
                                        cfg.mcs_size, cfg.mcs_reps, cfg.seed)
        return {
            "protocol": {
                "name": cfg.protocol,
                "test_start": str(pd.Timestamp(p["date"].min()).date()),
                "test_end": str(pd.Timestamp(p["date"].max()).date()),
                "refit": f"every {cfg.refit_months} months" if cfg.protocol == "walk-forward" else "once",
                "folds": len(self.splits),
                "cnn_warm_start": cfg.warm_start and cfg.protocol == "walk-forward",
                "fit_windows": {m: FIT_WINDOWS[m] for m in cfg.models},
            },
            "leaky": self.leaky,
            "config": cfg.to_dict(),
            "horizon": cfg.features.horizon,
            "n_assets": int(p["asset"].nunique()),
            "n_test_samples": int(len(p)),
            "data_report": self.data_report,
            "splits": self.splits,
            "models": models,
            "by_asset_class": by_class,
            "regime_rule": RegimeRule().to_dict(),
            "variance_floor": floor_section(p, list(cfg.models)),
            **comparison,
            "portfolio": portfolio,
            **self.extras,
        }


SURVIVORSHIP = ("the equities are the S&P 500 constituents of 2021, i.e. the survivors: firms that failed, were taken "
                "over or left the index before 2021 (Lehman Brothers, Bear Stearns, Washington Mutual in 2008) are absent, "
                "so an equity portfolio's 2008 losses, volatility and VaR exceedances are understated")


def floor_section(p: pd.DataFrame, models: list[str]) -> dict:
    """The shared variance floor: its rule and how many test rows it touched (targets, each model's forecasts)."""
    if "var_floor" not in p:
        return {"rule": "none recorded (a run from before per-asset floors): QLIKE floors at 1e-14"}
    floor = p["var_floor"].to_numpy()
    below = p["target"].to_numpy() ** 2 < floor
    return {
        "rule": FLOOR_RULE,
        "n_rows": int(len(p)),
        "target_rows_floored": int(below.sum()),
        "target_rows_floored_by_class": {c: int(below[(p["asset_class"] == c).to_numpy()].sum())
                                         for c in ASSET_CLASSES if (p["asset_class"] == c).any()},
        "forecast_rows_floored": {m: int((p[m].to_numpy() ** 2 <= floor * (1 + 1e-9)).sum()) for m in models},
        "qlike_without_floored_rows": "models.<model>.qlike_unfloored, by_asset_class.<class>.<model>.qlike_unfloored",
    }


def portfolio_section(predictions: pd.DataFrame, returns: list[pd.Series], cfg: RiskRunConfig) -> tuple[dict, pd.DataFrame]:
    """Portfolio risk from every model's forecasts (item 8) and the primary model's daily path.

    The primary model is the CNN when it ran. Bonds join only with --bond-returns duration: a
    yield change is not a price return, so it cannot be weighted into a portfolio's P&L.
    """
    keep = predictions if cfg.features.bond_returns == "duration" else predictions[predictions["asset_class"] != "bond"]
    weights = load_weights(cfg.weights, sorted(keep["asset"].unique())) if cfg.weights else None
    if weights is not None:
        keep = keep[keep["asset"].isin(weights.index)]
    if keep["asset"].nunique() < 2:
        return {"skipped": "fewer than two assets with price returns"}, pd.DataFrame()
    models = list(cfg.models)
    paths = portfolio_paths(keep, returns, models, cfg.features.horizon, weights, seed=cfg.seed)
    primary = "cnn" if "cnn" in models else models[0]
    per_model = {m: tail_risk_summary(paths[m], cfg.features.horizon) for m in models}
    section = {
        "weights": str(cfg.weights) if cfg.weights else "equal",
        "assets": int(keep["asset"].nunique()),
        "bonds_included": cfg.features.bond_returns == "duration",
        "primary_model": primary,
        "universe": SURVIVORSHIP if (keep["asset_class"] == "equity").any() and cfg.data != "arch" else "index series (no constituents)",
        **per_model[primary],
        "models": per_model,
        "weights_used": ({a: float(w) for a, w in weights.items()} if weights is not None
                         else {a: 1.0 / keep["asset"].nunique() for a in sorted(keep["asset"].unique())}),
    }
    frame = pd.concat({m: paths[m].frame().set_index("date") for m in models}, axis=1)
    return section, frame


def example_window(fp, predictions: pd.DataFrame) -> tuple[np.ndarray, str]:
    """The input window of the most volatile test day of the asset with most test rows, scaled
    with a scaler fitted on that asset's days before the test period (for the report's figure)."""
    asset = predictions["asset"].value_counts().index[0]
    rows = predictions[predictions["asset"] == asset]
    day = pd.Timestamp(rows.loc[rows["target"].idxmax(), "date"])
    a = next(x for x in fp.assets if x.name == asset)
    t = int(np.searchsorted(a.dates, np.datetime64(day, "ns")))
    first_test = np.datetime64(pd.Timestamp(predictions["date"].min()), "ns")
    past = a.features[(a.dates < first_test) & np.isfinite(a.features).all(axis=1)]
    scaler = FeatureScaler(fp.config.scaler, fp.config.outliers).fit(past if len(past) else a.features[np.isfinite(a.features).all(axis=1)])
    window = scaler.transform(a.features[t - fp.config.window + 1 : t + 1]).T
    return window, f"{asset} on {day.date()} (its most volatile test day): {len(fp.feature_names)} features x {fp.config.window} days"


def make_model(name: str, cfg: RiskRunConfig, n_features: int):
    if name in ("garch", "gjr", "svr", "tree"):
        return make_baseline(name, n_jobs=cfg.n_jobs, executor=cfg.executor)
    if name != "cnn":
        return make_baseline(name)
    encoder = get_encoder(cfg.encoder, per_window_rescale=cfg.per_window_rescale)
    cnn_cfg = RiskCNNConfig.tuned() if cfg.tuned else RiskCNNConfig()
    cnn_cfg.in_channels = encoder.channels(n_features)
    cnn_cfg.max_epochs = cfg.epochs
    cnn_cfg.linear_skip = cfg.linear_skip
    cnn_cfg = dataclasses.replace(cnn_cfg, **cfg.cnn_overrides)
    return CNNForecaster(cnn_cfg, encoder, target=cfg.cnn_target, seed=cfg.seed, max_train_samples=cfg.max_train_samples,
                         max_val_samples=cfg.max_val_samples, calibrate_by=cfg.cnn_calibration,
                         class_sampling=cfg.cnn_class_sampling)


def _fallback_assets(name: str, model, test_assets: set[str]) -> list[str]:
    """Test assets for which an expert used a fallback this fold (EWMA for GARCH/GJR, pooled HAR)."""
    if name in ("garch", "gjr"):
        return [a for a in model.fallback_assets_ if a in test_assets]
    if name == "har":
        return [a for a in test_assets if a not in model.coef_]
    return []


def _fit_and_predict(name: str, cfg: RiskRunConfig, n_features: int, train: RiskSamples, val: RiskSamples,
                     test: RiskSamples, previous_cnn: CNNForecaster | None):
    """(fitted model, test forecasts, fit seconds, predict seconds) for one model on one fold.

    Experts (EWMA, GARCH, GJR) are fitted on every sample before the fold (train + validation:
    the same data the CNN's fold sees); HAR picks its form on validation and refits on both;
    the paper's models and the CNN fit on train and use validation to choose and stop.
    """
    model = make_model(name, cfg, n_features)
    t0 = time.perf_counter()
    if name == "cnn":
        if previous_cnn is not None:
            model.config.max_epochs = cfg.warm_epochs
        model.fit(train, val, warm_start=previous_cnn)
    elif name in ("ewma", "garch", "gjr"):
        model.fit(concat_samples(train, val))
    else:
        model.fit(train, val)
    fit_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    forecast = np.asarray(model.predict(test), float)
    return model, forecast, fit_s, time.perf_counter() - t0


def run_risk_evaluation(cfg: RiskRunConfig, panel: MarketPanel | None = None, checkpoint: Path | None = None) -> RiskRunResult:
    """Fit and score every configured model under the configured protocol.

    ``checkpoint``: a run folder where the predictions and state so far are written after every
    fold, so a run cut off by a time limit keeps (and can report) the folds it finished.
    """
    panel = panel if panel is not None else load_panel(cfg.data, cfg.assets)
    fp = compute_features(panel, cfg.features)
    data_report = {**panel.report.to_dict(), "excluded_assets": fp.excluded}
    for name, why in fp.excluded.items():
        log.warning("asset %s left out: %s", name, why)
    splits = make_splits(cfg.protocol, fp.sample_date, fp.sample_target_end, cfg.seed, cfg.test_start, cfg.test_end, cfg.refit_months)
    fit_s = dict.fromkeys(cfg.models, 0.0)
    pred_s = dict.fromkeys(cfg.models, 0.0)
    frames, split_info = [], []
    extras: dict = {"cnn_history": [], "fallbacks": {m: {} for m in cfg.models if m in ("garch", "gjr", "har")}}
    cnn = None
    for split in track(splits, "folds"):
        info = split.describe(fp.sample_date)
        scaler = fit_scaler(fp, split.train)
        train_index = split.train
        if cfg.features.outliers == "zscore":
            train_index = zscore_keep(fp, scaler, split.train)
            info["zscore_dropped_train_samples"] = int(len(split.train) - len(train_index))
        train = build_samples(fp, scaler, train_index, split.leaky)
        val = build_samples(fp, scaler, split.val, split.leaky)
        test = build_samples(fp, scaler, split.test, split.leaky)
        floor = VarianceFloor.of_samples(train)  # one per-asset floor for every model of this fold
        for samples in (train, val, test):
            samples.var_floor = floor.by_asset
        log.info("%s: train %d, val %d, test %d samples", split.name, len(train), len(val), len(test))
        frame = pd.DataFrame(
            {
                "date": test.dates,
                "asset": np.asarray(test.asset_names)[test.asset],
                "asset_class": np.asarray(ASSET_CLASSES)[test.asset_class],
                "target": test.target,
                "fold": split.name,
                "var_floor": floor.rows(test.asset),
            }
        )
        test_assets = set(frame["asset"])
        for name in cfg.models:
            warm = cnn if (name == "cnn" and cfg.warm_start and cfg.protocol == "walk-forward") else None
            model, forecast, f_s, p_s = _fit_and_predict(name, cfg, len(fp.feature_names), train, val, test, warm)
            seen = model.train_end_ if hasattr(model, "train_end_") else train.dates.max()
            info.setdefault("fit_data_end", {})[name] = str(pd.Timestamp(seen).date())  # last date a model fitted on
            fit_s[name] += f_s
            pred_s[name] += p_s
            frame[name] = forecast
            log.info("%s %s: fit %.1fs, test QLIKE %.4f", split.name, name, f_s,
                     qlike_loss(test.target**2, forecast**2, frame["var_floor"].to_numpy()).mean())
            if name == "har":  # test forecasts its insanity filter replaced (HARBaseline docstring)
                info["har_filtered_test_forecasts"] = int(model.filtered_)
            if name == "cnn":
                cnn = model
                extras["cnn_history"].append({"split": split.name, "warm_started": model.warm_started_,
                                              "best_epoch": model.best_epoch_, "history": model.history_,
                                              "class_calibration": [float(c) for c in model.class_calibration_],
                                              "calibration_fallback_classes": model.calibration_fallback_})
            for asset in _fallback_assets(name, model, test_assets):
                counts = extras["fallbacks"][name]
                counts[asset] = counts.get(asset, 0) + 1
        frames.append(frame)
        split_info.append(info)
        if checkpoint is not None:
            write_state(checkpoint, cfg, pd.concat(frames, ignore_index=True), split_info, fit_s, pred_s, extras, data_report)
    predictions = pd.concat(frames, ignore_index=True)
    returns = [a.returns for a in fp.assets]
    return RiskRunResult(
        config=cfg,
        data_report=data_report,
        splits=split_info,
        predictions=predictions,
        fit_seconds=fit_s,
        predict_seconds=pred_s,
        extras=extras,
        returns=returns,
        example=example_window(fp, predictions),
        cnn=cnn,
    )
