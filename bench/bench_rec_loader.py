"""Benchmark the Taobao-format loader: streaming read alone, and read + sequence build (`prepare`).

Generates a SYNTHETIC Taobao-format file (10M rows by default, ~356 MB) in a temporary
folder unless --path names an existing file, times each variant in this one process,
prints a table and writes JSON (with hardware and library versions) to --out.

    .venv/bin/python bench/bench_rec_loader.py                     # 10M generated rows
    .venv/bin/python bench/bench_rec_loader.py --rows 1000000 --repeats 3
    .venv/bin/python bench/bench_rec_loader.py --path ../shared/data/rec/taobao/UserBehavior_head.csv
    taskset -c 0,1 .venv/bin/python bench/bench_rec_loader.py      # pin to 2 cores
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

import nimbleml
from nimbleml.environment import environment as base_environment
from nimbleml.rec.data import prepare, read_events, read_taobao
from nimbleml.rec.synthetic import write_taobao_rows

log = logging.getLogger("bench_rec_loader")


@dataclass
class BenchRow:
    """One variant's timing: medians over repeats.

    cpu_seconds is the process's CPU time over all its threads: on a machine shared with
    other jobs wall-clock time inflates, but rows_per_cpu_second does not, and it is a
    lower bound for wall-clock rows/s on dedicated cores (the file is in the page cache).
    """

    variant: str
    rows: int  # rows read from the file (malformed ones included)
    seconds: float  # wall-clock
    rows_per_second: float  # rows / wall-clock seconds
    cpu_seconds: float  # user + system CPU time of this process, all threads
    rows_per_cpu_second: float
    megabytes_per_second: float  # file MB (1e6 bytes) per wall-clock second
    repeats: int

    def to_dict(self) -> dict:
        return asdict(self)


def stream_only(path: Path, chunk_bytes: int) -> int:
    """Iterate read_taobao's chunks without keeping them; returns rows seen."""
    skipped: Counter = Counter()
    kept = sum(len(chunk["user"]) for chunk in read_taobao(path, chunk_bytes=chunk_bytes, skipped=skipped))
    return kept + sum(skipped.values())


def read_all(path: Path, chunk_bytes: int) -> int:
    """Stream and concatenate every column into numpy (what prepare does before building)."""
    skipped: Counter = Counter()
    columns = read_events(path, "taobao", chunk_bytes=chunk_bytes, skipped=skipped)
    return len(columns["user"]) + sum(skipped.values())


def prepare_all(path: Path, chunk_bytes: int) -> int:
    """Full prepare: read, dense re-indexing, per-user time sort, CSR sequences."""
    _, report = prepare(path, "taobao", chunk_bytes=chunk_bytes)
    return report.rows_read


def time_variant(name: str, run: Callable[[Path, int], int], path: Path, chunk_bytes: int, repeats: int) -> BenchRow:
    """Run a variant `repeats` times and keep the median wall-clock time."""
    seconds, cpu_seconds, rows = [], [], 0
    for _ in range(repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        rows = run(path, chunk_bytes)
        seconds.append(time.perf_counter() - start)
        cpu_seconds.append(time.process_time() - cpu_start)
    wall, cpu = statistics.median(seconds), statistics.median(cpu_seconds)
    size_mb = path.stat().st_size / 1e6
    return BenchRow(name, rows, wall, rows / wall, cpu, rows / cpu, size_mb / wall, repeats)


def peak_rss_megabytes() -> float | None:
    """Peak resident memory of this process so far, MB (1e6 bytes); None where unsupported."""
    try:
        import resource
    except ImportError:
        return None
    kilobytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # Linux reports KiB
    return kilobytes * 1024 / 1e6


def environment() -> dict:
    """nimbleml's environment block plus pyarrow's own thread pool size."""
    return {**base_environment(), "pyarrow_cpu_count": pa.cpu_count()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=10_000_000, help="rows to generate (default 10M)")
    parser.add_argument("--path", type=Path, help="existing Taobao-format file to read instead of generating one")
    parser.add_argument("--out", type=Path, default=Path("reports/bench_rec_loader.json"), help="JSON output file")
    parser.add_argument("--chunk-mb", type=int, nargs="+", default=[64], help="reader block sizes to try, MiB")
    parser.add_argument("--repeats", type=int, default=1, help="runs per variant; the median is reported")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    with tempfile.TemporaryDirectory(prefix="bench_rec_") as tmp:
        if args.path is not None:
            path, generated_seconds = args.path, None
        else:
            path = Path(tmp) / "UserBehavior_synthetic.csv"
            start = time.perf_counter()
            write_taobao_rows(path, args.rows, seed=args.seed)
            generated_seconds = time.perf_counter() - start
            log.info("generated %d rows (%.0f MB) in %.1f s", args.rows, path.stat().st_size / 1e6, generated_seconds)
        rows: list[BenchRow] = []
        for chunk_mb in args.chunk_mb:
            chunk_bytes = chunk_mb << 20
            for name, run in (("stream (read_taobao)", stream_only), ("read + concat", read_all), ("prepare (read + build)", prepare_all)):
                rows.append(time_variant(f"{name}, {chunk_mb} MiB blocks", run, path, chunk_bytes, args.repeats))
                log.info("%s: %.2f s", rows[-1].variant, rows[-1].seconds)
        file_bytes = path.stat().st_size

    header = f"{'variant':<40} {'rows':>12} {'seconds':>8} {'rows/s':>11} {'cpu s':>7} {'rows/cpu-s':>11} {'MB/s':>7}"
    print(header)
    print("-" * len(header))
    for row in rows:
        print(
            f"{row.variant:<40} {row.rows:>12,} {row.seconds:>8.2f} {row.rows_per_second:>11,.0f} "
            f"{row.cpu_seconds:>7.2f} {row.rows_per_cpu_second:>11,.0f} {row.megabytes_per_second:>7.1f}"
        )
    env = environment()
    print(
        f"cpus usable: {env['cpus_usable']}, load average (1 min) at the end: {env['load_average_1_5_15min'][0]:.1f}, "
        f"peak RSS: {peak_rss_megabytes():,.0f} MB"
    )

    result = {
        "benchmark": "rec_loader",
        "file": str(args.path) if args.path else "generated (synthetic, write_taobao_rows)",
        "file_bytes": file_bytes,
        "generated_seconds": generated_seconds,
        "environment": env,
        "rows": [row.to_dict() for row in rows],
        "peak_rss_megabytes": peak_rss_megabytes(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    log.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
