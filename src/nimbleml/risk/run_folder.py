"""A risk run's folder: written after every fold (so a run cut off by a time limit keeps the
folds it finished) and read back by ``nimbleml risk report --from DIR``, which recomputes every
statistic from the saved predictions without refitting a model.

Files: ``predictions.csv.gz`` (one row per test sample), ``state.json`` (config, splits,
timings, fallbacks, CNN history, data report, whether the run completed) and ``config.json``.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from nimbleml.errors import NimbleError

if TYPE_CHECKING:
    from nimbleml.risk.experiment import RiskRunResult


def data_fingerprint(data: str) -> dict:
    """sha256 of every data file a run read (a market folder's CSVs, or the arch package's data
    files for ``data="arch"``, with the arch version), and one combined hash over (relative path,
    file hash) pairs. A folder without data files is an error, not an empty fingerprint."""
    extra = {}
    if data == "arch":
        import arch
        import arch.data

        root = Path(arch.data.__file__).parent
        extra["arch_version"] = arch.__version__
    else:
        root = Path(data)
    files = sorted(Path(d) / f for d, _, names in os.walk(root, followlinks=True) for f in names
                   if f.endswith((".csv", ".csv.gz")))
    per_file = {str(f.relative_to(root)): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}
    if not per_file:
        raise NimbleError("no .csv or .csv.gz data file to fingerprint", path=root,
                          fix="pass --data arch or a market folder like ../shared/data/market")
    combined = hashlib.sha256("".join(f"{k}:{v}\n" for k, v in per_file.items()).encode()).hexdigest()
    return {"root": str(root), "files": len(per_file), "sha256": combined, "per_file": per_file, **extra}


def write_state(out: Path, cfg: Any, predictions: pd.DataFrame, splits: list[dict], fit_seconds: dict,
                predict_seconds: dict, extras: dict, data_report: dict, complete: bool = False) -> None:
    """Write the predictions and run state so far (atomically: a reader never sees half a file)."""
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "predictions.csv.gz.tmp"
    predictions.to_csv(tmp, index=False, compression="gzip")
    tmp.replace(out / "predictions.csv.gz")
    state = {"config": cfg.to_dict(), "splits": splits, "fit_seconds": fit_seconds, "predict_seconds": predict_seconds,
             "extras": extras, "data_report": data_report, "complete": complete}
    (out / "state.json.tmp").write_text(json.dumps(state, indent=1, default=str))
    (out / "state.json.tmp").replace(out / "state.json")
    (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2, default=str))


def load_run(folder: Path) -> RiskRunResult:
    """Rebuild a run's result from its folder; the return history is reloaded from the run's data."""
    from nimbleml.risk.data import load_panel
    from nimbleml.risk.experiment import RiskRunConfig, RiskRunResult, example_window
    from nimbleml.risk.features import compute_features

    folder = Path(folder)
    if not (folder / "state.json").exists() or not (folder / "predictions.csv.gz").exists():
        raise NimbleError("not a risk run folder (no state.json / predictions.csv.gz)", path=folder,
                          fix="point --from at the --out folder of `nimbleml risk evaluate`")
    state = json.loads((folder / "state.json").read_text())
    cfg = RiskRunConfig.from_dict(state["config"])
    predictions = pd.read_csv(folder / "predictions.csv.gz", parse_dates=["date"])
    fp = compute_features(load_panel(cfg.data, cfg.assets), cfg.features)
    extras = dict(state["extras"])
    extras["run_complete"] = bool(state.get("complete", False))
    return RiskRunResult(
        config=cfg,
        data_report=state["data_report"],
        splits=state["splits"],
        predictions=predictions,
        fit_seconds=state["fit_seconds"],
        predict_seconds=state["predict_seconds"],
        extras=extras,
        returns=[a.returns for a in fp.assets],
        example=example_window(fp, predictions),
    )
