"""Training modes side by side: FP32 against bf16 autocast, one process against N DDP processes.

    .venv/bin/python bench/rec_train_modes.py --data runs/video/data --epochs 4 --out runs/train-modes

Every variant trains the default preset from the same seed on the same data for the same number
of epochs, with the same CPU threads in all (split over the processes), and is validated once,
after the last epoch, by the same code on the same users. Each runs in fresh spawned processes,
one after another (never two at once). It prints a table and writes ``train_modes.json``:
``{"environment", "data", "epochs", "rows": [{variant, precision, processes, threads,
train_seconds, seconds_per_epoch, speedup, valid_ndcg@10, valid_hr@10, valid_sampled100_ndcg@10}]}``.
``train_seconds`` is the training loop's wall time including that one validation (the same work
in every variant); ``speedup`` = the first variant's ``train_seconds`` / this one's. A few
epochs are an early-training snapshot: quality within noise of each other is the check, not a
final score.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from nimbleml.environment import environment
from nimbleml.errors import NimbleError
from nimbleml.rec.commands import TRAIN_PRESETS, build_model
from nimbleml.rec.data import SequenceData
from nimbleml.rec.train import TrainConfig, launch_local, process_group, train

VARIANTS = {  # name: (precision, processes); more than one process = DistributedDataParallel (gloo)
    "fp32-1proc": ("fp32", 1),
    "bf16-1proc": ("bf16", 1),
    "fp32-2proc": ("fp32", 2),
    "bf16-2proc": ("bf16", 2),
}


def _train_variant(data_dir: Path, precision: str, epochs: int, threads: int, result_file: Path) -> None:
    """Runs in every spawned process; rank 0 writes the row."""
    data = SequenceData.load(data_dir)
    config = TrainConfig(**TRAIN_PRESETS["default"].to_dict())
    config.epochs, config.eval_every, config.patience = epochs, epochs, epochs
    config.precision, config.threads, config.time_limit_s = precision, threads, None  # type: ignore[assignment]
    result = train(build_model("default", data), data, config)
    rank, world = process_group()
    if rank == 0:
        last = result.history[-1]
        row = {
            "precision": precision, "processes": world, "threads": threads,
            "train_seconds": round(result.train_seconds, 1),
            "seconds_per_epoch": round(result.train_seconds / result.epochs_run, 1),
            "valid_ndcg@10": last["valid_ndcg@10"], "valid_hr@10": last["valid_hr@10"],
            "valid_sampled100_ndcg@10": last["valid_sampled100_ndcg@10"],
        }
        result_file.write_text(json.dumps(row))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="a folder written by `nimbleml rec prepare`")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads in all, split over the processes")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma list of: " + ", ".join(VARIANTS))
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    for name in names:  # all checked before any variant trains
        if name not in VARIANTS:
            parser.error(f"unknown variant {name!r}; use some of: {', '.join(VARIANTS)}")
    try:  # a missing or broken data folder is one message here, not a traceback per spawned process
        SequenceData.load(args.data)
    except NimbleError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in names:
        precision, processes = VARIANTS[name]
        result_file = args.out / f"row-{len(rows)}.json"
        launch_local(_train_variant, processes, args.data, precision, args.epochs, args.threads, result_file)
        row = {"variant": name, **json.loads(result_file.read_text())}
        row["speedup"] = round(rows[0]["train_seconds"] / row["train_seconds"], 2) if rows else 1.0
        rows.append(row)
    report = {"environment": environment(), "data": str(args.data), "epochs": args.epochs, "rows": rows}
    (args.out / "train_modes.json").write_text(json.dumps(report, indent=2))
    table = Table(title=f"rec training modes, {args.epochs} epochs, {args.threads} threads in all")
    for column in ("variant", "s / epoch", "speedup", "valid NDCG@10", "valid HR@10", "sampled-100 NDCG@10"):
        table.add_column(column, justify="left" if column == "variant" else "right")
    for row in rows:
        sampled = row["valid_sampled100_ndcg@10"]
        table.add_row(row["variant"], f"{row['seconds_per_epoch']:.1f}", f"{row['speedup']:.2f}x",
                      f"{row['valid_ndcg@10']:.4f}", f"{row['valid_hr@10']:.4f}",
                      "n/a" if sampled is None else f"{sampled:.4f}")
    Console().print(table)
    print(f"wrote {args.out / 'train_modes.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
