"""Does the default preset learn repeat behaviour? A sweep over SYNTHETIC logs whose revisit rate we set.

    .venv/bin/python bench/rec_repeat_sweep.py --revisit 0.0,0.35,0.7 --out runs/repeat-sweep

For each revisit probability (``SessionConfig.p_revisit``: the chance a page view goes back to an
item already seen in the session) it writes a synthetic Taobao-format log, prepares it, trains
the preset and evaluates it beside every baseline (the same code as ``nimbleml rec train``: the
same masks, hyper-parameters chosen on validation), on the test targets. It prints one row per
log and writes ``repeat_sweep.json``: rows of ``{p_revisit, repeat_target_share,
exclude_history, model.{ndcg@10,hr@10,mrr}, baselines.<name>.ndcg@10, best_baseline,
margin}`` (margin = model NDCG@10 / best baseline's - 1). The logs are synthetic: the sweep
checks behaviour across repeat shares, not quality on real traffic.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from nimbleml.environment import environment
from nimbleml.rec.commands import prepare, train_and_evaluate
from nimbleml.rec.synthetic import SessionConfig, write_synthetic_taobao


def sweep_row(p_revisit: float, out: Path, args: argparse.Namespace) -> dict:
    log_path = write_synthetic_taobao(out / "log.csv", n_users=args.users, n_items=args.items, seed=args.seed,
                                      config=SessionConfig(p_revisit=p_revisit))
    data, _ = prepare(log_path, "taobao")
    started = time.perf_counter()
    metrics, result = train_and_evaluate(data, out / "model", preset=args.preset, seed=args.seed, epochs=args.epochs)
    full = metrics["full"]
    baselines = {name: b["full"]["ndcg@10"] for name, b in metrics["baselines"].items()}
    best = max(baselines, key=baselines.get)
    return {
        "p_revisit": p_revisit,
        "repeat_target_share": metrics["repeat_target_share"],
        "exclude_history": metrics["exclude_history"],
        "model": {k: full[k] for k in ("ndcg@10", "hr@10", "mrr")},
        "epochs": result.epochs_run,
        "best_epoch": result.best_epoch,
        "seconds": round(time.perf_counter() - started, 1),
        "baselines": {name: {"ndcg@10": v} for name, v in baselines.items()},
        "best_baseline": best,
        "margin": full["ndcg@10"] / baselines[best] - 1.0 if baselines[best] > 0 else None,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--revisit", default="0.0,0.35,0.7", help="comma list of p_revisit values in [0, 1)")
    parser.add_argument("--users", type=int, default=2000)
    parser.add_argument("--items", type=int, default=1000, help="catalogue size (1,000: like the repeat-heavy log the issue keeps back)")
    parser.add_argument("--preset", default="default")
    parser.add_argument("--epochs", type=int, default=20, help="epoch cap (early stopping on validation still applies)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/repeat-sweep"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    values = [float(v) for v in args.revisit.split(",")]
    if any(not 0.0 <= v < 1.0 for v in values):
        parser.error(f"--revisit {args.revisit}: every value must be in [0, 1)")
    rows = [sweep_row(v, args.out / f"revisit-{v:g}", args) for v in values]
    names = list(rows[0]["baselines"])
    table = Table(title=f"SYNTHETIC logs ({args.users} users, {args.items} items), test full NDCG@10, preset {args.preset}")
    for column in ("p_revisit", "repeat targets", "SeqRec", *names, "margin vs best"):
        table.add_column(column, justify="right")
    for r in rows:
        best = r["best_baseline"]
        table.add_row(f"{r['p_revisit']:g}", f"{r['repeat_target_share']:.1%}", f"{r['model']['ndcg@10']:.4f}",
                      *(f"{r['baselines'][n]['ndcg@10']:.4f}" + (" *" if n == best else "") for n in names),
                      "" if r["margin"] is None else f"{r['margin']:+.1%}")
    Console().print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    payload = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
               "rows": rows, "environment": environment()}
    (args.out / "repeat_sweep.json").write_text(json.dumps(payload, indent=2))
    print(f"wrote {args.out / 'repeat_sweep.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
