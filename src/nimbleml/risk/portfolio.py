"""Portfolio risk from per-asset volatility forecasts, and VaR backtests.

Aggregation:
- ``paper``: R_total = sqrt(sum_i w_i² R_i²), the paper's formula. It assumes zero correlation
  and understates the risk of any portfolio of co-moving assets; kept for comparison.
- ``correlated`` (default): sqrt(wᵀ D C D w) with D = diag(forecast vols) and C a correlation
  estimated from trailing returns only, pairwise on the days both assets traded.

Backtests: Kupiec's proportion-of-failures and Christoffersen's independence tests, hand-written
because `arch` 8.0 (the release on PyPI) does not ship them; both are a few lines of likelihood ratios.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
from scipy import stats

from nimbleml.errors import NimbleError

AGGREGATIONS: tuple[str, ...] = ("paper", "correlated")


def portfolio_vol(weights: np.ndarray, vols: np.ndarray, corr: np.ndarray | None = None) -> float:
    """Portfolio vol (same units as ``vols``); ``corr=None`` is the paper's zero-correlation formula."""
    wv = np.asarray(weights, float) * np.asarray(vols, float)
    if corr is None:
        return float(np.sqrt(np.sum(wv**2)))
    return float(np.sqrt(max(wv @ corr @ wv, 0.0)))


def pairwise_correlation(returns: np.ndarray, min_overlap: int = 30) -> np.ndarray:
    """(n_assets, n_assets) correlation of (n_days, n_assets) returns with NaN for unobserved days.

    Each pair uses only the days both assets traded (pairwise-complete Pearson, the same
    numbers as ``pandas.DataFrame.corr``), so days before a listing or a market holiday never
    enter as zero returns; pairs with fewer than ``min_overlap`` common days are set to 0.
    The matrix is then made positive semi-definite by clipping negative eigenvalues
    (Higham-style projection, one step) and rescaling to a unit diagonal.
    """
    if returns.shape[0] < 2:
        raise NimbleError("need at least 2 days of returns to estimate a correlation", fix="use a longer lookback")
    observed = np.isfinite(returns).astype(float)
    x = np.where(observed > 0, returns, 0.0)
    n = observed.T @ observed  # (a, a) common days
    s = x.T @ observed  # s[i, j] = sum of x_i over days j also traded
    q = (x**2).T @ observed
    cross = x.T @ x
    with np.errstate(invalid="ignore", divide="ignore"):
        cov = n * cross - s * s.T
        var_i, var_j = n * q - s**2, (n * q - s**2).T
        corr = cov / np.sqrt(var_i * var_j)
    corr = np.where((n >= min_overlap) & np.isfinite(corr), corr, 0.0)
    np.fill_diagonal(corr, 1.0)
    values, vectors = np.linalg.eigh((corr + corr.T) / 2)
    if values.min() < 0:
        corr = (vectors * np.clip(values, 1e-10, None)) @ vectors.T
        d = np.sqrt(np.diag(corr))
        corr = corr / np.outer(d, d)
    return corr


@dataclass
class VaRBacktest:
    """Exceedances of a VaR series and the two classic likelihood-ratio tests (p-values)."""

    level: float  # VaR tail probability, e.g. 0.01
    n: int
    exceedances: int
    rate: float
    kupiec_lr: float
    kupiec_p: float
    christoffersen_lr: float
    christoffersen_p: float

    def to_dict(self) -> dict:
        return asdict(self)


def _xlogy(x: float, y: float) -> float:
    return 0.0 if x == 0 else x * np.log(y)


def var_backtest(hits: np.ndarray, level: float) -> VaRBacktest:
    """Kupiec POF and Christoffersen independence tests for a 0/1 exceedance series."""
    hits = np.asarray(hits, bool)
    n, x = len(hits), int(hits.sum())
    if n == 0:
        raise NimbleError("no VaR observations to backtest", fix="evaluate on a longer test period")
    phat = x / n
    lr_pof = -2.0 * (_xlogy(n - x, 1 - level) + _xlogy(x, level) - _xlogy(n - x, 1 - phat) - _xlogy(x, phat))
    prev, cur = hits[:-1], hits[1:]
    n00, n01 = int(np.sum(~prev & ~cur)), int(np.sum(~prev & cur))
    n10, n11 = int(np.sum(prev & ~cur)), int(np.sum(prev & cur))
    p01 = n01 / max(n00 + n01, 1)
    p11 = n11 / max(n10 + n11, 1)
    p = (n01 + n11) / max(n00 + n01 + n10 + n11, 1)
    lr_ind = -2.0 * (
        _xlogy(n00 + n10, 1 - p) + _xlogy(n01 + n11, p)
        - _xlogy(n00, 1 - p01) - _xlogy(n01, p01) - _xlogy(n10, 1 - p11) - _xlogy(n11, p11)
    )
    return VaRBacktest(
        level=level,
        n=n,
        exceedances=x,
        rate=phat,
        kupiec_lr=float(lr_pof),
        kupiec_p=float(stats.chi2.sf(lr_pof, 1)),
        christoffersen_lr=float(lr_ind),
        christoffersen_p=float(stats.chi2.sf(lr_ind, 1)),
    )


@dataclass
class PortfolioForecast:
    """Equal-weight portfolio risk per forecast origin for one model, h-day horizon."""

    dates: np.ndarray  # (m,) non-overlapping forecast origins
    forecast_vol: np.ndarray  # (m,) daily vol forecast of the portfolio over t+1..t+h
    realised_vol: np.ndarray  # (m,) sqrt(mean squared portfolio return) over t+1..t+h
    var: np.ndarray  # (m,) h-day VaR as a positive loss fraction
    es: np.ndarray  # (m,) h-day expected shortfall
    hday_return: np.ndarray  # (m,) realised h-day portfolio return


def equal_weight_portfolio(
    predictions: pd.DataFrame,
    returns: list[pd.Series],
    models: list[str],
    horizon: int,
    aggregation: str = "correlated",
    level: float = 0.01,
    lookback: int = 250,
) -> dict[str, PortfolioForecast]:
    """Aggregate each model's per-asset forecasts into an equal-weight portfolio's h-day vol, VaR and ES.

    predictions : rows (date, asset, <model>...) from a risk run; returns : per-asset daily returns.
    Origins are taken every h trading days so the h-day outcomes do not overlap (the backtests
    assume independent trials); at each the portfolio is equal-weighted over the assets that
    every model has a forecast for. Correlations use the ``lookback`` days up to each origin only,
    and are shared by all models so they differ only in their volatility forecasts.
    """
    if aggregation not in AGGREGATIONS:
        raise NimbleError(f"unknown aggregation {aggregation!r}", fix=f"use one of {', '.join(AGGREGATIONS)}")
    assets = sorted(predictions["asset"].unique())
    # an asset's market may be closed on a date the others trade: carry its last forecast a few days
    wide = {m: predictions.pivot_table(index="date", columns="asset", values=m).reindex(columns=assets).ffill(limit=5) for m in models}
    by_name = {r.name: r for r in returns}
    rets = pd.concat({a: by_name[a] for a in assets}, axis=1, sort=True)
    # the portfolio at each origin holds the assets every model has a forecast for (equal weights
    # over those): requiring all assets at once would keep only the few dates on which none of
    # 447 series has a gap or is not listed yet
    available = np.logical_and.reduce([w.notna().to_numpy() for w in wide.values()])  # (dates, assets)
    dates = wide[models[0]].index
    origins = np.flatnonzero(available.sum(axis=1) >= 2)[::horizon]
    z = stats.norm.ppf(1 - level)
    keys = ("dates", "forecast_vol", "realised_vol", "var", "es", "hday_return")
    out = {m: {k: [] for k in keys} for m in models}
    for i in origins:
        t, held = dates[i], available[i]
        past = rets.loc[:t].iloc[-lookback:].to_numpy()[:, held]
        future = rets.loc[t:].iloc[1 : horizon + 1].to_numpy()[:, held]
        if len(future) < horizon or len(past) < 30:
            continue
        future = np.nan_to_num(future)  # a closed market: no move that day in the P&L
        weights = np.full(int(held.sum()), 1.0 / held.sum())
        # correlations from observed days only (pairwise): a late listing's missing days are not zeros
        corr = pairwise_correlation(past) if aggregation == "correlated" else None
        port = future @ weights
        for m in models:
            vol = portfolio_vol(weights, wide[m].iloc[i].to_numpy()[held], corr)
            o = out[m]
            o["dates"].append(t)
            o["forecast_vol"].append(vol)
            o["realised_vol"].append(float(np.sqrt(np.mean(port**2))))
            o["var"].append(z * vol * np.sqrt(horizon))
            o["es"].append(vol * np.sqrt(horizon) * stats.norm.pdf(z) / level)
            o["hday_return"].append(float(port.sum()))
    return {m: PortfolioForecast(**{k: np.asarray(v) for k, v in o.items()}) for m, o in out.items()}


def portfolio_summary(forecasts: dict[str, PortfolioForecast], level: float) -> dict:
    """Per model: portfolio vol QLIKE and RMSE against realised, VaR exceedances and backtests."""
    from nimbleml.risk.evaluate import score_forecasts

    summary = {}
    for m, f in forecasts.items():
        if len(f.dates) == 0:
            continue
        s = score_forecasts(f.realised_vol, f.forecast_vol)
        bt = var_backtest(-f.hday_return > f.var, level)
        summary[m] = {"n_origins": int(len(f.dates)), "qlike": s.qlike, "rmse": s.rmse, "var_backtest": bt.to_dict()}
    return summary
