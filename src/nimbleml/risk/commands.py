"""`nimbleml risk ...` subcommands: evaluate, report.

Every `evaluate` option defaults to "not given" (argparse.SUPPRESS), so a run is built as:
the defaults of ``RiskRunConfig``, then ``--config FILE`` (TOML or a run's config.json), then
the flags actually given. The run folder's config.json runs the same experiment again.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
import tomllib
from pathlib import Path

from nimbleml.environment import environment
from nimbleml.errors import NimbleError
from nimbleml.risk.experiment import MODEL_NAMES, RiskRunConfig, run_risk_evaluation
from nimbleml.risk.parallel import EXECUTORS
from nimbleml.risk.protocol import PROTOCOLS
from nimbleml.risk.regimes import parse_windows
from nimbleml.risk.run_folder import data_fingerprint

# flag dest -> (config field, or "features.<field>"; how the flag value becomes the field value)
_FLAG_FIELDS: dict[str, tuple[str, object]] = {
    "data": ("data", str),
    "assets": ("assets", int),
    "horizon": ("features.horizon", int),
    "protocol": ("protocol", str),
    "test_start": ("test_start", str),
    "test_end": ("test_end", str),
    "refit_months": ("refit_months", int),
    "no_warm_start": ("warm_start", lambda v: not v),
    "warm_epochs": ("warm_epochs", int),
    "jobs": ("n_jobs", int),
    "executor": ("executor", str),
    "windows": ("windows", parse_windows),
    "mcs_reps": ("mcs_reps", int),
    "weights": ("weights", str),
    "encoder": ("encoder", str),
    "per_window_rescale": ("per_window_rescale", bool),
    "epochs": ("epochs", int),
    "cnn_target": ("cnn_target", str),
    "tuned": ("tuned", bool),
    "no_linear_skip": ("linear_skip", lambda v: not v),
    "max_train_samples": ("max_train_samples", int),
    "max_val_samples": ("max_val_samples", int),
    "cnn_calibration": ("cnn_calibration", str),
    "cnn_class_sampling": ("cnn_class_sampling", str),
    "models": ("models", lambda v: tuple(m.strip() for m in v.split(",") if m.strip())),
    "outliers": ("features.outliers", str),
    "scaler": ("features.scaler", str),
    "scale_scope": ("features.scale_scope", str),
    "bond_returns": ("features.bond_returns", str),
    "span": ("features.span", str),
    "exogenous": ("features.exogenous", lambda v: tuple(x.strip() for x in v.split(",") if x.strip())),
    "rates_dir": ("features.rates_dir", str),
    "pca": ("features.pca_components", int),
    "seed": ("seed", int),
}


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `risk evaluate`, `risk tune`, `risk ablate` and `risk report`."""
    d = RiskRunConfig()  # one source of defaults: the config dataclasses (shown in the help)
    risk = subparsers.add_parser("risk", help="portfolio risk forecasting")
    sub = risk.add_subparsers(dest="risk_command", required=True)
    ev = sub.add_parser("evaluate", help="fit the CNN and the baselines, print and write the comparison",
                        argument_default=argparse.SUPPRESS)
    _run_options(ev, d)
    ev.set_defaults(func=run_evaluate)
    tune = sub.add_parser("tune", help="Optuna TPE over the CNN settings on validation data; the test is scored once",
                          argument_default=argparse.SUPPRESS)
    _run_options(tune, d)  # the same options as evaluate: the base configuration to tune from
    tune.add_argument("--trials", type=int, help="Optuna trials (default 20)")
    tune.add_argument("--timeout", type=float, help="stop starting trials after this many seconds")
    _design_window_options(tune)
    tune.set_defaults(func=run_tune)
    abl = sub.add_parser("ablate", help="one change at a time (exogenous inputs, PCA, scaling) scored on validation only",
                         argument_default=argparse.SUPPRESS)
    _run_options(abl, d)  # the base configuration each variant changes one thing of
    abl.add_argument("--variants", help="comma list of base,rates,vix,pca,class_scale,robust_scale,winsorize,class_calibration "
                                        "(default base,rates,pca,class_scale)")
    abl.add_argument("--seeds", type=int, help="CNN fits per variant, averaged (default 1)")
    _design_window_options(abl)
    abl.set_defaults(func=run_ablate)
    rep = sub.add_parser("report", help="recompute metrics.json and write report.html from a run folder (no refitting)")
    rep.add_argument("--from", dest="run_dir", required=True, type=Path, help="a folder written by `risk evaluate --out`")
    rep.set_defaults(func=run_report)


def _design_window_options(p: argparse.ArgumentParser) -> None:
    """--val-start / --val-end of tune and ablate: the window design choices are judged on."""
    p.add_argument("--val-start", help="validation window start YYYY-MM-DD (default: the last 15/85 of the days "
                                       "before the run's first test date, --test-start or the protocol's default)")
    p.add_argument("--val-end", help="validation window end YYYY-MM-DD, exclusive (default and latest allowed: "
                                     "the first test date, e.g. 2007-01-01 for a walk-forward from 2007)")


def _run_options(p: argparse.ArgumentParser, d: RiskRunConfig) -> None:
    """The options that build a RiskRunConfig (shared by evaluate and tune); d gives the defaults shown."""
    p.add_argument("--config", type=Path, help="TOML file or a run's config.json; flags given here override it")
    p.add_argument("--data", help=f"'arch' (bundled real series) or a market folder like ../shared/data/market (default {d.data})")
    p.add_argument("--assets", type=int, help="keep the first N assets in sorted file-path order")
    p.add_argument("--horizon", type=int, help=f"forecast horizon h in trading days, 5 or 22 (default {d.features.horizon})")
    p.add_argument("--protocol", choices=PROTOCOLS, help=f"default {d.protocol}")
    p.add_argument("--test-start", help="first test date YYYY-MM-DD (2007-01-01 puts 2008 and 2020 out of sample)")
    p.add_argument("--test-end", help="end of the test period YYYY-MM-DD (exclusive)")
    p.add_argument("--refit-months", type=int, help=f"walk-forward refit cadence in months (default {d.refit_months}: yearly)")
    p.add_argument("--no-warm-start", action="store_true", help="walk-forward: train each fold's CNN from scratch")
    p.add_argument("--warm-epochs", type=int, help=f"max epochs of a warm-started walk-forward fold (default {d.warm_epochs})")
    p.add_argument("-j", "--jobs", type=int, help="parallel per-asset expert fits (-1: all cores; default 1)")
    p.add_argument("--executor", choices=EXECUTORS, help="joblib (local, default) or ray (a Ray cluster)")
    p.add_argument("--windows", help="stress windows name=YYYY-MM-DD:YYYY-MM-DD[,...] (default: 2008-09..2009-06, 2020-02..2020-06)")
    p.add_argument("--mcs-reps", type=int, help=f"Model Confidence Set bootstrap replications (default {d.mcs_reps})")
    p.add_argument("--weights", help="portfolio weights CSV with header asset,weight (default: equal weights)")
    p.add_argument("--encoder", help=f"heatmap (paper) | gaf | mtf | recurrence (default {d.encoder})")
    p.add_argument("--per-window-rescale", action="store_true", help="rescale each window to [0, 1] before imaging")
    p.add_argument("--epochs", type=int, help=f"CNN max epochs, early stopping on validation (default {d.epochs})")
    p.add_argument("--cnn-target", choices=("log_var", "qlike", "vol", "var"), help=f"default {d.cnn_target}")
    p.add_argument("--tuned", action="store_true", help="the paper's tuned CNN: 5x5 kernels, 3x3 pooling, lr 5e-4")
    p.add_argument("--no-linear-skip", action="store_true", help="the paper's CNN exactly, without our linear skip read-out")
    p.add_argument("--max-train-samples", type=int, help=f"CNN samples drawn per epoch (default {d.max_train_samples})")
    p.add_argument("--max-val-samples", type=int, help=f"CNN validation rows scored per epoch (default {d.max_val_samples})")
    p.add_argument("--cnn-calibration", choices=("pooled", "class"),
                   help=f"CNN variance factor fitted on validation: one, or one per asset class (default {d.cnn_calibration})")
    p.add_argument("--cnn-class-sampling", choices=("proportional", "sqrt"),
                   help=f"CNN rows per asset class in an epoch: as in the data, or by sqrt of each class's rows (default {d.cnn_class_sampling})")
    p.add_argument("--models", help=f"comma list from {','.join(MODEL_NAMES)} (default all)")
    p.add_argument("--outliers", choices=("winsorize", "zscore", "none"), help=f"default {d.features.outliers} (cap-free)")
    p.add_argument("--scaler", choices=("minmax", "robust"), help=f"default {d.features.scaler}")
    p.add_argument("--scale-scope", choices=("pooled", "class"),
                   help=f"one scaler over all assets or one per asset class (default {d.features.scale_scope})")
    p.add_argument("--bond-returns", choices=("yield_change", "duration"), help=f"default {d.features.bond_returns}")
    p.add_argument("--span", choices=("common", "all"), help="common (default): dates every asset class covers")
    p.add_argument("--exogenous", help="extra inputs, comma list of rates (yields, term spread) and vix (2014-2018 only)")
    p.add_argument("--rates-dir", help="FRED yields folder for --exogenous rates (default: <data>/rates)")
    p.add_argument("--pca", type=int, help="project the scaled features on N principal components fitted on training rows")
    p.add_argument("--seed", type=int, help="default 0")
    p.add_argument("--out", required=True, type=Path, help="run folder")


def read_config_file(path: Path) -> dict:
    """A config as a dict from TOML or JSON (a run's config.json)."""
    if not path.is_file():
        raise NimbleError("config file not found", path=path, fix="pass a TOML file or a run folder's config.json")
    try:
        if path.suffix == ".toml":
            return tomllib.loads(path.read_text())
        return json.loads(path.read_text())
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise NimbleError(f"cannot parse the config file ({exc})", path=path, fix="write valid TOML or JSON") from exc


def config_from_args(args: argparse.Namespace) -> RiskRunConfig:
    """Defaults, then --config FILE, then the flags given on the command line."""
    values = RiskRunConfig().to_dict()
    if getattr(args, "config", None) is not None:
        given = read_config_file(args.config)
        values.update({k: v for k, v in given.items() if k != "features"})
        values["features"].update(given.get("features", {}))
    for dest, (name, convert) in _FLAG_FIELDS.items():
        if dest not in vars(args):
            continue
        value = convert(getattr(args, dest))
        if name.startswith("features."):
            values["features"][name.split(".", 1)[1]] = value
        else:
            values[name] = value
    return RiskRunConfig.from_dict(values)


def _cpu_seconds() -> float:
    """CPU seconds used by this process and its finished children (user + system)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def run_evaluate(args: argparse.Namespace) -> int:
    from nimbleml.risk.report import print_table, write_report

    cfg = config_from_args(args)
    t0, c0 = time.perf_counter(), _cpu_seconds()
    result = run_risk_evaluation(cfg, checkpoint=args.out)
    result.extras["wall_seconds"] = time.perf_counter() - t0
    result.extras["cpu_seconds"] = _cpu_seconds() - c0
    result.extras["load_average"] = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else None
    result.extras["environment"] = environment()
    result.extras["data_fingerprint"] = data_fingerprint(cfg.data)
    if result.cnn is not None:
        result.cnn.save(args.out / "model")  # the model-folder contract: CNNForecaster.load(DIR/model)
    metrics = write_report(result, args.out)
    print_table(metrics)
    return 0


def run_tune(args: argparse.Namespace) -> int:
    from nimbleml.risk.report import print_table, write_report
    from nimbleml.risk.tune import TuneConfig, run_tuning

    base = config_from_args(args)
    tune = TuneConfig(trials=getattr(args, "trials", TuneConfig.trials), timeout_s=getattr(args, "timeout", None),
                      val_start=getattr(args, "val_start", None), val_end=getattr(args, "val_end", None))
    out = run_tuning(base, tune, args.out)
    result = out["result"]
    result.extras["tuning"] = {k: v for k, v in out["summary"].items() if k != "trials"}
    result.extras["environment"] = environment()
    result.extras["data_fingerprint"] = data_fingerprint(base.data)
    if result.cnn is not None:
        result.cnn.save(args.out / "final" / "model")
    print_table(write_report(result, args.out / "final"))
    return 0


def run_ablate(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from nimbleml.risk.ablation import DEFAULT_VARIANTS, parse_variants, run_ablation

    base = config_from_args(args)
    variants = parse_variants(args.variants) if "variants" in vars(args) else DEFAULT_VARIANTS
    seeds = getattr(args, "seeds", 1)
    if seeds < 1:
        raise NimbleError(f"--seeds must be >= 1, got {seeds}", fix="e.g. --seeds 3")
    summary = run_ablation(base, variants, tuple(range(base.seed, base.seed + seeds)), args.out,
                           val_start=getattr(args, "val_start", None), val_end=getattr(args, "val_end", None))
    results = summary["variants"]
    classes = list(results["base"]["val_qlike_by_class"])
    w = summary["windows"]
    table = Table(title=f"QLIKE on the scoring slice {w['scoring'][0]}..{w['scoring'][1]} (CNN, mean of {seeds} seed(s); "
                        f"early stopping on {w['validation'][0]}..{w['validation'][1]}; first test date {w['first_test_date']}); "
                        "HAR on the same rows in brackets")
    for col in ("variant", "all", *classes):
        table.add_column(col, justify="left" if col == "variant" else "right")
    for name, r in results.items():
        table.add_row(name, f"{r['val_qlike']:.4f} ({r['har_val_qlike']:.4f})", *(
            f"{r['val_qlike_by_class'][c]:.4f} ({r['har_val_qlike_by_class'][c]:.4f})" if c in r["val_qlike_by_class"] else ""
            for c in classes))
    Console(width=180).print(table)
    Console().print(f"wrote {args.out / 'ablation.json'} and {args.out / 'ablation.png'}")
    return 0


def run_report(args: argparse.Namespace) -> int:
    from nimbleml.risk.report import print_table, write_report
    from nimbleml.risk.run_folder import load_run

    result = load_run(args.run_dir)
    result.extras["environment"] = environment()
    result.extras.setdefault("data_fingerprint", data_fingerprint(result.config.data))
    metrics = write_report(result, args.run_dir)
    print_table(metrics)
    return 0
