"""Multi-asset daily market data: load, clean with explicit counted rules, return one long table.

Sources are a market folder laid out like ``../shared/data/market`` (``equities/``,
``rates/``, ``fx/``, ``commodities/`` with one CSV per asset) or the real series the
``arch`` package ships. Every cleaning rule is named in ``RULES``, counted per asset in a
``DataReport`` and logged once; bad input raises ``NimbleError`` naming the file and the fix.

Units: prices as published (USD per share, USD per barrel, USD per euro); bond "prices"
are yields in percent (4.06 means 4.06 %), so a bond close may be zero or negative.
"""

from __future__ import annotations

import csv
import io
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from nimbleml.errors import NimbleError
from nimbleml.risk.samples import ASSET_CLASSES

log = logging.getLogger(__name__)

# Subfolder of a market folder -> asset class (one of ASSET_CLASSES).
FOLDER_CLASSES: dict[str, str] = {
    "equities": "equity",
    "rates": "bond",
    "fx": "fx",
    "commodities": "commodity",
}

# Columns of MarketPanel.frame, in order.
COLUMNS: tuple[str, ...] = ("date", "asset", "asset_class", "open", "high", "low", "close", "volume")
VALUE_COLUMNS: tuple[str, ...] = ("open", "high", "low", "close", "volume")
OHLC: tuple[str, ...] = ("open", "high", "low")

# Every cleaning rule, in the order it is applied, with what it does to the data.
RULES: dict[str, str] = {
    "malformed_row": "rows dropped (wrong field count, unparseable date or number)",
    "missing_value": "cells missing ('.' marker); rows dropped where it is the close",
    "nan_close": "rows dropped (close empty, NaN or infinite)",
    "nonpositive_price": "rows dropped (close <= 0; not applied to bond yields)",
    "unsorted": "rows found earlier than the row before them (all rows sorted by date)",
    "duplicate_date": "rows dropped (repeated date; the last row in the file is kept)",
    "bad_print": "rows dropped from the history (historical cleaning, two-sided: looks at the next close): close jumps > 50% "
                 "and the next close undoes it (a bad tick; not bonds). Kept in MarketPanel.bad_prints: the sample "
                 "dated on such a day is built from the data as of that day, spike included (the one-sided view)",
    "unadjusted_split": "split-ratio close jumps with no intraday move: earlier prices back-adjusted (needs OHLC)",
    "nan_ohlc": "open/high/low cells NaN or infinite in the source (kept as NaN)",
    "nonpositive_ohlc": "open/high/low cells <= 0 set to NaN (not applied to bond yields)",
    "nonpositive_volume": "volume cells <= 0 set to NaN",
    "high_below_low": "rows with high < low: high and low set to NaN (not swapped)",
    "close_outside_range": "rows with close outside [low, high]: high and low set to NaN",
    "open_outside_range": "rows with open outside [low, high]: high and low set to NaN",
}
# Rules that remove whole rows: named in the error when a file keeps no rows.
ROW_DROPPING_RULES: tuple[str, ...] = (
    "malformed_row",
    "missing_value",
    "nan_close",
    "nonpositive_price",
    "duplicate_date",
    "bad_print",
)

# A one-day close move beyond this (log) that the next close reverses is a bad print.
BAD_PRINT_LOG_JUMP = float(np.log(1.5))
BAD_PRINT_REVERSAL = 0.25  # |r_t + r_{t+1}| below this share of |r_t| counts as a reversal
# Close-to-close ratios (old / new) that a forward or reverse split leaves when the source
# forgot to adjust the history, and how close (relative) the observed ratio must be. Only
# integer splits: at 3:2 (a 33% move) real crashes (DXCM 2017-09-28, HES 2020-03-09) match too.
SPLIT_RATIOS = (2.0, 3.0, 4.0, 5.0, 10.0, 1 / 2, 1 / 3, 1 / 4, 1 / 5, 1 / 10)
SPLIT_TOLERANCE = 0.005
SPLIT_MAX_INTRADAY = 0.02  # |log(close/open)| on the split day: the jump happened overnight

DATE_FORMAT = "%Y-%m-%d"  # ISO dates, as every source writes them
ARCH_SOURCE = "arch"

_MARKET_FIX = (
    "pass a folder laid out like ../shared/data/market (subfolders equities/, rates/, fx/, "
    "commodities/ holding one CSV per asset), use --data arch, or write one with "
    "nimbleml.risk.synthetic.write_synthetic_market"
)


@dataclass
class DataReport:
    """What cleaning did: rows (or cells) each rule touched, overall and per asset."""

    counts: dict[str, int]  # rule name -> rows (or cells) touched, summed over assets; every rule listed
    per_asset: dict[str, dict[str, int]]  # asset -> rule -> count, non-zero counts only
    n_assets: int  # assets in the panel
    n_rows: int  # rows in the panel after cleaning
    start: str  # first date, ISO
    end: str  # last date, ISO

    def to_dict(self) -> dict:
        """Plain dict for JSON."""
        return asdict(self)


@dataclass
class MarketPanel:
    """Cleaned daily bars of several assets in one long table.

    frame columns: date (datetime64[ns]), asset (str), asset_class (one of ASSET_CLASSES),
    open, high, low, close, volume (float64; NaN where the source has no such field or a
    rule removed it). Sorted by asset then date, one row per (asset, date). close is finite
    for every row, and > 0 except for bonds, whose close is the yield in percent.
    """

    frame: pd.DataFrame
    report: DataReport
    source: str  # the market folder, or "arch"
    # the rows the two-sided bad_print rule dropped (same columns as frame, prices in the units of
    # the cleaned history): a forecast made on that day saw them, so features rebuild that day from them
    bad_prints: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=list(COLUMNS)))

    @property
    def assets(self) -> list[str]:
        """Asset names in frame order (sorted)."""
        return list(pd.unique(self.frame["asset"]))

    @property
    def asset_classes(self) -> dict[str, str]:
        """Asset name -> asset class."""
        pairs = self.frame[["asset", "asset_class"]].drop_duplicates("asset")
        return dict(zip(pairs["asset"], pairs["asset_class"], strict=True))


@dataclass
class _Source:
    """One asset's file inside a market folder."""

    path: Path
    rel: str  # path relative to the market folder, posix; sets the --assets order
    asset: str
    asset_class: str


@dataclass
class _Bars:
    """One asset's bars as arrays: cleaning works on these, the panel is built once at the end."""

    dates: np.ndarray  # (n,) datetime64[ns]
    values: np.ndarray  # (n, 5) float64, columns VALUE_COLUMNS
    has_ohlc: bool  # the source has open/high/low fields
    # rows dropped as bad prints: their dates and values, prices as a ratio to the close of the
    # kept row before them (so a later split adjustment carries over), volume as is
    dropped_dates: np.ndarray = field(default_factory=lambda: np.zeros(0, "datetime64[ns]"))
    dropped_ratios: np.ndarray = field(default_factory=lambda: np.zeros((0, 5)))


def load_panel(data: str | Path, assets: int | None = None) -> MarketPanel:
    """``"arch"`` loads the arch package's series; anything else is a market folder."""
    if str(data) == ARCH_SOURCE:
        return load_arch(assets)
    return load_market(data, assets)


def load_market(path: str | Path, assets: int | None = None) -> MarketPanel:
    """Load every CSV of a market folder (or the first ``assets`` by relative path) and clean it."""
    _check_assets(assets)
    root = Path(path)
    sources = _list_sources(root)
    if assets is not None:
        sources = sources[:assets]
    cleaned: dict[str, tuple[str, _Bars]] = {}
    per_asset: dict[str, dict[str, int]] = {}
    for src in sources:
        raw, counts = _read_source(src.path)
        bars, rule_counts = _clean(raw, src.asset_class)
        counts.update(rule_counts)
        if not len(bars.dates):
            removed = ", ".join(f"{r} {counts[r]}" for r in ROW_DROPPING_RULES if counts.get(r))
            raise NimbleError(
                f"no usable rows after cleaning (rows removed by: {removed or 'none'})",
                path=src.path,
                fix="fix or remove this file; each row needs an ISO date and a finite close"
                + ("" if src.asset_class == "bond" else " > 0"),
            )
        cleaned[src.asset] = (src.asset_class, bars)
        per_asset[src.asset] = counts
    return _assemble(cleaned, per_asset, str(root))


def load_arch(assets: int | None = None) -> MarketPanel:
    """The real daily series shipped with ``arch``: NASDAQ and SP500 (equity OHLCV), WTI (commodity).

    Open, high and low are scaled by Adj Close / Close so that all four prices are on the
    adjusted basis; close is Adj Close. Assets are ordered by name; ``assets`` keeps the first N.
    """
    _check_assets(assets)
    from arch.data import nasdaq, sp500, wti

    loaders = {"NASDAQ": (nasdaq, "equity"), "SP500": (sp500, "equity"), "WTI": (wti, "commodity")}
    cleaned: dict[str, tuple[str, _Bars]] = {}
    per_asset: dict[str, dict[str, int]] = {}
    for name in sorted(loaders)[:assets]:
        module, asset_class = loaders[name]
        bars, counts = _clean(_arch_bars(module.load()), asset_class)
        if not len(bars.dates):
            raise NimbleError(
                f"arch series {name} has no usable rows",
                path=module.__file__,
                fix="reinstall arch (pip install --force-reinstall arch) or use a market folder",
            )
        cleaned[name] = (asset_class, bars)
        per_asset[name] = counts
    return _assemble(cleaned, per_asset, ARCH_SOURCE)


def _clean(raw: _Bars, asset_class: str) -> tuple[_Bars, dict[str, int]]:
    """Apply the rules from ``nan_close`` on to one asset's bars (file order in, sorted out)."""
    counts: dict[str, int] = {}
    dates, values = raw.dates, np.where(np.isfinite(raw.values), raw.values, np.nan)
    is_bond = asset_class == "bond"
    i_open, i_high, i_low, i_close, i_volume = range(len(VALUE_COLUMNS))

    drop = np.isnan(values[:, i_close])
    counts["nan_close"] = int(drop.sum())
    if not is_bond:
        nonpositive = ~drop & (values[:, i_close] <= 0)
        counts["nonpositive_price"] = int(nonpositive.sum())
        drop |= nonpositive
    dates, values = dates[~drop], values[~drop]

    counts["unsorted"] = int((dates[1:] < dates[:-1]).sum())
    if counts["unsorted"]:
        order = np.argsort(dates, kind="stable")
        dates, values = dates[order], values[order]
    duplicated = np.zeros(len(dates), dtype=bool)
    duplicated[:-1] = dates[:-1] == dates[1:]  # sorted: a row equal to the next is not the last
    counts["duplicate_date"] = int(duplicated.sum())
    dates, values = dates[~duplicated], values[~duplicated].copy()
    dropped_dates, dropped_ratios = np.zeros(0, "datetime64[ns]"), np.zeros((0, len(VALUE_COLUMNS)))
    if not is_bond:
        dates, values, dropped_dates, dropped_ratios = _drop_bad_prints(dates, values, counts)
        _adjust_splits(values, counts)

    ohlc = values[:, :3]
    if raw.has_ohlc:
        counts["nan_ohlc"] = int(np.isnan(ohlc).sum())
    if not is_bond:
        nonpositive_ohlc = ohlc <= 0
        counts["nonpositive_ohlc"] = int(nonpositive_ohlc.sum())
        ohlc[nonpositive_ohlc] = np.nan
    nonpositive_volume = values[:, i_volume] <= 0
    counts["nonpositive_volume"] = int(nonpositive_volume.sum())
    values[nonpositive_volume, i_volume] = np.nan

    # Range rules run in order on views of values: a row one rule cleared is not counted again.
    high, low = values[:, i_high], values[:, i_low]

    def clear_range(rule: str, bad: np.ndarray) -> None:
        counts[rule] = int(bad.sum())
        high[bad] = np.nan
        low[bad] = np.nan

    clear_range("high_below_low", high < low)
    clear_range("close_outside_range", (values[:, i_close] > high) | (values[:, i_close] < low))
    clear_range("open_outside_range", (values[:, i_open] > high) | (values[:, i_open] < low))
    return _Bars(dates=dates, values=values, has_ohlc=raw.has_ohlc, dropped_dates=dropped_dates,
                 dropped_ratios=dropped_ratios), counts


def _drop_bad_prints(
    dates: np.ndarray, values: np.ndarray, counts: dict[str, int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Drop single-day spikes: a close > 50% away from its neighbours on both sides (MNST's
    shared file jumps from 0.086 to 7.095 and back the next day). Real crashes rarely undo
    themselves within one day; a bad print does, and one such day is a QLIKE disaster.

    Two-sided, so history only: the last row is never judged (a live feed keeps today's spike).
    Returns (kept dates, kept values, dropped dates, dropped rows with prices divided by the close
    of the kept row before them)."""
    i_close = VALUE_COLUMNS.index("close")
    r = np.diff(np.log(values[:, i_close]))  # closes are > 0 here (non-bond rows)
    jump, back = r[:-1], r[1:]  # into row t and out of it, for t = 1 .. n-2
    bad = np.zeros(len(dates), dtype=bool)
    bad[1:-1] = (
        (np.abs(jump) > BAD_PRINT_LOG_JUMP)
        & (np.sign(jump) != np.sign(back))
        & (np.abs(jump + back) < BAD_PRINT_REVERSAL * np.abs(jump))
    )
    counts["bad_print"] = int(bad.sum())
    kept = np.flatnonzero(~bad)
    previous = kept[np.searchsorted(kept, np.flatnonzero(bad)) - 1]  # row 0 is never bad: always a kept row before
    ratios = values[bad].copy()
    ratios[:, :4] /= values[previous, i_close][:, None]
    return dates[~bad], values[~bad], dates[bad], ratios


def suspect_prints_causal(close: np.ndarray, lookback: int = 5) -> np.ndarray:
    """Real-time (one-sided) bad-print flag: (n,) True where close t is > 50% away, in log terms,
    from the median of the ``lookback`` closes before it; uses closes dated <= t only.

    The historical rule (``_drop_bad_prints``) waits for the next close to see the spike undone;
    a live path cannot, so it flags the print as suspect for a person or a later confirmation
    and never drops it: a real crash of that size looks the same until the next day. A flagged
    close is left out of the median that judges the following closes, so a run of bad ticks
    is flagged throughout; a close that stays within the threshold of a flagged one confirms
    a new level (a real crash) and restarts the reference from those two closes.
    """
    close = np.asarray(close, dtype=float)
    flags = np.zeros(len(close), dtype=bool)
    trusted: list[float] = []
    for t, c in enumerate(close):
        if not c > 0:
            continue
        if trusted:
            flags[t] = abs(np.log(c / float(np.median(trusted[-lookback:])))) > BAD_PRINT_LOG_JUMP
            if flags[t] and t > 0 and flags[t - 1] and close[t - 1] > 0 and abs(np.log(c / close[t - 1])) <= BAD_PRINT_LOG_JUMP:
                flags[t], trusted = False, [float(close[t - 1])]
        if not flags[t]:
            trusted.append(float(c))
    return flags


def _adjust_splits(values: np.ndarray, counts: dict[str, int]) -> None:
    """Back-adjust unadjusted splits in place: where the close-to-close ratio is within 0.5%
    of an integer split ratio and the day itself barely moved (close near open), earlier prices are
    divided by the ratio and earlier volumes multiplied by it, as a split-adjusted source
    would have them (JCI's shared file falls 3.00x on 2002-01-02 with a 0.1% intraday range).
    A price move of exactly such a ratio overnight with a quiet day after it is not a market
    event a volatility model should learn from."""
    i_open, i_close, i_volume = (VALUE_COLUMNS.index(c) for c in ("open", "close", "volume"))
    close = values[:, i_close]
    ratio = close[:-1] / close[1:]  # old / new at each day t = 1 .. n-1
    near = np.zeros(len(ratio), dtype=bool)
    for split in SPLIT_RATIOS:
        near |= np.abs(ratio / split - 1.0) < SPLIT_TOLERANCE
    with np.errstate(invalid="ignore", divide="ignore"):  # open <= 0 or NaN: not a split day
        intraday = np.abs(np.log(close[1:] / values[1:, i_open]))
    near &= intraday <= SPLIT_MAX_INTRADAY  # no open (Date,Price files): never adjusted
    counts["unadjusted_split"] = int(near.sum())
    for t in np.flatnonzero(near) + 1:  # rows before t are in the old units
        factor = close[t - 1] / close[t]
        values[:t, [0, 1, 2, i_close]] /= factor
        values[:t, i_volume] *= factor


def _check_assets(assets: int | None) -> None:
    if assets is None:
        return
    if isinstance(assets, bool) or not isinstance(assets, (int, np.integer)) or assets < 1:
        raise NimbleError(
            f"assets must be a whole number >= 1, got {assets!r}",
            fix="pass --assets N with N >= 1, or leave it out to load every asset",
        )


def _list_sources(root: Path) -> list[_Source]:
    """The CSVs of a market folder, sorted by path relative to it; validates the layout."""
    if not root.exists():
        raise NimbleError("market data folder not found", path=root, fix=_MARKET_FIX)
    if not root.is_dir():
        raise NimbleError("market data path is not a folder", path=root, fix=_MARKET_FIX)
    loose = sorted(p.name for p in root.glob("*.csv") if p.is_file())
    if loose and root.name in FOLDER_CLASSES:
        # a single asset-class folder given directly, e.g. --data ../shared/data/market/equities
        files = sorted(p for p in root.glob("*.csv") if p.is_file())
        return [
            _Source(path=f, rel=f"{root.name}/{f.name}", asset=f.stem.removesuffix("-daily"), asset_class=FOLDER_CLASSES[root.name])
            for f in files
        ]
    if loose:
        raise NimbleError(
            f"CSV files directly in the market folder ({', '.join(loose[:3])}): "
            "their asset class is unknown",
            path=root,
            fix=f"move each into one of the subfolders {', '.join(FOLDER_CLASSES)}",
        )
    sources: list[_Source] = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(p for p in folder.glob("*.csv") if p.is_file())
        if not files:
            continue
        if folder.name not in FOLDER_CLASSES:
            raise NimbleError(
                f"unknown asset-class folder {folder.name!r}",
                path=folder,
                fix=f"rename it to one of {', '.join(FOLDER_CLASSES)} "
                f"(classes {', '.join(ASSET_CLASSES)}), or move it out of the market folder",
            )
        for file in files:
            sources.append(
                _Source(
                    path=file,
                    rel=file.relative_to(root).as_posix(),
                    asset=file.stem.removesuffix("-daily"),
                    asset_class=FOLDER_CLASSES[folder.name],
                )
            )
    if not sources:
        raise NimbleError("no CSV files in the market folder's subfolders", path=root, fix=_MARKET_FIX)
    sources.sort(key=lambda s: s.rel)
    seen: dict[str, Path] = {}
    for src in sources:
        if src.asset in seen:
            raise NimbleError(
                f"asset name {src.asset!r} is used by two files ({seen[src.asset]} and {src.path})",
                path=src.path,
                fix="rename one of the files: the file name (without .csv) is the asset name",
            )
        seen[src.asset] = src.path
    return sources


def _read_source(path: Path) -> tuple[_Bars, dict[str, int]]:
    """Parse one CSV into raw bars (file order) and its malformed_row / missing_value counts.

    Two formats are read: OHLCV (``,open,high,low,close,volume``, date in the first column)
    and two-column date/value (FRED ``DATE,SERIES`` and ``Date,Price``), the value being
    the close. Lines with a field count unlike the header's are malformed, found on the raw
    bytes so that the C parser only sees well-formed lines.
    """
    try:
        data = path.read_bytes()
    except OSError as error:
        raise NimbleError(
            f"cannot read file: {error.strerror}", path=path, fix="check that it exists and is readable"
        ) from error
    if not data.strip():
        raise NimbleError(
            "empty file (0 bytes or only whitespace)",
            path=path,
            fix="delete the file or fill it with daily rows",
        )
    buf = np.frombuffer(data, dtype=np.uint8)
    newlines = np.flatnonzero(buf == ord("\n"))
    starts = np.concatenate([[0], newlines + 1])
    ends = np.concatenate([newlines, [len(buf)]])
    ends = np.where((ends > starts) & (buf[np.maximum(ends - 1, 0)] == ord("\r")), ends - 1, ends)
    commas = np.flatnonzero(buf == ord(","))
    n_commas = np.searchsorted(commas, ends) - np.searchsorted(commas, starts)
    blank = ends == starts

    header = data[starts[0] : ends[0]].decode("utf-8", errors="replace").lstrip("\ufeff")
    names = [name.strip().strip('"').lower() for name in header.split(",")]
    mapping = _column_mapping(names, path)
    if blank[1:].all():
        raise NimbleError(
            "file has a header but no data rows", path=path, fix="delete the file or add daily rows"
        )
    bad_fields = ~blank & (n_commas != n_commas[0])
    bad_fields[0] = False
    skip = np.flatnonzero(bad_fields | blank).tolist()  # physical line numbers; 0 is the header

    columns = [f"c{i}" for i in range(len(names))]
    table = pd.read_csv(
        io.BytesIO(data),
        header=0,
        names=columns,
        index_col=False,
        skiprows=set(skip) or None,
        skip_blank_lines=False,
        quoting=csv.QUOTE_NONE,  # no source quotes fields; a stray quote is then just a bad token
        dtype={"c0": str},
        encoding_errors="replace",
    )
    dates = pd.to_datetime(table["c0"], format=DATE_FORMAT, errors="coerce")
    if dates.isna().any():  # rare: retry with surrounding spaces removed
        dates = pd.to_datetime(table["c0"].str.strip(), format=DATE_FORMAT, errors="coerce")
    malformed = dates.isna().to_numpy().copy()
    values = np.full((len(table), len(VALUE_COLUMNS)), np.nan)
    markers = np.zeros(values.shape, dtype=bool)  # '.' cells
    for j, field in enumerate(VALUE_COLUMNS):
        if field in mapping:
            values[:, j], markers[:, j], garbage = _parse_numbers(table[columns[mapping[field]]])
            malformed |= garbage
    counts = {
        "malformed_row": int(bad_fields.sum() + malformed.sum()),
        "missing_value": int(markers[~malformed].sum()),
    }
    keep = ~malformed & ~markers[:, VALUE_COLUMNS.index("close")]
    bars = _Bars(
        dates=dates.to_numpy(dtype="datetime64[ns]")[keep],
        values=values[keep],
        has_ohlc={"open", "high", "low"} <= mapping.keys(),
    )
    return bars, counts


def _column_mapping(names: list[str], path: Path) -> dict[str, int]:
    """Field name -> column index for a header; date is always column 0."""
    if len(names) == 2:
        return {"close": 1}
    if {"open", "high", "low", "close"} <= set(names[1:]):
        return {name: i for i, name in enumerate(names) if i > 0 and name in VALUE_COLUMNS}
    raise NimbleError(
        f"unrecognised header {','.join(names)!r}",
        path=path,
        fix="use ',open,high,low,close,volume' (date first) or a two-column 'DATE,VALUE' file",
    )


def _parse_numbers(column: pd.Series) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(float values, '.' missing marker, unparseable token) for one CSV column."""
    if pd.api.types.is_numeric_dtype(column.dtype):
        values = column.to_numpy(dtype=np.float64)
        no = np.zeros(len(column), dtype=bool)
        return values, no, no
    text = column.astype("str").str.strip()
    present = column.notna().to_numpy()
    marker = (text == ".").to_numpy() & present
    values = pd.to_numeric(text.where(~marker), errors="coerce").to_numpy(dtype=np.float64)
    garbage = np.isnan(values) & present & ~marker
    return values, marker, garbage


def _arch_bars(frame: pd.DataFrame) -> _Bars:
    """An arch dataset as raw bars; OHLC on the Adj Close basis when both closes exist."""
    dates = pd.to_datetime(frame.index).to_numpy(dtype="datetime64[ns]")
    values = np.full((len(frame), len(VALUE_COLUMNS)), np.nan)
    if "Close" not in frame.columns:
        values[:, VALUE_COLUMNS.index("close")] = frame.iloc[:, 0].to_numpy(dtype=np.float64)
        return _Bars(dates=dates, values=values, has_ohlc=False)
    close = frame["Close"].to_numpy(dtype=np.float64)
    adjusted = frame.get("Adj Close", frame["Close"]).to_numpy(dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = adjusted / close
    for j, field in enumerate(OHLC):
        values[:, j] = frame[field.title()].to_numpy(dtype=np.float64) * ratio
    values[:, VALUE_COLUMNS.index("close")] = adjusted
    values[:, VALUE_COLUMNS.index("volume")] = frame["Volume"].to_numpy(dtype=np.float64)
    return _Bars(dates=dates, values=values, has_ohlc=True)


def _repeat_str(labels: list[str], lengths: list[int]) -> pd.Series:
    """labels[i] repeated lengths[i] times as pandas' str dtype, built in Arrow (a Python-level
    build of ~2 million strings costs most of a full load)."""
    codes = pa.array(np.repeat(np.arange(len(labels), dtype=np.int32), lengths))
    dictionary = pa.array(labels, pa.large_string())
    strings = pa.DictionaryArray.from_arrays(codes, dictionary).cast(pa.large_string())
    return pd.Series(strings, dtype=pd.StringDtype("pyarrow", na_value=np.nan))


def _assemble(
    cleaned: dict[str, tuple[str, _Bars]], per_asset: dict[str, dict[str, int]], source: str
) -> MarketPanel:
    """Build the long frame (assets sorted by name), the report, and log one line per rule."""
    names = sorted(cleaned)
    lengths = [len(cleaned[a][1].dates) for a in names]
    values = np.concatenate([cleaned[a][1].values for a in names])
    frame = pd.DataFrame(
        {
            "date": np.concatenate([cleaned[a][1].dates for a in names]).astype("datetime64[ns]"),
            "asset": _repeat_str(names, lengths),
            "asset_class": _repeat_str([cleaned[a][0] for a in names], lengths),
            **{field: values[:, j] for j, field in enumerate(VALUE_COLUMNS)},
        }
    )
    totals = {rule: sum(c.get(rule, 0) for c in per_asset.values()) for rule in RULES}
    report = DataReport(
        counts=totals,
        per_asset={a: {r: n for r, n in per_asset[a].items() if n} for a in names},
        n_assets=len(names),
        n_rows=len(frame),
        start=frame["date"].min().date().isoformat(),
        end=frame["date"].max().date().isoformat(),
    )
    for rule, what in RULES.items():
        touched = sorted(((c[rule], a) for a, c in report.per_asset.items() if rule in c), reverse=True)
        worst = ", ".join(f"{a} {n}" for n, a in touched[:3])
        worst = f" ({worst})" if worst else ""
        # a rule that changed nothing is debug detail (-v); one that fired is what a user reads
        level = logging.INFO if totals[rule] else logging.DEBUG
        log.log(level, "%s: %d in %d assets%s — %s", rule, totals[rule], len(touched), worst, what)
    log.info(
        "loaded %d assets, %d rows, %s to %s from %s",
        report.n_assets,
        report.n_rows,
        report.start,
        report.end,
        source,
    )
    return MarketPanel(frame=frame, report=report, source=source, bad_prints=_bad_print_rows(cleaned))


def _bad_print_rows(cleaned: dict[str, tuple[str, _Bars]]) -> pd.DataFrame:
    """The dropped bad prints as panel rows, prices rebuilt from the (split-adjusted) close before them."""
    rows = []
    for name in sorted(cleaned):
        asset_class, bars = cleaned[name]
        if not len(bars.dropped_dates):
            continue
        before = np.searchsorted(bars.dates, bars.dropped_dates) - 1
        values = bars.dropped_ratios.copy()
        values[:, :4] *= bars.values[before, VALUE_COLUMNS.index("close")][:, None]
        rows.append(pd.DataFrame({"date": bars.dropped_dates.astype("datetime64[ns]"), "asset": name, "asset_class": asset_class,
                                  **{c: values[:, j] for j, c in enumerate(VALUE_COLUMNS)}}))
    return pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(columns=list(COLUMNS))
