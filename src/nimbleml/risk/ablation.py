"""`nimbleml risk ablate`: one change at a time against the base run, judged before the first test date.

How a validator decides whether an input or a transform helps without touching the test period:
every variant rebuilds ``protocol.design_split`` before the base run's first test date (its
``--test-start``, else the protocol's default; a validation window reaching past it is refused).
The training part fits the scaler and the CNN; the first part of the validation window
early-stops and calibrates the CNN and picks HAR's form (HAR is then refitted on train + that
part, the data the CNN's fit saw); the last part, which neither model has seen, scores both:
QLIKE pooled and per asset class. "Does it help bonds?" is then read in the class where the CNN
loses to HAR. The windows are written to ablation.json. With several seeds each variant is
trained once per seed and the mean is reported, as one CNN fit's seed noise can be as large as
the effect of an input.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from nimbleml.errors import NimbleError  # noqa: E402
from nimbleml.progress import track  # noqa: E402
from nimbleml.risk.data import MarketPanel, load_panel  # noqa: E402
from nimbleml.risk.evaluate import VarianceFloor, qlike_loss  # noqa: E402
from nimbleml.risk.experiment import RiskRunConfig, make_model  # noqa: E402
from nimbleml.risk.features import build_samples, compute_features, fit_scaler  # noqa: E402
from nimbleml.risk.protocol import design_split, pinned_test_start  # noqa: E402
from nimbleml.risk.samples import ASSET_CLASSES  # noqa: E402

log = logging.getLogger(__name__)

# variant name -> FeatureConfig (or RiskRunConfig) fields changed from the base run (one change each)
VARIANTS: dict[str, dict] = {
    "base": {},
    "rates": {"exogenous": ("rates",)},  # Treasury 3m / 10y yields and the term spread, one-day lag
    "vix": {"exogenous": ("vix",)},  # log VIX (arch ships 2014-2018 only: fewer, later rows)
    "pca": {"pca_components": 5},  # the paper's Figure 6: 5 principal components of the features
    "class_scale": {"scale_scope": "class"},  # one scaler per asset class instead of one pooled
    "robust_scale": {"scaler": "robust"},  # median / IQR instead of min-max
    "winsorize": {"outliers": "winsorize"},  # clip inputs at the training 0.5% / 99.5% quantiles
    # one variance factor per asset class, fitted (like the pooled one) on the early-stopping slice
    # (the default since issue 25: then this variant equals the base, and the next one is the change)
    "class_calibration": {"cnn_calibration": "class"},
    "pooled_calibration": {"cnn_calibration": "pooled"},  # one variance factor for every asset
    # an epoch's CNN rows per class by sqrt of the class's rows (issue 25.10: bonds ~3% of the full panel)
    "class_sqrt_sampling": {"cnn_class_sampling": "sqrt"},
}
DEFAULT_VARIANTS: tuple[str, ...] = ("base", "rates", "pca", "class_scale")


def parse_variants(text: str) -> tuple[str, ...]:
    names = tuple(v.strip() for v in text.split(",") if v.strip())
    unknown = [v for v in names if v not in VARIANTS]
    if unknown or not names:
        raise NimbleError(f"unknown ablation variant(s) {unknown or text!r}", fix=f"choose from {', '.join(VARIANTS)}")
    return names


def _by_class(loss: np.ndarray, asset_class: np.ndarray) -> dict[str, float]:
    return {ASSET_CLASSES[c]: float(loss[asset_class == c].mean()) for c in np.unique(asset_class)}


def _run_variant(name: str, base: RiskRunConfig, panel: MarketPanel, seeds: tuple[int, ...],
                 val_start: str | None, val_end: str | None) -> dict:
    run_fields = {f.name for f in dataclasses.fields(RiskRunConfig)}
    changes = VARIANTS[name]
    features = dataclasses.replace(base.features, **{k: v for k, v in changes.items() if k not in run_fields})
    cfg = dataclasses.replace(base, features=features, **{k: v for k, v in changes.items() if k in run_fields})
    fp = compute_features(panel, features)
    split = design_split(fp.sample_date, fp.sample_target_end, base.protocol, base.test_start, val_start, val_end)
    scaler = fit_scaler(fp, split.train)
    train, val, score = (build_samples(fp, scaler, rows) for rows in (split.train, split.val, split.score))
    floor = VarianceFloor.of_samples(train)  # the walk-forward's rule: one floor for both models and the score
    for samples in (train, val, score):
        samples.var_floor = floor.by_asset
    score_floor = floor.rows(score.asset)
    target_var = score.target**2
    har = make_model("har", cfg, len(train.feature_names)).fit(train, val)  # form chosen on val, refitted on train + val
    har_loss = qlike_loss(target_var, har.predict(score) ** 2, score_floor)
    cnn_losses, epochs, started = [], [], time.perf_counter()
    for seed in seeds:
        model = make_model("cnn", dataclasses.replace(cfg, seed=seed), len(train.feature_names)).fit(train, val)
        cnn_losses.append(qlike_loss(target_var, model.predict(score) ** 2, score_floor))
        epochs.append(int(model.best_epoch_))
    cnn_loss = np.mean(cnn_losses, axis=0)
    per_seed = [float(loss.mean()) for loss in cnn_losses]
    return {
        "changes": {k: list(v) if isinstance(v, tuple) else v for k, v in VARIANTS[name].items()},
        "windows": split.to_dict(),
        "val_dates": split.windows["scoring"],
        "n_train": len(train),
        "n_val": len(val),
        "n_scored": len(score),
        "val_qlike": float(cnn_loss.mean()),
        "val_qlike_per_seed": per_seed,
        "val_qlike_by_class": _by_class(cnn_loss, score.asset_class),
        "har_val_qlike": float(har_loss.mean()),
        "har_val_qlike_by_class": _by_class(har_loss, score.asset_class),
        "best_epochs": epochs,
        "fit_seconds": time.perf_counter() - started,
    }


def run_ablation(base: RiskRunConfig, variants: tuple[str, ...], seeds: tuple[int, ...], out: Path,
                 panel: MarketPanel | None = None, val_start: str | None = None, val_end: str | None = None) -> dict:
    """Fit every variant on the data before the base run's first test date; writes ``ablation.json`` and ``ablation.png``.

    ``val_start`` / ``val_end`` (ISO dates): the validation window (default: the last 15/85 of the
    days before the first test date); one ending after the first test date is refused.
    """
    if "base" not in variants:
        variants = ("base", *variants)
    panel = panel if panel is not None else load_panel(base.data, base.assets)
    fp = compute_features(panel, base.features)
    base = dataclasses.replace(base, test_start=pinned_test_start(fp.sample_date, base.protocol, base.test_start))
    results = {name: _run_variant(name, base, panel, seeds, val_start, val_end) for name in track(variants, "ablation variants")}
    ref = results["base"]
    for r in results.values():
        r["val_qlike_change_vs_base"] = r["val_qlike"] - ref["val_qlike"]
        r["by_class_change_vs_base"] = {c: q - ref["val_qlike_by_class"][c]
                                        for c, q in r["val_qlike_by_class"].items() if c in ref["val_qlike_by_class"]}
    summary = {"base_config": base.to_dict(), "seeds": list(seeds),
               "scored_on": "the scoring slice of the validation window: after the early-stopping / calibration slice, "
                            "before the run's first test date (the test period is never built)",
               "windows": ref["windows"], "variants": results}
    out.mkdir(parents=True, exist_ok=True)
    (out / "ablation.json").write_text(json.dumps(summary, indent=2, default=str))
    _figure(results, out / "ablation.png")
    return summary


def _figure(results: dict, path: Path) -> None:
    """Validation QLIKE per asset class for every variant, HAR's (base rows) as a dashed line."""
    classes = [c for c in ASSET_CLASSES if c in results["base"]["val_qlike_by_class"]]
    fig, axes = plt.subplots(1, len(classes), figsize=(3.2 * len(classes), 3.4), squeeze=False)
    for ax, c in zip(axes[0], classes):
        names = [n for n in results if c in results[n]["val_qlike_by_class"]]
        ax.bar(range(len(names)), [results[n]["val_qlike_by_class"][c] for n in names], color="tab:blue")
        ax.axhline(results["base"]["har_val_qlike_by_class"][c], color="tab:red", ls="--", label="HAR (base rows)")
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
        ax.set_title(f"{c}: CNN validation QLIKE")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
