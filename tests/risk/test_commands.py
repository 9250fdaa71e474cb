"""The risk CLI end to end on a tiny generated market folder, and its bad-input exits."""

import json

import pytest

from nimbleml.cli import main
from nimbleml.risk.experiment import MODEL_NAMES
from nimbleml.risk.synthetic import write_synthetic_market


@pytest.fixture(scope="module")
def market(tmp_path_factory):
    return write_synthetic_market(tmp_path_factory.mktemp("market"), n_equities=2, n_days=700, seed=1)


def test_evaluate_end_to_end(market, tmp_path, capsys):
    out = tmp_path / "report"
    code = main(["risk", "evaluate", "--data", str(market), "--epochs", "2", "--max-train-samples", "2000", "--out", str(out)])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["protocol"]["name"] == "chronological" and metrics["horizon"] == 5 and not metrics["leaky"]
    assert metrics["n_assets"] == 5
    assert metrics["protocol"]["test_start"] <= metrics["protocol"]["test_end"]
    assert set(metrics["models"]) == set(MODEL_NAMES)
    for m in metrics["models"].values():
        assert {"rmse", "r2", "qlike", "mae", "fit_seconds", "predict_ms"} <= set(m)
        assert m["rmse"] > 0 and m["qlike"] >= 0
    assert set(metrics["by_asset_class"]) == {"equity", "bond", "commodity", "fx"}
    assert metrics["data_report"]["counts"]
    assert json.loads((out / "config.json").read_text())["features"]["horizon"] == 5
    assert (out / "qlike_by_model.png").stat().st_size > 0
    assert "QLIKE" in capsys.readouterr().out


def test_paper_random_is_labelled_leaky(market, tmp_path, capsys):
    out = tmp_path / "report"
    code = main(["risk", "evaluate", "--data", str(market), "--protocol", "paper-random", "--models", "har,ewma", "--out", str(out)])
    assert code == 0
    assert json.loads((out / "metrics.json").read_text())["leaky"] is True
    assert "LEAKY" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, words",
    [
        (["--data", "/nonexistent/market"], "/nonexistent/market"),
        (["--horizon", "2000"], "horizon"),
    ],
)
def test_bad_input_exits_non_zero_with_one_message(market, tmp_path, capsys, args, words):
    argv = ["risk", "evaluate"] + args + ([] if "--data" in args else ["--data", str(market)]) + ["--models", "har", "--out", str(tmp_path / "o")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("nimbleml: error:") and words in err and "fix:" in err
