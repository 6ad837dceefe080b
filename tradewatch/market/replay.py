"""Replay of recorded data: a CSV (optionally gzipped) of trades or of 1-minute bars.

Trades files need a timestamp and a price column; quantity, symbol, trade id, exchange, side and
sale condition are mapped by name (defaults fit ../shared/data/lean/*_trades.csv.gz). Files
without a side column get one from the tick rule (uptick = buy, downtick = sell, unchanged =
previous side). A bars file (open, high, low, close, volume columns) becomes four trades per bar
at the bar's open, high, low and close, splitting its volume evenly.

Rows that cannot be read are reported with their line number and skipped; the rest replays.
"""
from __future__ import annotations

import csv
import gzip
import logging
import math
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from tradewatch.events import InvalidTrade, Trade, iso_to_ms, trade_from_dict

log = logging.getLogger(__name__)

SIDE_WORDS = {"b": "buy", "buy": "buy", "bid": "buy", "s": "sell", "sell": "sell", "ask": "sell"}
BAR_OFFSETS_MS = (0, 15_000, 30_000, 45_000)  # where open, high, low, close land inside a 1m bar


@dataclass
class ColumnMap:
    timestamp: str = "timestamp"
    price: str = "price"
    quantity: str = "quantity"
    symbol: str = "symbol"
    trade_id: str = "trade_id"
    exchange: str = "exchange"
    side: str = "side"
    condition: str = "condition"


@dataclass
class ReplayFile:
    trades: list[Trade]
    skipped_rows: list[str] = field(default_factory=list)  # "line N: reason"


def parse_time_ms(text: str) -> int:
    """ISO-8601 (UTC when no offset) or a number: epoch seconds, milliseconds or microseconds."""
    text = text.strip()
    try:
        number = float(text)
    except ValueError:
        return iso_to_ms(text)
    if number > 1e14:
        return int(number // 1000)      # microseconds
    if number > 1e11:
        return int(number)              # milliseconds
    return int(round(number * 1000))    # seconds


def load(path: str | Path, columns: ColumnMap | None = None, symbol: str | None = None,
         exchange: str = "REPLAY") -> ReplayFile:
    """Read a trades or bars CSV into trades sorted by event time (stable for equal times)."""
    path = Path(path)
    columns = columns or ColumnMap()
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        try:
            result = _read(reader, path, columns, symbol, exchange)
        except csv.Error as error:         # e.g. a field over the csv module's 128 KiB limit
            raise ValueError(f"line {reader.line_num + 1}: not readable as CSV ({error})") from None
        except UnicodeDecodeError as error:
            raise ValueError(f"line {_first_not_utf8(path, opener)}: not UTF-8 ({error.reason}); save the file as"
                             " UTF-8") from None
        except (EOFError, gzip.BadGzipFile, zlib.error) as error:
            raise ValueError(f"after line {reader.line_num}: the compressed file is cut short or damaged ({error})"
                             ) from None
    result.trades.sort(key=lambda t: t.timestamp_ms)
    _apply_tick_rule(result.trades)
    if result.skipped_rows:
        log.warning("%s: skipped %d unreadable rows, first: %s", path, len(result.skipped_rows), result.skipped_rows[0])
    return result


def _first_not_utf8(path: Path, opener) -> int | str:
    """The number of the first line that is not UTF-8 (the text reader decodes whole blocks)."""
    with opener(path, "rb") as raw:
        for number, line in enumerate(raw, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError:
                return number
    return "?"


def _read(reader: csv.DictReader, path: Path, columns: ColumnMap, symbol: str | None, exchange: str) -> ReplayFile:
    header = set(reader.fieldnames or [])
    is_bars = {"open", "high", "low", "close"} <= header and columns.price not in header
    if not is_bars:
        missing = [c for c in (columns.timestamp, columns.price) if c not in header]
        if missing:
            raise ValueError(f"{path}: no column {', '.join(map(repr, missing))} "
                             f"(columns are {', '.join(sorted(header))}); map them with --time-column/--price-column")
    if columns.symbol not in header and not symbol:
        raise ValueError(f"{path}: no '{columns.symbol}' column; pass --symbol to name the instrument")
    rows = _bar_rows(reader, columns, symbol) if is_bars else _trade_rows(reader, columns, symbol, path.stem)
    result = ReplayFile([])
    for line, row in rows:
        if isinstance(row, str):
            result.skipped_rows.append(f"line {line}: {row}")
            continue
        try:
            row.setdefault("exchange", exchange)
            result.trades.append(trade_from_dict(row))
        except (InvalidTrade, ValueError, KeyError) as error:
            result.skipped_rows.append(f"line {line}: {error}")
    return result


# The row readers yield (line number, event dict) or (line number, reason it cannot be read).
def _trade_rows(reader: csv.DictReader, columns: ColumnMap, symbol: str | None, stem: str):
    for line, raw in enumerate(reader, start=2):
        try:
            row: dict[str, object] = {
                "schema_version": 1,
                "trade_id": raw.get(columns.trade_id) or f"{stem}-{line}",
                "symbol": (raw.get(columns.symbol) or symbol or "").upper(),
                "timestamp_ms": parse_time_ms(raw[columns.timestamp]),
                "price": _float(raw[columns.price]),
                "quantity": _float(raw[columns.quantity]) if raw.get(columns.quantity) else 1.0,
                "side": SIDE_WORDS.get((raw.get(columns.side) or "").strip().lower(), "unknown"),
                "condition": raw.get(columns.condition) or None,
            }
            if raw.get(columns.exchange):
                row["exchange"] = raw[columns.exchange]
        except (ValueError, TypeError) as error:
            yield line, f"unreadable value ({error})"
            continue
        yield line, row


def _bar_rows(reader: csv.DictReader, columns: ColumnMap, symbol: str | None):
    time_column = columns.timestamp if columns.timestamp in (reader.fieldnames or []) else "window_start"
    for line, raw in enumerate(reader, start=2):
        try:
            start = parse_time_ms(raw[time_column])
            name = (raw.get(columns.symbol) or symbol or "").upper()
            prices = [_float(raw[k]) for k in ("open", "high", "low", "close")]
            volume = _float(raw.get("volume") or "4") / 4
        except (ValueError, TypeError, KeyError) as error:
            yield line, f"unreadable bar ({error})"
            continue
        for index, (offset, price) in enumerate(zip(BAR_OFFSETS_MS, prices)):
            yield line, {"schema_version": 1, "trade_id": f"{name}-bar-{start}-{index}", "symbol": name,
                         "timestamp_ms": start + offset, "price": price, "quantity": volume, "side": "unknown"}


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"not a finite number: {text!r}")
    return value


def _apply_tick_rule(trades: list[Trade]) -> None:
    """Infer buy/sell for trades without a side: uptick buy, downtick sell, zero tick repeats."""
    last_price: dict[str, float] = {}
    last_side: dict[str, str] = {}
    for trade in trades:
        previous = last_price.get(trade.symbol)
        if trade.side == "unknown" and previous is not None:
            if trade.price > previous:
                trade.side = "buy"
            elif trade.price < previous:
                trade.side = "sell"
            else:
                trade.side = last_side.get(trade.symbol, "unknown")
        last_price[trade.symbol] = trade.price
        last_side[trade.symbol] = trade.side
