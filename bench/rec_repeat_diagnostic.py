"""Where a trained SeqRec wins or loses against `recent` and co-occurrence: full NDCG@10 on the
validation and test targets, split by repeat / novel target, by how many events back the
target was last seen, and by whether training ever saw the input's last item (the gap that made
the Taobao head's validation score fail to carry over to its test targets).

    .venv/bin/python bench/rec_repeat_diagnostic.py --model runs/taobao/model-v2 --data runs/taobao/data --out runs/diag
    .venv/bin/python bench/rec_repeat_diagnostic.py --model runs/video/model-v7 --data runs/video/data --sampled --out runs/diag-v7

Writes ``repeat_diagnostic.json``: {"<part>": {"n_users", "last_input_unseen_share",
"<scorer>": {"all", "repeat", "novel", "back_<lo>-<hi>", "last_input_unseen", "last_input_seen"}}}
with part in valid/test, scorer in model/recent/cooccurrence (NDCG@10 over the users in each
group; null where a group is empty). ``--sampled`` adds "model_sampled100": the model's NDCG@10
under the SASRec paper's 100 uniform negatives, on every user of each group (seed 0, so two
models scored with the same data and groups meet the same negatives).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from nimbleml.errors import NimbleError
from nimbleml.rec.baselines import ItemCooccurrence, RecentItems
from nimbleml.rec.data import SequenceData, leave_last_out
from nimbleml.rec.evaluate import SeqRecScorer, evaluate_sampled, full_ranks
from nimbleml.rec.train import load_checkpoint

BACK = ((2, 2), (3, 5), (6, 20), (21, 100))  # events since the target was last seen (1 = the last input)


def ndcg10(ranks: np.ndarray) -> float | None:
    return float(np.where(ranks < 10, 1.0 / np.log2(ranks + 2.0), 0.0).mean()) if len(ranks) else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="folder written by `rec train`")
    parser.add_argument("--data", type=Path, required=True, help="folder written by `rec prepare`")
    parser.add_argument("--decay", type=float, default=0.95, help="`recent` decay (rec train reports the chosen one)")
    parser.add_argument("--sampled", action="store_true", help="also the model's sampled-100 NDCG@10 per group")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    try:  # a missing or broken folder is one message, not a traceback
        data = SequenceData.load(args.data)
        model = load_checkpoint(args.model)
    except NimbleError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    split = leave_last_out(data, max_len=model.config.max_len)
    trained = np.bincount(split.train_items, minlength=data.n_items + 1)
    scorers = {"model": SeqRecScorer(model), "recent": RecentItems(args.decay).fit(data),
               "cooccurrence": ItemCooccurrence().fit(data)}
    result: dict = {}
    table = Table(title=f"full NDCG@10 by target type ({args.model})")
    for column in ("part", "scorer", "all", "repeat", "novel", *(f"back {lo}-{hi}" for lo, hi in BACK),
                   "last input unseen", "last input seen"):
        table.add_column(column, justify="right")
    for part in ("valid", "test"):
        inputs, targets = split[f"{part}_input"], split[f"{part}_target"]
        behaviors = split[f"{part}_behaviors"] if model.config.use_behavior else None
        width = inputs.shape[1]
        match = inputs == targets[:, None]
        back = np.where(match.any(1), width - np.where(match, np.arange(width), -1).max(1), 0)
        groups = {"all": np.ones(len(targets), bool), "repeat": back > 0, "novel": back == 0}
        groups |= {f"back_{lo}-{hi}": (back >= lo) & (back <= hi) for lo, hi in BACK}
        unseen = trained[inputs[:, -1]] == 0
        groups |= {"last_input_unseen": unseen, "last_input_seen": ~unseen}
        result[part] = {"n_users": len(targets), "last_input_unseen_share": float(unseen.mean())}
        for name, scorer in scorers.items():
            ranks = full_ranks(scorer, inputs, targets, behaviors if name == "model" else None,
                               model.config.exclude_history)
            result[part][name] = {group: ndcg10(ranks[mask]) for group, mask in groups.items()}
            table.add_row(part, name, *("" if v is None else f"{v:.3f}" for v in result[part][name].values()))
        if args.sampled:  # every item the user had before the target is never a negative
            end = data.offsets[1:] - (2 if part == "valid" else 1)
            seen = [data.items[a:b] for a, b in zip(data.offsets[:-1], end)]
            result[part]["model_sampled100"] = {
                group: None if not mask.any() else evaluate_sampled(
                    scorers["model"], inputs[mask], targets[mask], data.n_items,
                    None if behaviors is None else behaviors[mask], max_users=None, seed=0,
                    seen=[seen[u] for u in np.flatnonzero(mask)], exclude_history=model.config.exclude_history,
                ).to_dict()["ndcg@10"]
                for group, mask in groups.items()
            }
            table.add_row(part, "model, sampled-100",
                          *("" if v is None else f"{v:.3f}" for v in result[part]["model_sampled100"].values()))
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
