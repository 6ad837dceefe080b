"""The candle columns are defined once (tradewatch/candles.py): the tables schema.sql makes and the
sink flink_job.sql writes must not drift from that definition."""
from __future__ import annotations

import re

from tests.conftest import query
from tradewatch import candles
from tradewatch.config import PROJECT_ROOT


def table_columns(settings, table: str) -> list[tuple[str, str, bool]]:
    return [(name, kind, nullable == "YES") for name, kind, nullable in query(settings, """
        SELECT column_name, data_type, is_nullable FROM information_schema.columns
        WHERE table_schema = current_schema() AND table_name = %s AND column_name <> 'updated_at'
        ORDER BY ordinal_position""", (table,))]


def defined(columns: tuple[candles.Column, ...]) -> list[tuple[str, str, bool]]:
    return [(c.name, c.sql_type, c.nullable) for c in columns]


def test_the_candle_tables_are_the_defined_columns(services):
    assert table_columns(services, "stock_metrics") == defined(candles.STOCK_METRICS)
    assert table_columns(services, "flink_metrics") == defined(candles.CANDLE)


def test_flink_writes_the_defined_columns_in_their_order():
    sql = (PROJECT_ROOT / "flink_job.sql").read_text()
    sink = re.search(r"CREATE TABLE flink_metrics_sink \((.*?)\n\) WITH", sql, re.S).group(1)
    declared = [re.match(r"\s*`?(\w+)`?\s", line).group(1) for line in sink.splitlines()
                if re.match(r"\s*`?\w+`?\s+(STRING|DOUBLE|BIGINT)\b", line)]
    assert declared == [c.name for c in candles.FLINK_SINK]
    select = re.search(r"INSERT INTO flink_metrics_sink\s+SELECT (.*?)\nFROM TABLE", sql, re.S).group(1)
    select = re.sub(r"--[^\n]*", "", select)
    depth, items = 0, 1
    for char in select:
        depth += char == "("
        depth -= char == ")"
        items += char == "," and depth == 0
    assert items == len(candles.FLINK_SINK), "flink_job.sql's SELECT computes another number of columns"


def test_a_window_row_and_its_restore_round_trip():
    from tradewatch.events import Trade
    from tradewatch.windows import WindowSet

    windows = WindowSet((60_000,), 0, float("inf"), partition=3)
    for sequence, (ts, price, side) in enumerate([(5_000, 10.0, "buy"), (1_000, 11.0, "sell"), (9_000, 9.5, "buy")]):
        windows.add(Trade(f"t{sequence}", "ACME", ts, price, 2.0 + sequence, side, "TEST"), sequence)
    (window,) = windows.open_windows.values()
    stored = dict(zip([c.name for c in candles.STOCK_METRICS], candles.row(window)))
    back = candles.restore("ACME", 60_000, window.start_ms, 3, stored)
    assert back == window
    assert stored["open"] == 11.0 and stored["close"] == 9.5 and stored["volume"] == 9.0 and stored["kafka_partition"] == 3


def test_the_api_offers_the_configured_window_sizes():
    from tradewatch.api_app import create_app
    from tradewatch.config import Settings

    spec = create_app(Settings.load(window_sizes="1h,1m")).openapi()
    (size,) = [p for p in spec["paths"]["/candles"]["get"]["parameters"] if p["name"] == "size"]
    assert size["schema"]["default"] == "1m"
    assert spec["components"]["schemas"]["Size"]["enum"] == ["1m", "1h"]
