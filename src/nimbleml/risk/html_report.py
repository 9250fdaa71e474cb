"""``report.html``: one self-contained page (figures embedded as base64 PNG) a validator can open offline.

Figures (also written as PNGs beside it): example input images per encoder, forecast vs
realised volatility with the stress windows shaded, error distributions, standardised residuals
h·y²/f² against χ²(h) per asset class (the KS test's sample), the Diebold-Mariano matrix as a heat
map with Holm-adjusted p-values and the lags used, Model Confidence Set membership on QLIKE and on
the squared error of log variance, per-class QLIKE bars, the paper's Figure 4 radar of portfolio
weights and risk, VaR exceedances over time.
The page opens on a summary computed from ``metrics.json`` (``summarise``: the winner overall, per
asset class and per stress window, MCS members, VaR backtest verdicts, the paper formula's
understatement, MCS members on both losses, the VaR basis and equity universe); tables follow with
the best value of each column marked: pooled scores with QLIKE without floored targets, forecasts
floored, DM against the CNN with Holm-adjusted p and lag, the variance floor's rule and count;
stress windows with their DM lag, the indicative marking and effective n, and both MCS; the VaR
basis and calendar. The run config is folded away under the data fingerprint.
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from nimbleml.risk.comparison import standardised_squares  # noqa: E402
from nimbleml.risk.imaging import ENCODERS, get_encoder  # noqa: E402
from nimbleml.risk.samples import ASSET_CLASSES  # noqa: E402

DPI = 100  # PNG resolution; the page shows them at their natural width


def _save(fig, out: Path, name: str) -> str:
    fig.tight_layout()
    fig.savefig(out / name, dpi=DPI)
    plt.close(fig)
    return name


def _overlapping(windows: dict, dates: pd.Index) -> dict:
    """The stress windows that overlap the plotted dates (others would only stretch the axis)."""
    lo, hi = pd.Timestamp(dates.min()), pd.Timestamp(dates.max())
    return {k: (a, b) for k, (a, b) in windows.items() if pd.Timestamp(a) <= hi and pd.Timestamp(b) >= lo}


def fig_encoders(windows: np.ndarray, title: str, out: Path) -> str:
    """The same (features x days) window as each encoder's first channel."""
    fig, axes = plt.subplots(1, len(ENCODERS), figsize=(3.2 * len(ENCODERS), 3.2))
    for ax, name in zip(np.atleast_1d(axes), ENCODERS):
        image = get_encoder(name).encode(windows[None].astype(np.float32))[0, 0]
        ax.imshow(image, cmap="viridis")
        ax.set_title(name)
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    return _save(fig, out, "encoders.png")


def fig_forecasts(p: pd.DataFrame, models: list[str], windows: dict, out: Path) -> str:
    """Cross-sectional mean vol per date: realised against each model, stress windows shaded."""
    daily = p.groupby("date")[["target", *models]].mean()
    fig, ax = plt.subplots(figsize=(11, 4))
    ax.plot(daily.index, daily["target"], color="black", lw=0.8, label="realised")
    for m in models:
        ax.plot(daily.index, daily[m], lw=0.8, label=m)
    for name, (a, b) in _overlapping(windows, daily.index).items():
        ax.axvspan(pd.Timestamp(a), pd.Timestamp(b), color="red", alpha=0.12)
        ax.text(pd.Timestamp(a), ax.get_ylim()[1] * 0.95, name, fontsize=8, color="darkred")
    ax.set_ylabel("mean daily vol over the next h days")
    ax.set_title("Forecast vs realised volatility (mean over assets), stress windows shaded")
    ax.legend(fontsize=7, ncol=4)
    return _save(fig, out, "forecast_vs_realised.png")


def fig_errors(p: pd.DataFrame, models: list[str], out: Path) -> str:
    """Distribution of log(forecast / realised) vol per model (0 = exact)."""
    fig, ax = plt.subplots(figsize=(9, 4))
    bins = np.linspace(-2.5, 2.5, 81)
    y = np.maximum(p["target"].to_numpy(), 1e-8)
    for m in models:
        ax.hist(np.log(np.maximum(p[m].to_numpy(), 1e-8) / y), bins=bins, histtype="step", label=m, density=True)
    ax.axvline(0, color="black", lw=0.6)
    ax.set_xlabel("log(forecast / realised vol)")
    ax.set_title("Error distributions")
    ax.legend(fontsize=7)
    return _save(fig, out, "error_distributions.png")


def fig_ks(p: pd.DataFrame, models: list[str], metrics: dict, out: Path) -> str:
    """Per asset class: the empirical CDF of each model's standardised residuals h y² / f² against
    the χ²(h) CDF (their law if daily returns are Gaussian with the forecast variance), with the KS
    statistic of ``tests.ks`` in the legend. A curve left of χ²(h) over-forecasts variance, right of
    it under-forecasts; fat tails keep every model off it at the top."""
    from scipy import stats as sps

    h = int(metrics["horizon"])
    z = standardised_squares(p, models, h)
    classes = [c for c in ASSET_CLASSES if c in z]
    fig, axes = plt.subplots(1, max(len(classes), 1), figsize=(4.2 * max(len(classes), 1), 3.8), squeeze=False)
    hi = float(sps.chi2(h).ppf(0.995))
    grid = np.linspace(0, 2 * hi, 400)
    for ax, c in zip(axes[0], classes):
        ax.plot(grid, sps.chi2(h).cdf(grid), color="black", lw=1.6, label=f"χ²({h})")
        for m in models:
            x = np.sort(z[c][m])
            ks = metrics["tests"].get("ks", {}).get(c, {}).get(m)
            ax.step(x, np.arange(1, len(x) + 1) / len(x), where="post", lw=0.8,
                    label=f"{m} (KS {ks['stat']:.2f})" if ks else m)
        ax.set_xlim(0, 2 * hi)
        ax.set_xlabel(f"h·y²/f² (h = {h})")
        n = len(next(iter(z[c].values())))
        ax.set_title(f"{c}: {n} non-overlapping targets", fontsize=9)
        ax.legend(fontsize=6, loc="lower right")
    fig.suptitle(f"Standardised residuals against χ²({h}) (tests.ks); left of the black curve: variance over-forecast",
                 fontsize=9)
    return _save(fig, out, "ks_cdfs.png")


def fig_dm(metrics: dict, models: list[str], out: Path) -> str:
    """Heat map of DM statistics (row model minus column model; negative = row better), p-values printed."""
    k = len(models)
    stat, pval, holm = np.full((k, k), np.nan), np.full((k, k), np.nan), np.full((k, k), np.nan)
    for i, a in enumerate(models):
        for j, b in enumerate(models):
            entry = metrics["tests"]["dm"].get(a, {}).get(b)
            if entry:
                stat[i, j], pval[i, j] = entry["stat"], entry["pvalue"]
                stat[j, i], pval[j, i] = -entry["stat"], entry["pvalue"]
                holm[i, j] = holm[j, i] = entry.get("pvalue_holm", np.nan)
    lim = np.nanmax(np.abs(stat)) if np.isfinite(stat).any() else 1.0
    fig, ax = plt.subplots(figsize=(1.0 * k + 2, 0.8 * k + 1.5))
    im = ax.imshow(stat, cmap="RdBu_r", vmin=-lim, vmax=lim)
    for i in range(k):
        for j in range(k):
            if np.isfinite(stat[i, j]):
                text = f"{stat[i, j]:.1f}\np={pval[i, j]:.2g}" + (f"\nHolm {holm[i, j]:.2g}" if np.isfinite(holm[i, j]) else "")
                ax.text(j, i, text, ha="center", va="center", fontsize=6.5)
    ax.set_xticks(range(k), models, rotation=45)
    ax.set_yticks(range(k), models)
    lags = metrics["tests"].get("dm_lags", {}).get("all", {})
    lag_text = (f"; lags {lags['lags'][0]}-{lags['lags'][1]} (NW 1994 automatic, >= h-1), {lags['n']} dates"
                if lags.get("lags") else "")
    ax.set_title(f"Diebold-Mariano (HLN, Newey-West) on daily mean QLIKE{lag_text}\n"
                 "negative: row model has the lower loss; Holm: adjusted over the table's pairs", fontsize=9)
    fig.colorbar(im, ax=ax, shrink=0.8)
    return _save(fig, out, "dm_matrix.png")


def fig_mcs(metrics: dict, models: list[str], out: Path) -> str:
    """MCS p-values per scope on QLIKE and (when computed) on the squared error of log variance;
    models in the set are marked IN."""
    losses = [("QLIKE", metrics["tests"]["mcs"])]
    if metrics["tests"].get("mcs_log_mse"):
        losses.append(("squared error of log variance", metrics["tests"]["mcs_log_mse"]))
    scopes = list(metrics["tests"]["mcs"])
    fig, axes = plt.subplots(len(losses), 1, figsize=(1.0 * len(models) + 2, (0.6 * len(scopes) + 1.6) * len(losses)),
                             squeeze=False)
    for ax, (loss, table) in zip(axes[:, 0], losses):
        grid = np.array([[table.get(s, {}).get("pvalues", {}).get(m, np.nan) for m in models] for s in scopes]
                        ).reshape(len(scopes), len(models))
        ax.imshow(grid, cmap="Greens", vmin=0, vmax=1)
        for i, s in enumerate(scopes):
            included = set(table.get(s, {}).get("included", []))
            for j, m in enumerate(models):
                if np.isfinite(grid[i, j]):
                    ax.text(j, i, ("IN " if m in included else "") + f"{grid[i, j]:.2f}", ha="center", va="center",
                            fontsize=7, fontweight="bold" if m in included else "normal")
        ax.set_xticks(range(len(models)), models, rotation=45)
        ax.set_yticks(range(len(scopes)), scopes)
        ax.set_title(f"MCS on {loss}", fontsize=9)
    size = next(iter(metrics["tests"]["mcs"].values()), {}).get("size", 0.10)
    fig.suptitle(f"Model Confidence Set ({size:.0%}): MCS p-values, IN = survives", fontsize=10)
    return _save(fig, out, "mcs_membership.png")


def fig_class_bars(metrics: dict, models: list[str], out: Path) -> str:
    """QLIKE per model, pooled and per asset class."""
    classes = list(metrics["by_asset_class"])
    fig, ax = plt.subplots(figsize=(10, 4))
    width = 0.8 / (len(classes) + 1)
    x = np.arange(len(models))
    ax.bar(x, [metrics["models"][m]["qlike"] for m in models], width, label="pooled")
    for k, c in enumerate(classes, start=1):
        ax.bar(x + k * width, [metrics["by_asset_class"][c][m]["qlike"] for m in models], width, label=c)
    ax.set_xticks(x + width * len(classes) / 2, models)
    ax.set_ylabel("QLIKE (lower is better)")
    ax.set_yscale("log")
    ax.set_title("Test QLIKE per model and asset class")
    ax.legend(fontsize=8)
    return _save(fig, out, "qlike_by_class.png")


def fig_radar(p: pd.DataFrame, metrics: dict, out: Path, top: int = 12) -> str:
    """The paper's Figure 4: weights and mean forecast risk (primary model) of the largest positions."""
    port = metrics["portfolio"]
    weights = pd.Series(port["weights_used"]).sort_values(ascending=False).head(top)
    risk = p[p["asset"].isin(weights.index)].groupby("asset")[port["primary_model"]].mean().reindex(weights.index)
    angles = np.linspace(0, 2 * np.pi, len(weights), endpoint=False)
    fig = plt.figure(figsize=(6, 6))
    ax = fig.add_subplot(projection="polar")
    for values, label in ((weights / weights.max(), "weight (scaled to max)"), (risk / risk.max(), f"mean {port['primary_model']} vol (scaled)")):
        v = np.r_[values.to_numpy(), values.to_numpy()[:1]]
        ax.plot(np.r_[angles, angles[:1]], v, label=label)
        ax.fill(np.r_[angles, angles[:1]], v, alpha=0.15)
    ax.set_xticks(angles, weights.index, fontsize=7)
    ax.set_title(f"Portfolio weights and risk (top {len(weights)} positions)\n"
                 f"paper formula vol {port['paper_vol']:.4f} vs covariance vol {port['cov_vol']:.4f}", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    return _save(fig, out, "portfolio_radar.png")


def fig_var(path: pd.DataFrame, metrics: dict, windows: dict, out: Path) -> str:
    """Next-day portfolio returns against the 99% 1-day VaR (covariance vol), exceedances marked."""
    port = metrics["portfolio"]
    m = port["primary_model"]
    frame = path[m].dropna(subset=["cov_vol", "ret_1d"])
    dates = pd.to_datetime(frame.index)
    fig, ax = plt.subplots(figsize=(11, 4))
    ax.plot(dates, frame["ret_1d"], color="grey", lw=0.5, label="next-day portfolio return")
    z99 = 2.3263478740408408  # normal 99% quantile
    var_normal = z99 * frame["cov_vol"]
    ax.plot(dates, -var_normal, color="tab:blue", lw=0.8, label="-VaR 99% normal (cov vol)")
    ax.plot(dates, -z99 * frame["paper_vol"], color="tab:orange", lw=0.8, label="-VaR 99% normal (paper formula)")
    hits = frame["ret_1d"] < -var_normal
    ax.scatter(dates[hits], frame["ret_1d"][hits], color="red", s=10, zorder=3, label=f"exceedances ({int(hits.sum())})")
    for name, (a, b) in _overlapping(windows, dates).items():
        ax.axvspan(pd.Timestamp(a), pd.Timestamp(b), color="red", alpha=0.08)
    v = port["var"]["normal"]["99"]
    basis = port.get("var_basis", {}).get("one_day")
    ax.set_title(f"VaR 99% exceedances ({m}): {v['exceedances']} vs {v['expected']:.1f} expected, "
                 f"Kupiec p={v['kupiec_pvalue']:.3g}, Christoffersen p={v['christoffersen_pvalue']:.3g}"
                 + (f"\n1-day VaR from {basis}" if basis else ""), fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, out, "var_exceedances.png")


VAR_TEST_SIZE = 0.05  # a VaR backtest fails when its p-value is below this (the usual 5% test)


@dataclass
class ScopeWinner:
    """The lowest-QLIKE model over one slice of the test set, the next best, and the MCS members there."""

    kind: str  # "overall", "asset class" or "stress window"
    scope: str  # "all test dates", the class name or the window name
    best: str
    best_qlike: float
    runner_up: str | None
    runner_up_qlike: float | None
    n: int  # test samples in the slice
    mcs: list[str] | None  # models in the Model Confidence Set here; None when the test was skipped
    mcs_log_mse: list[str] | None = None  # the same on the squared error of log variance (None: not computed)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class VaRVerdict:
    """One 1-day VaR backtest of the portfolio: pass when Kupiec and Christoffersen both keep H0 at VAR_TEST_SIZE."""

    model: str  # whose volatility forecasts scale the VaR
    label: str  # e.g. "normal 99%" or "paper formula, normal 99%"
    exceedances: int
    expected: float
    kupiec_pvalue: float
    christoffersen_pvalue: float

    @property
    def kupiec_pass(self) -> bool:
        return self.kupiec_pvalue >= VAR_TEST_SIZE

    @property
    def christoffersen_pass(self) -> bool:
        return self.christoffersen_pvalue >= VAR_TEST_SIZE

    @property
    def passed(self) -> bool:
        return self.kupiec_pass and self.christoffersen_pass

    @property
    def paper_formula(self) -> bool:
        return self.label.startswith("paper formula")

    def failed_tests(self) -> str:
        """'Kupiec', 'Christoffersen', both joined by ' + ', or '' when it passed."""
        return " + ".join(t for t, ok in (("Kupiec", self.kupiec_pass), ("Christoffersen", self.christoffersen_pass)) if not ok)

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}


@dataclass
class ReportSummary:
    """What a risk committee reads first, computed from metrics.json alone (QLIKE decides "best":
    the loss the Diebold-Mariano and MCS tests use)."""

    scopes: list[ScopeWinner]  # overall first, then each asset class, then each stress window with test dates
    mcs_size: float
    test_period: tuple[str, str]
    windows_outside: dict[str, tuple[str, str]] = field(default_factory=dict)  # stress windows with no test date
    primary_model: str | None = None  # the run's primary model (the CNN when it ran): the portfolio section's own
    var: list[VaRVerdict] = field(default_factory=list)  # the primary model's, then the overall winner's
    paper_vol: float | None = None  # mean daily portfolio vol, fraction: the paper's sqrt(sum w_i² σ_i²)
    cov_vol: float | None = None  # mean daily portfolio vol, fraction: sqrt(w'Σw)
    understatement: float | None = None  # mean of 1 - paper_vol / cov_vol over test dates
    var_basis: str | None = None  # portfolio.var_basis.one_day: what the 1-day VaR's vol is
    universe: str | None = None  # portfolio.universe: the equity universe and its survivorship

    @property
    def winner(self) -> str:
        return self.scopes[0].best

    def var_of(self, model: str) -> list[VaRVerdict]:
        return [v for v in self.var if v.model == model]

    def to_dict(self) -> dict:
        return {"winner": self.winner, "scopes": [s.to_dict() for s in self.scopes], "mcs_size": self.mcs_size,
                "test_period": list(self.test_period), "windows_outside": {k: list(v) for k, v in self.windows_outside.items()},
                "primary_model": self.primary_model, "var": [v.to_dict() for v in self.var], "paper_vol": self.paper_vol,
                "cov_vol": self.cov_vol, "understatement": self.understatement, "var_basis": self.var_basis,
                "universe": self.universe}


def _ranked(scores: dict[str, dict]) -> list[tuple[str, float]]:
    """(model, QLIKE) from best to worst; models without a finite QLIKE are left out."""
    pairs = [(m, float(s["qlike"])) for m, s in scores.items() if s and np.isfinite(s.get("qlike", np.nan))]
    return sorted(pairs, key=lambda x: x[1])


def _scope_winner(kind: str, scope: str, scores: dict[str, dict], mcs: dict | None,
                  mcs_log_mse: dict | None = None) -> ScopeWinner | None:
    ranked = _ranked(scores)
    if not ranked:
        return None
    (best, q), *rest = ranked
    runner, rq = rest[0] if rest else (None, None)
    return ScopeWinner(kind, scope, best, q, runner, rq, int(scores[best].get("n", 0)),
                       list(mcs["included"]) if mcs else None, list(mcs_log_mse["included"]) if mcs_log_mse else None)


def _var_verdicts(model: str, section: dict) -> list[VaRVerdict]:
    out = [VaRVerdict(model, f"{method} {level}%", v["exceedances"], v["expected"], v["kupiec_pvalue"], v["christoffersen_pvalue"])
           for method, levels in section.get("var", {}).items() for level, v in levels.items()]
    paper = section.get("paper_formula_var99_normal")
    if paper:
        out.append(VaRVerdict(model, "paper formula, normal 99%", paper["exceedances"], paper["expected"],
                              paper["kupiec_pvalue"], paper["christoffersen_pvalue"]))
    return out


def summarise(metrics: dict) -> ReportSummary:
    """The report's first screen from a run's metrics: winners per scope, MCS members, VaR verdicts,
    and how much the paper's zero-correlation portfolio formula understates sqrt(w'Σw)."""
    mcs = metrics.get("tests", {}).get("mcs", {})
    log_mse = metrics.get("tests", {}).get("mcs_log_mse", {})
    scopes = [_scope_winner("overall", "all test dates", metrics["models"], mcs.get("all"), log_mse.get("all"))]
    scopes += [_scope_winner("asset class", c, s, mcs.get(c), log_mse.get(c)) for c, s in metrics.get("by_asset_class", {}).items()]
    scopes += [_scope_winner("stress window", w, s, mcs.get(w), log_mse.get(w)) for w, s in metrics.get("windows", {}).items()]
    windows = metrics["config"].get("windows", {})
    proto = metrics.get("protocol", {})
    summary = ReportSummary(
        scopes=[s for s in scopes if s is not None],
        mcs_size=float(metrics["config"].get("mcs_size", 0.10)),
        test_period=(str(proto.get("test_start", "?")), str(proto.get("test_end", "?"))),
        windows_outside={w: tuple(windows.get(w, ("?", "?"))) for w, s in metrics.get("windows", {}).items() if not s},
    )
    port = metrics.get("portfolio", {})
    if "var" not in port:
        return summary
    summary.primary_model = port["primary_model"]
    summary.paper_vol, summary.cov_vol, summary.understatement = port["paper_vol"], port["cov_vol"], port["understatement"]
    summary.var_basis = port.get("var_basis", {}).get("one_day")
    summary.universe = port.get("universe")
    summary.var = _var_verdicts(summary.primary_model, port)
    if summary.winner != summary.primary_model and summary.winner in port.get("models", {}):
        summary.var += _var_verdicts(summary.winner, port["models"][summary.winner])
    return summary


def _verdict(ok: bool) -> str:
    return "<span class='pass'>pass</span>" if ok else "<span class='fail'>FAIL</span>"


def _var_sentence(summary: ReportSummary, model: str, role: str) -> str:
    own = [v for v in summary.var_of(model) if not v.paper_formula]
    failed = [v for v in own if not v.passed]
    text = (f"<b>{html.escape(model)}</b> forecasts ({role}): {len(own) - len(failed)} of {len(own)} pass")
    if failed:
        text += "; <span class='fail'>fail: " + html.escape(", ".join(f"{v.label} ({v.failed_tests()})" for v in failed)) + "</span>"
    return text


def summary_html(summary: ReportSummary) -> str:
    """The summary section: headline sentences, the winner per scope with MCS members, VaR verdicts."""
    e = html.escape
    overall = summary.scopes[0]
    classes = [s for s in summary.scopes if s.kind == "asset class"]
    windows = [s for s in summary.scopes if s.kind == "stress window"]
    mcs_pct = f"{summary.mcs_size:.0%}"
    lines = [f"<b class='winner'>{e(overall.best)}</b> has the lowest QLIKE (lower is better) over all {overall.n} test samples "
             f"({overall.best_qlike:.4g}"
             + (f"; next best {e(overall.runner_up)} {overall.runner_up_qlike:.4g}" if overall.runner_up else "") + ")"
             + (f"; it is best in {sum(s.best == overall.best for s in classes)} of {len(classes)} asset classes" if classes else "")
             + (f" and {sum(s.best == overall.best for s in windows)} of {len(windows)} stress windows" if windows else "") + "."]
    if summary.windows_outside:
        spans = ", ".join(f"{e(w)} ({a} .. {b})" for w, (a, b) in summary.windows_outside.items())
        lines.append(f"<span class='warn'>No stress-window verdict for {spans}: the test period "
                     f"{summary.test_period[0]} .. {summary.test_period[1]} holds no date in them</span> "
                     "(a test period that covers them, e.g. <code>--test-start 2007-01-01</code>, scores them).")
    if overall.mcs is not None:
        lines.append(f"Model Confidence Set ({mcs_pct}) over all test dates: <b>{e(', '.join(overall.mcs))}</b> "
                     "(the models not statistically worse than the best; the report's multi-model statement, "
                     "pairwise DM p-values below are also given Holm-adjusted)"
                     + (f"; on the squared error of log variance: <b>{e(', '.join(overall.mcs_log_mse))}</b>"
                        if overall.mcs_log_mse is not None else "") + ".")
    if summary.var:
        roles = [(summary.primary_model, "the run's primary model")]
        if summary.winner != summary.primary_model and summary.var_of(summary.winner):
            roles.append((summary.winner, "lowest QLIKE"))
        lines.append(f"Portfolio 1-day VaR backtests, Kupiec and Christoffersen at {VAR_TEST_SIZE:.0%}: "
                     + "; ".join(_var_sentence(summary, m, role) for m, role in roles if m) + ".")
    if summary.understatement is not None:
        paper = next((v for v in summary.var_of(summary.primary_model or "") if v.paper_formula), None)
        lines.append(f"The paper's portfolio formula sqrt(Σ w<sub>i</sub>² σ<sub>i</sub>²) ignores correlation and understates "
                     f"sqrt(w'Σw) by <b class='fail'>{summary.understatement:.1%}</b> on average "
                     f"({summary.paper_vol:.2%} vs {summary.cov_vol:.2%} daily vol)"
                     + (f"; its 99% VaR is exceeded {paper.exceedances} times vs {paper.expected:.1f} expected" if paper else "") + ".")
    log_mse = any(s.mcs_log_mse is not None for s in summary.scopes)
    rows = "".join(
        f"<tr><td class='scope'>{e(s.kind)}</td><td class='scope'>{e(s.scope)}</td><td class='win'><b>{e(s.best)}</b></td>"
        f"<td>{s.best_qlike:.4g}</td><td class='scope'>{e(s.runner_up or '')}</td>"
        f"<td>{'' if s.runner_up_qlike is None else f'{s.runner_up_qlike:.4g}'}</td>"
        f"<td>{s.n}</td><td class='scope'>{e(', '.join(s.mcs)) if s.mcs is not None else 'too few dates'}</td>"
        + (f"<td class='scope'>{e(', '.join(s.mcs_log_mse)) if s.mcs_log_mse is not None else 'too few dates'}</td>"
           if log_mse else "") + "</tr>"
        for s in summary.scopes)
    rows += "".join(f"<tr><td class='scope'>stress window</td><td class='scope'>{e(w)}</td>"
                    f"<td class='scope' colspan='{7 if log_mse else 6}'>no test date ({a} .. {b} is outside the test period)</td></tr>"
                    for w, (a, b) in summary.windows_outside.items())
    winners = ("<table class='summary'><tr><th>slice</th><th>name</th><th>best (lowest QLIKE)</th><th>QLIKE</th><th>next best</th>"
               f"<th>QLIKE</th><th>n</th><th>MCS {mcs_pct} members (QLIKE)</th>"
               + (f"<th>MCS {mcs_pct} members (log-variance MSE)</th>" if log_mse else "") + f"</tr>{rows}</table>")
    parts = ["<section id='summary'><h2>Summary</h2><ul class='headline'>", *[f"<li>{x}</li>" for x in lines], "</ul>", winners]
    if summary.var:
        models = list(dict.fromkeys(v.model for v in summary.var))
        labels = list(dict.fromkeys(v.label for v in summary.var))
        by = {(v.model, v.label): v for v in summary.var}
        head = "".join(f"<th colspan='4'>{e(m)} forecasts</th>" for m in models)
        sub = "<th>exc. / expected</th><th>Kupiec p</th><th>Christoffersen p</th><th>verdict</th>" * len(models)

        def cells(v: VaRVerdict | None) -> str:
            if v is None:
                return "<td colspan='4'></td>"
            return (f"<td>{v.exceedances} / {v.expected:.1f}</td><td>{v.kupiec_pvalue:.3g} {_verdict(v.kupiec_pass)}</td>"
                    f"<td>{v.christoffersen_pvalue:.3g} {_verdict(v.christoffersen_pass)}</td><td>{_verdict(v.passed)}</td>")

        body = "".join(f"<tr><td class='scope'>{e(label)}</td>" + "".join(cells(by.get((m, label))) for m in models) + "</tr>"
                       for label in labels)
        notes = "".join(f"<p class='meta'>{label}: {e(text)}</p>" for label, text in
                        (("1-day VaR basis", summary.var_basis), ("universe", summary.universe)) if text)
        parts.append(f"<h3>1-day portfolio VaR backtests (FAIL: p &lt; {VAR_TEST_SIZE:g})</h3>{notes}<table class='summary'>"
                     f"<tr><th rowspan='2'>VaR</th>{head}</tr><tr>{sub}</tr>{body}</table>")
    parts.append("</section>")
    return "".join(parts)


def _lower(x: float) -> float:
    return x


def _higher(x: float) -> float:
    return -x


def _table(head: list[str], rows: list[list], best: dict[int, Callable[[float], float]] | None = None,
           p_values: tuple[int, ...] = ()) -> str:
    """An HTML table; ``best`` maps a column index to a key (lower is better) and the best cell(s)
    of each such column get class 'best' (bold, shaded); in the ``p_values`` columns a p-value
    below VAR_TEST_SIZE gets class 'fail' (the test rejects)."""
    def numeric(x) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool) and np.isfinite(x)

    marked: set[tuple[int, int]] = set()
    for j, key in (best or {}).items():
        keys = {i: key(r[j]) for i, r in enumerate(rows) if numeric(r[j])}
        if len(keys) > 1:
            top = min(keys.values())
            marked |= {(i, j) for i, k in keys.items() if k == top}

    def cell(i: int, j: int, x) -> str:
        text = f"{x:.4g}" if isinstance(x, float) else html.escape(str(x))
        classes = " ".join(c for c, on in (("best", (i, j) in marked), ("fail", j in p_values and numeric(x) and x < VAR_TEST_SIZE)) if on)
        text = f"<b>{text}</b>" if (i, j) in marked else text
        return f"<td class='{classes}'>{text}</td>" if classes else f"<td>{text}</td>"

    body = "".join("<tr>" + "".join(cell(i, j, x) for j, x in enumerate(r)) + "</tr>" for i, r in enumerate(rows))
    return "<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>" + body + "</table>"


# column keys of the score tables: model, RMSE, R², QLIKE (then MAE or n)
SCORE_BEST = {1: _lower, 2: _higher, 3: _lower}


def _dm_vs(table: dict, anchor: str, model: str) -> dict:
    """The DM entry of (anchor, model) from a tests.dm-style table, whichever way round it was
    stored (the statistic's sign is flipped to read as anchor minus model); {} when absent."""
    entry = table.get(anchor, {}).get(model)
    if entry:
        return entry
    entry = table.get(model, {}).get(anchor)
    return {**entry, "stat": -entry["stat"]} if entry else {}


def _caption(*lines: str | None) -> str:
    return "".join(f"<p class='meta'>{line}</p>" for line in lines if line)


def _lag_text(lags: dict, horizon: int | None) -> str | None:
    """One line naming the DM lags of a table, and the indicative marking with its effective n."""
    if not lags or not lags.get("lags"):
        return None
    lo, hi = lags["lags"]
    text = f"DM lag {lo}" + (f"-{hi}" if hi != lo else "") + f" ({html.escape(lags.get('rule', ''))}), {lags['n']} dates"
    if lags.get("indicative"):
        text += (f"; <b class='warn'>indicative</b>: fewer than 30 non-overlapping targets, so tested on every "
                 f"{horizon or 'h'}-th date only, effective n = {lags['effective_n']}")
    return text


def _floor_text(metrics: dict) -> str | None:
    floor = metrics.get("variance_floor")
    if not floor:
        return None
    if "target_rows_floored" not in floor:
        return f"variance floor: {html.escape(floor.get('rule', ''))}"
    by_class = ", ".join(f"{c} {n}" for c, n in floor.get("target_rows_floored_by_class", {}).items() if n)
    return (f"variance floor ({html.escape(floor['rule'])}): {floor['target_rows_floored']} of {floor['n_rows']} target rows "
            f"floored{f' ({by_class})' if by_class else ''}; 'QLIKE unfloored' leaves those rows out")


def _tables(metrics: dict, models: list[str]) -> list[tuple[str, str]]:
    tests = metrics.get("tests", {})
    horizon = metrics.get("horizon")
    anchor = "cnn" if "cnn" in models else models[0]
    floored = metrics.get("variance_floor", {}).get("forecast_rows_floored", {})
    dm = tests.get("dm", {})
    rows = []
    for m, s in metrics["models"].items():
        d = _dm_vs(dm, anchor, m) if m != anchor else {}
        rows.append([m, s["rmse"], s["r2"], s["qlike"], s.get("qlike_unfloored", ""), s["mae"], s["n"], floored.get(m, ""),
                     d.get("pvalue", ""), d.get("pvalue_holm", ""), d.get("lags", "")])
    out = [("Pooled test scores",
            _caption(_floor_text(metrics), _lag_text(tests.get("dm_lags", {}).get("all", {}), horizon))
            + _table(["model", "RMSE", "R²", "QLIKE", "QLIKE unfloored", "MAE", "n", "forecasts floored",
                      f"DM p vs {anchor}", "Holm p", "DM lag"], rows, {**SCORE_BEST, 4: _lower, 5: _lower}))]
    classes = list(metrics.get("by_asset_class", {}))
    if classes:
        out.append(("QLIKE by asset class", _table(["model", *classes],
                    [[m, *(metrics["by_asset_class"][c].get(m, {}).get("qlike", "") for c in classes)] for m in models],
                    {j: _lower for j in range(1, len(classes) + 1)})))
    for name, scores in metrics["windows"].items():
        if not scores:
            out.append((f"Stress window {name}", "<p>no test date in this window</p>"))
            continue
        dmw = tests.get("dm_windows", {}).get(name, {})
        mcs = tests.get("mcs", {}).get(name, {})
        mcs_log = tests.get("mcs_log_mse", {}).get(name)
        head = ["model", "RMSE", "R²", "QLIKE", "n", f"DM p vs {anchor}", "Holm p", "in MCS (QLIKE)"]
        rows = []
        for m, s in scores.items():
            d = _dm_vs(dmw, anchor, m) if m != anchor else {}
            row = [m, s["rmse"], s["r2"], s["qlike"], s["n"], d.get("pvalue", ""), d.get("pvalue_holm", ""),
                   "yes" if m in mcs.get("included", []) else "no"]
            if mcs_log is not None:
                row.append("yes" if m in mcs_log.get("included", []) else "no")
            rows.append(row)
        if mcs_log is not None:
            head.append("in MCS (log-variance MSE)")
        out.append((f"Stress window {name}", _caption(_lag_text(tests.get("dm_lags", {}).get(name, {}), horizon))
                    + _table(head, rows, SCORE_BEST)))
    for name, scores in metrics["regimes"].items():
        if not scores:
            continue
        out.append((f"Regime {name}", _table(["model", "RMSE", "R²", "QLIKE", "n"],
                                             [[m, s["rmse"], s["r2"], s["qlike"], s["n"]] for m, s in scores.items()], SCORE_BEST)))
    mz = tests.get("mz", {})
    out.append(("Mincer-Zarnowitz (variance, pooled over assets, Driscoll-Kraay errors): best is alpha nearest 0, beta nearest 1",
                _table(["model", "alpha", "beta", "p (a=0, b=1)", "R²", "lags"],
                       [[m, r["alpha"], r["beta"], r["pvalue"], r["r2"], r["lags"]] for m, r in mz.items()],
                       {1: abs, 2: lambda b: abs(b - 1.0), 3: _higher, 4: _higher}, p_values=(3,))))
    port = metrics.get("portfolio", {})
    if "var" in port:
        rows = [[meth, lvl, v["exceedances"], v["expected"], v["kupiec_pvalue"], v["christoffersen_pvalue"], v["cc_pvalue"],
                 v["h_day"].get("exceedances", ""), v["h_day"].get("expected", ""), v["h_day"].get("kupiec_pvalue", "")]
                for meth, levels in port["var"].items() for lvl, v in levels.items()]
        basis = port.get("var_basis", {})
        out.append((f"Portfolio VaR backtests ({port['primary_model']}); paper-formula understatement {port['understatement']:.1%}",
                    _caption(*(f"{label}: {html.escape(basis[k])}" for label, k in
                               (("1-day VaR", "one_day"), ("h-day VaR", "h_day"), ("calendar", "calendar")) if basis.get(k)),
                             f"universe: {html.escape(port['universe'])}" if port.get("universe") else None)
                    + _table(["method", "level", "1d exc.", "1d exp.", "Kupiec p", "Christoffersen p", "CC p",
                              "h-day exc.", "h-day exp.", "h-day Kupiec p"], rows, {4: _higher, 5: _higher, 6: _higher, 9: _higher},
                             p_values=(4, 5, 6, 9))))
    return out


def _fingerprint_html(fp: dict) -> str:
    """One line naming the data a run read: source, file count, combined sha256 (full hash in the title)."""
    if not fp:
        return "data fingerprint: not recorded for this run"
    source = f"arch {fp['arch_version']} package data folder" if fp.get("arch_version") else html.escape(str(fp.get("root", "")))
    return (f"data: {source}, {fp['files']} files, sha256 <code title='{html.escape(fp['sha256'])}'>"
            f"{html.escape(fp['sha256'][:16])}…</code>")


PAGE_HEAD = (
    "<!doctype html><html><head><meta charset='utf-8'><title>nimbleml risk report</title><style>"
    "body{font-family:sans-serif;max-width:1200px;margin:auto;padding:1em}table{border-collapse:collapse;margin:0.5em 0}"
    "td,th{border:1px solid #ccc;padding:2px 6px;font-size:12px;text-align:right}img{max-width:100%;display:block;margin:1em 0}"
    "td.scope,td.win{text-align:left}td.best{background:#dff0d8}.pass{color:#1b7f1b}.fail{color:#b00020;font-weight:bold}"
    "table.summary th{text-align:left}ul.headline li{margin:0.35em 0;font-size:15px}.warn{color:#8a5a00}.meta{color:#444;font-size:13px}details{margin:0.5em 0}"
    "pre{font-size:11px;background:#f6f6f6;padding:0.5em;overflow-x:auto}"
    "</style></head><body>"
)


def first_screen(metrics: dict) -> str:
    """The title, the run in one line with its data fingerprint, the summary, and the run config
    folded away (``<details>``): what a reader sees before scrolling."""
    proto = metrics["protocol"]
    details = {"data_report": metrics.get("data_report"), "data_fingerprint": metrics.get("data_fingerprint")}
    return (
        f"<h1>Risk model validation report</h1><p class='meta'>protocol <b>{html.escape(proto['name'])}</b> "
        f"(refit {html.escape(proto['refit'])}, {proto['folds']} fold(s), CNN warm start: {proto['cnn_warm_start']}), "
        f"h = {metrics['horizon']} days, test {proto['test_start']} .. {proto['test_end']}, {metrics['n_assets']} assets, "
        f"{metrics['n_test_samples']} test samples{' — <b class=fail>LEAKY</b>' if metrics['leaky'] else ''}. "
        f"{_fingerprint_html(metrics.get('data_fingerprint', {}))}</p>"
        + summary_html(summarise(metrics))
        + "<details><summary>run config (config.json), data report and per-file hashes</summary>"
        f"<pre>{html.escape(json.dumps(metrics['config'], indent=1, default=str))}</pre>"
        f"<pre>{html.escape(json.dumps(details, indent=1, default=str))}</pre></details>"
        "<p class='meta'>In every table below the best value of each column is <b>bold on green</b>; "
        f"a test p-value below {VAR_TEST_SIZE:g} (the test rejects) is <span class='fail'>red</span>.</p>"
    )


def write_html_report(metrics: dict, predictions: pd.DataFrame, portfolio_path: pd.DataFrame, example_window: np.ndarray | None,
                      example_title: str, out: Path) -> list[str]:
    """Write every figure as PNG and ``report.html`` embedding them; returns the figure file names."""
    out.mkdir(parents=True, exist_ok=True)
    models = list(metrics["models"])
    windows = {k: tuple(v) for k, v in metrics["config"]["windows"].items()}
    figures = []
    if example_window is not None:
        figures.append(fig_encoders(example_window, example_title, out))
    figures += [fig_forecasts(predictions, models, windows, out), fig_errors(predictions, models, out),
                fig_ks(predictions, models, metrics, out), fig_dm(metrics, models, out), fig_mcs(metrics, models, out),
                fig_class_bars(metrics, models, out)]
    if "var" in metrics.get("portfolio", {}) and not portfolio_path.empty:
        figures += [fig_radar(predictions, metrics, out), fig_var(portfolio_path, metrics, windows, out)]
    parts = [PAGE_HEAD, first_screen(metrics)]
    for title, table in _tables(metrics, models):
        parts.append(f"<h2>{html.escape(title)}</h2>{table}")
    parts.append("<h2>Figures</h2>")
    for name in figures:
        data = base64.b64encode((out / name).read_bytes()).decode("ascii")
        parts.append(f"<h3>{html.escape(name)}</h3><img class='figure' alt='{html.escape(name)}' src='data:image/png;base64,{data}'>")
    # a reader (or a headless browser test) sees how many figures decoded: loaded/total
    parts.append("<p id='figure-status'>figures: not checked (JavaScript off)</p><script>window.addEventListener('load',()=>{"
                 "const imgs=[...document.querySelectorAll('img.figure')];const ok=imgs.filter(i=>i.complete&&i.naturalWidth>0).length;"
                 "document.getElementById('figure-status').textContent='figures loaded: '+ok+'/'+imgs.length;});</script>")
    parts.append("</body></html>")
    (out / "report.html").write_text("\n".join(parts))
    return figures
