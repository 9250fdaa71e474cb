"""One risk evaluation run: load -> features -> protocol -> fit every model -> score -> compare.

The CNN and every baseline go through the same ``fit(train, val)`` / ``predict(samples)``
loop on the same samples, so their scores are side by side and comparable.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd

from nimbleml.risk.baselines import make_baseline
from nimbleml.risk.cnn import CNNForecaster
from nimbleml.risk.data import MarketPanel, load_panel
from nimbleml.risk.evaluate import qlike_loss, score_by_class, score_forecasts
from nimbleml.risk.features import FeatureConfig, build_samples, compute_features, fit_scaler, zscore_keep
from nimbleml.risk.imaging import get_encoder
from nimbleml.risk.model import RiskCNNConfig
from nimbleml.risk.portfolio import AGGREGATIONS, equal_weight_portfolio, portfolio_summary
from nimbleml.risk.protocol import PROTOCOLS, make_splits
from nimbleml.risk.samples import ASSET_CLASSES
from nimbleml.risk.stats import diebold_mariano

log = logging.getLogger(__name__)

PAPER_BASELINES: tuple[str, ...] = ("linear", "svr", "tree")
EXPERT_BASELINES: tuple[str, ...] = ("ewma", "garch", "gjr", "har")
MODEL_NAMES: tuple[str, ...] = ("cnn",) + PAPER_BASELINES + EXPERT_BASELINES


@dataclass
class RiskRunConfig:
    """Everything a risk evaluation run depends on; written beside its results."""

    data: str = "arch"  # "arch" (series the arch package ships) or a market folder path
    assets: int | None = None  # keep the first N assets in sorted file-path order
    protocol: str = "chronological"  # chronological | walk-forward | paper-random (leaky)
    encoder: str = "heatmap"  # heatmap (paper) | gaf | mtf | recurrence
    per_window_rescale: bool = False  # rescale each window to [0, 1]; off: the vol level is the signal
    epochs: int = 10  # CNN max epochs (early stopping on validation QLIKE); sized for 2 CPU cores
    cnn_target: str = "qlike"  # qlike (train on the evaluation loss) | log_var | vol | var
    tuned: bool = False  # the paper's tuned CNN (5x5 kernels, 3x3 pooling, lr 5e-4)
    linear_skip: bool = True  # ours: linear read-out of the image added to the CNN output; False = paper's CNN
    max_train_samples: int | None = 25_000  # CNN samples drawn per epoch (overlapping windows are redundant); raise on a GPU
    models: tuple[str, ...] = MODEL_NAMES  # which forecasters to run
    seed: int = 0
    var_level: float = 0.01  # portfolio VaR tail probability for the backtests
    features: FeatureConfig = field(default_factory=FeatureConfig)

    def __post_init__(self) -> None:
        from nimbleml.errors import NimbleError

        if self.protocol not in PROTOCOLS:
            raise NimbleError(f"unknown protocol {self.protocol!r}", fix=f"use one of {', '.join(PROTOCOLS)}")
        unknown = [m for m in self.models if m not in MODEL_NAMES]
        if unknown:
            raise NimbleError(f"unknown model(s) {unknown}", fix=f"choose from {', '.join(MODEL_NAMES)}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["models"] = list(self.models)
        return d


@dataclass
class RiskRunResult:
    """Scores, timings, predictions and the data report of one run."""

    config: RiskRunConfig
    data_report: dict
    splits: list[dict]
    predictions: pd.DataFrame  # one row per test sample: date, asset, asset_class, target, <model>...
    fit_seconds: dict[str, float]
    predict_seconds: dict[str, float]
    extras: dict = field(default_factory=dict)

    @property
    def leaky(self) -> bool:
        return self.config.protocol == "paper-random"

    def metrics(self) -> dict:
        """The stable metrics.json structure."""
        p = self.predictions
        y = p["target"].to_numpy()
        cls = p["asset_class"].map({c: k for k, c in enumerate(ASSET_CLASSES)}).to_numpy()
        models, by_class = {}, {}
        for name in self.config.models:
            s = score_forecasts(y, p[name].to_numpy()).to_dict()
            s["fit_seconds"] = self.fit_seconds[name]
            s["predict_ms"] = 1000.0 * self.predict_seconds[name] / max(len(p), 1)
            models[name] = s
            for cname, cs in score_by_class(y, p[name].to_numpy(), cls).items():
                by_class.setdefault(cname, {})[name] = {"rmse": cs.rmse, "r2": cs.r2, "qlike": cs.qlike, "mae": cs.mae, "n": cs.n}
        comparisons = {}
        if "cnn" in self.config.models:
            cnn_loss = qlike_loss(y**2, p["cnn"].to_numpy() ** 2)
            for name in self.config.models:
                if name == "cnn":
                    continue
                other = qlike_loss(y**2, p[name].to_numpy() ** 2)
                comparisons[f"cnn_vs_{name}"] = diebold_mariano_panel(cnn_loss, other, p, self.config.features.horizon)
        return {
            "protocol": self.config.protocol,
            "leaky": self.leaky,
            "horizon": self.config.features.horizon,
            "n_assets": int(p["asset"].nunique()),
            "n_test_samples": int(len(p)),
            "test_start": str(pd.Timestamp(p["date"].min()).date()),
            "test_end": str(pd.Timestamp(p["date"].max()).date()),
            "data_report": self.data_report,
            "splits": self.splits,
            "models": models,
            "by_asset_class": by_class,
            "qlike_dm_tests": comparisons,
            **self.extras,
        }


def diebold_mariano_panel(loss_a: np.ndarray, loss_b: np.ndarray, frame: pd.DataFrame, horizon: int) -> dict:
    """DM (HLN-corrected) on the cross-sectional mean loss per date, so the test sees one series.

    Averaging across assets each day keeps the time ordering the HAC variance needs; a
    negative statistic means model A (the CNN) has the lower loss.
    """
    daily = pd.DataFrame({"date": frame["date"].to_numpy(), "d": loss_a - loss_b, "a": loss_a, "b": loss_b}).groupby("date").mean()
    res = diebold_mariano(daily["a"].to_numpy(), daily["b"].to_numpy(), horizon)
    out = res.to_dict()
    out["mean_loss_diff"] = float(daily["d"].mean())
    return out


def portfolio_section(predictions: pd.DataFrame, returns: list[pd.Series], cfg: RiskRunConfig) -> dict:
    """Equal-weight portfolio risk from every model's forecasts, both aggregations, with VaR backtests.

    Bonds join only with --bond-returns duration: a yield change is not a price return, so it
    cannot be weighted into a portfolio's P&L.
    """
    keep = predictions if cfg.features.bond_returns == "duration" else predictions[predictions["asset_class"] != "bond"]
    if keep["asset"].nunique() < 2:
        return {"skipped": "fewer than two assets with price returns"}
    section: dict = {
        "weights": "equal",
        "level": cfg.var_level,
        "assets": int(keep["asset"].nunique()),
        "bonds_included": cfg.features.bond_returns == "duration",
    }
    for agg in AGGREGATIONS:
        forecasts = equal_weight_portfolio(keep, returns, list(cfg.models), cfg.features.horizon, agg, cfg.var_level)
        section[agg] = portfolio_summary(forecasts, cfg.var_level)
    return section


def _make_model(name: str, cfg: RiskRunConfig, n_features: int):
    if name != "cnn":
        return make_baseline(name)
    encoder = get_encoder(cfg.encoder, per_window_rescale=cfg.per_window_rescale)
    cnn_cfg = RiskCNNConfig.tuned() if cfg.tuned else RiskCNNConfig()
    cnn_cfg.in_channels = encoder.channels(n_features)
    cnn_cfg.max_epochs = cfg.epochs
    cnn_cfg.linear_skip = cfg.linear_skip
    return CNNForecaster(cnn_cfg, encoder, target=cfg.cnn_target, seed=cfg.seed, max_train_samples=cfg.max_train_samples)


def run_risk_evaluation(cfg: RiskRunConfig, panel: MarketPanel | None = None) -> RiskRunResult:
    """Fit and score every configured model under the configured protocol."""
    panel = panel if panel is not None else load_panel(cfg.data, cfg.assets)
    fp = compute_features(panel, cfg.features)
    for name, why in fp.excluded.items():
        log.warning("asset %s left out: %s", name, why)
    splits = make_splits(cfg.protocol, fp.sample_date, fp.sample_target_end, cfg.seed)
    fit_s = dict.fromkeys(cfg.models, 0.0)
    pred_s = dict.fromkeys(cfg.models, 0.0)
    frames, split_info, extras = [], [], {"cnn_history": []}
    for split in splits:
        info = split.describe(fp.sample_date)
        scaler = fit_scaler(fp, split.train)
        train_index = split.train
        if cfg.features.outliers == "zscore":
            train_index = zscore_keep(fp, scaler, split.train)
            info["zscore_dropped_train_samples"] = int(len(split.train) - len(train_index))
        train = build_samples(fp, scaler, train_index, split.leaky)
        val = build_samples(fp, scaler, split.val, split.leaky)
        test = build_samples(fp, scaler, split.test, split.leaky)
        log.info("%s: train %d, val %d, test %d samples", split.name, len(train), len(val), len(test))
        frame = pd.DataFrame(
            {
                "date": test.dates,
                "asset": np.asarray(test.asset_names)[test.asset],
                "asset_class": np.asarray(ASSET_CLASSES)[test.asset_class],
                "target": test.target,
                "fold": split.name,
            }
        )
        for name in cfg.models:
            model = _make_model(name, cfg, len(fp.feature_names))
            t0 = time.perf_counter()
            model.fit(train, val)
            fit_s[name] += time.perf_counter() - t0
            t0 = time.perf_counter()
            forecast = np.asarray(model.predict(test), float)
            pred_s[name] += time.perf_counter() - t0
            frame[name] = forecast
            log.info("%s %s: fit %.1fs, test QLIKE %.4f", split.name, name, fit_s[name], qlike_loss(test.target**2, forecast**2).mean())
            if name == "cnn":
                extras["cnn_history"].append({"split": split.name, "best_epoch": getattr(model, "best_epoch_", None), "history": getattr(model, "history_", [])})
        frames.append(frame)
        split_info.append(info)
    predictions = pd.concat(frames, ignore_index=True)
    extras["portfolio"] = portfolio_section(predictions, [a.returns for a in fp.assets], cfg)
    return RiskRunResult(
        config=cfg,
        data_report={**panel.report.to_dict(), "excluded_assets": fp.excluded},
        splits=split_info,
        predictions=predictions,
        fit_seconds=fit_s,
        predict_seconds=pred_s,
        extras=extras,
    )
