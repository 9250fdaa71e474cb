"""Report folder for a risk run: metrics.json, config.json, predictions, a markdown table, report.html and figures."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pandas as pd
from rich.console import Console
from rich.table import Table

from nimbleml.risk.experiment import RiskRunResult
from nimbleml.risk.html_report import write_html_report
from nimbleml.risk.run_folder import data_fingerprint, write_state

log = logging.getLogger(__name__)

# The paper's Table 1 (random split, undefined target): shown beside ours, never a target.
PAPER_CLAIMS = {"cnn": (0.043, 0.88), "linear": (0.075, 0.62), "svr": (0.068, 0.65), "tree": (0.071, 0.60)}


def comparison_table(metrics: dict) -> Table:
    """A Table-1-like comparison: pooled RMSE, R², QLIKE, MAE, timings; per-class QLIKE."""
    leaky = " — LEAKY (paper-random split: test windows overlap training windows)" if metrics["leaky"] else ""
    proto = metrics["protocol"]
    title = (
        f"Volatility forecasts, h={metrics['horizon']}, protocol={proto['name']} (refit {proto['refit']}){leaky}\n"
        f"{metrics['n_assets']} assets, test {proto['test_start']} .. {proto['test_end']}, {metrics['n_test_samples']} samples"
    )
    table = Table(title=title, caption="best QLIKE in green; paper RMSE/R² are its claimed random-split figures")
    classes = list(metrics["by_asset_class"])
    for col in ["model", "RMSE", "R²", "QLIKE", "MAE", "fit s", "pred ms"] + [f"QLIKE {c}" for c in classes] + ["paper RMSE/R²"]:
        table.add_column(col, justify="left" if col == "model" else "right")
    best = min(m["qlike"] for m in metrics["models"].values())
    for name, m in metrics["models"].items():
        paper = PAPER_CLAIMS.get(name)
        q = f"[bold green]{m['qlike']:.4f}[/]" if m["qlike"] == best else f"{m['qlike']:.4f}"
        table.add_row(
            name,
            f"{m['rmse']:.5f}",
            f"{m['r2']:.3f}",
            q,
            f"{m['mae']:.5f}",
            f"{m['fit_seconds']:.1f}",
            f"{m['predict_ms']:.4f}",
            *[f"{metrics['by_asset_class'][c][name]['qlike']:.4f}" for c in classes],
            f"{paper[0]:.3f}/{paper[1]:.2f}" if paper else "",
        )
    return table


def markdown_table(metrics: dict) -> str:
    """The same comparison as GitHub markdown, pooled and per asset class."""
    proto = metrics["protocol"]
    lines = [f"protocol `{proto['name']}` (refit {proto['refit']}){' (LEAKY)' if metrics['leaky'] else ''}, h={metrics['horizon']}, "
             f"{metrics['n_assets']} assets, test {proto['test_start']}..{proto['test_end']}", ""]
    classes = list(metrics["by_asset_class"])
    head = ["model", "RMSE", "R²", "QLIKE", "MAE", "fit s"] + [f"{c} RMSE / R² / QLIKE" for c in classes]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, m in metrics["models"].items():
        row = [name, f"{m['rmse']:.5f}", f"{m['r2']:.3f}", f"{m['qlike']:.4f}", f"{m['mae']:.5f}", f"{m['fit_seconds']:.1f}"]
        for c in classes:
            s = metrics["by_asset_class"][c][name]
            row.append(f"{s['rmse']:.5f} / {s['r2']:.3f} / {s['qlike']:.4f}")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def write_report(result: RiskRunResult, out: Path) -> dict:
    """Write metrics.json, state, predictions.csv.gz, report.md and PNG figures; return the metrics."""
    out.mkdir(parents=True, exist_ok=True)
    write_state(out, result.config, result.predictions, result.splits, result.fit_seconds, result.predict_seconds,
                result.extras, result.data_report, complete=result.extras.get("run_complete", True))
    metrics = result.metrics()
    if "data_fingerprint" not in metrics:  # e.g. `nimbleml demo`: every report names the data it came from
        metrics["data_fingerprint"] = data_fingerprint(result.config.data)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
    window, caption = result.example if result.example is not None else (None, "")
    figures = write_html_report(metrics, result.predictions, result.__dict__.get("portfolio_path", pd.DataFrame()), window, caption, out)
    md = ["# Risk evaluation", "", markdown_table(metrics), "", "Full report: [report.html](report.html)", ""]
    md += [f"![{f}]({f})" for f in figures]
    (out / "report.md").write_text("\n".join(md) + "\n")
    log.info("report written to %s", out)
    return metrics


def print_table(metrics: dict, console: Console | None = None) -> None:
    """Print the comparison; off a terminal (logs, CI) use a wide page instead of 80 columns."""
    console = console or Console()
    if not console.is_terminal:
        console = Console(width=180)
    console.print(comparison_table(metrics))
