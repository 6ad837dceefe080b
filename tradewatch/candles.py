"""A candle's columns, defined once (pure: no I/O).

Each column says its name, its PostgreSQL type, whether it may be NULL, how it is read off an
aggregator window (tradewatch/windows.py folds the trades), and how PostgreSQL computes it from a
window's trades (the backfill). Everything that writes, restores or rebuilds candles is derived
from this list (tradewatch/store/candles.py), and a test holds `stock_metrics` and
`flink_metrics` in schema.sql and the sink of flink_job.sql to it (tests/integration/test_candles.py):
adding a column is one line here, one in schema.sql per table and, for Flink, flink_job.sql.

- CANDLE: what both candle tables hold (the aggregator's `stock_metrics`, Flink's `flink_metrics`).
- STATE: what `stock_metrics` keeps beside them so a restarted aggregator resumes an open window
  exactly (where open and close came from, the source partition).
- STREAMED: what a final candle carries on the Kafka topic `candles` and the candle stream of the
  API (`message`), with every indicator; its id is `candle_id`.
Columns named like a Window attribute are restored into it by name.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from datetime import datetime, timezone
from typing import Callable

import orjson

from tradewatch.indicators import INDICATOR_COLUMNS
from tradewatch.volatility import FORECAST_COLUMNS
from tradewatch.windows import Window, size_label

# the backfill's PostgreSQL filter of the trades that may set open/high/low/close
SETS_PRICE = "(condition IS NULL OR NOT condition = ANY(%(excluded)s))"


@dataclass(frozen=True)
class Column:
    name: str
    sql_type: str                          # as PostgreSQL's information_schema spells it
    nullable: bool
    of: Callable[[Window], object]         # the value of an aggregator window (times in epoch ms)
    from_trades: str                       # PostgreSQL over one window's trades (`bin`, %(step)s, %(label)s)
    in_flink: bool = True                  # Flink's sink writes it (is_final comes from the default)

    @property
    def is_time(self) -> bool:
        return self.sql_type == "timestamp with time zone"


TEXT, TIME, FLOAT, BIGINT, INTEGER, BOOLEAN = ("text", "timestamp with time zone", "double precision", "bigint",
                                              "integer", "boolean")

KEY = ("symbol", "window_size", "window_start")
# the size every overview reads (KPIs, prices, the scanner) and the one Flink computes: WINDOW_SIZES
# must include it (tradewatch/config.py); the other sizes are the candle charts' choice
BASE_SIZE = "1m"

CANDLE: tuple[Column, ...] = (
    Column("symbol", TEXT, False, lambda w: w.symbol, "symbol"),
    Column("window_size", TEXT, False, lambda w: size_label(w.size_ms), "%(label)s"),
    Column("window_start", TIME, False, lambda w: w.start_ms, "bin"),
    Column("window_end", TIME, False, lambda w: w.end_ms, "bin + %(step)s * interval '1 millisecond'"),
    Column("open", FLOAT, True, lambda w: w.open,
           f"(array_agg(price ORDER BY ts, kafka_offset) FILTER (WHERE {SETS_PRICE}))[1]"),
    Column("high", FLOAT, True, lambda w: w.high, f"max(price) FILTER (WHERE {SETS_PRICE})"),
    Column("low", FLOAT, True, lambda w: w.low, f"min(price) FILTER (WHERE {SETS_PRICE})"),
    Column("close", FLOAT, True, lambda w: w.close,
           f"(array_agg(price ORDER BY ts DESC, kafka_offset DESC) FILTER (WHERE {SETS_PRICE}))[1]"),
    Column("volume", FLOAT, False, lambda w: w.sum_quantity, "sum(quantity)"),
    Column("traded_value", FLOAT, False, lambda w: w.traded_value, "sum(price * quantity)"),
    Column("vwap", FLOAT, True, lambda w: w.vwap, "sum(price * quantity) / sum(quantity)"),
    Column("trade_count", BIGINT, False, lambda w: w.trade_count, "count(*)"),
    Column("avg_price", FLOAT, False, lambda w: w.sum_price / w.trade_count, "avg(price)"),
    Column("min_price", FLOAT, False, lambda w: w.min_price, "min(price)"),
    Column("max_price", FLOAT, False, lambda w: w.max_price, "max(price)"),
    Column("sum_price", FLOAT, False, lambda w: w.sum_price, "sum(price)"),
    Column("avg_quantity", FLOAT, False, lambda w: w.sum_quantity / w.trade_count, "avg(quantity)"),
    Column("min_quantity", FLOAT, False, lambda w: w.min_quantity, "min(quantity)"),
    Column("max_quantity", FLOAT, False, lambda w: w.max_quantity, "max(quantity)"),
    Column("sum_quantity", FLOAT, False, lambda w: w.sum_quantity, "sum(quantity)"),
    Column("buy_volume", FLOAT, False, lambda w: w.buy_volume, "coalesce(sum(quantity) FILTER (WHERE side = 'buy'), 0)"),
    Column("sell_volume", FLOAT, False, lambda w: w.sell_volume,
           "coalesce(sum(quantity) FILTER (WHERE side = 'sell'), 0)"),
    Column("is_final", BOOLEAN, False, lambda w: w.is_final, "true", in_flink=False),
)

STATE: tuple[Column, ...] = (
    Column("open_ts_ms", BIGINT, True, lambda w: w.open_key and w.open_key[0], "NULL"),
    Column("open_seq", BIGINT, True, lambda w: w.open_key and w.open_key[1], "NULL"),
    Column("close_ts_ms", BIGINT, True, lambda w: w.close_key and w.close_key[0], "NULL"),
    Column("close_seq", BIGINT, True, lambda w: w.close_key and w.close_key[1], "NULL"),
    Column("kafka_partition", INTEGER, True, lambda w: w.partition, "min(kafka_partition)"),
)

STOCK_METRICS = CANDLE + STATE
FLINK_SINK = tuple(c for c in CANDLE if c.in_flink)
# the candle columns that are a Window's own attributes, restored into it by name
RESTORED = tuple(c.name for c in CANDLE if c.name in {f.name for f in fields(Window)} and c.name not in KEY)


def names(columns: tuple[Column, ...]) -> str:
    return ", ".join(c.name for c in columns)


def row(window: Window) -> tuple:
    """The window as a `stock_metrics` row, in STOCK_METRICS order (times in epoch ms)."""
    return tuple(c.of(window) for c in STOCK_METRICS)


def restore(symbol: str, size_ms: int, start_ms: int, partition: int, stored: dict) -> Window:
    """An open window again from its stored row (`stored`: column name -> value)."""
    window = Window(symbol, size_ms, start_ms, partition, **{name: stored[name] for name in RESTORED})
    if stored["open_ts_ms"] is not None:
        window.open_key = (stored["open_ts_ms"], stored["open_seq"])
    if stored["close_ts_ms"] is not None:
        window.close_key = (stored["close_ts_ms"], stored["close_seq"])
    return window


# a final candle as published: its figures (times as epoch ms), every indicator, the forecast of the next window
FIGURES = ("open", "high", "low", "close", "volume", "traded_value", "vwap", "trade_count", "buy_volume", "sell_volume")
STREAMED = ("symbol", "window_size", "window_start_ms", "window_end_ms", *FIGURES, *INDICATOR_COLUMNS,
            *FORECAST_COLUMNS)


def candle_id(symbol: str, size: str, start_ms: int) -> str:
    """A final candle's id (its key): `AAPL:1m:1767225600000`. A symbol never holds a colon."""
    return f"{symbol}:{size}:{start_ms}"


def message(row: dict) -> bytes:
    """A final candle as JSON (`row`: the STREAMED fields): its id, the figures, `window_start` also as
    ISO-8601 UTC for a person reading the stream."""
    start = datetime.fromtimestamp(row["window_start_ms"] / 1000, timezone.utc).isoformat().replace("+00:00", "Z")
    return orjson.dumps({"candle_id": candle_id(row["symbol"], row["window_size"], row["window_start_ms"]),
                         "window_start": start, **{name: row[name] for name in STREAMED}})
