"""Batched, idempotent writes of trades: COPY straight into `trades`, or — when the batch holds a
trade_id already stored (a re-delivery after a crash or rebalance, a replayed file) — COPY into a
session temp table and INSERT … ON CONFLICT DO NOTHING.

Rows travel in COPY's binary format (`copy_row`): PostgreSQL takes the numbers and times as they are
instead of parsing text (measured: 0.75 us less of its CPU a row), and a row is built in half the
Python time of a text line. The direct COPY runs at the database's bulk-load speed and is what
happens in steady state; it sits in a savepoint, so a duplicate key only rolls back that attempt,
and the same buffer then takes the merge path. The conflict clause on (trade_id, ts) is what makes
"offsets after commit" exactly-once: a re-delivered trade carries the same timestamp (the table is
partitioned by day of ts, and PostgreSQL wants the partition key in the unique key).

A row the database refuses although validation passed it (a data error, or a constraint an
operator added) never stops ingestion: the batch is split in halves, each in its own savepoint,
until the refused rows are found; they become dead letters with PostgreSQL's own message, and
every other row is stored.
"""
from __future__ import annotations

import hashlib
import struct
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import psycopg2.errors
import psycopg2.extensions
from psycopg2.extras import execute_values

from tradewatch.events import LATEST_TIMESTAMP_MS, MAX_EVENT_BYTES, Trade
from tradewatch.store import db, partitions

COLUMNS = ("trade_id, symbol, ts, price, quantity, side, exchange, bid, ask, condition, schema_version, "
            "injected_anomaly, kafka_partition, kafka_offset")
_CREATE_STAGE = """
CREATE TEMP TABLE IF NOT EXISTS trades_incoming (
    trade_id text, symbol text, ts timestamptz, price float8, quantity float8, side text,
    exchange text, bid float8, ask float8, condition text, schema_version smallint,
    injected_anomaly text, kafka_partition integer, kafka_offset bigint
) ON COMMIT DELETE ROWS
"""
_MERGE = f"""
INSERT INTO trades ({COLUMNS})
SELECT DISTINCT ON (trade_id) {COLUMNS}
FROM trades_incoming
ORDER BY trade_id, kafka_partition, kafka_offset
ON CONFLICT (trade_id, ts) DO NOTHING
"""


@dataclass(slots=True)
class DeadLetter:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    raw: bytes | None
    reason: str
    sent_ms: int | None = None       # the record's Kafka timestamp: the clock-skew rule's reference


RAW_KEPT = 4 * MAX_EVENT_BYTES      # a dead letter keeps this much of its message (64 KiB)


@dataclass(slots=True)
class Refused:
    index: int          # position in the batch's lines
    reason: str


@dataclass(slots=True)
class BatchResult:
    trades_inserted: int
    duplicates_skipped: int
    dead_letters: int
    refused: list[Refused]


def write_batch(cur: psycopg2.extensions.cursor, rows: list[bytes], dead_letters: list[DeadLetter],
                days: set[int] | None = None, newest: list[int] | None = None) -> BatchResult:
    """Write one batch — trades as `copy_row`s, of the event days `days` (found from the rows when
    not given) — inside the caller's transaction (the stage runtime commits it, then the Kafka
    offsets), and bring `latest_trades` up to date from the batch's newest row of each symbol
    (`newest`: their positions, found from the rows when not given). Rows the database refuses are
    not written and come back in `refused`; the caller dead-letters them (`write_dead_letters`)."""
    if rows:
        partitions.ensure(cur, "trades", days if days is not None else {_day_of_row(row) for row in rows})
    inserted, refused = _store(cur, rows, 0, 0) if rows else (0, [])
    if rows:
        gone = {r.index for r in refused}
        if newest is None or gone.intersection(newest):
            newest = newest_rows(rows, gone)
        keep_latest(cur, [rows[i] for i in newest])
    write_dead_letters(cur, dead_letters)
    return BatchResult(inserted, len(rows) - inserted - len(refused), len(dead_letters), refused)


def _store(cur, rows: list[bytes], first: int, depth: int) -> tuple[int, list[Refused]]:
    """Store rows[...] (batch positions from `first`) in a savepoint: COPY straight into trades;
    when a trade_id is already stored, back to the savepoint and merge through a temp table; on a
    data error, back to it and split. Returns (rows inserted, refused rows). One savepoint for both
    fallbacks: each statement is a round trip, and the writer thread waits for the GIL after each."""
    savepoint = f"store_{depth}"
    data = copy_data(rows)
    cur.execute(f"SAVEPOINT {savepoint}")
    try:
        try:
            copy_trades(cur, data)
            inserted = len(rows)
        except psycopg2.errors.UniqueViolation:
            cur.execute(f"ROLLBACK TO SAVEPOINT {savepoint}")
            cur.execute(_CREATE_STAGE)
            copy_trades(cur, data, "trades_incoming")
            cur.execute(_MERGE)
            inserted = cur.rowcount
        cur.execute(f"RELEASE SAVEPOINT {savepoint}")
        return inserted, []
    except (psycopg2.DataError, psycopg2.IntegrityError) as error:
        cur.execute(f"ROLLBACK TO SAVEPOINT {savepoint}")
        cur.execute(f"RELEASE SAVEPOINT {savepoint}")
        if len(rows) == 1:
            message = (error.pgerror or str(error)).strip().splitlines()[0]
            return 0, [Refused(first, f"refused by PostgreSQL: {message}")]
    half = len(rows) // 2
    left, left_refused = _store(cur, rows[:half], first, depth + 1)
    right, right_refused = _store(cur, rows[half:], first + half, depth + 1)
    return left + right, left_refused + right_refused


def newest_rows(rows: list[bytes], skip: set[int] = frozenset()) -> list[int]:
    """The position of each symbol's newest row (by ts, then trade_id, as `latest_trades` orders
    them), leaving out the positions in `skip`. The consumer finds them as it decodes (cheaper)."""
    best: dict[bytes, tuple[int, bytes, int]] = {}
    for i, row in enumerate(rows):
        if i in skip:
            continue
        trade_id, symbol, ts = _fields(row, 3)
        stamp = _Q.unpack(ts)[0]
        old = best.get(symbol)
        # trade_id compares as the database's C collation does: by its UTF-8 bytes
        if old is None or (stamp, trade_id) > old[:2]:
            best[symbol] = (stamp, trade_id, i)
    return [i for *_, i in best.values()]


_KEEP_LATEST = """
INSERT INTO latest_trades (symbol, ts, trade_id, price, quantity, side, exchange) VALUES %s
ON CONFLICT (symbol) DO UPDATE SET ts = EXCLUDED.ts, trade_id = EXCLUDED.trade_id, price = EXCLUDED.price,
    quantity = EXCLUDED.quantity, side = EXCLUDED.side, exchange = EXCLUDED.exchange
WHERE (latest_trades.ts, latest_trades.trade_id) < (EXCLUDED.ts, EXCLUDED.trade_id)
"""


def keep_latest(cur, rows: list[bytes]) -> None:
    """Upsert the given stored rows (one per symbol) into `latest_trades`, where newer than the
    row kept. In symbol order: two writers lock shared symbols in the same order. In the writer's
    transaction, so a rolled-back batch leaves no trace; one statement of a few rows per batch,
    where the trigger it replaced cost 8-10 % of the consumer's speed."""
    execute_values(cur, _KEEP_LATEST, sorted(latest_values(row) for row in rows), page_size=10_000)


def write_dead_letters(cur: psycopg2.extensions.cursor, dead_letters: list[DeadLetter]) -> None:
    if dead_letters:
        # the Kafka time, which a producer sets: clamped to the dates PostgreSQL and Python share
        now_ms = int(time.time() * 1000)
        sent = [min(max(d.sent_ms, 0), LATEST_TIMESTAMP_MS) if d.sent_ms is not None else now_ms
                for d in dead_letters]
        partitions.ensure(cur, "dead_letters", {partitions.day_of(ms) for ms in sent})
        execute_values(
            cur,
            "INSERT INTO dead_letters (topic, kafka_partition, kafka_offset, message_key, raw, raw_bytes, raw_sha256,"
            " reason, sent_at) VALUES %s ON CONFLICT (topic, kafka_partition, kafka_offset, sent_at) DO NOTHING",
            [(d.topic, d.partition, d.offset, d.key and d.key[:1024], d.raw and d.raw[:RAW_KEPT],
              None if d.raw is None else len(d.raw), None if d.raw is None else hashlib.sha256(d.raw).digest(),
              d.reason[:2000], ms) for d, ms in zip(dead_letters, sent)],
            template="(%s, %s, %s, %s, %s, %s, %s, %s, timestamptz 'epoch' + %s * interval '1 millisecond')")


def _day_of_row(row: bytes) -> int:
    """The event day of a copy_row."""
    return partitions.day_of((_Q.unpack(_fields(row, 3)[2])[0] + PG_EPOCH_US) // 1000)


@dataclass
class Replayed:
    stored: int = 0               # now in trades
    already_stored: int = 0       # their trade_id was stored before: the stored trade stays
    still_invalid: int = 0        # left in dead_letters, with today's reason
    first_ms: int | None = None   # event-time range of the stored ones
    last_ms: int | None = None


def replay_dead_letters(conn, topic: str, reason: str | None, since, max_skew_ms: int,
                        batch: int = 1000) -> Replayed:
    """Validate the dead letters of the trades topic `topic` again with today's rules (against the
    Kafka timestamp each was sent with): the valid ones go into `trades` (a trade_id already stored
    keeps its row: never twice) and leave dead_letters; the others stay, their reason brought up to
    date. Those of other topics (the quotes stage's) are left alone. One transaction per batch."""
    from tradewatch.events import InvalidTrade, parse_trade
    done, after = Replayed(), 0
    while True:
        with conn, conn.cursor() as cur:
            cur.execute(
                "SELECT id, kafka_partition, kafka_offset, raw, reason,"
                " (extract(epoch FROM coalesce(sent_at, received_at)) * 1000)::bigint FROM dead_letters"
                " WHERE id > %s AND topic = %s AND (%s::text IS NULL OR strpos(lower(reason), lower(%s::text)) > 0)"
                " AND (%s::timestamptz IS NULL OR received_at >= %s::timestamptz) ORDER BY id LIMIT %s FOR UPDATE",
                (after, topic, reason, reason, since, since, batch))
            rows = cur.fetchall()
            if not rows:
                return done
            after = rows[-1][0]
            valid, changed = [], []
            for letter_id, partition, offset, raw, old_reason, sent_ms in rows:
                try:
                    valid.append((letter_id, partition, offset,
                                  parse_trade(bytes(raw) if raw is not None else None, sent_ms, max_skew_ms)))
                except InvalidTrade as error:
                    done.still_invalid += 1
                    if str(error) != old_reason:
                        changed.append((str(error), letter_id))
            # a trade_id stored already (with whatever timestamp) keeps its row: not a second one
            cur.execute("SELECT DISTINCT trade_id FROM trades WHERE trade_id = ANY(%s)",
                        ([t.trade_id for *_, t in valid],))
            stored = {r[0] for r in cur.fetchall()}
            known = [letter_id for letter_id, *_, t in valid if t.trade_id in stored]
            valid = [v for v in valid if v[3].trade_id not in stored]
            rows = [copy_row(t, partition, offset) for _, partition, offset, t in valid]
            ids, times = [v[0] for v in valid], [v[3].timestamp_ms for v in valid]
            cur.execute("DELETE FROM dead_letters WHERE id = ANY(%s)", (known,))
            done.already_stored += len(known)
            result = write_batch(cur, rows, [], {partitions.day_of(ms) for ms in times})
            for refused in result.refused:
                changed.append((refused.reason, ids[refused.index]))
                done.still_invalid += 1
            gone = set(r.index for r in result.refused)
            resolved = [letter_id for i, letter_id in enumerate(ids) if i not in gone]
            cur.execute("DELETE FROM dead_letters WHERE id = ANY(%s)", (resolved,))
            if changed:
                execute_values(cur, "UPDATE dead_letters d SET reason = v.reason FROM (VALUES %s) AS v (reason, id)"
                                    " WHERE d.id = v.id", changed)
            done.stored += result.trades_inserted
            done.already_stored += len(resolved) - result.trades_inserted
            kept = [ms for i, ms in enumerate(times) if i not in gone]
            if kept:
                done.first_ms = min(kept + ([done.first_ms] if done.first_ms is not None else []))
                done.last_ms = max(kept + ([done.last_ms] if done.last_ms is not None else []))


# COPY's binary format (PostgreSQL's "COPY" page): a header, then per row its field count and each
# field as a 4-byte length (-1: NULL) and its bytes in network order; timestamptz as microseconds
# since 2000-01-01 UTC, float8 as IEEE 754.
_HEADER, _TRAILER = b"PGCOPY\n\xff\r\n\x00" + struct.pack("!ii", 0, 0), struct.pack("!h", -1)
PG_EPOCH_US = 946_684_800_000_000
_PG_EPOCH = datetime(2000, 1, 1, tzinfo=timezone.utc)
_FIELDS = struct.pack("!h", COLUMNS.count(",") + 1)
_TIME_PRICE_QUANTITY = struct.Struct("!iqidid")
_FLOAT8, _VERSION, _INT4, _INT8 = struct.Struct("!id"), struct.Struct("!ih"), struct.Struct("!ii"), struct.Struct("!iq")
_LENGTH, _Q, _D = struct.Struct("!i"), struct.Struct("!q"), struct.Struct("!d")
NULL = _LENGTH.pack(-1)
_WORDS: dict[str, bytes] = {}


def copy_row(t: Trade, partition: int | None, offset: int | None) -> bytes:
    """One trade as a row of binary COPY (columns `COLUMNS`). `t` may be any record with the
    Trade's attribute names (the decoder's own, on the fast path)."""
    return b"".join((
        _FIELDS, _text(t.trade_id), _word(t.symbol),
        _TIME_PRICE_QUANTITY.pack(8, t.timestamp_ms * 1000 - PG_EPOCH_US, 8, t.price, 8, t.quantity),
        _word(t.side), _word(t.exchange), _float8(t.bid), _float8(t.ask), _text(t.condition),
        _VERSION.pack(2, t.schema_version), _word(t.injected_anomaly),
        NULL if partition is None else _INT4.pack(4, partition), NULL if offset is None else _INT8.pack(8, offset)))


def copy_data(rows: list[bytes]) -> bytes:
    """What `COPY … FROM STDIN (FORMAT binary)` reads: the rows between the header and trailer."""
    return _HEADER + b"".join(rows) + _TRAILER


def copy_trades(cur, data: bytes, table: str = "trades") -> None:
    """COPY `data` (copy_data of copy_rows) into `table`, whose columns include COLUMNS."""
    db.copy_in(cur, f"COPY {table} ({COLUMNS}) FROM STDIN (FORMAT binary)", data)


def _text(value: str | None) -> bytes:
    if value is None:
        return NULL
    data = value.encode()
    return _LENGTH.pack(len(data)) + data


def _word(value: str | None) -> bytes:
    """_text of a value that repeats (symbol, side, exchange, anomaly kind): encoded once."""
    data = _WORDS.get(value)
    if data is None:
        if len(_WORDS) > 4_096:       # a bound: the consumer's memory stays flat over any feed
            _WORDS.clear()
        data = _WORDS[value] = _text(value)
    return data


def _float8(value: float | None) -> bytes:
    return NULL if value is None else _FLOAT8.pack(8, value)


def _fields(row: bytes, count: int) -> list[bytes | None]:
    """The first `count` fields of a copy_row, as bytes (None for NULL)."""
    found, at = [], 2
    for _ in range(count):
        size = _LENGTH.unpack_from(row, at)[0]
        at += 4
        found.append(None if size < 0 else row[at:at + size])
        at += max(size, 0)
    return found


def latest_values(row: bytes) -> tuple:
    """A copy_row read back as `latest_trades` keeps it: (symbol, ts, trade_id, price, quantity,
    side, exchange)."""
    trade_id, symbol, ts, price, quantity, side, exchange = _fields(row, 7)
    return (symbol.decode(), _PG_EPOCH + timedelta(microseconds=_Q.unpack(ts)[0]), trade_id.decode(),
            _D.unpack(price)[0], _D.unpack(quantity)[0], side.decode(), exchange.decode())
