"""`nimbleml compress --model DIR --recipe R [--recipe R ...] --data DIR --out DIR`: apply
compression recipes in order to a trained recommender and write a model folder that
`rec evaluate`, `bench` and `serve` accept (see ``nimbleml.rec.compression``)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from nimbleml.rec.compression import RECIPES, VARIANT_FILE, CompressConfig, compress_model


def run(args: argparse.Namespace) -> int:
    config = CompressConfig(seed=args.seed, threads=args.threads)
    if args.finetune_seconds is not None:
        config.finetune_seconds = args.finetune_seconds
    if args.distill_seconds is not None:
        config.distill_seconds = args.distill_seconds
    config.student_dim = args.student_dim
    out = compress_model(Path(args.model), Path(args.data), args.recipe, Path(args.out), config)
    variant = json.loads((out / VARIANT_FILE).read_text())
    table = Table(title=f"compressed {variant['parent']} -> {out} ({variant['precision']})")
    for column in ("recipe", "seconds"):
        table.add_column(column, justify="right" if column == "seconds" else "left")
    for step in variant["steps"]:
        table.add_row(step["recipe"], f"{step['seconds']:.0f}")
    console = Console()
    console.print(table)
    before, after = variant["valid_before"], variant["valid_after"]
    console.print(
        f"parameters {variant['parent_params']['total'] / 1e6:.3f}M -> {variant['params_m']:.3f}M "
        f"({variant['params']['nonzero'] / 1e6:.3f}M nonzero); validation 50-candidate NDCG@10 "
        f"{before['ndcg@10']:.4f} -> {after['ndcg@10']:.4f} ({variant['quality_protocol']}); wrote {out / VARIANT_FILE}"
    )
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("compress", help="prune, quantise, distil or slim the attention of a trained recommender")
    p.add_argument("--model", required=True, help="model folder (`rec train` or `compress` output)")
    p.add_argument("--recipe", required=True, action="append", choices=sorted(RECIPES),
                   help="recipe to apply; repeat to chain them (an int8 recipe last)")
    p.add_argument("--data", required=True, help="the prepared data the model was trained on")
    p.add_argument("--out", required=True, help="output model folder")
    p.add_argument("--finetune-seconds", type=float, default=None, help="time limit per fine-tune (default 60)")
    p.add_argument("--distill-seconds", type=float, default=None, help="distillation time limit (default 240)")
    p.add_argument("--student-dim", type=int, default=None,
                   help="distill: the student's width (default: the width at 20%% of the teacher's parameters)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)
