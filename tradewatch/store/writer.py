"""Batched, idempotent writes: COPY into a session temp table, then INSERT … ON CONFLICT DO NOTHING.

COPY keeps the speed of a bulk load; the conflict clause on trade_id makes re-delivered or
replayed messages harmless, which is what makes "offsets after commit" exactly-once.
"""
from __future__ import annotations

import io
from dataclasses import dataclass

import psycopg2.extensions
from psycopg2.extras import execute_values

from tradewatch.events import Trade

_STAGE_COLUMNS = ("trade_id, symbol, timestamp_ms, price, quantity, side, exchange, bid, ask, "
                  "condition, schema_version, injected_anomaly, kafka_partition, kafka_offset")
_CREATE_STAGE = """
CREATE TEMP TABLE IF NOT EXISTS trades_incoming (
    trade_id text, symbol text, timestamp_ms bigint, price float8, quantity float8, side text,
    exchange text, bid float8, ask float8, condition text, schema_version smallint,
    injected_anomaly text, kafka_partition integer, kafka_offset bigint
) ON COMMIT DELETE ROWS
"""
_MERGE = """
INSERT INTO trades (trade_id, symbol, ts, price, quantity, side, exchange, bid, ask, condition,
                    schema_version, injected_anomaly, kafka_partition, kafka_offset)
SELECT DISTINCT ON (trade_id)
       trade_id, symbol, timestamptz 'epoch' + timestamp_ms * interval '1 millisecond', price,
       quantity, side, exchange, bid, ask, condition, schema_version, injected_anomaly,
       kafka_partition, kafka_offset
FROM trades_incoming
ORDER BY trade_id, kafka_partition, kafka_offset
ON CONFLICT (trade_id) DO NOTHING
"""


@dataclass(slots=True)
class StoredTrade:
    trade: Trade
    partition: int | None = None
    offset: int | None = None


@dataclass(slots=True)
class DeadLetter:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    raw: bytes | None
    reason: str


@dataclass(slots=True)
class BatchResult:
    trades_inserted: int
    duplicates_skipped: int
    dead_letters: int


def write_batch(cur: psycopg2.extensions.cursor, trades: list[StoredTrade],
                dead_letters: list[DeadLetter]) -> BatchResult:
    """Write one batch inside the caller's transaction (the stage runtime commits it, then the
    Kafka offsets)."""
    inserted = 0
    if trades:
        cur.execute(_CREATE_STAGE)
        cur.copy_expert(f"COPY trades_incoming ({_STAGE_COLUMNS}) FROM STDIN", _copy_buffer(trades))
        cur.execute(_MERGE)
        inserted = cur.rowcount
    if dead_letters:
        execute_values(
            cur,
            "INSERT INTO dead_letters (topic, kafka_partition, kafka_offset, message_key, raw, reason) "
            "VALUES %s ON CONFLICT (topic, kafka_partition, kafka_offset) DO NOTHING",
            [(d.topic, d.partition, d.offset, d.key, d.raw, d.reason) for d in dead_letters],
        )
    return BatchResult(inserted, len(trades) - inserted, len(dead_letters))


def _copy_buffer(rows: list[StoredTrade]) -> io.StringIO:
    lines = []
    for row in rows:
        t = row.trade
        lines.append("\t".join((
            _text(t.trade_id), _text(t.symbol), str(t.timestamp_ms), repr(t.price), repr(t.quantity),
            _text(t.side), _text(t.exchange), _number(t.bid), _number(t.ask), _text(t.condition),
            str(t.schema_version), _text(t.injected_anomaly), _number(row.partition), _number(row.offset),
        )))
    lines.append("")
    return io.StringIO("\n".join(lines))


def _text(value: str | None) -> str:
    if value is None:
        return r"\N"
    return value.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


def _number(value: float | int | None) -> str:
    return r"\N" if value is None else repr(value)
