"""Multi-asset daily market data: load, clean with explicit counted rules, return one long table.

Sources are a market folder laid out like ``../shared/data/market`` (``equities/``,
``rates/``, ``fx/``, ``commodities/`` with one CSV per asset) or the real series the
``arch`` package ships. Every cleaning rule is named in ``RULES``, counted per asset in a
``DataReport`` and logged once; bad input raises ``NimbleError`` naming the file and the fix.

Units: prices as published (USD per share, USD per barrel, USD per euro); bond "prices"
are yields in percent (4.06 means 4.06 %), so a bond close may be zero or negative.
"""

from __future__ import annotations

import io
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

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
)

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
    parts: list[pd.DataFrame] = []
    per_asset: dict[str, dict[str, int]] = {}
    for src in sources:
        raw, counts, has_ohlc = _read_source(src.path)
        clean, rule_counts = clean_bars(raw, src.asset_class, has_ohlc=has_ohlc)
        counts.update(rule_counts)
        if clean.empty:
            removed = ", ".join(f"{r} {counts[r]}" for r in ROW_DROPPING_RULES if counts.get(r))
            raise NimbleError(
                f"no usable rows after cleaning (rows removed by: {removed or 'none'})",
                path=src.path,
                fix="fix or remove this file; each row needs an ISO date and a finite close"
                + ("" if src.asset_class == "bond" else " > 0"),
            )
        parts.append(_label(clean, src.asset, src.asset_class))
        per_asset[src.asset] = counts
    return _assemble(parts, per_asset, str(root))


def load_arch(assets: int | None = None) -> MarketPanel:
    """The real daily series shipped with ``arch``: NASDAQ and SP500 (equity OHLCV), WTI (commodity).

    Open, high and low are scaled by Adj Close / Close so that all four prices are on the
    adjusted basis; close is Adj Close. Assets are ordered by name; ``assets`` keeps the first N.
    """
    _check_assets(assets)
    from arch.data import nasdaq, sp500, wti

    loaders = {"NASDAQ": (nasdaq, "equity"), "SP500": (sp500, "equity"), "WTI": (wti, "commodity")}
    names = sorted(loaders)[:assets] if assets is not None else sorted(loaders)
    parts: list[pd.DataFrame] = []
    per_asset: dict[str, dict[str, int]] = {}
    for name in names:
        module, asset_class = loaders[name]
        raw, has_ohlc = _arch_bars(module.load())
        clean, counts = clean_bars(raw, asset_class, has_ohlc=has_ohlc)
        if clean.empty:
            raise NimbleError(
                f"arch series {name} has no usable rows",
                path=module.__file__,
                fix="reinstall arch (pip install --force-reinstall arch) or use a market folder",
            )
        parts.append(_label(clean, name, asset_class))
        per_asset[name] = counts
    return _assemble(parts, per_asset, ARCH_SOURCE)


def clean_bars(raw: pd.DataFrame, asset_class: str, *, has_ohlc: bool) -> tuple[pd.DataFrame, dict[str, int]]:
    """Apply the cleaning rules after ``missing_value`` to one asset's bars.

    raw : columns date (datetime64) and open, high, low, close, volume (float64), file order.
    has_ohlc : whether the source has open/high/low fields (NaN there is then counted).
    Returns the cleaned bars sorted by date and the count for each rule applied.
    """
    counts: dict[str, int] = {}
    df = raw.loc[:, ["date", *VALUE_COLUMNS]].copy()
    values = df[list(VALUE_COLUMNS)].to_numpy(dtype=np.float64)
    df[list(VALUE_COLUMNS)] = np.where(np.isfinite(values), values, np.nan)
    is_bond = asset_class == "bond"

    nan_close = df["close"].isna()
    counts["nan_close"] = int(nan_close.sum())
    df = df[~nan_close]
    if not is_bond:
        nonpositive = df["close"] <= 0
        counts["nonpositive_price"] = int(nonpositive.sum())
        df = df[~nonpositive]

    dates = df["date"].to_numpy()
    counts["unsorted"] = int((dates[1:] < dates[:-1]).sum())
    if counts["unsorted"]:
        df = df.sort_values("date", kind="stable")
    duplicated = df["date"].duplicated(keep="last")
    counts["duplicate_date"] = int(duplicated.sum())
    df = df[~duplicated].copy()

    if has_ohlc:
        counts["nan_ohlc"] = int(df[list(OHLC)].isna().to_numpy().sum())
    if not is_bond:
        nonpositive_ohlc = df[list(OHLC)] <= 0
        counts["nonpositive_ohlc"] = int(nonpositive_ohlc.to_numpy().sum())
        df[list(OHLC)] = df[list(OHLC)].mask(nonpositive_ohlc)
    nonpositive_volume = df["volume"] <= 0
    counts["nonpositive_volume"] = int(nonpositive_volume.sum())
    df.loc[nonpositive_volume, "volume"] = np.nan

    # Range rules run in order; a row whose high/low a rule cleared is not counted again.
    high_below_low = df["high"] < df["low"]
    close_outside = ~high_below_low & ((df["close"] > df["high"]) | (df["close"] < df["low"]))
    open_outside = (
        ~high_below_low & ~close_outside & ((df["open"] > df["high"]) | (df["open"] < df["low"]))
    )
    for rule, mask in (
        ("high_below_low", high_below_low),
        ("close_outside_range", close_outside),
        ("open_outside_range", open_outside),
    ):
        counts[rule] = int(mask.sum())
        df.loc[mask, ["high", "low"]] = np.nan
    return df.reset_index(drop=True), counts


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
    if loose:
        raise NimbleError(
            f"CSV files directly in the market folder ({', '.join(loose[:3])}): their asset class is unknown",
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


def _read_source(path: Path) -> tuple[pd.DataFrame, dict[str, int], bool]:
    """Parse one CSV into raw bars (file order) and the malformed_row / missing_value counts.

    Two formats are read: OHLCV (``,open,high,low,close,volume``, date in the first column)
    and two-column date/value (FRED ``DATE,SERIES`` and ``Date,Price``), the value being
    the close. Returns (bars, counts, has_ohlc).
    """
    data = path.read_bytes()
    if not data.strip():
        raise NimbleError("empty file (0 bytes or only whitespace)", path=path, fix="delete the file or fill it with daily rows")
    buf = np.frombuffer(data, dtype=np.uint8)
    newlines = np.flatnonzero(buf == ord("\n"))
    starts = np.concatenate([[0], newlines + 1])
    ends = np.concatenate([newlines, [len(buf)]])
    ends = np.where((ends > starts) & (buf[np.maximum(ends - 1, 0)] == ord("\r")), ends - 1, ends)
    commas = np.concatenate([[0], np.cumsum(buf == ord(","))])
    n_commas = commas[ends] - commas[starts]
    blank = ends == starts

    header = data[starts[0] : ends[0]].decode("utf-8", errors="replace").lstrip("\ufeff")
    names = [name.strip().lower() for name in header.split(",")]
    mapping = _column_mapping(names, path)
    body = np.arange(1, len(starts))
    if not (~blank[body]).any():
        raise NimbleError("file has a header but no data rows", path=path, fix="delete the file or add daily rows")
    bad_fields = ~blank & (n_commas != n_commas[0])
    bad_fields[0] = False
    skip = np.flatnonzero(bad_fields | blank)
    skip = skip[skip > 0]

    columns = [f"c{i}" for i in range(len(names))]
    table = pd.read_csv(
        io.BytesIO(data),
        header=0,
        names=columns,
        index_col=False,
        skiprows=set(skip.tolist()),
        skip_blank_lines=False,
        dtype={"c0": str},
        encoding_errors="replace",
    )
    dates = pd.to_datetime(table["c0"].str.strip(), format=DATE_FORMAT, errors="coerce")
    malformed = dates.isna().to_numpy().copy()
    missing = np.zeros(len(table), dtype=np.int64)
    bars = pd.DataFrame({"date": dates.astype("datetime64[ns]")})
    for field in VALUE_COLUMNS:
        if field not in mapping:
            bars[field] = np.nan
            continue
        values, is_marker, is_garbage = _parse_numbers(table[columns[mapping[field]]])
        bars[field] = values
        malformed |= is_garbage
        missing += is_marker
        if field == "close":
            missing_close = is_marker
    counts = {
        "malformed_row": int(bad_fields.sum() + malformed.sum()),
        "missing_value": int(missing[~malformed].sum()),
    }
    keep = ~malformed & ~missing_close
    return bars[keep].reset_index(drop=True), counts, {"open", "high", "low"} <= mapping.keys()


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


def _arch_bars(frame: pd.DataFrame) -> tuple[pd.DataFrame, bool]:
    """An arch dataset as raw bars; OHLC on the Adj Close basis when both closes exist."""
    bars = pd.DataFrame({"date": pd.to_datetime(frame.index).astype("datetime64[ns]")})
    if "Close" in frame.columns:
        close = frame["Close"].to_numpy(dtype=np.float64)
        adjusted = frame.get("Adj Close", frame["Close"]).to_numpy(dtype=np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = adjusted / close
        for field in OHLC:
            bars[field] = frame[field.title()].to_numpy(dtype=np.float64) * ratio
        bars["close"] = adjusted
        bars["volume"] = frame["Volume"].to_numpy(dtype=np.float64)
        return bars, True
    bars["close"] = frame.iloc[:, 0].to_numpy(dtype=np.float64)
    for field in (*OHLC, "volume"):
        bars[field] = np.nan
    return bars, False


def _label(clean: pd.DataFrame, asset: str, asset_class: str) -> pd.DataFrame:
    out = clean.loc[:, ["date"]].copy()
    out["asset"] = asset
    out["asset_class"] = asset_class
    for field in VALUE_COLUMNS:
        out[field] = clean[field].to_numpy(dtype=np.float64)
    return out


def _assemble(parts: list[pd.DataFrame], per_asset: dict[str, dict[str, int]], source: str) -> MarketPanel:
    """Concatenate cleaned assets sorted by name, build the report and log one line per rule."""
    parts = sorted(parts, key=lambda p: p["asset"].iloc[0])
    frame = pd.concat(parts, ignore_index=True).loc[:, list(COLUMNS)]
    frame["date"] = frame["date"].astype("datetime64[ns]")
    totals = {rule: sum(c.get(rule, 0) for c in per_asset.values()) for rule in RULES}
    report = DataReport(
        counts=totals,
        per_asset={a: {r: n for r, n in c.items() if n} for a, c in sorted(per_asset.items())},
        n_assets=len(parts),
        n_rows=len(frame),
        start=frame["date"].min().date().isoformat(),
        end=frame["date"].max().date().isoformat(),
    )
    for rule, what in RULES.items():
        touched = sorted(((c[rule], a) for a, c in report.per_asset.items() if rule in c), reverse=True)
        worst = ", ".join(f"{a} {n}" for n, a in touched[:3])
        log.info("%s: %d in %d assets%s — %s", rule, totals[rule], len(touched), f" ({worst})" if worst else "", what)
    log.info(
        "loaded %d assets, %d rows, %s to %s from %s",
        report.n_assets,
        report.n_rows,
        report.start,
        report.end,
        source,
    )
    return MarketPanel(frame=frame, report=report, source=source)
