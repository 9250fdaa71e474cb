"""Tables and JSON for benchmark rows: the same columns for every workload."""

from __future__ import annotations

import json
from pathlib import Path

from rich.table import Table

from nimbleml.bench.harness import BenchRow


def rows_table(rows: list[BenchRow], baseline: BenchRow, title: str, quality: dict[str, str]) -> Table:
    """One line per row; ratios against ``baseline``; ``quality``: row.quality key -> column name."""
    table = Table(title=title)
    for column in ("variant", "backend", "params M", "MB", "MFLOP/req", "p50 b1 ms", "p99 b1 ms", "best batch",
                   "req/s", "x base", "p50 / base", "% peak", *quality.values()):
        table.add_column(column, justify="left" if column in ("variant", "backend") else "right")
    for row in rows:
        table.add_row(
            row.variant, row.backend, f"{row.params_m:.3f}", f"{row.size_mb:.2f}", f"{row.flops_per_request / 1e6:.2f}",
            f"{row.p50_ms_b1:.3f}", f"{row.p99_ms_b1:.3f}", str(row.best_batch), f"{row.throughput_rps:,.0f}",
            f"{row.throughput_rps / baseline.throughput_rps:.2f}", f"{row.p50_ms_b1 / baseline.p50_ms_b1:.2f}",
            f"{100 * row.peak_fraction:.2f}", *(f"{row.quality.get(key, float('nan')):.4f}" for key in quality),
        )
    return table


def markdown(rows: list[BenchRow], baseline: BenchRow, quality: dict[str, str]) -> str:
    """The same table as GitHub markdown, for READMEs and reports."""
    head = ["variant", "backend", "params M", "MB", "MFLOP/req", "p50 b1 ms", "p99 b1 ms", "best batch", "req/s",
            "x base", "p50 / base", "% peak", *quality.values()]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row.variant, row.backend, f"{row.params_m:.3f}", f"{row.size_mb:.2f}",
                 f"{row.flops_per_request / 1e6:.2f}", f"{row.p50_ms_b1:.3f}", f"{row.p99_ms_b1:.3f}",
                 str(row.best_batch), f"{row.throughput_rps:,.0f}", f"{row.throughput_rps / baseline.throughput_rps:.2f}",
                 f"{row.p50_ms_b1 / baseline.p50_ms_b1:.2f}", f"{100 * row.peak_fraction:.2f}",
                 *(f"{row.quality.get(key, float('nan')):.4f}" for key in quality)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_bench(out: Path, payload: dict, rows: list[BenchRow], baseline: BenchRow, quality: dict[str, str]) -> Path:
    """``out/bench.json`` (payload + rows) and ``out/bench.md`` (the table)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps({**payload, "rows": [r.to_dict() for r in rows]}, indent=2) + "\n")
    (out / "bench.md").write_text(markdown(rows, baseline, quality))
    return out / "bench.json"
