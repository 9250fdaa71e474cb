"""Where a trained SeqRec wins or loses against `recent` and co-occurrence: full NDCG@10 on the
validation and test targets, split by repeat / novel target and by how many events back the
target was last seen, plus the share of inputs whose last item training never saw (the gap
that made the Taobao head's validation score fail to carry over to its test targets).

    .venv/bin/python bench/rec_repeat_diagnostic.py --model runs/taobao/model-v2 --data runs/taobao/data --out runs/diag

Writes ``repeat_diagnostic.json``: {"<part>": {"n_users", "last_input_unseen_share",
"<scorer>": {"all", "repeat", "novel", "back_<lo>-<hi>"}}} with part in valid/test, scorer in
model/recent/cooccurrence (NDCG@10 over the users in each group; null where a group is empty).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from nimbleml.rec.baselines import ItemCooccurrence, RecentItems
from nimbleml.rec.data import SequenceData, leave_last_out
from nimbleml.rec.evaluate import SeqRecScorer, checked_scores
from nimbleml.rec.train import load_checkpoint

BACK = ((2, 2), (3, 5), (6, 20), (21, 100))  # events since the target was last seen (1 = the last input)


def full_ranks(scorer: object, inputs: np.ndarray, targets: np.ndarray, behaviors: np.ndarray | None) -> np.ndarray:
    """0-based rank of each target among all items (pessimistic ties), like ``evaluate_full``."""
    scores = checked_scores(scorer.score_all(inputs, behaviors))
    rows = np.arange(len(targets))
    target = scores[rows, targets].copy()
    scores[:, 0] = -np.inf
    scores[rows, targets] = -np.inf
    return (scores >= target[:, None]).sum(1)


def ndcg10(ranks: np.ndarray) -> float | None:
    return float(np.where(ranks < 10, 1.0 / np.log2(ranks + 2.0), 0.0).mean()) if len(ranks) else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="folder written by `rec train`")
    parser.add_argument("--data", type=Path, required=True, help="folder written by `rec prepare`")
    parser.add_argument("--decay", type=float, default=0.95, help="`recent` decay (rec train reports the chosen one)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    data = SequenceData.load(args.data)
    model = load_checkpoint(args.model)
    split = leave_last_out(data, max_len=model.config.max_len)
    trained = np.bincount(split.train_items, minlength=data.n_items + 1)
    scorers = {"model": SeqRecScorer(model), "recent": RecentItems(args.decay).fit(data),
               "cooccurrence": ItemCooccurrence().fit(data)}
    result: dict = {}
    table = Table(title=f"full NDCG@10 by target type ({args.model})")
    for column in ("part", "scorer", "all", "repeat", "novel", *(f"back {lo}-{hi}" for lo, hi in BACK)):
        table.add_column(column, justify="right")
    for part in ("valid", "test"):
        inputs, targets = split[f"{part}_input"], split[f"{part}_target"]
        behaviors = split[f"{part}_behaviors"] if model.config.use_behavior else None
        width = inputs.shape[1]
        match = inputs == targets[:, None]
        back = np.where(match.any(1), width - np.where(match, np.arange(width), -1).max(1), 0)
        groups = {"all": np.ones(len(targets), bool), "repeat": back > 0, "novel": back == 0}
        groups |= {f"back_{lo}-{hi}": (back >= lo) & (back <= hi) for lo, hi in BACK}
        result[part] = {"n_users": len(targets), "last_input_unseen_share": float((trained[inputs[:, -1]] == 0).mean())}
        for name, scorer in scorers.items():
            ranks = full_ranks(scorer, inputs, targets, behaviors if name == "model" else None)
            result[part][name] = {group: ndcg10(ranks[mask]) for group, mask in groups.items()}
            table.add_row(part, name, *("" if v is None else f"{v:.3f}" for v in result[part][name].values()))
    console = Console()
    console.print(table)
    for part in ("valid", "test"):
        console.print(f"{part}: last input item unseen in training for {result[part]['last_input_unseen_share']:.1%} of users")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "repeat_diagnostic.json").write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out / 'repeat_diagnostic.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
