"""The risk CLI end to end on a tiny generated market folder: evaluate (walk-forward), the run
folder (metrics keys, saved model, config), report --from, report.html in headless Chromium,
and the bad-input exits."""

import argparse
import json
import shutil
import subprocess

import pytest
import torch

from nimbleml.cli import main
from nimbleml.risk.cnn import CNNForecaster
from nimbleml.risk.commands import add_parser, config_from_args
from nimbleml.risk.experiment import RiskRunConfig
from nimbleml.risk.synthetic import write_synthetic_market

MODELS = "cnn,linear,ewma,garch,har"


@pytest.fixture(scope="module")
def market(tmp_path_factory):
    return write_synthetic_market(tmp_path_factory.mktemp("market"), n_equities=2, n_days=900, seed=1)


@pytest.fixture(scope="module")
def run_dir(market, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "wf"
    small = out.parent / "small.toml"  # a small CNN through --config keeps the test fast
    small.write_text("[cnn_overrides]\nfilters = 8\nn_conv = 3\nfc = [16, 8]\n")
    argv = ["risk", "evaluate", "--config", str(small), "--data", str(market), "--protocol", "walk-forward", "--refit-months", "6",
            "--windows", "calm=2017-09-01:2017-12-31,late=2018-01-15:2018-04-30", "--epochs", "1", "--warm-epochs", "1",
            "--max-train-samples", "300", "--max-val-samples", "300", "--models", MODELS, "--mcs-reps", "100", "--out", str(out)]
    assert main(argv) == 0
    return out


def test_metrics_have_the_stable_keys(run_dir):
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["protocol"]["name"] == "walk-forward" and m["protocol"]["refit"] == "every 6 months"
    assert m["protocol"]["folds"] == 2 and m["protocol"]["cnn_warm_start"] is True
    assert m["protocol"]["test_start"] <= m["protocol"]["test_end"] and not m["leaky"]
    models = MODELS.split(",")
    for window in ("calm", "late"):
        assert set(m["windows"][window]) == set(models)
        assert {"rmse", "r2", "qlike", "n"} <= set(m["windows"][window]["cnn"])
        assert set(m["tests"]["mcs"][window]["included"]) <= set(models)
    assert set(m["regimes"]) <= {"bull", "bear", "high_vol"} and m["regimes"]
    dm = m["tests"]["dm"]["cnn"]["har"]
    assert {"stat", "pvalue", "lags"} <= set(dm) and dm["lags"] >= 4  # Newey-West lag recorded
    assert {"alpha", "beta", "pvalue"} <= set(m["tests"]["mz"]["garch"])
    assert {"stat", "pvalue"} <= set(m["tests"]["ks"]["equity"]["cnn"])
    assert {"all", "equity", "bond", "commodity", "fx"} <= set(m["tests"]["mcs"])
    assert set(m["tests"]["mcs"]["all"]["pvalues"]) == set(models)
    assert set(m["fallbacks"]) == {"garch", "har"}
    p = m["portfolio"]
    assert {"paper_vol", "cov_vol", "understatement", "var", "es"} <= set(p)
    v = p["var"]["t"]["99"]
    assert {"exceedances", "expected", "kupiec_pvalue", "christoffersen_pvalue", "cc_pvalue"} <= set(v)
    assert set(p["es"]) == {"normal", "t", "fhs"}
    assert m["data_fingerprint"]["files"] == 5 and len(m["data_fingerprint"]["sha256"]) == 64
    assert m["cpu_seconds"] > 0 and m["environment"]


def test_model_folder_loads_with_the_serving_signature(run_dir):
    cnn = CNNForecaster.load(run_dir / "model")
    images = torch.zeros((3, 1, 32, 32), dtype=torch.float32)
    with torch.inference_mode():
        out = cnn.model_(images, torch.zeros(3, dtype=torch.int64))  # (B, C, 32, 32) float32, (B,) int64
    assert out.shape == (3,) and torch.isfinite(out).all()


def test_config_json_reruns_the_same_experiment_and_flags_override(run_dir, tmp_path):
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    args = parser.parse_args(["risk", "evaluate", "--config", str(run_dir / "config.json"), "--out", "x"])
    again = config_from_args(args)
    assert json.loads(json.dumps(again.to_dict())) == json.loads((run_dir / "config.json").read_text())
    toml = tmp_path / "run.toml"
    toml.write_text('protocol = "walk-forward"\nrefit_months = 3\n[features]\nhorizon = 22\n')
    args = parser.parse_args(["risk", "evaluate", "--config", str(toml), "--horizon", "5", "--out", "x"])
    cfg = config_from_args(args)
    assert (cfg.protocol, cfg.refit_months, cfg.features.horizon) == ("walk-forward", 3, 5)
    assert cfg.epochs == RiskRunConfig().epochs  # untouched keys keep their defaults


def test_report_from_a_run_folder_writes_every_figure(run_dir, capsys):
    (run_dir / "metrics.json").unlink()
    assert main(["risk", "report", "--from", str(run_dir)]) == 0
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["run_complete"] is True and "QLIKE" in capsys.readouterr().out
    html = (run_dir / "report.html").read_text()
    names = ["encoders.png", "forecast_vs_realised.png", "error_distributions.png", "ks_cdfs.png", "dm_matrix.png",
             "mcs_membership.png", "qlike_by_class.png", "portfolio_radar.png", "var_exceedances.png"]
    for name in names:
        assert (run_dir / name).stat().st_size > 1000
        assert f"alt='{name}'" in html
    assert html.count("data:image/png;base64,") == len(names) and "http" not in html.split("<body>")[1].split("<script>")[0]


def test_report_renders_in_headless_chromium(run_dir, tmp_path):
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("Debian chromium is not installed: the report's browser check needs it")
    flags = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}"]
    url = (run_dir / "report.html").resolve().as_uri()
    dom = subprocess.run(flags + ["--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
    total = (run_dir / "report.html").read_text().count("class='figure'")
    assert f"figures loaded: {total}/{total}" in dom
    shot = tmp_path / "report.png"
    subprocess.run(flags + ["--window-size=1280,2000", f"--screenshot={shot}", url], capture_output=True, timeout=120)
    assert shot.stat().st_size > 10_000


def test_paper_random_is_labelled_leaky(market, tmp_path, capsys):
    out = tmp_path / "report"
    code = main(["risk", "evaluate", "--data", str(market), "--protocol", "paper-random", "--models", "har,ewma",
                 "--mcs-reps", "50", "--out", str(out)])
    assert code == 0
    assert json.loads((out / "metrics.json").read_text())["leaky"] is True
    assert "LEAKY" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, words",
    [
        (["--data", "/nonexistent/market"], "/nonexistent/market"),
        (["--horizon", "2000"], "horizon"),
        (["--windows", "crash=2020-03-01"], "stress window"),
        (["--test-start", "2031-01-01"], "test start"),
        (["--weights", "/nonexistent/weights.csv"], "weights"),
    ],
)
def test_bad_input_exits_non_zero_with_one_message(market, tmp_path, capsys, args, words):
    argv = ["risk", "evaluate"] + args + ([] if "--data" in args else ["--data", str(market)]) + ["--models", "har", "--out", str(tmp_path / "o")]
    assert main(argv) == 2
    err = capsys.readouterr().err  # progress and INFO lines share stderr (one console): the error is the one message after them
    assert err.count("nimbleml: error:") == 1
    error = err[err.index("nimbleml: error:"):]
    assert words in error and "fix:" in error
