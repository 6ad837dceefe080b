"""Writes of the quotes stage (tradewatch/stages/quotes.py): `quotes`, `book_snapshots` and
`order_books` (its alerts go through store/detections.py), all keyed, so a checkpoint written
again after a crash changes nothing."""
from __future__ import annotations

from datetime import datetime, timezone

import orjson
import psycopg2.errors
from psycopg2.extras import execute_values

from tradewatch.book import OrderBook
from tradewatch.store import db, partitions

_CREATE_INCOMING = """
CREATE TEMP TABLE IF NOT EXISTS quotes_incoming (
    symbol text, ms bigint, seq bigint, bid float8, bid_size float8, ask float8, ask_size float8
) ON COMMIT DELETE ROWS
"""
_MERGE = """
INSERT INTO quotes (symbol, ts, seq, bid, bid_size, ask, ask_size)
SELECT symbol, timestamptz 'epoch' + ms * interval '1 millisecond', seq, bid, bid_size, ask, ask_size
FROM quotes_incoming ON CONFLICT DO NOTHING
"""
_MS = "timestamptz 'epoch' + %s * interval '1 millisecond'"


def write_quotes(cur, rows: list[tuple]) -> None:
    """rows: (symbol, ms, seq, bid, bid_size, ask, ask_size). COPY straight into `quotes` (symbols
    are validated against a pattern with no tab, backslash or newline); when a row is already
    stored (a checkpoint written again after a crash), merged through a temp table instead."""
    if not rows:
        return
    partitions.ensure(cur, "quotes", {partitions.day_of(r[1]) for r in rows})
    cur.execute("SAVEPOINT quotes_copy")
    try:
        db.copy_in(cur, "COPY quotes (symbol, ts, seq, bid, bid_size, ask, ask_size) FROM STDIN",
                   "".join(_quote_lines(rows, copy_timestamp)))
        cur.execute("RELEASE SAVEPOINT quotes_copy")
        return
    except psycopg2.errors.UniqueViolation:
        cur.execute("ROLLBACK TO SAVEPOINT quotes_copy")
        cur.execute("RELEASE SAVEPOINT quotes_copy")
    cur.execute(_CREATE_INCOMING)
    db.copy_in(cur, "COPY quotes_incoming FROM STDIN", "".join(_quote_lines(rows, str)))
    cur.execute(_MERGE)


def _quote_lines(rows: list[tuple], when) -> list[str]:
    """COPY text lines of quote rows, the time written by `when`. A side is empty (NULL) only in a
    book with no bid or no ask: a full book's line is written without a test per number."""
    lines = []
    append = lines.append
    for s, ms, seq, b, bs, a, az in rows:
        if b is not None and a is not None:
            append(f"{s}\t{when(ms)}\t{seq}\t{b!r}\t{bs!r}\t{a!r}\t{az!r}\n")
        else:
            n = copy_number
            append(f"{s}\t{when(ms)}\t{seq}\t{n(b)}\t{n(bs)}\t{n(a)}\t{n(az)}\n")
    return lines


NULL = r"\N"
_SECONDS: dict[int, str] = {}


def copy_timestamp(ms: int) -> str:
    """Epoch ms as a timestamptz literal of COPY text; the date-time part is cached per second
    (quotes of one second share it)."""
    second, milli = divmod(ms, 1000)
    prefix = _SECONDS.get(second)
    if prefix is None:
        if len(_SECONDS) > 4_096:      # a feed is roughly in time order: recent seconds are enough, and
            _SECONDS.clear()            # the stage's memory stays flat over days of sparse quotes
        prefix = _SECONDS[second] = datetime.fromtimestamp(second, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
    return f"{prefix}.{milli:03d}+00"


def copy_number(value: float | int | None) -> str:
    return NULL if value is None else repr(value)


def write_snapshots(cur, rows: list[tuple]) -> None:
    """rows: (symbol, ms, seq, bids, asks), the sides as lists of (price, size) best first."""
    if not rows:
        return
    partitions.ensure(cur, "book_snapshots", {partitions.day_of(r[1]) for r in rows})
    execute_values(cur, "INSERT INTO book_snapshots (symbol, ts, seq, bids, asks) VALUES %s ON CONFLICT DO NOTHING",
                   [(s, ms, seq, orjson.dumps(b).decode(), orjson.dumps(a).decode()) for s, ms, seq, b, a in rows],
                   template=f"(%s, {_MS}, %s, %s::jsonb, %s::jsonb)")


def write_books(cur, books: list[tuple[int, OrderBook, dict | None]], gone: set[str]) -> None:
    """The current book of each (partition, book, watch) changed since the last checkpoint, with
    its watch (JSON data: the book watch's state and alert cooldowns); `gone`: symbols no longer
    held (idle)."""
    if books:
        rows = []
        for p, b, watch in books:
            bids, asks = b.depth(len(b.bids) + len(b.asks))
            rows.append((b.symbol, b.exchange, p, b.timestamp_ms, b.seq, b.stale, b.gaps,
                         orjson.dumps(bids).decode(), orjson.dumps(asks).decode(),
                         None if watch is None else orjson.dumps(watch).decode()))
        execute_values(
            cur, "INSERT INTO order_books (symbol, exchange, kafka_partition, ts, seq, stale, gaps, bids, asks, watch)"
                 " VALUES %s ON CONFLICT (symbol) DO UPDATE SET exchange = EXCLUDED.exchange,"
                 " kafka_partition = EXCLUDED.kafka_partition, ts = EXCLUDED.ts, seq = EXCLUDED.seq,"
                 " stale = EXCLUDED.stale, gaps = EXCLUDED.gaps, bids = EXCLUDED.bids, asks = EXCLUDED.asks,"
                 " watch = EXCLUDED.watch, updated_at = now()",
            rows, template=f"(%s, %s, %s, {_MS}, %s, %s, %s, %s::jsonb, %s::jsonb, %s::jsonb)")
    if gone:
        cur.execute("DELETE FROM order_books WHERE symbol = ANY(%s)", (sorted(gone),))


def load_books(cur, kafka_partitions: list[int]) -> list[tuple[int, OrderBook, dict | None]]:
    """The stored books of these Kafka partitions with their watches, as the last checkpoint left
    them (a watch is None when stored before watches were)."""
    cur.execute("SELECT kafka_partition, symbol, exchange, (extract(epoch FROM ts) * 1000)::bigint, seq, stale, gaps,"
                " bids, asks, watch FROM order_books WHERE kafka_partition = ANY(%s)", (kafka_partitions,))
    found = []
    for p, symbol, exchange, ms, seq, stale, gaps, bids, asks, watch in cur.fetchall():
        book = OrderBook(symbol, exchange, seq, ms, {pr: s for pr, s in bids}, {pr: s for pr, s in asks}, stale)
        book.gaps = gaps
        found.append((p, book, watch))
    return found
