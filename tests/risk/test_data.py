"""Market data loader: every cleaning rule on real rows, the arch loader, --assets order, errors."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from nimbleml.errors import NimbleError
from nimbleml.risk.data import COLUMNS, RULES, MarketPanel, load_arch, load_market, load_panel, suspect_prints_causal
from nimbleml.risk.samples import ASSET_CLASSES
from nimbleml.risk.synthetic import MESSY_ROWS, NEGATIVE_WTI_PRICE, write_synthetic_market

# Real files whose messy rows the tests below pin down (see ../shared/data/README.md).
REAL_FILES = (
    "commodities/wti-daily.csv",
    "equities/AAL.csv",
    "equities/AAP.csv",
    "equities/ALB.csv",
    "equities/AMGN.csv",
    "equities/CDNS.csv",
    "equities/CME.csv",
    "fx/DEXUSEU.csv",
    "rates/DGS1MO.csv",
)
OHLCV_HEADER = ",open,high,low,close,volume\n"


def assert_contract(panel: MarketPanel) -> None:
    """The MarketPanel contract every consumer relies on."""
    frame = panel.frame
    assert list(frame.columns) == list(COLUMNS)
    assert frame["date"].dtype == np.dtype("datetime64[ns]")
    assert pd.api.types.is_string_dtype(frame["asset"])
    assert pd.api.types.is_string_dtype(frame["asset_class"])
    for field in ("open", "high", "low", "close", "volume"):
        assert frame[field].dtype == np.float64
    assert set(frame["asset_class"]) <= set(ASSET_CLASSES)
    assert frame.equals(frame.sort_values(["asset", "date"], ignore_index=True))
    assert not frame.duplicated(["asset", "date"]).any()
    assert np.isfinite(frame["close"]).all()
    assert (frame.loc[frame["asset_class"] != "bond", "close"] > 0).all()
    ranged = frame[["high", "low"]].notna().all(axis=1)
    assert (frame.loc[ranged, "high"] >= frame.loc[ranged, "low"]).all()
    assert panel.report.n_rows == len(frame)
    assert panel.report.n_assets == len(panel.assets) == frame["asset"].nunique()
    assert set(panel.report.counts) == set(RULES)
    assert panel.report.start == frame["date"].min().date().isoformat()


def row(panel: MarketPanel, asset: str, date: str) -> pd.Series:
    frame = panel.frame
    hit = frame[(frame["asset"] == asset) & (frame["date"] == pd.Timestamp(date))]
    assert len(hit) == 1, f"{asset} {date}: {len(hit)} rows"
    return hit.iloc[0]


def has_date(panel: MarketPanel, asset: str, date: str) -> bool:
    frame = panel.frame
    return bool(((frame["asset"] == asset) & (frame["date"] == pd.Timestamp(date))).any())


def write(root: Path, rel: str, text: str) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def real(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> MarketPanel:
    """A few real files, linked (not copied) into a temporary market folder and loaded once."""
    root = tmp_path_factory.mktemp("real_market")
    for rel in REAL_FILES:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).symlink_to(shared_data / "market" / rel)
    return load_market(root)


# --- cleaning rules on real rows ---------------------------------------------------------


def test_real_panel_keeps_the_contract(real):
    assert_contract(real)
    assert real.assets == ["AAL", "AAP", "ALB", "AMGN", "CDNS", "CME", "DEXUSEU", "DGS1MO", "wti"]
    assert real.asset_classes["DGS1MO"] == "bond"
    assert real.asset_classes["DEXUSEU"] == "fx"
    assert real.asset_classes["wti"] == "commodity"
    assert real.asset_classes["AAL"] == "equity"


def test_real_negative_wti_is_dropped(real):
    assert not has_date(real, "wti", "2020-04-20")
    assert has_date(real, "wti", "2020-04-21")
    assert real.report.per_asset["wti"] == {"nonpositive_price": 1}


def test_real_all_nan_row_is_dropped(real):
    assert not has_date(real, "AAP", "2010-05-28")  # ",,,,," in the source
    assert real.report.per_asset["AAP"] == {"nan_close": 1}


def test_real_zero_volume_becomes_nan(real):
    bar = row(real, "AAL", "2017-07-03")
    assert np.isnan(bar["volume"]) and bar["close"] == 50.39 and bar["high"] == 51.28
    assert real.report.per_asset["AAL"] == {"nonpositive_volume": 1}


def test_real_high_below_low_clears_the_range(real):
    bar = row(real, "AMGN", "2017-07-03")  # source: high 172.63 < low 172.8
    assert np.isnan(bar["high"]) and np.isnan(bar["low"])
    assert bar["open"] == 172.63 and bar["close"] == 172.8
    assert real.report.per_asset["AMGN"] == {"high_below_low": 1}


def test_real_close_above_high_clears_the_range(real):
    bar = row(real, "ALB", "2007-01-23")  # source: close 36.5 > high 36.45
    assert np.isnan(bar["high"]) and np.isnan(bar["low"]) and bar["close"] == 36.5
    assert real.report.per_asset["ALB"] == {"close_outside_range": 1}


def test_real_open_above_high_clears_the_range(real):
    bar = row(real, "CDNS", "2014-01-03")  # source: open 14.48 > high 14.45
    assert np.isnan(bar["high"]) and np.isnan(bar["low"]) and bar["open"] == 14.48
    assert real.report.per_asset["CDNS"]["open_outside_range"] == 8


def test_real_negative_prices_drop_rows_and_cells(real):
    assert not has_date(real, "CME", "2002-12-06")  # close -1.67
    bar = row(real, "CME", "2003-04-24")  # open -0.15, low -0.15, close 0.07
    assert np.isnan(bar["open"]) and np.isnan(bar["low"]) and bar["close"] == pytest.approx(0.07)
    counts = real.report.per_asset["CME"]
    assert counts["nonpositive_price"] == 94 and counts["nonpositive_ohlc"] == 2


def test_real_fred_dots_are_missing_and_zero_yields_are_kept(real):
    assert real.report.per_asset["DEXUSEU"] == {"missing_value": 259}
    assert real.report.per_asset["DGS1MO"] == {"missing_value": 212}
    bar = row(real, "DGS1MO", "2008-12-10")  # a real 0.00 % yield
    assert bar["close"] == 0.0
    bonds = real.frame[real.frame["asset"] == "DGS1MO"]
    assert (bonds["close"] == 0).sum() == 91
    assert bonds[["open", "high", "low", "volume"]].isna().all().all()


def test_real_report_totals_sum_the_assets(real):
    for rule, total in real.report.counts.items():
        assert total == sum(c.get(rule, 0) for c in real.report.per_asset.values())
    assert real.report.counts["missing_value"] == 259 + 212
    assert real.report.to_dict()["per_asset"]["wti"] == {"nonpositive_price": 1}


def test_real_assets_n_follows_relative_path_order(shared_data):
    panel = load_market(shared_data / "market", assets=3)
    # commodities/brent-daily.csv < commodities/wti-daily.csv < equities/AAL.csv
    assert sorted(panel.assets) == ["AAL", "brent", "wti"]
    assert_contract(panel)


def test_each_rule_logs_one_line_at_info_only_when_it_fired(shared_data, caplog):
    with caplog.at_level(logging.DEBUG, logger="nimbleml.risk.data"):
        panel = load_market(shared_data / "market", assets=3)  # brent, wti (negative price), AAL
    for rule in RULES:
        lines = [r for r in caplog.records if r.getMessage().startswith(f"{rule}:")]
        assert len(lines) == 1
        assert lines[0].levelno == (logging.INFO if panel.report.counts[rule] else logging.DEBUG)
    assert any(panel.report.counts.values()) and not all(panel.report.counts.values())  # both kinds seen


# --- rules the real files do not exercise -------------------------------------------------


def test_duplicates_keep_last_and_unsorted_rows_are_sorted(tmp_path):
    write(
        tmp_path,
        "equities/X.csv",
        OHLCV_HEADER
        + "2020-01-03,10,11,9,10.5,100\n"
        + "2020-01-02,10,11,9,10.2,100\n"
        + "2020-01-03,10,11,9,10.7,100\n"
        + "2020-01-06,10,11,9,10.1,100\n",
    )
    panel = load_market(tmp_path)
    assert_contract(panel)
    assert list(panel.frame["close"]) == [10.2, 10.7, 10.1]
    assert panel.report.per_asset["X"] == {"unsorted": 1, "duplicate_date": 1}


def test_malformed_lines_and_cells_are_counted(tmp_path):
    write(
        tmp_path,
        "equities/X.csv",
        OHLCV_HEADER
        + "2020-01-02,10,11,9,10.5,100\n"
        + "2020-01-03,10,11\n"  # too few fields
        + "2020-01-06,10,11,9,10.5,100,7\n"  # too many fields
        + "not-a-date,10,11,9,10.5,100\n"
        + "2020-01-07,10,abc,9,10.5,100\n"  # unparseable number
        + "\n"  # blank lines are ignored, not counted
        + "2020-01-08,,11,9,10.5,100\n"  # empty open: kept, counted
        + "2020-01-09,10,11,9,inf,100\n",  # infinite close: dropped
    )
    panel = load_market(tmp_path)
    assert_contract(panel)
    assert [d.day for d in panel.frame["date"]] == [2, 8]
    assert panel.report.per_asset["X"] == {"malformed_row": 4, "nan_close": 1, "nan_ohlc": 1}


def test_dot_in_close_drops_the_row_as_missing_value(tmp_path):
    write(tmp_path, "fx/DEXJPUS.csv", "DATE,DEXJPUS\n2020-01-02,108.1\n2020-01-03,.\n2020-01-06,108.4\n")
    panel = load_market(tmp_path)
    assert list(panel.frame["close"]) == [108.1, 108.4]
    assert panel.report.per_asset["DEXJPUS"] == {"missing_value": 1}


def test_negative_yields_are_kept(tmp_path):
    text = "DATE,DGS1MO\n2020-01-02,-0.05\n2020-01-03,0.00\n2020-01-06,0.01\n"
    write(tmp_path, "rates/DGS1MO.csv", text)
    panel = load_market(tmp_path)
    assert list(panel.frame["close"]) == [-0.05, 0.0, 0.01]
    assert sum(panel.report.counts.values()) == 0


# --- synthetic data ---------------------------------------------------------------------


def test_synthetic_market_reports_the_injected_rows_exactly(tmp_path):
    root = write_synthetic_market(tmp_path, n_equities=3, n_days=400, seed=2)
    panel = load_market(root)
    assert_contract(panel)
    assert panel.assets == ["DEXUSEU", "DGS10", "SYN00", "SYN01", "SYN02", "wti"]
    lines = [line.strip() for f in root.glob("*/*.csv") for line in f.read_text().splitlines()]
    dots = sum(line.endswith(",.") for line in lines)
    expected = {rule: 0 for rule in RULES} | MESSY_ROWS | {"nonpositive_price": 1, "missing_value": dots}
    assert dots > 0 and panel.report.counts == expected
    assert panel.report.per_asset["SYN00"] == MESSY_ROWS
    assert NEGATIVE_WTI_PRICE < 0


def test_synthetic_market_without_messy_rows(tmp_path):
    root = write_synthetic_market(tmp_path, n_equities=1, n_days=200, messy=False)
    counts = load_market(root).report.counts
    assert all(counts[rule] == 0 for rule in MESSY_ROWS)
    assert counts["nonpositive_price"] == 1  # the negative WTI day is part of the format


def test_synthetic_equities_cluster_volatility(tmp_path):
    root = write_synthetic_market(tmp_path, n_equities=1, n_days=2000, messy=False)
    close = load_market(root).frame.query("asset == 'SYN00'")["close"].to_numpy()
    squared = np.diff(np.log(close)) ** 2
    autocorrelation = [np.corrcoef(squared[k:], squared[:-k])[0, 1] for k in range(1, 6)]
    assert np.mean(autocorrelation) > 0.05  # GARCH(1,1) with alpha 0.08, beta 0.9: about 0.1-0.2


def test_assets_n_keeps_the_first_files_by_relative_path(tmp_path):
    root = write_synthetic_market(tmp_path, n_equities=3, n_days=100, messy=False)
    assert load_market(root, assets=1).assets == ["wti"]
    assert load_market(root, assets=3).assets == ["SYN00", "SYN01", "wti"]
    assert load_market(root, assets=99).report.n_assets == 6


# --- arch -----------------------------------------------------------------------------


def test_arch_loader_shapes_and_classes():
    panel = load_arch()
    assert_contract(panel)
    assert panel.source == "arch"
    assert panel.asset_classes == {"NASDAQ": "equity", "SP500": "equity", "WTI": "commodity"}
    sizes = panel.frame.groupby("asset").size()
    assert sizes["SP500"] == sizes["NASDAQ"] == 5031
    assert panel.report.per_asset["WTI"] == {"nan_close": 290}
    assert sizes["WTI"] == 8611 - 290
    assert panel.frame.query("asset == 'WTI'")[["open", "high", "low", "volume"]].isna().all().all()
    sp500 = panel.frame.query("asset == 'SP500'")
    assert sp500[["open", "high", "low"]].notna().all().all()
    assert load_arch(assets=1).assets == ["NASDAQ"]


def test_load_panel_dispatches(tmp_path):
    assert load_panel("arch", assets=2).assets == ["NASDAQ", "SP500"]
    root = write_synthetic_market(tmp_path, n_equities=1, n_days=100)
    panel = load_panel(str(root))
    assert panel.source == str(root) and panel.report.n_assets == 4


# --- errors -------------------------------------------------------------------------------


def raises(match: str, call, *args, **kwargs) -> NimbleError:
    with pytest.raises(NimbleError, match=match) as info:
        call(*args, **kwargs)
    assert info.value.fix, "every error names the fix"
    return info.value


def test_missing_folder(tmp_path):
    error = raises("not found", load_market, tmp_path / "nope")
    assert error.path == str(tmp_path / "nope")


def test_path_is_a_file(tmp_path):
    raises("not a folder", load_market, write(tmp_path, "x.txt", "hi"))


def test_folder_without_csvs(tmp_path):
    raises("no CSV files", load_market, tmp_path)
    write(tmp_path, "equities/README.md", "no data here")
    raises("no CSV files", load_market, tmp_path)


def test_csv_outside_the_class_folders(tmp_path):
    write(tmp_path, "AAPL.csv", OHLCV_HEADER + "2020-01-02,1,2,0.5,1.5,10\n")
    raises("asset class is unknown", load_market, tmp_path)


def test_unknown_asset_class_folder(tmp_path):
    write(tmp_path, "equities/A.csv", OHLCV_HEADER + "2020-01-02,1,2,0.5,1.5,10\n")
    write(tmp_path, "crypto/BTC.csv", "Date,Price\n2020-01-02,7000\n")
    error = raises("unknown asset-class folder 'crypto'", load_market, tmp_path)
    assert error.path.endswith("crypto")
    for name in ("equities", "rates", "fx", "commodities"):
        assert name in error.fix


def test_empty_file(tmp_path):
    write(tmp_path, "equities/A.csv", "")
    error = raises("empty file", load_market, tmp_path)
    assert error.path.endswith("A.csv")


def test_header_only_file(tmp_path):
    write(tmp_path, "rates/DGS10.csv", "DATE,DGS10\n\n")
    error = raises("header but no data rows", load_market, tmp_path)
    assert error.path.endswith("DGS10.csv")


def test_file_with_no_usable_rows_names_the_rules(tmp_path):
    write(tmp_path, "equities/A.csv", OHLCV_HEADER + "2020-01-02,1,2,0.5,1.5,10\n")
    write(tmp_path, "commodities/wti-daily.csv", "Date,Price\n2020-04-20,-36.98\n2020-04-21,\nbad,3\n")
    error = raises("no usable rows", load_market, tmp_path)
    assert error.path.endswith("wti-daily.csv")
    assert "malformed_row 1" in error.problem and "nan_close 1" in error.problem
    assert "nonpositive_price 1" in error.problem


def test_unrecognised_header(tmp_path):
    write(tmp_path, "equities/A.csv", "date,price,size\n2020-01-02,1,2\n")
    raises("unrecognised header", load_market, tmp_path)


def test_two_files_with_one_asset_name(tmp_path):
    write(tmp_path, "commodities/wti-daily.csv", "Date,Price\n2020-01-02,60\n")
    write(tmp_path, "commodities/wti.csv", "Date,Price\n2020-01-02,60\n")
    raises("used by two files", load_market, tmp_path)


@pytest.mark.parametrize("assets", [0, -3, True, 2.5])
def test_bad_assets_count(tmp_path, assets):
    write(tmp_path, "equities/A.csv", OHLCV_HEADER + "2020-01-02,1,2,0.5,1.5,10\n")
    raises("assets must be", load_market, tmp_path, assets=assets)
    raises("assets must be", load_arch, assets=assets)


# --- bad prints and unadjusted splits ------------------------------------------------------


def _link(shared_data: Path, root: Path, *rels: str) -> Path:
    for rel in rels:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).symlink_to(shared_data / "market" / rel)
    return root


def test_real_bad_prints_are_dropped(shared_data, tmp_path):
    panel = load_market(_link(shared_data, tmp_path, "equities/MNST.csv"))
    assert panel.report.per_asset["MNST"]["bad_print"] == 2  # 0.086 -> 7.095 -> 0.086, twice
    assert not has_date(panel, "MNST", "2002-01-31") and not has_date(panel, "MNST", "2003-01-31")
    assert has_date(panel, "MNST", "2002-02-01")
    r = np.diff(np.log(panel.frame["close"].to_numpy()))
    assert np.abs(r).max() < 1.0  # the genuine 2008 moves (up to +0.76) stay


def test_real_unadjusted_split_is_back_adjusted(shared_data, tmp_path):
    panel = load_market(_link(shared_data, tmp_path, "equities/JCI.csv"))
    assert panel.report.per_asset["JCI"]["unadjusted_split"] == 1  # 40.375 -> 13.45 on 2002-01-02
    before, after = row(panel, "JCI", "2001-12-31"), row(panel, "JCI", "2002-01-02")
    assert after["close"] == pytest.approx(13.45)  # later prices untouched
    assert before["close"] == pytest.approx(13.45)  # 40.375 / (40.375 / 13.45)
    assert before["volume"] == pytest.approx(440200 * 40.375 / 13.45)


def _bars(closes: list[float], opens: list[float] | None = None) -> str:
    days = pd.bdate_range("2020-01-01", periods=len(closes))
    opens = opens or closes
    lines = [f"{d:%Y-%m-%d},{o},{max(o, c) * 1.01},{min(o, c) * 0.99},{c},1000" for d, o, c in zip(days, opens, closes)]
    return OHLCV_HEADER + "\n".join(lines) + "\n"


def test_spike_that_reverts_is_a_bad_print_but_a_crash_is_not(tmp_path):
    write(tmp_path, "equities/X.csv", _bars([10, 10.1, 10.0, 30.0, 10.05, 10.1, 6.0, 6.1, 6.2]))
    panel = load_market(tmp_path)
    assert panel.report.per_asset["X"] == {"bad_print": 1}
    assert list(panel.frame["close"]) == [10, 10.1, 10.0, 10.05, 10.1, 6.0, 6.1, 6.2]  # the -40% day stays


def test_quiet_split_day_is_adjusted_but_a_volatile_one_is_not(tmp_path):
    closes = [100.0, 101.0, 50.5, 50.6, 50.4]
    write(tmp_path, "equities/S.csv", _bars(closes))  # opens at the close: the 2:1 drop was overnight
    write(tmp_path, "equities/V.csv", _bars(closes, opens=[100.0, 101.0, 60.0, 50.6, 50.4]))  # fell during the day
    panel = load_market(tmp_path)
    assert panel.report.per_asset["S"] == {"unadjusted_split": 1}
    s = panel.frame[panel.frame["asset"] == "S"]
    np.testing.assert_allclose(s["close"], [50.0, 50.5, 50.5, 50.6, 50.4])
    np.testing.assert_allclose(s["volume"], [2000, 2000, 1000, 1000, 1000])
    assert panel.report.per_asset["V"] == {}


def test_realtime_bad_print_rule_uses_past_data_only():
    """The one-sided rule flags MNST's spike on its day and never changes a flag when later closes change."""
    close = np.array([0.085, 0.086, 0.087, 7.095, 0.086, 0.088, 0.089, 0.05, 0.051])
    flags = suspect_prints_causal(close)
    assert flags.tolist() == [False, False, False, True, False, False, False, True, False]
    for t in range(1, len(close)):
        future_changed = close.copy()
        future_changed[t:] = future_changed[t:] * 3.0
        np.testing.assert_array_equal(suspect_prints_causal(future_changed)[:t], flags[:t])
