"""Portfolio risk from per-asset volatility forecasts, and VaR backtests.

Aggregation:
- ``paper``: R_total = sqrt(sum_i w_i² R_i²), the paper's formula. It assumes zero correlation
  and understates the risk of any portfolio of co-moving assets; kept for comparison.
- ``correlated`` (default): sqrt(wᵀ D C D w) with D = diag(forecast vols) and C a correlation
  estimated from trailing returns only, pairwise on the days both assets traded.

Tail risk at every test date: 1-day and h-day VaR and ES at 95% and 99% under a normal, a
Student-t and filtered historical simulation (FHS), each scaled by a model's covariance vol.
The vol is the run's forecast: the mean daily variance over t+1..t+h. The 1-day VaR uses it for
day t+1, which assumes a flat variance term structure over the h days (exact at --horizon 1;
``var_basis`` says which); the h-day VaR scales it by sqrt(h) (uncorrelated daily returns).

Calendars: each asset trades on its own calendar (Brent on UK days, FX and yields on Fed days,
equities on NYSE days). A backtest trial is an origin on which the held assets that traded carry
at least half the weight (``MAX_MISSING_WEIGHT``); one that did not trade that day (a halt) is
left out of that day's portfolio. Each asset's next-day (and h-day) return is its own next
trading day's (days), so a holiday on which only Brent or FX traded is neither a trial nor a
zero return of the others.

Backtests: Kupiec's proportion-of-failures, Christoffersen's independence and their sum, the
conditional-coverage test, hand-written because `arch` 8.0 (the release on PyPI) does not ship
them; each is a likelihood ratio of a few lines (formulas in ``var_backtest``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import optimize, stats

from nimbleml.errors import NimbleError
from nimbleml.risk.evaluate import score_forecasts

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
    """Exceedances of a VaR series and the classic likelihood-ratio tests (p-values)."""

    level: float  # VaR tail probability, e.g. 0.01
    n: int
    exceedances: int
    expected: float  # n * level
    rate: float
    kupiec_lr: float
    kupiec_pvalue: float
    christoffersen_lr: float
    christoffersen_pvalue: float
    cc_lr: float
    cc_pvalue: float

    def to_dict(self) -> dict:
        return asdict(self)


def _xlogy(x: float, y: float) -> float:
    return 0.0 if x == 0 else x * np.log(y)


def var_backtest(hits: np.ndarray, level: float) -> VaRBacktest:
    """Kupiec POF, Christoffersen independence and conditional coverage for a 0/1 exceedance series.

    With n days, x exceedances, p = level and p^ = x/n (Kupiec 1995; Jorion, *Value at Risk*, ch. 6):
        LR_pof = -2 ln[(1-p)^(n-x) p^x] + 2 ln[(1-p^)^(n-x) p^^x]            ~ chi2(1)
    With n_ij the count of day pairs in state i then j and pi_ij = n_ij / (n_i0 + n_i1),
    pi = (n01 + n11) / (n00 + n01 + n10 + n11) (Christoffersen 1998, eq. 6-9):
        LR_ind = -2 ln[(1-pi)^(n00+n10) pi^(n01+n11)]
                 + 2 ln[(1-pi01)^n00 pi01^n01 (1-pi11)^n10 pi11^n11]           ~ chi2(1)
        LR_cc = LR_pof + LR_ind                                                ~ chi2(2)
    """
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
    lr_cc = lr_pof + lr_ind
    return VaRBacktest(
        level=level,
        n=n,
        exceedances=x,
        expected=n * level,
        rate=phat,
        kupiec_lr=float(lr_pof),
        kupiec_pvalue=float(stats.chi2.sf(lr_pof, 1)),
        christoffersen_lr=float(lr_ind),
        christoffersen_pvalue=float(stats.chi2.sf(lr_ind, 1)),
        cc_lr=float(lr_cc),
        cc_pvalue=float(stats.chi2.sf(lr_cc, 2)),
    )


# ----------------------------------------------------------------------------- weights

WEIGHT_TOLERANCE = 1e-6  # |sum of weights - 1| allowed in a weights file


def load_weights(path: str | Path, assets: list[str]) -> pd.Series:
    """Portfolio weights from a CSV with columns ``asset,weight``; validated against the run's assets.

    Unknown tickers, duplicates, non-numbers and weights that do not sum to 1 are one clear error each.
    """
    path = Path(path)
    try:
        frame = pd.read_csv(path)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise NimbleError(f"cannot read the weights file ({exc.__class__.__name__})", path=path,
                          fix="write a CSV with a header line 'asset,weight'") from exc
    if list(frame.columns) != ["asset", "weight"]:
        raise NimbleError(f"weights file columns are {list(frame.columns)}", path=path, fix="write the header 'asset,weight'")
    weight = pd.to_numeric(frame["weight"], errors="coerce")
    if weight.isna().any():
        bad = frame.loc[weight.isna(), "asset"].tolist()[:5]
        raise NimbleError(f"weights that are not numbers for {bad}", path=path, fix="write one number per asset")
    names = frame["asset"].astype(str).str.strip()
    if names.duplicated().any():
        raise NimbleError(f"assets listed twice: {sorted(set(names[names.duplicated()]))[:5]}", path=path, fix="list each asset once")
    unknown = sorted(set(names) - set(assets))
    if unknown:
        raise NimbleError(f"{len(unknown)} unknown ticker(s) {unknown[:5]}", path=path,
                          fix=f"use tickers of the loaded data (e.g. {', '.join(sorted(assets)[:3])})")
    total = float(weight.sum())
    if abs(total - 1.0) > WEIGHT_TOLERANCE:
        raise NimbleError(f"weights sum to {total:.6f}, not 1", path=path, fix="rescale the weights so they sum to 1")
    return pd.Series(weight.to_numpy(float), index=names.to_numpy(), name="weight")


# ----------------------------------------------------------------------------- tail-risk shapes

VAR_METHODS: tuple[str, ...] = ("normal", "t", "fhs")
VAR_LEVELS: tuple[float, ...] = (0.05, 0.01)  # tail probabilities: 95% and 99% VaR
EWMA_LAMBDA = 0.94  # RiskMetrics decay of the filter that standardises past portfolio returns
FHS_SIMULATIONS = 4000  # h-day paths drawn per origin for the t and FHS h-day quantiles
MAX_MISSING_WEIGHT = 0.5  # an origin where held assets of more weight did not trade is a holiday: no trial


def standardised_residuals(history: np.ndarray, lam: float = EWMA_LAMBDA) -> np.ndarray:
    """r_s / sigma_{s|s-1} with an EWMA variance filter run over ``history`` (oldest first); causal."""
    var = np.empty(len(history))
    var[0] = np.mean(history[: min(20, len(history))] ** 2) or 1e-12
    for s in range(1, len(history)):
        var[s] = lam * var[s - 1] + (1 - lam) * history[s - 1] ** 2
    return history / np.sqrt(np.maximum(var, 1e-18))


def fit_student_nu(z: np.ndarray, bounds: tuple[float, float] = (2.1, 200.0)) -> float:
    """Maximum-likelihood degrees of freedom of a unit-variance Student t for standardised data z.

    One-dimensional (the scale is pinned by unit variance: sqrt((nu-2)/nu)), so a bounded scalar
    search replaces scipy's generic 3-parameter ``t.fit``, which cost ~1 s per call here.
    """
    def nll(nu: float) -> float:
        scale = np.sqrt((nu - 2.0) / nu)
        return -float(np.sum(stats.t.logpdf(z, nu, scale=scale)))

    res = optimize.minimize_scalar(nll, bounds=bounds, method="bounded", options={"xatol": 1e-3})
    return float(res.x)


def tail_multipliers(z: np.ndarray, horizon: int, rng: np.random.Generator) -> dict:
    """{(method, level, days): (VaR multiplier, ES multiplier)} of a unit daily vol, days in {1, h}.

    normal: z_a and phi(z_a)/a, h-day scaled by sqrt(h). t: a Student t fitted by maximum
    likelihood to the standardised residuals z (``fit_student_nu``), with unit variance; its
    1-day ES is the closed form scale * f(t_a)/a * (nu + t_a^2)/(nu - 1). FHS: empirical
    quantile and tail mean of z (rescaled to unit variance). h-day t and FHS: quantile and tail
    mean of sums of h independent draws (``FHS_SIMULATIONS`` paths) from the same distribution.
    """
    z = z[np.isfinite(z)]
    z = z / z.std()
    nu = fit_student_nu(z)
    unit = np.sqrt(nu / (nu - 2.0))  # sd of a t(nu) with scale 1
    out = {}
    for a in VAR_LEVELS:
        q = stats.norm.ppf(a)
        out[("normal", a, 1)] = (-q, stats.norm.pdf(q) / a)
        out[("normal", a, horizon)] = (-q * np.sqrt(horizon), stats.norm.pdf(q) / a * np.sqrt(horizon))
        ta = stats.t.ppf(a, nu)
        out[("t", a, 1)] = (-ta / unit, stats.t.pdf(ta, nu) / a * (nu + ta**2) / (nu - 1) / unit)
        zq = np.quantile(z, a)
        out[("fhs", a, 1)] = (-zq, -z[z <= zq].mean())
    if horizon > 1:
        t_paths = (stats.t.rvs(nu, size=(FHS_SIMULATIONS, horizon), random_state=rng) / unit).sum(axis=1)
        fhs_paths = rng.choice(z, size=(FHS_SIMULATIONS, horizon)).sum(axis=1)
        for method, paths in (("t", t_paths), ("fhs", fhs_paths)):
            for a in VAR_LEVELS:
                q = np.quantile(paths, a)
                out[(method, a, horizon)] = (-q, -paths[paths <= q].mean())
    return out


# ----------------------------------------------------------------------------- portfolio paths


@dataclass
class PortfolioPath:
    """One model's portfolio risk at every test date (daily vols are daily fractions)."""

    dates: np.ndarray  # (m,) forecast origins t: dates on which every held asset traded
    paper_vol: np.ndarray  # (m,) sqrt(sum w^2 sigma^2): the paper's formula, ignores correlation
    cov_vol: np.ndarray  # (m,) sqrt(w' D C D w) with a trailing pairwise correlation C
    ret_1d: np.ndarray  # (m,) portfolio return over each asset's next trading day after t
    ret_h: np.ndarray  # (m,) the same over each asset's next h trading days (NaN where the data end first)
    multipliers: list[dict]  # per origin: tail_multipliers of the portfolio's past standardised returns
    skipped_partial_days: int = 0  # origins left out because a held asset did not trade that day

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame({"date": self.dates, "paper_vol": self.paper_vol, "cov_vol": self.cov_vol,
                             "ret_1d": self.ret_1d, "ret_h": self.ret_h})


def portfolio_paths(
    predictions: pd.DataFrame,
    returns: list[pd.Series],
    models: list[str],
    horizon: int,
    weights: pd.Series | None = None,
    lookback: int = 250,
    history: int = 500,
    refresh_every: int = 5,
    seed: int = 0,
) -> dict[str, PortfolioPath]:
    """Each model's portfolio vol (both formulas), next-day and h-day returns, tail shapes, per test date.

    At each date the portfolio holds the assets every model has a forecast for (of the weights
    file's assets when given, renormalised over those held; else equal weights). The
    correlation (``lookback`` trading days, pairwise on observed days) and the tail shape
    (``history`` days of past portfolio returns at today's weights, EWMA-standardised) use
    data dated <= t only and are re-estimated every ``refresh_every`` dates (cost).
    """
    assets = sorted(predictions["asset"].unique())
    if weights is not None:
        assets = [a for a in assets if a in weights.index]
    wide = {m: predictions.pivot_table(index="date", columns="asset", values=m).reindex(columns=assets).ffill(limit=5) for m in models}
    by_name = {r.name: r for r in returns}
    rets = pd.concat({a: by_name[a] for a in assets}, axis=1, sort=True)
    ret_values, ret_dates = rets.to_numpy(), rets.index.to_numpy()
    own = [(by_name[a].dropna().index.to_numpy(), by_name[a].dropna().to_numpy()) for a in assets]  # each asset's calendar
    traded = rets.reindex(wide[models[0]].index).notna().to_numpy()  # asset traded on the origin date
    available = np.logical_and.reduce([w.notna().to_numpy() for w in wide.values()])
    dates = wide[models[0]].index
    rng = np.random.default_rng(seed)
    cols = ("dates", "paper_vol", "cov_vol", "ret_1d", "ret_h", "multipliers")
    out = {m: {k: [] for k in cols} for m in models}
    corr, shape, held_then, since, skipped = None, None, None, refresh_every, 0
    for i in np.flatnonzero(available.sum(axis=1) >= 2):
        t, held = dates[i], available[i]
        missing = held & ~traded[i]
        if missing.any():
            if _weights(held, assets, weights)[missing[held]].sum() > MAX_MISSING_WEIGHT or (held & traded[i]).sum() < 2:
                skipped += 1  # a holiday of most of the book: not a trial of the whole portfolio
                continue
            held = held & traded[i]  # one asset's missing day (a halt, a dropped row): the rest is the trial
        pos = int(np.searchsorted(ret_dates, np.datetime64(t), side="right"))  # returns dated <= t: [:pos]
        nexts = [own[k][1][np.searchsorted(own[k][0], np.datetime64(t), side="right"):][:horizon] for k in np.flatnonzero(held)]
        if min(len(x) for x in nexts) < 1 or pos < 30:
            continue
        full_h = min(len(x) for x in nexts) == horizon
        future = np.column_stack([x[:1] for x in nexts])  # (1, held): each asset's next own trading day
        w = _weights(held, assets, weights)
        if since >= refresh_every or held_then is None or not np.array_equal(held, held_then):
            past = ret_values[max(0, pos - history) : pos][:, held]
            corr = pairwise_correlation(past[-lookback:])
            open_days = (np.isfinite(past) * w).sum(axis=1) >= 1.0 - MAX_MISSING_WEIGHT  # as the trials: most of the book traded
            hist = np.nan_to_num(past[open_days]) @ w
            shape = tail_multipliers(standardised_residuals(hist)[20:], horizon, rng)
            held_then, since = held, 0
        since += 1
        port_1d = float(future[0] @ w)
        port_h = float(sum(wk * x.sum() for wk, x in zip(w, nexts))) if full_h else np.nan
        for m in models:
            vols = wide[m].iloc[i].to_numpy()[held]
            o = out[m]
            o["dates"].append(t)
            o["paper_vol"].append(portfolio_vol(w, vols))
            o["cov_vol"].append(portfolio_vol(w, vols, corr))
            o["ret_1d"].append(port_1d)
            o["ret_h"].append(port_h)
            o["multipliers"].append(shape)
    return {m: PortfolioPath(**{k: (v if k == "multipliers" else np.asarray(v)) for k, v in o.items()}, skipped_partial_days=skipped)
            for m, o in out.items()}


def _weights(held: np.ndarray, assets: list[str], weights: pd.Series | None) -> np.ndarray:
    """(held.sum(),) the weights of the held assets, renormalised to sum to 1 (equal when no file)."""
    if weights is None:
        return np.full(int(held.sum()), 1.0 / held.sum())
    w = weights.reindex(np.asarray(assets)[held]).to_numpy(float)
    return w / w.sum()


def _level_key(level: float) -> str:
    return f"{round(100 * (1 - level))}"  # 0.01 -> "99"


def tail_risk_summary(path: PortfolioPath, horizon: int) -> dict:
    """paper_vol, cov_vol, understatement, var.<method>.<level>, es.<method>.<level> for one model.

    1-day VaR/ES are backtested on every date against the next day's return; h-day ones on
    non-overlapping origins (every h-th date) against the h-day return, so the trials the
    backtests assume independent are not overlapping. Vols forecast the mean daily variance over
    t+1..t+h; the 1-day VaR uses that daily vol for day t+1.
    """
    if len(path.dates) == 0:
        return {"skipped": "no test date with two or more assets"}
    ratio = path.paper_vol / path.cov_vol
    out = {
        "n_dates": int(len(path.dates)),
        "paper_vol": float(np.mean(path.paper_vol)),
        "cov_vol": float(np.mean(path.cov_vol)),
        "understatement": float(1.0 - np.mean(ratio)),  # share of the covariance vol the paper's formula misses
        "realised_vol_1d": float(np.sqrt(np.mean(path.ret_1d**2))),
        "vol_scores_1d": {k: score_forecasts(np.abs(path.ret_1d), path.cov_vol).to_dict()[k] for k in ("qlike", "rmse")},
        "var": {},
        "es": {},
        "var_basis": {
            "one_day": ("the 1-day forecast" if horizon == 1 else
                      f"the {horizon}-day mean daily variance forecast used for day t+1: assumes a flat variance over t+1..t+{horizon}"),
            "h_day": f"sqrt({horizon}) x the daily vol of the {horizon}-day mean variance forecast (uncorrelated daily returns)",
            "calendar": ("trials are origins on which held assets of at least half the weight traded (the others are left out "
                         "that day); each asset's return is its own next trading day's"),
        },
        "skipped_partial_days": int(path.skipped_partial_days),
    }
    origins = np.flatnonzero(np.isfinite(path.ret_h))[::horizon]
    for method in VAR_METHODS:
        for level in VAR_LEVELS:
            key = _level_key(level)
            m1 = np.array([mult[(method, level, 1)] for mult in path.multipliers])
            var1, es1 = m1[:, 0] * path.cov_vol, m1[:, 1] * path.cov_vol
            hits1 = -path.ret_1d > var1
            entry = var_backtest(hits1, level).to_dict()
            mh = np.array([path.multipliers[i][(method, level, horizon)] for i in origins])
            varh, esh = mh[:, 0] * path.cov_vol[origins], mh[:, 1] * path.cov_vol[origins]
            hitsh = -path.ret_h[origins] > varh
            entry["h_day"] = var_backtest(hitsh, level).to_dict() if len(origins) else {}
            entry["mean_var"] = float(var1.mean())
            out["var"].setdefault(method, {})[key] = entry
            out["es"].setdefault(method, {})[key] = {
                "mean_es": float(es1.mean()),
                "mean_loss_beyond_var": float(-path.ret_1d[hits1].mean()) if hits1.any() else None,
                "mean_es_on_exceedances": float(es1[hits1].mean()) if hits1.any() else None,
                "h_day": {"mean_es": float(esh.mean()) if len(origins) else None,
                          "mean_loss_beyond_var": float(-path.ret_h[origins][hitsh].mean()) if hitsh.any() else None},
            }
    # the paper's formula used for a VaR: the exceedances it would have produced (normal, 99%)
    z99 = stats.norm.ppf(1 - 0.01)
    out["paper_formula_var99_normal"] = var_backtest(-path.ret_1d > z99 * path.paper_vol, 0.01).to_dict()
    return out
