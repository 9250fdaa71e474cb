"""`nimbleml demo`: both workloads end to end on data that needs no download.

Risk: the real S&P 500, NASDAQ and WTI series that the `arch` package ships.
Recommendation: a synthetic Taobao-format behaviour log (clearly labelled as such).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from rich.console import Console


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    demo = subparsers.add_parser("demo", help="run both workloads end to end on bundled / generated data")
    demo.add_argument("--out", type=Path, default=Path("reports/demo"), help="report folder")
    demo.add_argument("--epochs", type=int, default=15, help="risk CNN max epochs")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--skip-rec", action="store_true", help="risk workload only")
    demo.set_defaults(func=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    from nimbleml.rec.commands import run_demo as run_rec_demo
    from nimbleml.risk.experiment import RiskRunConfig, run_risk_evaluation
    from nimbleml.risk.report import print_table, write_report

    console = Console()
    summary: dict = {}
    t0 = time.perf_counter()
    console.rule("[bold]Risk: volatility forecasts on the arch package's real S&P 500, NASDAQ and WTI series")
    result = run_risk_evaluation(RiskRunConfig(data="arch", epochs=args.epochs, seed=args.seed))
    metrics = write_report(result, args.out / "risk")
    print_table(metrics, console)
    summary["risk"] = {"seconds": time.perf_counter() - t0, "report": str(args.out / "risk")}
    if not args.skip_rec:
        t1 = time.perf_counter()
        console.rule("[bold]Recommendation: SYNTHETIC Taobao-format behaviour log (generated, not real data)")
        run_rec_demo(args.out / "rec", seed=args.seed)
        summary["rec"] = {"seconds": time.perf_counter() - t1, "report": str(args.out / "rec")}
        t2 = time.perf_counter()
        console.rule("[bold]Compression and runtimes: the demo ranker's variants side by side (SYNTHETIC data)")
        summary["bench_rec"] = {**_bench_rec_demo(args.out), "seconds": time.perf_counter() - t2}
        from nimbleml.commands.loadtest import demo_burst

        t3 = time.perf_counter()
        console.rule("[bold]Serving: nimbleml serve on loopback, a 5 s burst from the load generator (SYNTHETIC data)")
        burst = demo_burst(args.out / "rec" / "model", args.out / "serve", console)
        summary["serve"] = {**burst, "seconds": time.perf_counter() - t3}
    summary["total_seconds"] = time.perf_counter() - t0
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    console.print(f"demo finished in {summary['total_seconds']:.0f} s; reports under {args.out}")
    return 0


# the variants the demo builds: fast ones, so the whole demo stays a few minutes on 2 cores
DEMO_VARIANTS = "serving,prune-structured,quantize-dynamic,quantize-static"


def _bench_rec_demo(out: Path) -> dict:
    """`nimbleml bench rec --quick` on the demo's model: export, compress, every CPU runtime."""
    from nimbleml.commands import bench_rec

    parser = argparse.ArgumentParser()
    bench_rec.add_arguments(parser)
    bench_args = parser.parse_args(["--model", str(out / "rec" / "model"), "--data", str(out / "rec" / "data"),
                                    "--out", str(out / "bench_rec"), "--variants", DEMO_VARIANTS, "--quick"])
    bench_rec.run(bench_args)
    return {"report": str(out / "bench_rec" / "bench.json")}
