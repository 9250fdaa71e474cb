"""Print the README's risk tables (markdown) from one or more `nimbleml risk evaluate` run folders.

    .venv/bin/python bench/risk_tables.py runs/eq30-h5 runs/full-h5

For each run: pooled and per-window QLIKE of every model, its DM p-value against the CNN (HLN,
Newey-West variance with Newey-West 1994's automatic lag; negative statistic = the CNN's loss is
lower), the Holm-adjusted p-value across the table's pairs ("holm"), membership of the 10% Model
Confidence Set on QLIKE ("IN") and on the squared error of log variance ("IN-log"), and per table
the DM lags used, the number of non-overlapping targets and whether the p-values are only
indicative; then QLIKE per class with and without the rows whose target was floored, and the 99%
VaR backtests of the CNN-based portfolio. Reads only metrics.json, so it never refits anything.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _cell(qlike: float, dm: dict | None, included: bool, included_log: bool) -> str:
    text = f"{qlike:.3f}"
    if dm is not None:
        sign = "CNN better" if dm["stat"] < 0 else "CNN worse"
        holm = f", holm {dm['pvalue_holm']:.2g}" if "pvalue_holm" in dm else ""
        text += f" p={dm['pvalue']:.2g}{holm} ({sign})"
    return text + (" IN" if included else "") + (" IN-log" if included_log else "")


def _lags(summary: dict) -> str:
    """The DM lags of one table, its non-overlapping target count and whether it is indicative only."""
    if not summary:
        return "-"
    lo, hi = summary["lags"]
    text = f"{lo}" if lo == hi else f"{lo}-{hi}"
    return f"{text} (n_eff {summary['effective_n']}{', indicative' if summary['indicative'] else ''})"


def run_tables(run: Path) -> str:
    m = json.loads((run / "metrics.json").read_text())
    models = list(m["models"])
    p = m["protocol"]
    lines = [f"**{run.name}**: {p['name']}, refit {p['refit']}, h={m['horizon']}, {m['n_assets']} assets, "
             f"test {p['test_start']}..{p['test_end']}, {m.get('wall_seconds', 0) / 60:.1f} min wall", "",
             "| scope | DM lags | " + " | ".join(models) + " |", "|---|---|" + "---|" * len(models)]
    tests = m["tests"]
    scopes = [("all", m["models"], tests["dm"].get("cnn", {}), tests["mcs"].get("all", {}), tests.get("mcs_log_mse", {}).get("all", {}))]
    scopes += [(w, m["windows"][w], tests.get("dm_windows", {}).get(w, {}).get("cnn", {}),
                tests["mcs"].get(w, {}), tests.get("mcs_log_mse", {}).get(w, {})) for w in m["windows"]]
    for name, losses, dm, mcs, mcs_log in scopes:
        included, included_log = set(mcs.get("included", [])), set(mcs_log.get("included", []))
        lines.append(f"| {name} | {_lags(tests.get('dm_lags', {}).get(name, {}))} | " + " | ".join(
            _cell(losses[k]["qlike"], dm.get(k), k in included, k in included_log) if k in losses else "" for k in models) + " |")
    floor = m.get("variance_floor", {})
    lines += ["", f"Variance floor: {floor.get('rule', 'none recorded')}; {floor.get('target_rows_floored', 0)} of "
                  f"{floor.get('n_rows', m['n_test_samples'])} targets floored.", "",
              "| by class (QLIKE; without floored rows) | " + " | ".join(models) + " |", "|---|" + "---|" * len(models)]
    for c, losses in m["by_asset_class"].items():
        lines.append(f"| {c} | " + " | ".join(
            f"{losses[k]['qlike']:.3f}; {losses[k].get('qlike_unfloored', float('nan')):.3f}" if k in losses else "" for k in models) + " |")
    port = m["portfolio"]
    lines += ["", f"Portfolio: the paper's formula understates σ by {100 * port['understatement']:.1f}% "
                  f"({port['paper_vol']:.4f} against {port['cov_vol']:.4f} daily).", "",
              "| 99% VaR | 1-day exceedances (expected) | Kupiec p | Christoffersen p | CC p | h-day exceedances (expected) | h-day Kupiec p |",
              "|---|---|---|---|---|---|---|"]
    for method, levels in port["var"].items():
        if "99" not in levels:
            continue
        v = levels["99"]
        h = v.get("h_day", {})
        lines.append(f"| {method} | {v['exceedances']} ({v['expected']:.1f}) | {v['kupiec_pvalue']:.2g} | "
                     f"{v['christoffersen_pvalue']:.2g} | {v['cc_pvalue']:.2g} | "
                     f"{h.get('exceedances', '')} ({h.get('expected', 0):.1f}) | {h.get('kupiec_pvalue', float('nan')):.2g} |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__)
        return 2
    for run in map(Path, argv):
        if not (run / "metrics.json").is_file():
            print(f"error: {run / 'metrics.json'} not found; pass a folder written by `nimbleml risk evaluate --out`",
                  file=sys.stderr)
            return 1
        print(run_tables(run), end="\n\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
