"""The forecast-comparison battery a validator reads: slices, pairwise tests and the Model Confidence Set.

Everything here is computed from a run's prediction table (one row per test sample: date,
asset, asset_class, target, one column per model; vols in daily fractions), so a report can
be recomputed from ``predictions.csv.gz`` without refitting anything.

- Scores on slices: stress windows and regimes (``nimbleml.risk.regimes``), pooled and per class.
- Paired t-test on per-row QLIKE differences (the paper's test; ignores autocorrelation).
- Diebold-Mariano (Newey-West, data-driven lag, HLN) on the daily cross-sectional mean QLIKE.
- Mincer-Zarnowitz on variances, realised = a + b forecast, Newey-West within each asset.
- Two-sample KS of forecast vs realised vol per asset class (the paper's distribution check).
- Model Confidence Set (Hansen, Lunde and Nason 2011; ``arch.bootstrap.MCS``) at ``mcs_size``
  on the daily mean QLIKE, per asset class and per stress window: the models that survive.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
from arch.bootstrap import MCS

from nimbleml.risk.evaluate import qlike_loss, score_forecasts
from nimbleml.risk.regimes import REGIMES, window_mask
from nimbleml.risk.samples import ASSET_CLASSES
from nimbleml.risk.stats import diebold_mariano, ks_test, mincer_zarnowitz, newey_west_lags, paired_t_test

log = logging.getLogger(__name__)

MIN_SLICE_DATES = 10  # fewer forecast dates in a slice: its tests are not computed (named in "skipped")


def row_floor(p: pd.DataFrame) -> np.ndarray | None:
    """(n,) each row's variance floor (the shared per-asset rule), or None for an old run without one."""
    return p["var_floor"].to_numpy() if "var_floor" in p else None


def row_losses(p: pd.DataFrame, models: list[str]) -> pd.DataFrame:
    """(n, models) QLIKE of each row's variance forecast, target and forecast floored per asset."""
    y = p["target"].to_numpy() ** 2
    floor = row_floor(p)
    return pd.DataFrame({m: qlike_loss(y, p[m].to_numpy() ** 2, floor) for m in models}, index=p.index)


def daily_losses(p: pd.DataFrame, losses: pd.DataFrame, mask: np.ndarray | None = None) -> pd.DataFrame:
    """(dates, models) cross-sectional mean QLIKE per forecast date, in time order."""
    keep = np.ones(len(p), bool) if mask is None else mask
    return losses[keep].groupby(p.loc[keep, "date"].to_numpy()).mean().sort_index()


def slice_scores(p: pd.DataFrame, models: list[str], mask: np.ndarray) -> dict:
    """{model: {rmse, r2, qlike, mae, n}} on the rows in ``mask``."""
    y = p["target"].to_numpy()[mask]
    floor = row_floor(p)
    floor = None if floor is None else floor[mask]
    return {m: score_forecasts(y, p[m].to_numpy()[mask], floor).to_dict() for m in models} if mask.any() else {}


def slice_tables(p: pd.DataFrame, models: list[str], masks: dict[str, np.ndarray]) -> tuple[dict, dict]:
    """(pooled, by class): {slice: {model: scores}} and {slice: {class: {model: scores}}}."""
    pooled, by_class = {}, {}
    cls = p["asset_class"].to_numpy()
    for name, mask in masks.items():
        pooled[name] = slice_scores(p, models, mask)
        by_class[name] = {c: slice_scores(p, models, mask & (cls == c)) for c in ASSET_CLASSES if (mask & (cls == c)).any()}
    return pooled, by_class


def dm_tests(daily: pd.DataFrame, horizon: int, pairs: list[tuple[str, str]]) -> dict:
    """{a: {b: {stat, pvalue, lags, mean_loss_diff}}}: negative stat means a has the lower loss."""
    out: dict = {}
    for a, b in pairs:
        res = diebold_mariano(daily[a].to_numpy(), daily[b].to_numpy(), min(horizon, len(daily) - 1))
        out.setdefault(a, {})[b] = {"stat": res.statistic, "pvalue": res.pvalue, "lags": res.lags, "n": res.n,
                                    "mean_loss_diff": res.mean_difference, "variance": res.variance}
    return out


def mcs_members(daily: pd.DataFrame, horizon: int, size: float, reps: int, seed: int) -> dict:
    """{included: [...], pvalues: {model: p}, size, block_size}; block length max(h, T^(1/3)) days."""
    block = int(max(horizon, round(len(daily) ** (1 / 3))))
    mcs = MCS(daily, size=size, reps=reps, block_size=block, method="R", seed=seed)
    mcs.compute()
    pvalues = mcs.pvalues["Pvalue"].to_dict()
    return {"included": [m for m in daily.columns if m in set(mcs.included)], "pvalues": {m: float(pvalues[m]) for m in daily.columns},
            "size": size, "block_size": block, "n_dates": int(len(daily))}


def mz_tests(p: pd.DataFrame, models: list[str], horizon: int) -> dict:
    """{model: {alpha, beta, pvalue (H0 a=0, b=1), r2, lags}} on variances, panel HAC by asset."""
    s = p.sort_values(["asset", "date"], kind="stable")
    groups = pd.factorize(s["asset"])[0]
    lags = newey_west_lags(int(s.groupby("asset").size().median()), horizon)
    out = {}
    for m in models:
        res = mincer_zarnowitz(s["target"].to_numpy() ** 2, s[m].to_numpy() ** 2, lags, groups=groups)
        out[m] = {"alpha": res.alpha, "beta": res.beta, "pvalue": res.wald_pvalue, "alpha_se": res.alpha_se,
                  "beta_se": res.beta_se, "r2": res.r2, "lags": res.hac_lags, "units": "daily variance"}
    return out


def ks_tests(p: pd.DataFrame, models: list[str]) -> dict:
    """{class: {model: {stat, pvalue}}}: forecast vs realised vol distributions per class."""
    out: dict = {}
    for c in ASSET_CLASSES:
        rows = p[p["asset_class"] == c]
        if len(rows) < 2:
            continue
        for m in models:
            res = ks_test(rows[m].to_numpy(), rows["target"].to_numpy())
            out.setdefault(c, {})[m] = {"stat": res.statistic, "pvalue": res.pvalue}
    return out


def comparison_section(
    p: pd.DataFrame,
    models: list[str],
    horizon: int,
    windows: dict[str, tuple[str, str]],
    regimes: pd.Series | None,
    mcs_size: float = 0.10,
    mcs_reps: int = 1000,
    seed: int = 0,
) -> dict:
    """windows, windows_by_class, regimes, regimes_by_class and tests.{dm, dm_windows, ttest, mz, ks, mcs}."""
    p = p.reset_index(drop=True)
    losses = row_losses(p, models)
    dates = p["date"].to_numpy()
    window_masks = {name: window_mask(dates, w) for name, w in windows.items()}
    regime_masks = {}
    if regimes is not None:
        label = regimes.reindex(pd.DatetimeIndex(dates)).to_numpy()
        regime_masks = {r: label == r for r in REGIMES}
    windows_out, windows_cls = slice_tables(p, models, window_masks)
    regimes_out, regimes_cls = slice_tables(p, models, regime_masks)
    daily = daily_losses(p, losses)
    all_pairs = [(a, b) for i, a in enumerate(models) for b in models[i + 1 :]]
    anchor = "cnn" if "cnn" in models else models[0]
    anchor_pairs = [(anchor, b) for b in models if b != anchor]
    tests: dict = {"dm": dm_tests(daily, horizon, all_pairs), "dm_windows": {}, "skipped": {}}
    tests["ttest"] = {}
    for a, b in anchor_pairs:
        res = paired_t_test(losses[a].to_numpy(), losses[b].to_numpy())
        tests["ttest"].setdefault(a, {})[b] = {"stat": res.statistic, "pvalue": res.pvalue, "mean_loss_diff": res.mean_difference, "n": res.n}
    tests["mz"] = mz_tests(p, models, horizon)
    tests["ks"] = ks_tests(p, models)
    scopes = {"all": np.ones(len(p), bool)}
    cls = p["asset_class"].to_numpy()
    scopes.update({c: cls == c for c in ASSET_CLASSES if (cls == c).any()})
    scopes.update(window_masks)
    tests["mcs"] = {}
    for scope, mask in scopes.items():
        d = daily_losses(p, losses, mask)
        if len(d) < MIN_SLICE_DATES:
            tests["skipped"][scope] = f"{len(d)} forecast dates < {MIN_SLICE_DATES}"
            continue
        tests["mcs"][scope] = mcs_members(d, horizon, mcs_size, mcs_reps, seed)
        if scope in window_masks:
            tests["dm_windows"][scope] = dm_tests(d, horizon, anchor_pairs)
    return {"windows": windows_out, "windows_by_class": windows_cls, "regimes": regimes_out,
            "regimes_by_class": regimes_cls, "tests": tests}
