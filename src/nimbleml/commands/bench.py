"""`nimbleml bench <target>`: side-by-side measurements that print a table and write JSON.

Each target is a module with ``HELP`` (one line), ``add_arguments(parser)`` and
``run(args) -> int``; adding a target is one line in ``BENCH_TARGETS``.
"""

from __future__ import annotations

import argparse
import importlib

BENCH_TARGETS: dict[str, str] = {
    "rec": "nimbleml.commands.bench_rec",
    "risk": "nimbleml.commands.bench_risk",
    "retrieve": "nimbleml.rec.retrieve_bench",
    "serve": "nimbleml.commands.serve_bench",
}


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    bench = subparsers.add_parser("bench", help="side-by-side benchmarks (tables + JSON)")
    targets = bench.add_subparsers(dest="bench_target", required=True)
    for name, module_name in BENCH_TARGETS.items():
        module = importlib.import_module(module_name)
        parser = targets.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(parser)
        parser.set_defaults(func=module.run)
