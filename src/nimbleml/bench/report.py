"""Tables and JSON for benchmark rows: the same columns for every workload."""

from __future__ import annotations

import json
from pathlib import Path

from rich.table import Table

from nimbleml.bench.harness import BenchRow, Estimate

HEAD = ["variant", "backend", "params M", "MB", "MFLOP/req", "p50 b1 ms [95% CI]", "p99 b1 ms", "best batch",
        "req/s [95% CI]", "req/s server batch", "x base", "p50 / base", "% peak"]


def _interval(value: float, estimate: Estimate | None, digits: int) -> str:
    """``median [low-high]`` where the row was timed more than once, else the number."""
    if estimate is None or estimate.n < 2:
        return f"{value:,.{digits}f}"
    low, high = estimate.ci95
    return f"{value:,.{digits}f} [{low:,.{digits}f}-{high:,.{digits}f}]"


def _cells(row: BenchRow, baseline: BenchRow, quality: dict[str, str]) -> list[str]:
    server = _interval(row.server.median, row.server, 0) if row.server is not None else "-"
    return [row.variant, row.backend, f"{row.params_m:.3f}", f"{row.size_mb:.2f}", f"{row.flops_per_request / 1e6:.2f}",
            _interval(row.p50_ms_b1, row.p50, 3), f"{row.p99_ms_b1:.3f}", str(row.best_batch),
            _interval(row.throughput_rps, row.throughput, 0), server,
            f"{row.throughput_rps / baseline.throughput_rps:.2f}", f"{row.p50_ms_b1 / baseline.p50_ms_b1:.2f}",
            f"{100 * row.peak_fraction:.2f}", *(f"{row.quality.get(key, float('nan')):.4f}" for key in quality)]


def rows_table(rows: list[BenchRow], baseline: BenchRow, title: str, quality: dict[str, str]) -> Table:
    """One line per row; ratios against ``baseline``; ``quality``: row.quality key -> column name;
    "% peak": the row's achieved FLOP rate over the peak the rows were measured against."""
    table = Table(title=title)
    for column in (*HEAD, *quality.values()):
        table.add_column(column, justify="left" if column in ("variant", "backend") else "right")
    for row in rows:
        table.add_row(*_cells(row, baseline, quality))
    return table


def markdown(rows: list[BenchRow], baseline: BenchRow, quality: dict[str, str]) -> str:
    """The same table as GitHub markdown, for READMEs and reports."""
    head = [*HEAD, *quality.values()]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(_cells(row, baseline, quality)) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_bench(out: Path, payload: dict, rows: list[BenchRow], baseline: BenchRow, quality: dict[str, str],
                note: str = "") -> Path:
    """``out/bench.json`` (payload + rows) and ``out/bench.md`` (the table, under ``note``: what
    the rows were timed and scored on)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps({**payload, "rows": [r.to_dict() for r in rows]}, indent=2) + "\n")
    (out / "bench.md").write_text((f"{note}\n\n" if note else "") + markdown(rows, baseline, quality))
    return out / "bench.json"
