"""`nimbleml risk ...` subcommands."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from nimbleml.environment import environment
from nimbleml.risk.experiment import MODEL_NAMES, RiskRunConfig, run_risk_evaluation
from nimbleml.risk.features import FeatureConfig
from nimbleml.risk.parallel import EXECUTORS
from nimbleml.risk.protocol import PROTOCOLS
from nimbleml.risk.regimes import STRESS_WINDOWS, parse_windows


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `risk evaluate`."""
    d, f = RiskRunConfig(), FeatureConfig()  # one source of defaults: the config dataclasses
    risk = subparsers.add_parser("risk", help="portfolio risk forecasting")
    sub = risk.add_subparsers(dest="risk_command", required=True)
    ev = sub.add_parser("evaluate", help="fit the CNN and the baselines, print and write the comparison")
    ev.add_argument("--data", default=d.data, help="'arch' (bundled real series) or a market folder like ../shared/data/market")
    ev.add_argument("--assets", type=int, default=None, help="keep the first N assets in sorted file-path order")
    ev.add_argument("--horizon", type=int, default=f.horizon, help="forecast horizon h in trading days (5 or 22)")
    ev.add_argument("--protocol", choices=PROTOCOLS, default=d.protocol)
    ev.add_argument("--test-start", default=None, help="first test date YYYY-MM-DD (e.g. 2007-01-01 puts 2008 and 2020 out of sample)")
    ev.add_argument("--test-end", default=None, help="end of the test period YYYY-MM-DD (exclusive)")
    ev.add_argument("--refit-months", type=int, default=d.refit_months, help="walk-forward refit cadence in months (12 = yearly)")
    ev.add_argument("--no-warm-start", action="store_true", help="walk-forward: train each fold's CNN from scratch")
    ev.add_argument("--warm-epochs", type=int, default=d.warm_epochs, help="max epochs of a warm-started walk-forward fold")
    ev.add_argument("-j", "--jobs", type=int, default=d.n_jobs, help="parallel per-asset expert fits (-1: all cores)")
    ev.add_argument("--executor", choices=EXECUTORS, default=d.executor, help="joblib (local) or ray (a Ray cluster)")
    ev.add_argument("--windows", default=None, help="stress windows name=YYYY-MM-DD:YYYY-MM-DD[,...] (default: 2008 and 2020)")
    ev.add_argument("--mcs-reps", type=int, default=d.mcs_reps, help="Model Confidence Set bootstrap replications")
    ev.add_argument("--encoder", default=d.encoder, help="heatmap (paper) | gaf | mtf | recurrence")
    ev.add_argument("--per-window-rescale", action="store_true", help="rescale each window to [0, 1] before imaging")
    ev.add_argument("--epochs", type=int, default=d.epochs, help="CNN max epochs (early stopping on validation)")
    ev.add_argument("--cnn-target", choices=("log_var", "qlike", "vol", "var"), default=d.cnn_target)
    ev.add_argument("--tuned", action="store_true", help="the paper's tuned CNN: 5x5 kernels, 3x3 pooling, lr 5e-4")
    ev.add_argument("--no-linear-skip", action="store_true", help="the paper's CNN exactly, without our linear skip read-out")
    ev.add_argument("--max-train-samples", type=int, default=d.max_train_samples, help="CNN samples drawn per epoch")
    ev.add_argument("--models", default=",".join(MODEL_NAMES), help=f"comma list from {','.join(MODEL_NAMES)}")
    ev.add_argument("--outliers", choices=("winsorize", "zscore", "none"), default=f.outliers)
    ev.add_argument("--scaler", choices=("minmax", "robust"), default=f.scaler)
    ev.add_argument("--bond-returns", choices=("yield_change", "duration"), default=f.bond_returns)
    ev.add_argument("--span", choices=("common", "all"), default=f.span, help="common: dates every asset class covers")
    ev.add_argument("--seed", type=int, default=d.seed)
    ev.add_argument("--out", required=True, type=Path, help="report folder")
    ev.set_defaults(func=run_evaluate)


def config_from_args(args: argparse.Namespace) -> RiskRunConfig:
    features = FeatureConfig(
        horizon=args.horizon, outliers=args.outliers, scaler=args.scaler, bond_returns=args.bond_returns, span=args.span
    )
    return RiskRunConfig(
        data=args.data,
        assets=args.assets,
        protocol=args.protocol,
        test_start=args.test_start,
        test_end=args.test_end,
        refit_months=args.refit_months,
        warm_start=not args.no_warm_start,
        warm_epochs=args.warm_epochs,
        n_jobs=args.jobs,
        executor=args.executor,
        windows=parse_windows(args.windows) if args.windows else dict(STRESS_WINDOWS),
        mcs_reps=args.mcs_reps,
        encoder=args.encoder,
        per_window_rescale=args.per_window_rescale,
        epochs=args.epochs,
        cnn_target=args.cnn_target,
        tuned=args.tuned,
        linear_skip=not args.no_linear_skip,
        max_train_samples=args.max_train_samples,
        models=tuple(m.strip() for m in args.models.split(",") if m.strip()),
        seed=args.seed,
        features=features,
    )


def run_evaluate(args: argparse.Namespace) -> int:
    from nimbleml.risk.report import print_table, write_report

    cfg = config_from_args(args)
    t0 = time.perf_counter()
    result = run_risk_evaluation(cfg)
    result.extras["wall_seconds"] = time.perf_counter() - t0
    result.extras["environment"] = environment()
    metrics = write_report(result, args.out)
    if result.cnn is not None:
        result.cnn.save(args.out / "model")  # the model-folder contract: CNNForecaster.load(DIR/model)
    print_table(metrics)
    return 0
