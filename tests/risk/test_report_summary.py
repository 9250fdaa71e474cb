"""report.html's first screen: the summary computed from a known metrics dict (winners per scope,
MCS members, VaR verdicts, the paper formula's understatement), best cells marked, config folded
away, and a data fingerprint for the bundled arch data."""

from __future__ import annotations

import html
import re

import numpy as np
import pandas as pd
import pytest

from nimbleml.risk.html_report import _fingerprint_html, _table, _tables, first_screen, summarise, summary_html
from nimbleml.risk.run_folder import data_fingerprint


def _scores(qlike: float, n: int = 100) -> dict:
    return {"rmse": qlike / 10, "r2": 1.0 - qlike, "qlike": qlike, "mae": qlike / 20, "n": n}


def _var(exceedances: int, expected: float, kupiec: float, christoffersen: float) -> dict:
    return {"exceedances": exceedances, "expected": expected, "kupiec_pvalue": kupiec, "christoffersen_pvalue": christoffersen,
            "cc_pvalue": min(kupiec, christoffersen), "h_day": {}}


@pytest.fixture
def metrics() -> dict:
    """har wins pooled and on equities; garch wins fx and the 2008 window; 2020 has no test date."""
    return {
        "config": {"mcs_size": 0.10, "windows": {"gfc": ["2008-09-01", "2009-06-30"], "covid": ["2020-02-01", "2020-06-30"]}},
        "models": {"cnn": _scores(0.30, 500), "garch": _scores(0.25, 500), "har": _scores(0.20, 500)},
        "by_asset_class": {"equity": {"cnn": _scores(0.31), "garch": _scores(0.27), "har": _scores(0.19)},
                           "fx": {"cnn": _scores(0.28), "garch": _scores(0.22), "har": _scores(0.24)}},
        "windows": {"gfc": {"cnn": _scores(0.9, 40), "garch": _scores(0.5, 40), "har": _scores(0.7, 40)}, "covid": {}},
        "regimes": {},
        "tests": {"mcs": {"all": {"included": ["har", "garch"]}, "equity": {"included": ["har"]},
                          "fx": {"included": ["garch", "har"]}},
                  "dm_windows": {}, "mz": {}},
        "portfolio": {"primary_model": "cnn", "paper_vol": 0.006, "cov_vol": 0.010, "understatement": 0.4,
                      "var": {"normal": {"95": _var(30, 25.0, 0.32, 0.40), "99": _var(14, 5.0, 0.001, 0.20)}},
                      "paper_formula_var99_normal": _var(40, 5.0, 1e-9, 0.01),
                      "models": {"har": {"var": {"normal": {"95": _var(26, 25.0, 0.8, 0.5), "99": _var(6, 5.0, 0.6, 0.04)}}}}},
        "protocol": {"test_start": "2015-01-02", "test_end": "2018-12-31"},
    }


def test_summary_names_the_winner_per_scope(metrics: dict) -> None:
    s = summarise(metrics)
    assert s.winner == "har"
    best = {(w.kind, w.scope): (w.best, w.runner_up) for w in s.scopes}
    assert best == {("overall", "all test dates"): ("har", "garch"), ("asset class", "equity"): ("har", "garch"),
                    ("asset class", "fx"): ("garch", "har"), ("stress window", "gfc"): ("garch", "har")}
    assert s.scopes[0].mcs == ["har", "garch"] and next(w for w in s.scopes if w.scope == "gfc").mcs is None


def test_summary_var_verdicts_and_understatement(metrics: dict) -> None:
    s = summarise(metrics)
    verdicts = {(v.model, v.label): v.passed for v in s.var}
    assert verdicts == {("cnn", "normal 95%"): True, ("cnn", "normal 99%"): False, ("cnn", "paper formula, normal 99%"): False,
                        ("har", "normal 95%"): True, ("har", "normal 99%"): False}
    assert s.windows_outside == {"covid": ("2020-02-01", "2020-06-30")}
    assert s.understatement == pytest.approx(0.4) and s.to_dict()["winner"] == "har"


def test_summary_html_reads_as_the_first_screen(metrics: dict) -> None:
    page = summary_html(summarise(metrics))
    text = re.sub(r"<[^>]+>", "", page)
    assert "har has the lowest QLIKE (lower is better) over all 500 test samples (0.2; next best garch 0.25)" in text
    assert "best in 1 of 2 asset classes and 0 of 1 stress windows" in text
    assert "No stress-window verdict for covid (2020-02-01 .. 2020-06-30)" in text
    assert "Model Confidence Set (10%) over all test dates: har, garch" in text
    assert ("cnn forecasts (the run's primary model): 1 of 2 pass; fail: normal 99% (Kupiec); "
            "har forecasts (lowest QLIKE): 1 of 2 pass; fail: normal 99% (Christoffersen)") in text
    assert "understates sqrt(w'Σw) by 40.0%" in text and "exceeded 40 times vs 5.0 expected" in text


def test_first_screen_opens_on_the_summary_and_folds_the_config(metrics: dict) -> None:
    metrics |= {"horizon": 5, "n_assets": 3, "n_test_samples": 500, "leaky": False, "data_report": {},
                "data_fingerprint": {"files": 2, "sha256": "ab" * 32, "arch_version": "8.0.0"}}
    metrics["protocol"] |= {"name": "chronological", "refit": "once", "folds": 1, "cnn_warm_start": False}
    page = first_screen(metrics)
    assert page.index("<section id='summary'>") < page.index("<details>") < page.index("mcs_size")
    assert "arch 8.0.0 package data folder, 2 files, sha256" in page and "n/a" not in page


def test_best_cell_is_marked_per_column() -> None:
    page = _table(["model", "RMSE", "R²"], [["a", 0.2, 0.5], ["b", 0.1, 0.4], ["c", 0.3, float("nan")]],
                  {1: lambda x: x, 2: lambda x: -x})
    assert re.findall(r"<td class='best'><b>([^<]+)</b></td>", page) == ["0.5", "0.1"]


def test_every_score_table_marks_its_best_qlike(metrics: dict) -> None:
    tables = dict(_tables(metrics, list(metrics["models"])))
    assert "<td class='best'><b>0.2</b></td>" in tables["Pooled test scores"]
    assert "<td class='best'><b>0.5</b></td>" in tables["Stress window gfc"]
    by_class = tables["QLIKE by asset class"]
    assert "<td class='best'><b>0.19</b></td>" in by_class and "<td class='best'><b>0.22</b></td>" in by_class


def test_arch_data_has_a_fingerprint_with_the_arch_version() -> None:
    import arch

    fp = data_fingerprint("arch")
    assert fp["files"] > 0 and re.fullmatch(r"[0-9a-f]{64}", fp["sha256"]) and fp["arch_version"] == arch.__version__
    line = _fingerprint_html(fp)
    assert f"arch {arch.__version__} package data folder" in line and fp["sha256"][:16] in line and "n/a" not in line


def test_rejecting_p_values_are_flagged() -> None:
    page = _table(["method", "Kupiec p"], [["normal 95%", 0.3], ["normal 99%", 0.001]], {1: lambda p: -p}, p_values=(1,))
    assert "<td class='best'><b>0.3</b></td>" in page and "<td class='fail'>0.001</td>" in page


# ------------------------------------------------------------------ issue 25 keys and the KS figure
def _predictions(horizon: int = 5, n_dates: int = 150, seed: int = 0) -> pd.DataFrame:
    """Three assets whose daily returns are Gaussian with the cnn's forecast variance (so h y²/f²
    is χ²(h) for the cnn); har forecasts twice the vol; two fx targets are exact zeros (floored)."""
    rng = np.random.default_rng(seed)
    dates = pd.bdate_range("2008-01-01", periods=n_dates)
    frames = []
    for asset, cls, vol in (("A", "equity", 0.02), ("B", "equity", 0.015), ("E", "fx", 0.005)):
        f = vol * np.exp(0.2 * rng.standard_normal(n_dates))
        y = f * np.sqrt(rng.chisquare(horizon, n_dates) / horizon)
        if cls == "fx":
            y[[3, 40]] = 0.0
        frames.append(pd.DataFrame({"date": dates, "asset": asset, "asset_class": cls, "target": y, "cnn": f, "har": 2 * f,
                                    "var_floor": 0.01 * vol**2}))
    return pd.concat(frames, ignore_index=True)


def test_ks_figure_plots_the_residuals_the_ks_test_tests(tmp_path) -> None:
    from scipy import stats as sps

    from nimbleml.risk.comparison import ks_tests, standardised_squares
    from nimbleml.risk.html_report import fig_ks

    p, models = _predictions(), ["cnn", "har"]
    ks = ks_tests(p, models, 5)
    z = standardised_squares(p, models, 5)
    assert set(z) == set(ks) == {"equity", "fx"}
    for c in z:
        for m in models:
            assert len(z[c][m]) == ks[c][m]["n"]
            assert sps.kstest(z[c][m], sps.chi2(5).cdf).statistic == pytest.approx(ks[c][m]["stat"])
    assert ks["equity"]["cnn"]["stat"] < ks["equity"]["har"]["stat"]  # calibrated vs variance 4x too high
    assert np.median(z["equity"]["har"]) < np.median(z["equity"]["cnn"])  # over-forecast: residuals left of χ²(5)
    assert fig_ks(p, models, {"horizon": 5, "tests": {"ks": ks}}, tmp_path) == "ks_cdfs.png"
    assert (tmp_path / "ks_cdfs.png").stat().st_size > 10_000


def test_tables_show_floor_dm_lags_holm_indicative_windows_log_mse_mcs_and_var_basis(metrics: dict) -> None:
    from nimbleml.risk.comparison import comparison_section
    from nimbleml.risk.evaluate import score_forecasts
    from nimbleml.risk.experiment import floor_section

    p, models = _predictions(), ["cnn", "har"]
    floor = p["var_floor"].to_numpy()
    section = comparison_section(p, models, 5, {"gfc": ("2008-02-01", "2008-04-30")}, None, mcs_reps=50)
    port = metrics["portfolio"] | {
        "var_basis": {"one_day": "the 5-day mean daily variance forecast used for day t+1: assumes a flat variance",
                      "h_day": "sqrt(5) x the daily vol", "calendar": "each asset's own next trading day"},
        "universe": "the S&P 500 constituents of 2021, i.e. the survivors"}
    m = {"config": metrics["config"] | {"windows": {"gfc": ["2008-02-01", "2008-04-30"]}}, "horizon": 5,
         "models": {name: score_forecasts(p["target"].to_numpy(), p[name].to_numpy(), floor).to_dict() for name in models},
         "by_asset_class": {}, "variance_floor": floor_section(p, models), "portfolio": port, "protocol": metrics["protocol"],
         **section}
    assert m["tests"]["dm_lags"]["gfc"]["indicative"] and m["variance_floor"]["target_rows_floored"] == 2
    tables = dict(_tables(m, models))
    text = {k: html.unescape(re.sub(r"<[^>]+>", " ", v)) for k, v in tables.items()}
    pooled = tables["Pooled test scores"]
    for head in ("QLIKE unfloored", "forecasts floored", "DM p vs cnn", "Holm p", "DM lag"):
        assert f"<th>{head}</th>" in pooled
    assert f"{m['models']['har']['qlike_unfloored']:.4g}" in pooled
    assert "2 of 450 target rows floored (fx 2)" in text["Pooled test scores"]
    assert f"{m['tests']['dm']['cnn']['har']['pvalue_holm']:.4g}" in pooled
    lags = m["tests"]["dm_lags"]
    assert f"DM lag {lags['all']['lags'][0]}" in text["Pooled test scores"] and "Newey-West 1994" in text["Pooled test scores"]
    gfc = text["Stress window gfc"]
    assert "indicative" in gfc and f"effective n = {lags['gfc']['effective_n']}" in gfc and "every 5-th date" in gfc
    assert "in MCS (log-variance MSE)" in gfc and "Holm p" in gfc
    assert "Driscoll-Kraay" in " ".join(tables)
    var = text[next(k for k in tables if k.startswith("Portfolio VaR"))]
    assert "1-day VaR: the 5-day mean daily variance forecast used for day t+1" in var and "survivors" in var
    page = html.unescape(re.sub(r"<[^>]+>", "", summary_html(summarise(m))))
    assert "on the squared error of log variance: " in page and "MCS 10% members (log-variance MSE)" in page
    assert "1-day VaR basis: the 5-day mean daily variance" in page and "universe: the S&P 500 constituents of 2021" in page
