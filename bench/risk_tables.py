"""Print the README's risk tables (markdown) from one or more `nimbleml risk evaluate` run folders.

    .venv/bin/python bench/risk_tables.py runs/eq30-h5 runs/full-h5

For each run: pooled and per-window QLIKE of every model, its DM p-value against the CNN (HLN,
Newey-West; negative statistic = the CNN's loss is lower) and membership of the 10% Model
Confidence Set ("IN"); then the 99% VaR backtests of the CNN-based portfolio. Reads only
metrics.json, so it never refits anything.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _cell(qlike: float, dm: dict | None, included: bool) -> str:
    text = f"{qlike:.3f}"
    if dm is not None:
        sign = "CNN better" if dm["stat"] < 0 else "CNN worse"
        text += f" p={dm['pvalue']:.2g} ({sign})"
    return text + (" IN" if included else "")


def run_tables(run: Path) -> str:
    m = json.loads((run / "metrics.json").read_text())
    models = list(m["models"])
    p = m["protocol"]
    lines = [f"**{run.name}**: {p['name']}, refit {p['refit']}, h={m['horizon']}, {m['n_assets']} assets, "
             f"test {p['test_start']}..{p['test_end']}, {m.get('wall_seconds', 0) / 60:.1f} min wall", "",
             "| scope | " + " | ".join(models) + " |", "|---|" + "---|" * len(models)]
    scopes = [("all", m["models"], m["tests"]["dm"].get("cnn", {}), m["tests"]["mcs"].get("all", {}))]
    scopes += [(w, m["windows"][w], m["tests"].get("dm_windows", {}).get(w, {}).get("cnn", {}),
                m["tests"]["mcs"].get(w, {})) for w in m["windows"]]
    for name, losses, dm, mcs in scopes:
        included = set(mcs.get("included", []))
        lines.append(f"| {name} | " + " | ".join(
            _cell(losses[k]["qlike"], dm.get(k), k in included) if k in losses else "" for k in models) + " |")
    lines += ["", "| by class (QLIKE) | " + " | ".join(models) + " |", "|---|" + "---|" * len(models)]
    for c, losses in m["by_asset_class"].items():
        lines.append(f"| {c} | " + " | ".join(f"{losses[k]['qlike']:.3f}" if k in losses else "" for k in models) + " |")
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
