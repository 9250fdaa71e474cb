"""``report.html``: one self-contained page (figures embedded as base64 PNG) a validator can open offline.

Figures (also written as PNGs beside it): example input images per encoder, forecast vs
realised volatility with the stress windows shaded, error distributions, KS CDFs per asset
class, the Diebold-Mariano matrix as a heat map, Model Confidence Set membership, per-class
QLIKE bars, the paper's Figure 4 radar of portfolio weights and risk, VaR exceedances over time.
Tables come from ``metrics.json``; the page names the config and the data fingerprint it came from.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

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
    """Empirical CDFs of forecast and realised vol per asset class, KS statistic in the legend."""
    classes = [c for c in ASSET_CLASSES if (p["asset_class"] == c).any()]
    fig, axes = plt.subplots(1, len(classes), figsize=(4.2 * len(classes), 3.6), squeeze=False)
    for ax, c in zip(axes[0], classes):
        rows = p[p["asset_class"] == c]
        hi = np.quantile(rows["target"], 0.99)
        for col in ["target", *models]:
            x = np.sort(rows[col].to_numpy())
            ks = metrics["tests"]["ks"].get(c, {}).get(col)
            label = "realised" if col == "target" else f"{col} (KS {ks['stat']:.2f})" if ks else col
            ax.plot(x, np.arange(1, len(x) + 1) / len(x), lw=1.4 if col == "target" else 0.8,
                    color="black" if col == "target" else None, label=label)
        ax.set_xlim(0, hi)
        ax.set_title(c)
        ax.legend(fontsize=6)
    return _save(fig, out, "ks_cdfs.png")


def fig_dm(metrics: dict, models: list[str], out: Path) -> str:
    """Heat map of DM statistics (row model minus column model; negative = row better), p-values printed."""
    k = len(models)
    stat, pval = np.full((k, k), np.nan), np.full((k, k), np.nan)
    for i, a in enumerate(models):
        for j, b in enumerate(models):
            entry = metrics["tests"]["dm"].get(a, {}).get(b)
            if entry:
                stat[i, j], pval[i, j] = entry["stat"], entry["pvalue"]
                stat[j, i], pval[j, i] = -entry["stat"], entry["pvalue"]
    lim = np.nanmax(np.abs(stat)) if np.isfinite(stat).any() else 1.0
    fig, ax = plt.subplots(figsize=(1.0 * k + 2, 0.8 * k + 1.5))
    im = ax.imshow(stat, cmap="RdBu_r", vmin=-lim, vmax=lim)
    for i in range(k):
        for j in range(k):
            if np.isfinite(stat[i, j]):
                ax.text(j, i, f"{stat[i, j]:.1f}\np={pval[i, j]:.2g}", ha="center", va="center", fontsize=7)
    ax.set_xticks(range(k), models, rotation=45)
    ax.set_yticks(range(k), models)
    ax.set_title("Diebold-Mariano (HLN, Newey-West) on daily mean QLIKE\nnegative: row model has the lower loss")
    fig.colorbar(im, ax=ax, shrink=0.8)
    return _save(fig, out, "dm_matrix.png")


def fig_mcs(metrics: dict, models: list[str], out: Path) -> str:
    """MCS p-values per scope; models in the 10% set are outlined and marked."""
    scopes = list(metrics["tests"]["mcs"])
    grid = np.array([[metrics["tests"]["mcs"][s]["pvalues"].get(m, np.nan) for m in models] for s in scopes]).reshape(len(scopes), len(models))
    fig, ax = plt.subplots(figsize=(1.0 * len(models) + 2, 0.6 * len(scopes) + 1.5))
    ax.imshow(grid, cmap="Greens", vmin=0, vmax=1)
    for i, s in enumerate(scopes):
        included = set(metrics["tests"]["mcs"][s]["included"])
        for j, m in enumerate(models):
            ax.text(j, i, ("IN " if m in included else "") + f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=7,
                    fontweight="bold" if m in included else "normal")
    ax.set_xticks(range(len(models)), models, rotation=45)
    ax.set_yticks(range(len(scopes)), scopes)
    ax.set_title("Model Confidence Set (10%): MCS p-values, IN = survives")
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
    ax.set_title(f"VaR 99% exceedances ({m}): {v['exceedances']} vs {v['expected']:.1f} expected, "
                 f"Kupiec p={v['kupiec_pvalue']:.3g}, Christoffersen p={v['christoffersen_pvalue']:.3g}")
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, out, "var_exceedances.png")


def _table(head: list[str], rows: list[list]) -> str:
    def cell(x) -> str:
        if isinstance(x, float):
            return f"{x:.4g}"
        return html.escape(str(x))

    body = "".join("<tr>" + "".join(f"<td>{cell(x)}</td>" for x in r) + "</tr>" for r in rows)
    return "<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>" + body + "</table>"


def _tables(metrics: dict, models: list[str]) -> list[tuple[str, str]]:
    out = [("Pooled test scores", _table(["model", "RMSE", "R²", "QLIKE", "MAE", "n"],
                                          [[m, s["rmse"], s["r2"], s["qlike"], s["mae"], s["n"]] for m, s in metrics["models"].items()]))]
    for name, scores in metrics["windows"].items():
        if not scores:
            out.append((f"Stress window {name}", "<p>no test date in this window</p>"))
            continue
        dm = metrics["tests"]["dm_windows"].get(name, {})
        anchor = next(iter(dm), None)
        mcs = metrics["tests"]["mcs"].get(name, {})
        rows = [[m, s["rmse"], s["r2"], s["qlike"], s["n"], dm.get(anchor, {}).get(m, {}).get("pvalue", ""),
                 "yes" if m in mcs.get("included", []) else "no"] for m, s in scores.items()]
        out.append((f"Stress window {name}", _table(["model", "RMSE", "R²", "QLIKE", "n", f"DM p vs {anchor}", "in MCS"], rows)))
    for name, scores in metrics["regimes"].items():
        if not scores:
            continue
        out.append((f"Regime {name}", _table(["model", "RMSE", "R²", "QLIKE", "n"],
                                             [[m, s["rmse"], s["r2"], s["qlike"], s["n"]] for m, s in scores.items()])))
    out.append(("Mincer-Zarnowitz (variance, panel HAC)", _table(["model", "alpha", "beta", "p (a=0, b=1)", "R²", "lags"],
               [[m, r["alpha"], r["beta"], r["pvalue"], r["r2"], r["lags"]] for m, r in metrics["tests"]["mz"].items()])))
    port = metrics.get("portfolio", {})
    if "var" in port:
        rows = [[meth, lvl, v["exceedances"], v["expected"], v["kupiec_pvalue"], v["christoffersen_pvalue"], v["cc_pvalue"],
                 v["h_day"].get("exceedances", ""), v["h_day"].get("expected", ""), v["h_day"].get("kupiec_pvalue", "")]
                for meth, levels in port["var"].items() for lvl, v in levels.items()]
        out.append((f"Portfolio VaR backtests ({port['primary_model']}); paper-formula understatement {port['understatement']:.1%}",
                    _table(["method", "level", "1d exc.", "1d exp.", "Kupiec p", "Christoffersen p", "CC p",
                            "h-day exc.", "h-day exp.", "h-day Kupiec p"], rows)))
    return out


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
    proto = metrics["protocol"]
    fingerprint = metrics.get("data_fingerprint", {})
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>nimbleml risk report</title><style>"
        "body{font-family:sans-serif;max-width:1200px;margin:auto;padding:1em}table{border-collapse:collapse;margin:0.5em 0}"
        "td,th{border:1px solid #ccc;padding:2px 6px;font-size:12px;text-align:right}img{max-width:100%;display:block;margin:1em 0}"
        "</style></head><body>",
        f"<h1>Risk model validation report</h1><p>protocol <b>{html.escape(proto['name'])}</b> (refit {html.escape(proto['refit'])}, "
        f"{proto['folds']} fold(s), CNN warm start: {proto['cnn_warm_start']}), h = {metrics['horizon']}, test "
        f"{proto['test_start']} .. {proto['test_end']}, {metrics['n_assets']} assets, {metrics['n_test_samples']} test samples"
        f"{' — LEAKY' if metrics['leaky'] else ''}.</p>",
        f"<p>config: <code>{html.escape(json.dumps(metrics['config'], default=str))}</code></p>",
        f"<p>data fingerprint: {fingerprint.get('files', '?')} files, sha256 <code>{fingerprint.get('sha256', 'n/a')}</code></p>",
    ]
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
