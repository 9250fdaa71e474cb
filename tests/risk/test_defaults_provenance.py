"""The risk defaults come from an ablation whose every date lies before the first test date (issue 25).

`docs/results/risk-ablate-pre2007-h5.json` is the `ablation.json` of

    nimbleml risk ablate --data runs/R-market44 --protocol walk-forward --test-start 2007-01-01 \
        --val-start 2005-01-01 --variants base,rates,pca,class_scale,robust_scale,winsorize,class_calibration \
        --seeds 2 -j 2 --out runs/ablate-pre2007-h5

kept in the repository as the record the defaults were chosen from, and
`docs/results/risk-ablate-full-pre2007-class-sampling-h5.json` is the one for issue 25.10's
class-balanced sampling on the full panel:

    nimbleml risk ablate --data ../shared/data/market --protocol walk-forward --test-start 2007-01-01 \
        --val-start 2005-01-01 --variants base,class_sqrt_sampling --seeds 2 -j 2 \
        --out runs/ablate-full-pre2007-sqrt

These tests fail if a default an ablation examined drifts from the variant it chose, or if a
record's windows reach the test.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from nimbleml.risk.ablation import VARIANTS
from nimbleml.risk.experiment import RiskRunConfig

RESULTS = Path(__file__).resolve().parents[2] / "docs" / "results"
RECORDS = ("risk-ablate-pre2007-h5.json", "risk-ablate-full-pre2007-class-sampling-h5.json")
# what the first record (the one that rechose the defaults) had to examine
FIRST_EXAMINED = {"cnn_calibration", "outliers", "scaler", "scale_scope", "exogenous", "pca_components"}


@pytest.fixture(scope="module", params=RECORDS)
def record(request) -> dict:
    return json.loads((RESULTS / request.param).read_text())


def _dates(windows: dict) -> list[str]:
    out = []
    for key, value in windows.items():
        if key in {"protocol", "first_test_date", "rule"}:
            continue
        out += value if isinstance(value, list) else [value]
    return out


def test_every_date_of_the_record_is_before_the_first_test_date(record):
    first_test = record["windows"]["first_test_date"]
    assert first_test == "2007-01-01"
    assert record["base_config"]["test_start"] == first_test
    for name, result in record["variants"].items():
        dates = _dates(result["windows"])
        assert dates, name
        assert max(dates) < first_test, f"{name}: {max(dates)} is not before {first_test}"
        assert all(d < first_test for d in result["val_dates"])


def test_the_defaults_are_the_variant_the_record_chose(record):
    """Each setting the ablation examined: today's default is the winner's value, else the base's."""
    best = min(record["variants"], key=lambda n: record["variants"][n]["val_qlike"])
    chosen = record["variants"][best]["changes"]
    base = record["base_config"]
    defaults = dataclasses.asdict(RiskRunConfig())
    run_fields = {f.name for f in dataclasses.fields(RiskRunConfig)}
    examined = {k for name in record["variants"] for k in VARIANTS[name]}
    if "winsorize" in record["variants"]:
        assert examined >= FIRST_EXAMINED
    for key in examined:
        expected = chosen.get(key, base[key] if key in run_fields else base["features"][key])
        actual = defaults[key] if key in run_fields else defaults["features"][key]
        actual = list(actual) if isinstance(actual, tuple) else actual
        assert actual == expected, f"default {key}={actual!r}, but the pre-2007 ablation chose {expected!r} ({best})"


def test_the_record_compares_every_variant_on_the_same_rows_with_several_seeds(record):
    scored = {r["n_scored"] for r in record["variants"].values()}
    har = {round(r["har_val_qlike"], 12) for r in record["variants"].values()}
    assert len(record["seeds"]) >= 2
    assert all(len(r["val_qlike_per_seed"]) == len(record["seeds"]) for r in record["variants"].values())
    assert len(scored) == 1, "every variant is scored on the same validation rows"
    # HAR reads raw variances, which none of these changes touches: one yardstick for every row
    assert len(har) == 1
