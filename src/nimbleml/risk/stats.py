"""Forecast-comparison statistics: losses, paired t, Diebold-Mariano (HLN), Mincer-Zarnowitz, KS.

Losses are elementwise and unit-agnostic; the tests take losses or errors as 1-d arrays in time
order. For a panel, pass one series per date (e.g. the cross-sectional mean loss of each date),
otherwise the HAC variance of the Diebold-Mariano test mixes assets and dates.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import numpy as np
import statsmodels.api as sm
from arch.covariance.kernel import Bartlett
from scipy import stats as sps

from nimbleml.errors import NimbleError

log = logging.getLogger(__name__)


def qlike(y_var: np.ndarray, f_var: np.ndarray) -> np.ndarray:
    """QLIKE loss y/f - log(y/f) - 1 (Patton 2011), elementwise; 0 at f = y.

    y_var : realised variance proxy, > 0 (a zero proxy gives +inf).
    f_var : forecast variance, > 0. Same units as ``y_var`` (e.g. daily variance).
    """
    ratio = np.asarray(y_var, dtype=float) / np.asarray(f_var, dtype=float)
    return ratio - np.log(ratio) - 1.0


def squared_error(y: np.ndarray, f: np.ndarray) -> np.ndarray:
    """(y - f)^2 elementwise, in the squared units of the inputs."""
    return (np.asarray(y, dtype=float) - np.asarray(f, dtype=float)) ** 2


@dataclass
class _Result:
    def to_dict(self) -> dict:
        """Plain floats and ints, ready for JSON."""
        return asdict(self)


@dataclass
class PairedTTest(_Result):
    """Paired t-test of mean(loss_a - loss_b) = 0; ignores autocorrelation (kept from the paper)."""

    statistic: float
    pvalue: float  # two-sided
    mean_difference: float  # mean(loss_a - loss_b); < 0 means a is better
    n: int


@dataclass
class DieboldMariano(_Result):
    """Diebold-Mariano test of equal expected loss, with the HLN small-sample correction."""

    statistic: float  # HLN-corrected when hln=True; compare with Student t(n-1)
    pvalue: float  # two-sided
    mean_difference: float  # mean(loss_a - loss_b); < 0 means a is better
    n: int
    horizon: int
    hln: bool
    variance: str  # "newey-west" (Bartlett weights), "acf" (rectangular, h-1 lags) or "bartlett" (acf fallback)
    lags: int  # HAC lags used in the long-run variance
    lag_rule: str  # how ``lags`` was set: "newey-west-1994" (automatic, >= h-1), "given" or "h-1"


@dataclass
class MincerZarnowitz(_Result):
    """realised = alpha + beta * forecast + e, HAC standard errors; H0: alpha = 0, beta = 1."""

    covariance: str  # "newey-west" (one series), "driscoll-kraay" (panel, time groups) or "hac-panel" (by asset)

    alpha: float
    beta: float
    alpha_se: float
    beta_se: float
    wald_statistic: float  # chi2 with 2 degrees of freedom
    wald_pvalue: float
    r2: float
    n: int
    hac_lags: int


@dataclass
class KSTest(_Result):
    """Two-sample Kolmogorov-Smirnov test that two error samples share one distribution."""

    statistic: float
    pvalue: float
    n_a: int
    n_b: int


def _pair(a: np.ndarray, b: np.ndarray, what: str, min_n: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Validate two equal-length finite 1-d arrays."""
    a = np.asarray(a, dtype=float).ravel()
    b = np.asarray(b, dtype=float).ravel()
    if a.shape != b.shape:
        raise NimbleError(f"{what}: lengths differ ({a.size} vs {b.size})", fix="pass losses of the same rows")
    if a.size < min_n:
        raise NimbleError(f"{what}: {a.size} values, need at least {min_n}", fix="use a longer test period")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise NimbleError(f"{what}: non-finite values", fix="drop rows with NaN/inf losses (e.g. a zero variance proxy)")
    return a, b


def paired_t_test(loss_a: np.ndarray, loss_b: np.ndarray) -> PairedTTest:
    """Paired t-test on per-row losses (the paper's test)."""
    a, b = _pair(loss_a, loss_b, "paired t-test")
    res = sps.ttest_rel(a, b)
    return PairedTTest(float(res.statistic), float(res.pvalue), float(np.mean(a - b)), int(a.size))


def newey_west_lags(n: int, horizon: int = 1) -> int:
    """A fixed rule of n, not data-driven: max(h - 1, floor(4 (n/100)^(2/9))).

    The second term is the pilot bandwidth of Newey and West (1994); h-step forecast errors are
    MA(h-1) under the null, so fewer than h-1 lags is never enough. Used where one lag must serve
    a panel (Mincer-Zarnowitz); the Diebold-Mariano test selects its lag from the data.
    """
    return int(max(horizon - 1, int(np.floor(4.0 * (n / 100.0) ** (2.0 / 9.0)))))


def automatic_lags(x: np.ndarray, horizon: int = 1) -> int:
    """Data-driven HAC lag: max(h - 1, the automatic Bartlett bandwidth of Newey and West 1994).

    The bandwidth is the one of ``arch.covariance.kernel.Bartlett`` (rounded to an integer): it
    grows with the autocorrelation of ``x``, not only with its length.
    """
    x = np.asarray(x, dtype=float)
    if not np.var(x) > 0:
        return int(min(horizon - 1, len(x) - 1))  # a constant series: no autocorrelation to estimate
    return int(min(max(horizon - 1, int(Bartlett(x, force_int=True).bandwidth)), len(x) - 1))


def diebold_mariano(
    loss_a: np.ndarray, loss_b: np.ndarray, horizon: int, hln: bool = True, lags: int | None = None, variance: str = "newey-west"
) -> DieboldMariano:
    """Diebold-Mariano (1995) test with the Harvey-Leybourne-Newbold (1997) correction.

    d = loss_a - loss_b in time order. ``variance="newey-west"`` (default): long-run variance
    with Bartlett weights over ``lags`` lags (None: ``automatic_lags(d, h)``, the data-driven
    bandwidth of Newey and West 1994, at least h-1), always positive.
    ``variance="acf"``: the original rectangular window over lags 0..h-1 (d is MA(h-1) under H0),
    falling back to Bartlett weights if that estimate is not positive; this is what the
    ``dieboldmariano`` package computes (checked in the tests). HLN scales the statistic by
    sqrt((n + 1 - 2h + h(h-1)/n) / n) and uses Student t(n-1). Written in numpy because that
    package loops in Python and raises where we fall back. The lag used is in ``lags``.
    """
    a, b = _pair(loss_a, loss_b, "Diebold-Mariano", min_n=3)
    n = a.size
    if not 1 <= horizon < n:
        raise NimbleError(f"Diebold-Mariano: horizon {horizon} not in [1, {n})", fix="pass the forecast horizon in days")
    if variance not in ("newey-west", "acf"):
        raise NimbleError(f"Diebold-Mariano: unknown variance {variance!r}", fix="use newey-west or acf")
    d = a - b
    dbar = float(d.mean())
    c = d - dbar
    if variance != "newey-west":
        n_lags, rule = horizon - 1, "h-1"
    elif lags is None:
        n_lags, rule = automatic_lags(d, horizon), "newey-west-1994"
    else:
        n_lags, rule = int(lags), "given"
    n_lags = min(n_lags, n - 1)
    gamma = np.array([c[k:] @ c[: n - k] / n for k in range(n_lags + 1)])
    if not gamma[0] > 0:
        raise NimbleError("Diebold-Mariano: the loss differential has zero variance", fix="the two forecasts are identical; drop the comparison")
    bartlett = 1.0 - np.arange(1, n_lags + 1) / (n_lags + 1)
    if variance == "newey-west":
        lrv = gamma[0] + 2.0 * (bartlett * gamma[1:]).sum()
    else:
        lrv = gamma[0] + 2.0 * gamma[1:].sum()
        if lrv <= 0:
            lrv = gamma[0] + 2.0 * ((1.0 - np.arange(1, horizon) / horizon) * gamma[1:]).sum()
            variance = "bartlett"
            log.info("Diebold-Mariano: acf long-run variance <= 0, used Bartlett weights")
    stat = dbar / np.sqrt(lrv / n)
    if hln:
        stat *= np.sqrt((n + 1 - 2 * horizon + horizon * (horizon - 1) / n) / n)
        pvalue = 2.0 * sps.t.sf(abs(stat), df=n - 1)
    else:
        pvalue = 2.0 * sps.norm.sf(abs(stat))
    return DieboldMariano(float(stat), float(pvalue), dbar, int(n), int(horizon), hln, variance, int(n_lags), rule)


def mincer_zarnowitz(realised: np.ndarray, forecast: np.ndarray, hac_lags: int, groups: np.ndarray | None = None,
                     time: np.ndarray | None = None) -> MincerZarnowitz:
    """Mincer-Zarnowitz regression with Newey-West (HAC) covariance and the joint Wald test.

    Use ``hac_lags = h - 1`` or more for overlapping h-day targets. Units: whatever the two
    inputs share (volatility or variance). A panel, one of:
    ``time`` (one integer period id per row, rows sorted by time): Driscoll-Kraay errors
    (statsmodels ``hac-groupsum``): scores summed over each date, then Newey-West over dates,
    robust to the correlation of all assets on one date (a crash day) as well as over time.
    ``groups`` (one id per row, e.g. the asset; rows sorted by group, then time): Newey-West within
    each group (``hac-panel``); it treats assets as independent, which they are not on one date.
    """
    y, f = _pair(realised, forecast, "Mincer-Zarnowitz", min_n=3)
    if hac_lags < 0:
        raise NimbleError(f"Mincer-Zarnowitz: hac_lags={hac_lags} < 0", fix="pass hac_lags >= 0, e.g. horizon - 1")
    if time is not None:
        time = np.asarray(time)
        if (np.diff(time) < 0).any():
            raise NimbleError("Mincer-Zarnowitz: rows are not sorted by time", fix="sort the panel by date before the test")
        cov_type, cov_kwds, name = "hac-groupsum", {"maxlags": int(hac_lags), "time": time}, "driscoll-kraay"
    elif groups is None:
        cov_type, cov_kwds, name = "HAC", {"maxlags": int(hac_lags)}, "newey-west"
    else:
        cov_type, cov_kwds, name = "hac-panel", {"maxlags": int(hac_lags), "groups": np.asarray(groups)}, "hac-panel"
    res = sm.OLS(y, sm.add_constant(f, has_constant="add")).fit(cov_type=cov_type, cov_kwds=cov_kwds)
    wald = res.wald_test((np.eye(2), np.array([0.0, 1.0])), use_f=False, scalar=True)
    return MincerZarnowitz(
        covariance=name,
        alpha=float(res.params[0]),
        beta=float(res.params[1]),
        alpha_se=float(res.bse[0]),
        beta_se=float(res.bse[1]),
        wald_statistic=float(wald.statistic),
        wald_pvalue=float(wald.pvalue),
        r2=float(res.rsquared),
        n=int(y.size),
        hac_lags=int(hac_lags),
    )


def ks_test(errors_a: np.ndarray, errors_b: np.ndarray) -> KSTest:
    """Two-sample KS test on forecast errors (the paper's distribution check); lengths may differ."""
    a = np.asarray(errors_a, dtype=float).ravel()
    b = np.asarray(errors_b, dtype=float).ravel()
    if a.size == 0 or b.size == 0 or not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise NimbleError("KS test: empty or non-finite errors", fix="pass finite forecast errors")
    res = sps.ks_2samp(a, b)
    return KSTest(float(res.statistic), float(res.pvalue), int(a.size), int(b.size))
