"""The forecast-comparison battery a validator reads: slices, pairwise tests and the Model Confidence Set.

Everything here is computed from a run's prediction table (one row per test sample: date,
asset, asset_class, target, one column per model; vols in daily fractions), so a report can
be recomputed from ``predictions.csv.gz`` without refitting anything.

- Scores on slices: stress windows and regimes (``nimbleml.risk.regimes``), pooled and per class.
- Paired t-test on per-row QLIKE differences (the paper's test; ignores autocorrelation).
- Diebold-Mariano (Newey-West variance, HLN) on the daily cross-sectional mean QLIKE; the lag is
  Newey-West 1994's automatic bandwidth of each loss differential (at least h-1), recorded per
  pair and summarised per table in ``dm_lags``; Holm-adjusted p-values across each table's pairs
  (``pvalue_holm``). In a stress window with fewer than ``MIN_NONOVERLAPPING`` non-overlapping
  h-day targets the test runs on every h-th date only (no overlap) and is marked indicative,
  with that effective n.
- Mincer-Zarnowitz on variances pooled over assets, realised = a + b forecast, with
  Driscoll-Kraay errors (scores summed per date: assets move together on a date).
- KS of standardised residuals per class and model: h y^2 / f^2 on every h-th date of each
  asset against chi2(h), its law if daily returns are Gaussian with the forecast variance. Fat
  tails reject it for every model; a smaller statistic is a better-calibrated distribution. (The
  paper compared forecast and realised levels, which penalises a good conditional-mean forecast
  for being less dispersed than the outcome.)
- Model Confidence Set (Hansen, Lunde and Nason 2011; ``arch.bootstrap.MCS``) at ``mcs_size``
  on the daily mean QLIKE, per asset class and per stress window: the models that survive;
  ``mcs_log_mse`` the same on a robust second loss, the squared error of log variance (a few
  rows of enormous QLIKE can make the QLIKE set powerless).

Targets and forecasts are floored per asset (``evaluate.VarianceFloor``, the ``var_floor``
column) before every loss.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
from arch.bootstrap import MCS
from scipy import stats as sps
from statsmodels.stats.multitest import multipletests

from nimbleml.risk.evaluate import qlike_loss, score_forecasts
from nimbleml.risk.regimes import REGIMES, window_mask
from nimbleml.risk.samples import ASSET_CLASSES
from nimbleml.risk.stats import diebold_mariano, mincer_zarnowitz, newey_west_lags, paired_t_test

log = logging.getLogger(__name__)

MIN_SLICE_DATES = 10  # fewer forecast dates in a slice: its tests are not computed (named in "skipped")
MIN_NONOVERLAPPING = 30  # fewer non-overlapping h-day targets in a window: DM on every h-th date, marked indicative
DM_LAG_RULE = "Newey-West 1994 automatic Bartlett bandwidth of each loss differential, at least h-1"


def row_floor(p: pd.DataFrame) -> np.ndarray | None:
    """(n,) each row's variance floor (the shared per-asset rule), or None for an old run without one."""
    return p["var_floor"].to_numpy() if "var_floor" in p else None


def row_losses(p: pd.DataFrame, models: list[str]) -> pd.DataFrame:
    """(n, models) QLIKE of each row's variance forecast, target and forecast floored per asset."""
    y = p["target"].to_numpy() ** 2
    floor = row_floor(p)
    return pd.DataFrame({m: qlike_loss(y, p[m].to_numpy() ** 2, floor) for m in models}, index=p.index)


def row_log_mse(p: pd.DataFrame, models: list[str]) -> pd.DataFrame:
    """(n, models) squared error of log variance, target and forecast floored per asset: a loss no
    single row can dominate (a zero target costs (log floor - log f)^2, not a ratio)."""
    floor = row_floor(p)
    floor = 1e-14 if floor is None else floor
    y = np.log(np.maximum(p["target"].to_numpy() ** 2, floor))
    return pd.DataFrame({m: (y - np.log(np.maximum(p[m].to_numpy() ** 2, floor))) ** 2 for m in models}, index=p.index)


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
    """{a: {b: {stat, pvalue, pvalue_holm, lags, n, effective_n, indicative, ...}}}: negative stat means a has the lower loss.

    ``pvalue_holm``: Holm-adjusted across the pairs of this table. With fewer than
    MIN_NONOVERLAPPING non-overlapping h-day targets the test uses every h-th date (no overlap,
    horizon 1) and ``indicative`` is True; ``effective_n`` is the number of non-overlapping targets.
    """
    out: dict = {}
    effective_n = -(-len(daily) // horizon)
    thin = horizon > 1 and effective_n < MIN_NONOVERLAPPING
    rows = daily.iloc[::horizon] if thin else daily
    step = 1 if thin else min(horizon, len(daily) - 1)
    for a, b in pairs:
        if len(rows) < 3:
            continue
        res = diebold_mariano(rows[a].to_numpy(), rows[b].to_numpy(), min(step, len(rows) - 1))
        out.setdefault(a, {})[b] = {"stat": res.statistic, "pvalue": res.pvalue, "lags": res.lags, "lag_rule": res.lag_rule,
                                    "n": res.n, "effective_n": int(effective_n), "indicative": bool(thin),
                                    "non_overlapping": bool(thin), "mean_loss_diff": res.mean_difference, "variance": res.variance}
    entries = [e for row in out.values() for e in row.values()]
    if entries:
        adjusted = multipletests([e["pvalue"] for e in entries], method="holm")[1]
        for e, p in zip(entries, adjusted):
            e["pvalue_holm"] = float(p)
    return out


def dm_lag_summary(table: dict) -> dict:
    """{lags: [min, max], n, effective_n, indicative} of one DM table, for printing beside it."""
    entries = [e for row in table.values() for e in row.values()]
    if not entries:
        return {}
    lags = [e["lags"] for e in entries]
    return {"lags": [int(min(lags)), int(max(lags))], "n": int(entries[0]["n"]), "effective_n": int(entries[0]["effective_n"]),
            "indicative": bool(entries[0]["indicative"]), "rule": DM_LAG_RULE}


def mcs_members(daily: pd.DataFrame, horizon: int, size: float, reps: int, seed: int) -> dict:
    """{included: [...], pvalues: {model: p}, size, block_size}; block length max(h, T^(1/3)) days."""
    block = int(max(horizon, round(len(daily) ** (1 / 3))))
    mcs = MCS(daily, size=size, reps=reps, block_size=block, method="R", seed=seed)
    mcs.compute()
    pvalues = mcs.pvalues["Pvalue"].to_dict()
    return {"included": [m for m in daily.columns if m in set(mcs.included)], "pvalues": {m: float(pvalues[m]) for m in daily.columns},
            "size": size, "block_size": block, "n_dates": int(len(daily))}


def mz_tests(p: pd.DataFrame, models: list[str], horizon: int) -> dict:
    """{model: {alpha, beta, pvalue (H0 a=0, b=1), r2, lags, covariance}} on floored variances, pooled,
    Driscoll-Kraay errors over dates with a fixed lag rule of the number of dates (newey_west_lags)."""
    s = p.sort_values("date", kind="stable")
    time = pd.factorize(s["date"], sort=True)[0]
    lags = newey_west_lags(int(time.max()) + 1, horizon)
    floor = row_floor(s)
    floor = 0.0 if floor is None else floor
    y = np.maximum(s["target"].to_numpy() ** 2, floor)
    out = {}
    for m in models:
        res = mincer_zarnowitz(y, np.maximum(s[m].to_numpy() ** 2, floor), lags, time=time)
        out[m] = {"alpha": res.alpha, "beta": res.beta, "pvalue": res.wald_pvalue, "alpha_se": res.alpha_se,
                  "beta_se": res.beta_se, "r2": res.r2, "lags": res.hac_lags, "units": "daily variance",
                  "covariance": res.covariance, "lag_rule": "max(h-1, floor(4 (dates/100)^(2/9))), a fixed rule of n"}
    return out


def standardised_squares(p: pd.DataFrame, models: list[str], horizon: int) -> dict[str, dict[str, np.ndarray]]:
    """{class: {model: (n,) h y^2 / f^2}} on every h-th date of each asset (non-overlapping targets),
    target and forecast floored at the row's variance floor: chi2(h) if daily returns are Gaussian
    with the forecast variance."""
    floor = row_floor(p)
    p = p.assign(_floor=1e-14 if floor is None else floor)
    out: dict[str, dict[str, np.ndarray]] = {}
    for c in ASSET_CLASSES:
        rows = p[p["asset_class"] == c].sort_values(["asset", "date"], kind="stable")
        rows = rows[rows.groupby("asset").cumcount().to_numpy() % horizon == 0]  # non-overlapping targets
        if len(rows) < 2:
            continue
        y = np.maximum(rows["target"].to_numpy() ** 2, rows["_floor"].to_numpy())
        out[c] = {m: horizon * y / np.maximum(rows[m].to_numpy() ** 2, rows["_floor"].to_numpy()) for m in models}
    return out


def ks_tests(p: pd.DataFrame, models: list[str], horizon: int) -> dict:
    """{class: {model: {stat, pvalue, n}}}: KS of the standardised residuals against chi2(h)."""
    out: dict = {}
    for c, by_model in standardised_squares(p, models, horizon).items():
        for m, z in by_model.items():
            res = sps.kstest(z, sps.chi2(horizon).cdf)
            out.setdefault(c, {})[m] = {"stat": float(res.statistic), "pvalue": float(res.pvalue), "n": int(len(z))}
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
    tests: dict = {"dm": dm_tests(daily, horizon, all_pairs), "dm_windows": {}, "skipped": {}, "dm_lag_rule": DM_LAG_RULE}
    tests["dm_lags"] = {"all": dm_lag_summary(tests["dm"])}
    tests["ttest"] = {}
    for a, b in anchor_pairs:
        res = paired_t_test(losses[a].to_numpy(), losses[b].to_numpy())
        tests["ttest"].setdefault(a, {})[b] = {"stat": res.statistic, "pvalue": res.pvalue, "mean_loss_diff": res.mean_difference, "n": res.n}
    tests["mz"] = mz_tests(p, models, horizon)
    tests["ks"] = ks_tests(p, models, horizon)
    tests["ks_null"] = f"h y^2 / f^2 ~ chi2({horizon}) on non-overlapping targets (Gaussian daily returns with the forecast variance)"
    log_mse = row_log_mse(p, models)
    scopes = {"all": np.ones(len(p), bool)}
    cls = p["asset_class"].to_numpy()
    scopes.update({c: cls == c for c in ASSET_CLASSES if (cls == c).any()})
    scopes.update(window_masks)
    tests["mcs"], tests["mcs_log_mse"] = {}, {}
    for scope, mask in scopes.items():
        d = daily_losses(p, losses, mask)
        if len(d) < MIN_SLICE_DATES:
            tests["skipped"][scope] = f"{len(d)} forecast dates < {MIN_SLICE_DATES}"
            continue
        tests["mcs"][scope] = mcs_members(d, horizon, mcs_size, mcs_reps, seed)
        tests["mcs_log_mse"][scope] = mcs_members(daily_losses(p, log_mse, mask), horizon, mcs_size, mcs_reps, seed)
        if scope in window_masks:
            tests["dm_windows"][scope] = dm_tests(d, horizon, anchor_pairs)
            tests["dm_lags"][scope] = dm_lag_summary(tests["dm_windows"][scope])
    return {"windows": windows_out, "windows_by_class": windows_cls, "regimes": regimes_out,
            "regimes_by_class": regimes_cls, "tests": tests}
