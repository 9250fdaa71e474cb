"""`nimbleml rec prepare | train | evaluate`, and the recommendation part of the demo.

Every metric is computed on the TEST targets (each user's last event) after early stopping
on the validation targets (``--targets valid`` scores the validation targets instead, to compare
configurations), for the model and for every baseline under every protocol, with
the same history mask for all (see ``rec.evaluate``). metrics.json keys:
``full.{hr@10,hr@50,ndcg@10,ndcg@50,mrr}``, ``sampled100.{hr@10,ndcg@10,mrr}``,
``candidates50.{hr@10,ndcg@10,mrr}``, each with ``repeat`` and ``novel`` (the same metrics and
``n_users`` on the users whose target is / is not a repeat), ``candidates50_novel.{...}`` (the
older novel split, re-drawn), ``baselines.<name>.<protocol>.{...}`` (split alike),
``baselines.<name>.selected`` (validation choice), ``targets``, ``repeat_mode``,
``exclude_history``, ``repeat_target_share``,
``n_users``, ``n_items``, ``epochs``, ``train_seconds``, ``precision``, ``processes``.

Multi-process training: ``rec train --nproc N`` starts N local processes itself. On many
machines, start the same command with torchrun on every node (rank 0's node as endpoint);
each process joins torchrun's group and only global rank 0 evaluates and writes::

    torchrun --nnodes 2 --nproc-per-node 4 --rdzv-backend c10d --rdzv-endpoint HOST0:29500 \
        .venv/bin/nimbleml rec train --data runs/video/data --out runs/video/model-ddp
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from rich.console import Console
from rich.table import Table

from nimbleml.environment import environment
from nimbleml.errors import NimbleError
from nimbleml.rec.baselines import BASELINES, fit_on_validation
from nimbleml.rec.data import FORMATS, PrepareReport, SequenceData, leave_last_out, prepare
from nimbleml.rec.evaluate import TARGET_GROUPS, SeqRecScorer, evaluate_protocols, repeat_targets
from nimbleml.rec.model import SeqRec, SeqRecConfig
from nimbleml.rec.retrieve import IndexSpec, ItemIndex, item_table, recommend
from nimbleml.rec.train import (
    TrainConfig,
    TrainResult,
    init_process_group,
    launch_local,
    load_checkpoint,
    process_group,
    save_checkpoint,
    train,
)

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
REPORT_FILE = "prepare_report.json"

# small: tests and the demo (about a minute on 2 cores). default: the production ranker; on
# CPU it trains with a 2048-negative logQ-corrected sampled softmax: on Amazon Video Games an
# epoch takes ~20 s against ~65 s for the full softmax over the 24k-item catalogue (one core),
# for about the same validation NDCG@10 per epoch; pass --loss ce where a GPU is available.
# Negatives are drawn half by popularity, half uniformly ("mixed"): on Games (validation, best
# epoch of each, history items not excluded) popularity alone gave full NDCG@10 0.043 and
# sampled-100 NDCG@10 0.540, uniform alone 0.041 / 0.545, mixed 0.043 / 0.549; 256 uniform
# negatives learnt more slowly (0.513 at epoch 8; all these at dim 64, weight decay 0.1). With
# history exclusion (model_config), dim 128 and weight decay 0.5 the validation full NDCG@10
# levels off near 0.063 by epoch ~15, so patience 5 ends the run after ~23 epochs (~13 min on 2
# threads; the 17-minute limit is a guard). SASRec's
# one-negative BCE (dim 50, 1 head) is still climbing at epoch 36 (sampled NDCG@10 0.506,
# full 0.027), too slow for the CPU budget.
TRAIN_PRESETS: dict[str, TrainConfig] = {
    "small": TrainConfig(epochs=12, batch_size=64, lr=2e-3, patience=3, loss="ce", max_valid_users=1000),
    "default": TrainConfig(
        epochs=200, batch_size=128, lr=1e-3, patience=5, loss="sampled_softmax", n_negatives=2048,
        negatives_from="mixed", time_limit_s=17 * 60,
        # AdamW decoupled weight decay. Video.txt at dim 128 (validation full NDCG@10 /
        # sampled-100 NDCG@10): 0.1 -> 0.0614 / 0.556 at epoch 10, then overfits; 0.5 -> 0.0642 /
        # 0.567 at epoch 15; 1.0 still 0.0508 / 0.550 at epoch 12. Taobao head (dim 64): best 0.0994
        # -> 0.1000
        weight_decay=0.5,
        # Taobao head (815 users, 7 batches): validation full NDCG@10 0.035 -> 0.091 with 100
        # steps an epoch; Video.txt (240 batches) is unchanged
        min_steps_per_epoch=100,
        # weight averaging, validation full NDCG@10: Video.txt 0.0577 -> 0.0600, Taobao head
        # (rare inputs and repeat counts on) 0.0627 -> 0.0637
        ema_decay=0.999,
        # the repeat bonus at a higher rate: Taobao head validation full NDCG@10 0.0637 (lr) ->
        # 0.0786 (1e-2, best epoch 9) -> 0.0819 (3e-2, best epoch 5)
        repeat_lr=3e-2,
    ),
}


REPEAT_SHARE_TO_KEEP_HISTORY = 0.01  # at or above this share of repeat events, history items stay rankable


def repeat_share(data: SequenceData) -> float:
    """Share of training events (each user's events[:-2]) whose item the user already had
    earlier: 0.0 on Amazon Games, most of the Taobao views."""
    split = leave_last_out(data, max_len=1)
    users = np.repeat(np.arange(data.n_users), np.diff(split.train_offsets))
    events = pd.DataFrame({"user": users, "item": split.train_items})
    return float(events.duplicated().mean()) if len(events) else 0.0


# at or above this share of training events on items seen once in training, rare items enter
# histories as one shared vector (SeqRecConfig.min_input_count = 2). Taobao head: 48.6% (on);
# Video.txt: 1.8% (off; on, its validation full NDCG@10 was 0.0595 against 0.0600 off).
# Such a log also keeps the narrower embedding (LONG_TAIL_DIM): its items have too few events
# to fill a wider one (Taobao head, weight decay 0.5, validation full NDCG@10 at epoch 6: dim 64
# 0.0994, dim 128 0.0890), while Video.txt gains from it (best 0.0605 at dim 64, 0.0642 at 128)
SINGLETON_SHARE_FOR_RARE_INPUTS = 0.10
DEFAULT_DIM = 128  # embedding width of the default preset
LONG_TAIL_DIM = 64  # ... on a long-tail log
# the default preset's item-frequency aware input dropout (SeqRecConfig.unknown_input_alpha) on
# logs that are not long-tail (those have min_input_count instead). Video.txt validation, best
# full NDCG@10 / sampled-100 NDCG@10 (best epoch): off 0.0628 / 0.5660 (16), 0.25 0.0635 / 0.5706
# (17), 1.0 0.0647 / 0.5745 (21), 2.0 0.0650 / 0.5762 (23), 4.0 0.0650 / 0.5784 (24): full level
# from 1 on, sampled-100 best at 4 (the grid's edge; larger values learn more slowly still)
UNKNOWN_INPUT_ALPHA = 4.0


def singleton_share(data: SequenceData) -> float:
    """Share of training events (each user's events[:-2]) whose item occurs once in training."""
    counts = data.item_popularity("train")
    total = counts.sum()
    return float(counts[counts == 1].sum() / total) if total else 0.0


def model_config(preset: str, data: SequenceData, repeat_mode: str = "bonus") -> SeqRecConfig:
    """The preset's SeqRecConfig for this data: behaviour and category embeddings are used
    only when the data has more than one behaviour type / has categories; history items are
    ranked last only when the training data (almost) never repeats an item; where it does, the
    model gets repeat-aware scores (by recency, count and decayed count) instead; on a long-tail
    log (many items seen once) rare items share one input vector and the embedding stays
    narrow (LONG_TAIL_DIM; DEFAULT_DIM elsewhere); elsewhere the default preset learns that
    vector by item-frequency aware input dropout (UNKNOWN_INPUT_ALPHA). ``repeat_mode`` says how
    the repeat scores work (``SeqRecConfig.repeat_mode``); it has no effect where history is
    excluded (no repeats)."""
    share = repeat_share(data)
    repeats = share >= REPEAT_SHARE_TO_KEEP_HISTORY
    long_tail = singleton_share(data) >= SINGLETON_SHARE_FOR_RARE_INPUTS
    extra = dict(
        n_categories=data.n_categories,
        use_category=data.n_categories > 0,
        use_behavior=len(np.unique(data.behaviors)) > 1,
        exclude_history=not repeats,
        repeat_scores=repeats,
        repeat_counts=repeats,
        repeat_decay=repeats,
        repeat_mode=repeat_mode if repeats else "bonus",
        min_input_count=2 if long_tail else 0,
    )
    if preset == "small":
        return SeqRecConfig.small(data.n_items, **extra)
    return SeqRecConfig(
        n_items=data.n_items, dim=LONG_TAIL_DIM if long_tail else DEFAULT_DIM,
        unknown_input_alpha=0.0 if long_tail else UNKNOWN_INPUT_ALPHA, **extra,
    )


def build_model(preset: str, data: SequenceData, repeat_mode: str = "bonus") -> SeqRec:
    model = SeqRec(model_config(preset, data, repeat_mode))
    if model.config.use_category:
        model.set_item_category(data.item_category)
    model.set_item_counts(data.item_popularity("train"))
    return model


TARGETS = ("test", "valid")  # which held-out event evaluate_all scores: the last, or the second-to-last


def evaluate_all(model: SeqRec, data: SequenceData, seed: int = 0, targets: str = "test") -> dict:
    """Model and baselines under every protocol on the test targets -> metrics dict.

    Every scorer gets the same inputs, the same sampled negatives and the same history mask
    (on when the model was built with ``exclude_history``); baseline hyperparameters are
    chosen on the validation targets. ``targets="valid"`` scores the validation targets instead
    (each user's second-to-last event, the test event never read): for choosing between
    configurations. The model's early stopping and the baselines' hyperparameters were chosen
    on those same targets, so they are a selection score, not an estimate of test quality."""
    if targets not in TARGETS:
        raise NimbleError(f"unknown targets {targets!r}", fix=f"use one of {', '.join(TARGETS)}")
    split = leave_last_out(data, max_len=model.config.max_len)
    popularity = data.item_popularity()
    held_out = 1 if targets == "test" else 2  # events from the end: the target and what follows it
    inputs = split.test_input if targets == "test" else split.valid_input
    target = split.test_target if targets == "test" else split.valid_target
    behaviors = None
    if model.config.use_behavior:
        behaviors = split.test_behaviors if targets == "test" else split.valid_behaviors
    exclude_history = model.config.exclude_history
    # every item before the target (for test, the validation item included), not only the input window
    seen = [data.items[start : end - held_out] for start, end in zip(data.offsets[:-1], data.offsets[1:])]
    results = evaluate_protocols(
        SeqRecScorer(model), inputs, target, popularity, behaviors, seed, seen, exclude_history
    )
    metrics: dict = {name: result.to_dict() for name, result in results.items()}
    metrics["baselines"] = {}
    for name in BASELINES:
        baseline, selection = fit_on_validation(name, data, exclude_history, seed=seed)
        results = evaluate_protocols(baseline, inputs, target, popularity, None, seed, seen, exclude_history)
        metrics["baselines"][name] = {protocol: result.to_dict() for protocol, result in results.items()}
        metrics["baselines"][name]["selected"] = selection.to_dict()
        if hasattr(baseline, "coverage_"):  # EASE on the most popular items only: their share of events
            metrics["baselines"][name]["selected"]["event_coverage"] = baseline.coverage_
    metrics["targets"] = targets
    metrics["repeat_mode"] = model.config.repeat_mode if model.config.repeat_scores else None
    metrics["exclude_history"] = exclude_history
    metrics["repeat_target_share"] = float(repeat_targets(target, seen).mean())
    metrics["n_users"] = data.n_users
    metrics["n_items"] = data.n_items
    metrics["protocol_notes"] = {
        "targets": "test = each user's last event; early stopping on the second-to-last (valid)",
        "repeat/novel": "each protocol's metrics on the users whose target they had (had not) seen before: "
                        "the same ranks and negatives; null metrics when a group is empty",
        "full": "rank among all items but padding; ties pessimistic",
        "exclude_history": "when true, every scorer's input-window items score -inf (a repeat target is a miss)",
        "sampled100": "SASRec protocol: target + 100 uniform negatives not in the whole history, <= 10,000 users",
        "candidates50": "target + 49 popularity-sampled negatives not in the whole history (serving re-rank task)",
        "candidates50_novel": "candidates50 on the users whose test target is not in their history",
        "repeat_target_share": "share of test targets the user had interacted with before",
        "baselines": "hyperparameters chosen on validation full NDCG@10 (baselines.<name>.selected)",
    }
    return metrics


def _metrics_table(metrics: dict) -> Table:
    """One row per protocol and metric, one column per model; then the split by target
    (repeat / novel rows of each protocol's NDCG@10 and HR@10, full MRR)."""
    rows = [
        ("full", "hr@10"), ("full", "hr@50"), ("full", "ndcg@10"), ("full", "ndcg@50"), ("full", "mrr"),
        ("sampled100", "hr@10"), ("sampled100", "ndcg@10"),
        ("candidates50", "hr@10"), ("candidates50", "ndcg@10"), ("candidates50", "mrr"),
        ("candidates50_novel", "hr@10"), ("candidates50_novel", "ndcg@10"), ("candidates50_novel", "mrr"),
    ]  # fmt: skip
    rows = [(protocol, None, metric) for protocol, metric in rows if protocol in metrics]
    split = [("full", "ndcg@10"), ("full", "hr@10"), ("full", "mrr"), ("sampled100", "ndcg@10"),
             ("candidates50", "ndcg@10")]  # fmt: skip
    rows += [(protocol, group, metric) for group in TARGET_GROUPS for protocol, metric in split
             if group in metrics.get(protocol, {})]  # fmt: skip
    models = [("SeqRec", metrics)] + list(metrics["baselines"].items())
    targets = metrics.get("targets", "test")
    table = Table(
        title=f"{targets} metrics ({metrics['n_users']:,} users, {metrics['n_items']:,} items; "
        f"repeat targets {metrics['repeat_target_share']:.1%}; history excluded: {metrics['exclude_history']}); "
        "/repeat, /novel: users whose target they had, had not seen"
    )
    table.add_column("protocol")
    table.add_column("metric")
    for name, _ in models:
        table.add_column(name, justify="right")

    def cell(m: dict, protocol: str, group: str | None, metric: str) -> str:
        value = (m[protocol] if group is None else m[protocol][group])[metric]
        return "-" if value is None else f"{value:.4f}"

    for protocol, group, metric in rows:
        table.add_row(protocol if group is None else f"{protocol}/{group}", metric,
                      *(cell(m, protocol, group, metric) for _, m in models))
    return table


def _write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")


def _report_table(report: PrepareReport) -> Table:
    table = Table(title="prepare")
    table.add_column("what")
    table.add_column("count", justify="right")
    table.add_row("rows read", f"{report.rows_read:,}")
    table.add_row("rows per second", f"{report.rows_per_second:,.0f}")
    table.add_row("users", f"{report.n_users:,}")
    table.add_row("items", f"{report.n_items:,}")
    table.add_row("categories", f"{report.n_categories:,}")
    table.add_row("events kept", f"{report.rows_kept:,}")
    for reason, n in sorted(report.skipped.items(), key=lambda kv: -kv[1]):
        table.add_row(f"skipped: {reason}", f"{n:,}")
    if not report.skipped:
        table.add_row("skipped", "0")
    return table


# ---------------------------------------------------------------- subcommands


def run_prepare(args: argparse.Namespace) -> int:
    """Read a behaviour log, build sequences, save them and the report under --out."""
    data, report = prepare(args.data, args.format, k_core=args.k_core)
    out = Path(args.out)
    data.save(out)
    _write_json(out / REPORT_FILE, report.to_dict())
    Console().print(_report_table(report))
    return 0


def train_and_evaluate(
    data: SequenceData, out: Path, preset: str = "default", seed: int = 0, epochs: int | None = None,
    loss: str | None = None, threads: int | None = None, precision: str | None = None, ema_decay: float | None = None,
    repeat_mode: str = "bonus", targets: str = "test",
) -> tuple[dict, TrainResult]:
    """Train the preset on ``data``, save the checkpoint and metrics.json under ``out``
    (on the ``targets``: "test", or "valid" to compare configurations without reading the test).
    In a multi-process group only rank 0 evaluates and writes; the others return ({}, result)."""
    if preset not in TRAIN_PRESETS:
        raise NimbleError(f"unknown preset {preset!r}", fix=f"use one of {', '.join(TRAIN_PRESETS)}")
    config = TrainConfig(**TRAIN_PRESETS[preset].to_dict())
    config.seed = seed
    if epochs is not None:
        config.epochs = epochs
    if loss is not None:
        config.loss = loss  # type: ignore[assignment]
    if threads is not None:
        config.threads = threads
    if precision is not None:
        config.precision = precision  # type: ignore[assignment]
    if ema_decay is not None:
        config.ema_decay = ema_decay
    model = build_model(preset, data, repeat_mode)
    result = train(model, data, config)
    rank, world = process_group()
    metrics: dict = {}
    if rank == 0:
        save_checkpoint(model, {"preset": preset, "train": config.to_dict(), "result": result.to_dict()}, out)
        metrics = evaluate_all(model, data, seed=seed, targets=targets)
        metrics.update(epochs=result.epochs_run, best_epoch=result.best_epoch, train_seconds=result.train_seconds,
                       loss=config.loss, precision=config.precision, processes=world, preset=preset,
                       environment=environment())
        _write_json(out / METRICS_FILE, metrics)
    if world > 1:
        # every process waits here until rank 0 has written, so no process tears down its gloo
        # group while a peer still holds the connections (see the SIGABRT note in rec.train.train)
        torch.distributed.barrier()
    return metrics, result


def run_train(args: argparse.Namespace) -> int:
    """Train on prepared data (--data), evaluate on the test targets, write everything to --out.

    --nproc N > 1 starts N local processes (DistributedDataParallel, gloo on CPU, NCCL on
    GPUs); under torchrun (WORLD_SIZE set) this process joins torchrun's group instead."""
    if args.nproc > 1:
        launch_local(run_train, args.nproc, argparse.Namespace(**{**vars(args), "nproc": 1}))
        return 0
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
        init_process_group()
    data = SequenceData.load(Path(args.data))
    metrics, result = train_and_evaluate(
        data, Path(args.out), args.preset, args.seed, args.epochs, args.loss, args.threads, args.precision, args.ema_decay,
        args.repeat_mode, args.targets,
    )
    if not metrics:  # not rank 0: it wrote nothing
        return 0
    console = Console()
    console.print(_metrics_table(metrics))
    console.print(
        f"{result.epochs_run} epochs ({result.stopped_because}), best epoch {result.best_epoch}, "
        f"{result.train_seconds:.0f} s; wrote {Path(args.out) / METRICS_FILE}"
    )
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    """Evaluate a saved model (--model) and the baselines on prepared data (--data)."""
    model = load_checkpoint(Path(args.model))
    data = SequenceData.load(Path(args.data))
    if data.n_items != model.config.n_items:
        raise NimbleError(
            f"model has {model.config.n_items} items, data has {data.n_items}",
            path=args.data, fix="evaluate on the prepared data the model was trained on",
        )
    metrics = evaluate_all(model, data, seed=args.seed, targets=args.targets)
    saved = json.loads((Path(args.model) / "config.json").read_text()).get("result", {})
    metrics.update(epochs=saved.get("epochs_run"), train_seconds=saved.get("train_seconds"), environment=environment())
    _write_json(Path(args.out) / METRICS_FILE, metrics)
    Console().print(_metrics_table(metrics))
    return 0


def parse_search(text: str) -> dict[str, float]:
    """ "efSearch=128" or "nprobe=32,k_factor_rf=4" -> {"efSearch": 128.0}."""
    try:
        return {name.strip(): float(value) for name, value in (pair.split("=") for pair in text.split(",") if pair)}
    except ValueError as exc:
        raise NimbleError(f"search parameters {text!r} are not name=value pairs", fix="e.g. --search efSearch=128") from exc


def run_index(args: argparse.Namespace) -> int:
    """Build the approximate item index of a model folder (--model) and save it there."""
    model_dir = Path(args.model)
    model = load_checkpoint(model_dir)
    search = parse_search(args.search)
    index = ItemIndex.build(item_table(model), IndexSpec(factory=args.factory, search=search))
    path = index.save(model_dir)
    Console().print(
        f"indexed {index.n_items:,} items x {index.dim} with {args.factory} {search} in {index.build_s:.1f} s "
        f"({index.memory_mb():.1f} MiB); wrote {path}"
    )
    return 0


def parse_history(text: str, n_items: int, max_len: int, what: str = "item ids") -> np.ndarray:
    """ "12 7 93" (dense ids in 1..n_items, oldest first) -> (1, max_len) left-padded int64 row."""
    try:
        ids = [int(token) for token in text.replace(",", " ").split()]
    except ValueError as exc:
        raise NimbleError(f"{text!r} is not a list of {what}", fix='pass e.g. --history "12 7 93"') from exc
    if not ids or min(ids) < 1 or max(ids) > n_items:
        raise NimbleError(f"needs 1+ {what} in 1..{n_items}, got {text!r}",
                          fix="use the dense ids of the prepared data the model was trained on")
    row = np.zeros((1, max_len), dtype=np.int64)
    ids = ids[-max_len:]
    row[0, max_len - len(ids) :] = ids
    return row


def run_recommend(args: argparse.Namespace) -> int:
    """Top --k items for one history: retrieve --candidates from the model's index, rank them."""
    model = load_checkpoint(Path(args.model))
    history = parse_history(args.history, model.config.n_items, model.config.max_len)
    behaviors = None
    if model.config.use_behavior:  # one code per event (1 pv, 2 cart, 3 fav, 4 buy); default: all page views
        codes = args.behaviors or " ".join(["1"] * int((history > 0).sum()))
        behaviors = parse_history(codes, model.config.n_behaviors - 1, model.config.max_len, "behaviour codes")
        if ((behaviors > 0) != (history > 0)).any():
            raise NimbleError("--behaviors needs one code per --history item", fix='e.g. --behaviors "1 1 2"')
    index = ItemIndex.load(Path(args.model), model)
    (result,) = recommend(model, index, history, k=args.k, n_candidates=max(args.candidates, args.k), behaviors=behaviors)
    table = Table(title=f"top {args.k} of {args.candidates} retrieved ({index.spec.factory})")
    table.add_column("rank", justify="right")
    table.add_column("item", justify="right")
    table.add_column("score", justify="right")
    for rank, (item, score) in enumerate(zip(result.items, result.scores), start=1):
        table.add_row(str(rank), str(item), f"{score:.4f}")
    console = Console()
    console.print(table)
    console.print_json(json.dumps(result.to_dict()))
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add `rec` with its subcommands; each sets args.func."""
    rec = subparsers.add_parser("rec", help="sequential recommendation: prepare, train, evaluate, index, recommend")
    sub = rec.add_subparsers(dest="rec_command", required=True)

    p = sub.add_parser("prepare", help="behaviour log -> per-user sequences")
    p.add_argument("--data", required=True, help="input log file")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--k-core", type=int, default=0, help="drop users/items with fewer events (0 = off)")
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(func=run_prepare)

    p = sub.add_parser("train", help="train SeqRec, evaluate it and the baselines on test targets")
    p.add_argument("--data", required=True, help="folder written by `rec prepare`")
    p.add_argument("--preset", default="default", choices=sorted(TRAIN_PRESETS))
    p.add_argument("--epochs", type=int, default=None, help="maximum epochs (default: the preset's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--loss", default=None, choices=["ce", "sampled_softmax", "bce"])
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads in all (default 2), split over --nproc")
    p.add_argument("--nproc", type=int, default=1,
                   help="local training processes (DDP); for many machines run torchrun instead (see README)")
    p.add_argument("--precision", default=None, choices=["fp32", "bf16"], help="bf16 = torch.autocast mixed precision")
    p.add_argument("--ema-decay", type=float, default=None,
                   help="exponential moving average of the weights (0 = off); default: the preset's (default 0.999, small off)")
    p.add_argument("--repeat-mode", default="bonus", choices=["bonus", "mixture"],
                   help="on logs with repeats: additive recency bonus, or RepeatNet's repeat/explore mixture")
    p.add_argument("--targets", default="test", choices=TARGETS,
                   help="evaluate on the test targets, or on the validation ones (to compare configurations)")
    p.add_argument("--out", required=True, help="output folder for the model and metrics.json")
    p.set_defaults(func=run_train)

    p = sub.add_parser("evaluate", help="evaluate a trained model and the baselines")
    p.add_argument("--model", required=True, help="folder written by `rec train`")
    p.add_argument("--data", required=True, help="folder written by `rec prepare`")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--targets", default="test", choices=TARGETS,
                   help="evaluate on the test targets, or on the validation ones (to compare configurations)")
    p.add_argument("--out", required=True)
    p.set_defaults(func=run_evaluate)

    p = sub.add_parser("index", help="build the item index (ANN retrieval) into a model folder")
    p.add_argument("--model", required=True, help="folder written by `rec train`")
    p.add_argument("--factory", default="HNSW32,Flat", help="faiss index_factory string (default HNSW32,Flat)")
    p.add_argument("--search", default="efSearch=128", help="faiss search parameters, e.g. efSearch=128 or nprobe=32")
    p.set_defaults(func=run_index)

    p = sub.add_parser("recommend", help="top items for a history: retrieve from the index, then rank")
    p.add_argument("--model", required=True, help="model folder with an index (`rec index`)")
    p.add_argument("--history", required=True, help='dense item ids, oldest first, e.g. "12 7 93"')
    p.add_argument("--k", type=int, default=10, help="items to return")
    p.add_argument("--candidates", type=int, default=50, help="items retrieved before ranking")
    p.add_argument("--behaviors", default=None,
                   help='behaviour codes per history item (1 pv, 2 cart, 3 fav, 4 buy) for models trained with them; default all pv')
    p.set_defaults(func=run_recommend)
    return rec


def run_demo(out_dir: Path, seed: int = 0) -> dict:
    """Synthetic Taobao log -> prepare -> train the small preset -> metrics (model vs baselines).

    Writes synthetic_taobao.csv, data/, model/ (with metrics.json) under out_dir; a couple of
    minutes at most on 2 CPU cores. The log is SYNTHETIC: the numbers say the pipeline works,
    not how good the model is on real traffic."""
    from nimbleml.rec.synthetic import write_synthetic_taobao

    out_dir = Path(out_dir)
    log_path = write_synthetic_taobao(out_dir / "synthetic_taobao.csv", n_users=2000, n_items=5000, seed=seed)
    data, report = prepare(log_path, "taobao")
    data.save(out_dir / "data")
    _write_json(out_dir / "data" / REPORT_FILE, report.to_dict())
    metrics, _ = train_and_evaluate(data, out_dir / "model", preset="small", seed=seed)
    metrics["synthetic"] = True
    _write_json(out_dir / "model" / METRICS_FILE, metrics)
    return metrics
