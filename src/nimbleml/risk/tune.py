"""`nimbleml risk tune`: Optuna (TPE) over the CNN's settings, judged on validation data only.

Search space: kernel (3, 5), pooling (2, 3), learning rate (1e-4 .. 3e-3, log), dropout
(0 .. 0.6), encoder (heatmap, gaf, mtf, recurrence), window length (10, 20 days) and the
exogenous set (none, rates, pca). Every trial sees only rows before the run's first test date
(``protocol.design_split``: its ``--test-start``, else the protocol's default; a validation
window reaching past it is refused). Each trial fits the CNN on the training part, early-stops
on the first part of the validation window (validation QLIKE after every epoch; Optuna's median
pruner stops trials that trail the median of earlier ones) and is judged on the last part, which
the fit never saw. QLIKE per asset class is kept for every trial, which is how each exogenous
set is judged. The test period is touched once: the chosen configuration then runs the full
evaluation protocol.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import optuna

from nimbleml.risk.data import MarketPanel, load_panel
from nimbleml.risk.evaluate import VarianceFloor, qlike_loss
from nimbleml.risk.experiment import RiskRunConfig, make_model, run_risk_evaluation
from nimbleml.risk.features import build_samples, compute_features, fit_scaler
from nimbleml.risk.imaging import ENCODERS
from nimbleml.risk.protocol import design_split, pinned_test_start
from nimbleml.risk.samples import ASSET_CLASSES

log = logging.getLogger(__name__)

EXOGENOUS_CHOICES: dict[str, dict] = {  # exogenous set -> FeatureConfig fields
    "none": {"exogenous": (), "pca_components": None},
    "rates": {"exogenous": ("rates",), "pca_components": None},
    "pca": {"exogenous": (), "pca_components": 5},  # the paper's Figure 6: PCA on the feature matrix
}


@dataclass
class TuneConfig:
    """How long to search."""

    trials: int = 20  # Optuna trials (pruned ones included)
    timeout_s: float | None = None  # stop starting trials after this many seconds
    exogenous: tuple[str, ...] = tuple(EXOGENOUS_CHOICES)  # exogenous sets to choose from
    startup_trials: int = 3  # trials before the median pruner may prune
    val_start: str | None = None  # ISO start of the validation window; None: the last 15/85 before the first test date
    val_end: str | None = None  # ISO end (exclusive); None: the first test date; later is refused


def _trial_config(trial: optuna.Trial, base: RiskRunConfig, tune: TuneConfig) -> RiskRunConfig:
    exog = trial.suggest_categorical("exogenous", list(tune.exogenous))
    features = dataclasses.replace(base.features, window=trial.suggest_categorical("window", [10, 20]), **EXOGENOUS_CHOICES[exog])
    overrides = {
        "kernel": trial.suggest_categorical("kernel", [3, 5]),
        "pool": trial.suggest_categorical("pool", [2, 3]),
        "lr": trial.suggest_float("lr", 1e-4, 3e-3, log=True),
        "dropout": trial.suggest_float("dropout", 0.0, 0.6),
    }
    return dataclasses.replace(base, encoder=trial.suggest_categorical("encoder", list(ENCODERS)), features=features,
                               cnn_overrides={**base.cnn_overrides, **overrides}, models=("cnn",))


def _objective(trial: optuna.Trial, base: RiskRunConfig, tune: TuneConfig, panel: MarketPanel) -> float:
    cfg = _trial_config(trial, base, tune)
    fp = compute_features(panel, cfg.features)
    split = design_split(fp.sample_date, fp.sample_target_end, base.protocol, base.test_start, tune.val_start, tune.val_end)
    scaler = fit_scaler(fp, split.train)
    train, val, score = (build_samples(fp, scaler, rows) for rows in (split.train, split.val, split.score))
    floor = VarianceFloor.of_samples(train)
    for samples in (train, val, score):
        samples.var_floor = floor.by_asset
    trial.set_user_attr("val_dates", split.windows["scoring"])
    trial.set_user_attr("windows", split.to_dict())

    def report(epoch: int, val_qlike: float) -> None:
        trial.report(val_qlike, epoch)
        if trial.should_prune():
            raise optuna.TrialPruned(f"epoch {epoch}: validation QLIKE {val_qlike:.4f}")

    model = make_model("cnn", cfg, len(train.feature_names)).fit(train, val, on_epoch=report)
    loss = qlike_loss(score.target**2, model.predict(score) ** 2, floor.rows(score.asset))
    by_class = {ASSET_CLASSES[c]: float(loss[score.asset_class == c].mean()) for c in np.unique(score.asset_class)}
    trial.set_user_attr("val_qlike_by_class", by_class)
    return float(loss.mean())


def run_tuning(base: RiskRunConfig, tune: TuneConfig, out: Path, panel: MarketPanel | None = None) -> dict:
    """Search on validation data, then run the chosen configuration once; returns the tune summary."""
    panel = panel if panel is not None else load_panel(base.data, base.assets)
    fp = compute_features(panel, base.features)
    base = dataclasses.replace(base, test_start=pinned_test_start(fp.sample_date, base.protocol, base.test_start))
    sampler = optuna.samplers.TPESampler(seed=base.seed)
    pruner = optuna.pruners.MedianPruner(n_startup_trials=tune.startup_trials, n_warmup_steps=1)
    study = optuna.create_study(direction="minimize", sampler=sampler, pruner=pruner)
    study.optimize(lambda t: _objective(t, base, tune, panel), n_trials=tune.trials, timeout=tune.timeout_s)
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    trials = [{"number": t.number, "state": t.state.name, "params": t.params, "val_qlike": t.value,
               "val_qlike_by_class": t.user_attrs.get("val_qlike_by_class"), "val_dates": t.user_attrs.get("val_dates"),
               "windows": t.user_attrs.get("windows"), "epochs_run": len(t.intermediate_values)}
              for t in study.trials]
    by_exog: dict[str, dict[str, float]] = {}
    for name in tune.exogenous:
        runs = [t for t in complete if t.params["exogenous"] == name]
        if runs:
            best = min(runs, key=lambda t: t.value)
            by_exog[name] = {"best_val_qlike": best.value, **{f"val_qlike_{c}": q for c, q in best.user_attrs["val_qlike_by_class"].items()}}
    best = study.best_trial
    chosen = _trial_config(optuna.trial.FixedTrial(best.params), base, tune)
    chosen = dataclasses.replace(chosen, models=base.models)
    summary = {"best_params": best.params, "best_val_qlike": best.value, "n_trials": len(study.trials),
               "n_pruned": sum(t.state == optuna.trial.TrialState.PRUNED for t in study.trials),
               "exogenous_on_validation": by_exog, "trials": trials, "chosen_config": chosen.to_dict(),
               "test": "computed once, for the chosen configuration, in final/"}
    out.mkdir(parents=True, exist_ok=True)
    (out / "tune.json").write_text(json.dumps(summary, indent=2, default=str))
    result = run_risk_evaluation(chosen, panel, checkpoint=out / "final")
    summary["final_run"] = str(out / "final")
    return {"summary": summary, "result": result}
