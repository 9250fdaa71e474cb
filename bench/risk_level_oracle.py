"""How much of each model's QLIKE is a level error? An oracle diagnostic, never a result.

Rescales each model's test variance forecasts by the QLIKE-optimal constant (the mean of
target / forecast) per asset class and fold, and per asset and fold, fitted on the TEST rows
themselves, and prints the QLIKE left. A model that wins after the rescaling but loses before
it forecasts the right movements at the wrong level. Reads a run folder's predictions.csv.gz.

    .venv/bin/python bench/risk_level_oracle.py runs/full-h22-v5 [--json out.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

from nimbleml.risk.evaluate import qlike_loss

MODELS = ("cnn", "ewma", "garch", "gjr", "har")


def level_oracle(predictions: pd.DataFrame, models: tuple[str, ...] = MODELS) -> pd.DataFrame:
    """One row per (model, asset class): QLIKE as forecast, after the class x fold and the asset x
    fold oracle rescaling, and the mean log(target / forecast) (negative: forecasts too high)."""
    floor = predictions["var_floor"].to_numpy()
    target = np.maximum(predictions["target"].to_numpy() ** 2, floor)
    rows = []
    for model in (m for m in models if m in predictions):
        forecast = np.maximum(predictions[model].to_numpy() ** 2, floor)
        ratio = pd.Series(target / forecast)

        def rescaled(keys: list[str]) -> np.ndarray:
            group = predictions[keys].astype(str).agg("|".join, axis=1).to_numpy()
            return qlike_loss(target, forecast * ratio.groupby(group).transform("mean").to_numpy(), floor)

        as_is = qlike_loss(target, forecast, floor)
        by_class, by_asset = rescaled(["asset_class", "fold"]), rescaled(["asset", "fold"])
        for cls in sorted(predictions["asset_class"].unique()):
            rows_c = (predictions["asset_class"] == cls).to_numpy()
            rows.append({"model": model, "asset_class": cls, "qlike": float(as_is[rows_c].mean()),
                         "oracle_class_fold": float(by_class[rows_c].mean()),
                         "oracle_asset_fold": float(by_asset[rows_c].mean()),
                         "mean_log_ratio": float(np.mean(np.log(target[rows_c] / forecast[rows_c])))})
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a `nimbleml risk evaluate --out` folder")
    parser.add_argument("--json", type=Path, help="also write the table as JSON records")
    args = parser.parse_args()
    table = level_oracle(pd.read_csv(args.run / "predictions.csv.gz"))
    for cls, part in table.groupby("asset_class"):
        print(f"\n{args.run.name}: {cls}")
        print(part.drop(columns="asset_class").round(3).to_string(index=False))
    if args.json:
        args.json.write_text(json.dumps({"run": str(args.run), "rows": table.to_dict("records")}, indent=1))


if __name__ == "__main__":
    main()
