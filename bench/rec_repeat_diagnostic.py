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
models scored with the same data and groups meet the same negatives). ``--mass N`` adds
"train_windows": {"n_windows", "n_positions", "targets": {...}, "eval": {...}, "train": {...}}:
over N random training windows (seed 0), the share of targets that were last seen 1, 2, 3-5,
6-20 or 21-100 events back ("back_<lo>-<hi>") or anywhere in the history ("history"), beside
the softmax probability the model puts on those items, with dropout off ("eval") and on
("train", the loss's view: at a full-softmax optimum a per-recency bonus makes the two equal).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from nimbleml.errors import NimbleError
from nimbleml.rec.baselines import ItemCooccurrence, RecentItems
from nimbleml.rec.data import SequenceData, leave_last_out
from nimbleml.rec.evaluate import SeqRecScorer, evaluate_sampled, full_ranks
from nimbleml.rec.train import PrefixRepeats, TrainingWindows, load_checkpoint

BACK = ((2, 2), (3, 5), (6, 20), (21, 100))  # events since the target was last seen (1 = the last input)


MASS_BACK = ((1, 1), *BACK)


def probability_mass(model: torch.nn.Module, windows: TrainingWindows, rows: np.ndarray, batch: int = 8) -> dict:
    """Over the training windows ``rows``: share of targets per recency bucket ("targets") and the
    model's mean softmax probability on the items of each bucket, in eval and train mode."""
    hits, mass = {}, {"eval": {}, "train": {}}
    n_positions = 0
    for mode in ("eval", "train"):
        model.train(mode == "train")
        torch.manual_seed(0)  # the same dropout draws on every run
        totals = dict.fromkeys(("history", *(f"back_{lo}-{hi}" for lo, hi in MASS_BACK)), 0.0)
        counts = dict.fromkeys(totals, 0)
        n_positions = 0
        with torch.no_grad():
            for start in range(0, len(rows), batch):
                chunk = rows[start : start + batch]
                inputs, targets = (torch.as_tensor(a[chunk]) for a in (windows.inputs, windows.targets))
                behaviors = torch.as_tensor(windows.behaviors[chunk]) if model.config.use_behavior else None
                mask = inputs != 0
                states = model.encode(inputs, behaviors)[mask]
                gamma = model.decay_gamma() if model.config.repeat_decay else None
                repeats = PrefixRepeats.from_inputs(inputs, mask, gamma)
                logits = states @ model.item_emb.weight.T
                logits[:, 0] = float("-inf")  # padding
                if model.config.repeat_scores:  # only the latest occurrence (recency > 0) has a bonus
                    bonus = torch.where(repeats.recency > 0, repeats.bonus(model, states), 0.0)
                    logits = logits.scatter_add(1, repeats.items, bonus)
                on_items = torch.softmax(logits, -1).gather(1, repeats.items)
                is_target = repeats.items == targets[mask].unsqueeze(1)
                for name, (lo, hi) in (("history", (1, model.config.max_len)), *((f"back_{lo}-{hi}", (lo, hi)) for lo, hi in MASS_BACK)):
                    bucket = (repeats.recency >= lo) & (repeats.recency <= hi)
                    totals[name] += float((on_items * bucket).sum())
                    counts[name] += int((is_target & bucket).any(1).sum())
                n_positions += len(states)
        mass[mode] = {name: total / max(n_positions, 1) for name, total in totals.items()}
        hits = {name: count / max(n_positions, 1) for name, count in counts.items()}
    model.eval()
    return {"n_windows": len(rows), "n_positions": n_positions, "targets": hits, **mass}


def ndcg10(ranks: np.ndarray) -> float | None:
    return float(np.where(ranks < 10, 1.0 / np.log2(ranks + 2.0), 0.0).mean()) if len(ranks) else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="folder written by `rec train`")
    parser.add_argument("--data", type=Path, required=True, help="folder written by `rec prepare`")
    parser.add_argument("--decay", type=float, default=0.95, help="`recent` decay (rec train reports the chosen one)")
    parser.add_argument("--sampled", action="store_true", help="also the model's sampled-100 NDCG@10 per group")
    parser.add_argument("--mass", type=int, default=0, metavar="N",
                        help="also the probability per recency bucket over N training windows (0 = off)")
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
    if args.mass > 0:
        windows = TrainingWindows.from_split(split, model.config.max_len)
        rows = np.random.default_rng(0).permutation(len(windows))[: args.mass]
        result["train_windows"] = mass = probability_mass(model, windows, rows)
        buckets = Table(title=f"probability on history items vs share of targets, {len(rows)} training windows")
        for column in ("items", "targets", "model (eval)", "model (train mode)"):
            buckets.add_column(column, justify="right")
        for name, share in mass["targets"].items():
            buckets.add_row(name, f"{share:.3f}", f"{mass['eval'][name]:.3f}", f"{mass['train'][name]:.3f}")
        console.print(buckets)
    for part in ("valid", "test"):
        console.print(f"{part}: last input item unseen in training for {result[part]['last_input_unseen_share']:.1%} of users")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "repeat_diagnostic.json").write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out / 'repeat_diagnostic.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
