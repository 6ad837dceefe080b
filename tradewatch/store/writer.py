"""Batched, idempotent writes of trades: COPY straight into `trades`, or — when the batch holds a
trade_id already stored (a re-delivery after a crash or rebalance, a replayed file) — COPY into a
session temp table and INSERT … ON CONFLICT DO NOTHING.

The direct COPY runs at the database's bulk-load speed and is what happens in steady state; it
sits in a savepoint, so a duplicate key only rolls back that attempt, and the same buffer then
takes the merge path. The conflict clause on trade_id is what makes "offsets after commit"
exactly-once.

A row the database refuses although validation passed it (a data error, or a constraint an
operator added) never stops ingestion: the batch is split in halves, each in its own savepoint,
until the refused rows are found; they become dead letters with PostgreSQL's own message, and
every other row is stored.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from datetime import datetime, timezone

import psycopg2.errors
import psycopg2.extensions
from psycopg2.extras import execute_values

from tradewatch.events import Trade

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
ON CONFLICT (trade_id) DO NOTHING
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


def write_batch(cur: psycopg2.extensions.cursor, lines: list[str],
                dead_letters: list[DeadLetter]) -> BatchResult:
    """Write one batch — trades as `copy_line`s — inside the caller's transaction (the stage
    runtime commits it, then the Kafka offsets). Lines the database refuses are not written and
    come back in `refused`; the caller dead-letters them (`write_dead_letters`)."""
    inserted, refused = _store(cur, lines, 0, 0) if lines else (0, [])
    write_dead_letters(cur, dead_letters)
    return BatchResult(inserted, len(lines) - inserted - len(refused), len(dead_letters), refused)


def _store(cur, lines: list[str], first: int, depth: int) -> tuple[int, list[Refused]]:
    """Store lines[...] (batch positions from `first`); split on a data error. Returns (rows
    inserted, refused lines)."""
    savepoint = f"store_{depth}"
    cur.execute(f"SAVEPOINT {savepoint}")
    try:
        inserted = _copy(cur, "\n".join(lines) + "\n")
        cur.execute(f"RELEASE SAVEPOINT {savepoint}")
        return inserted, []
    except (psycopg2.DataError, psycopg2.IntegrityError) as error:
        cur.execute(f"ROLLBACK TO SAVEPOINT {savepoint}")
        cur.execute(f"RELEASE SAVEPOINT {savepoint}")
        if len(lines) == 1:
            message = (error.pgerror or str(error)).strip().splitlines()[0]
            return 0, [Refused(first, f"refused by PostgreSQL: {message}")]
    half = len(lines) // 2
    left, left_refused = _store(cur, lines[:half], first, depth + 1)
    right, right_refused = _store(cur, lines[half:], first + half, depth + 1)
    return left + right, left_refused + right_refused


def _copy(cur, text: str) -> int:
    """COPY straight into trades; when a trade_id is already stored, merge through a temp table."""
    cur.execute("SAVEPOINT direct_copy")
    try:
        cur.copy_expert(f"COPY trades ({COLUMNS}) FROM STDIN", io.StringIO(text))
        cur.execute("RELEASE SAVEPOINT direct_copy")
        return text.count("\n")
    except psycopg2.errors.UniqueViolation:
        cur.execute("ROLLBACK TO SAVEPOINT direct_copy")
        cur.execute("RELEASE SAVEPOINT direct_copy")
    cur.execute(_CREATE_STAGE)
    cur.copy_expert(f"COPY trades_incoming ({COLUMNS}) FROM STDIN", io.StringIO(text))
    cur.execute(_MERGE)
    return cur.rowcount


def write_dead_letters(cur: psycopg2.extensions.cursor, dead_letters: list[DeadLetter]) -> None:
    if dead_letters:
        execute_values(
            cur,
            "INSERT INTO dead_letters (topic, kafka_partition, kafka_offset, message_key, raw, reason, sent_at) "
            "VALUES %s ON CONFLICT (topic, kafka_partition, kafka_offset) DO NOTHING",
            [(d.topic, d.partition, d.offset, d.key, d.raw, d.reason, d.sent_ms) for d in dead_letters],
            template="(%s, %s, %s, %s, %s, %s, timestamptz 'epoch' + %s * interval '1 millisecond')")


@dataclass
class Replayed:
    stored: int = 0               # now in trades
    already_stored: int = 0       # their trade_id was stored before: the stored trade stays
    still_invalid: int = 0        # left in dead_letters, with today's reason
    first_ms: int | None = None   # event-time range of the stored ones
    last_ms: int | None = None


def replay_dead_letters(conn, reason: str | None, since, max_skew_ms: int, batch: int = 1000) -> Replayed:
    """Validate dead letters again with today's rules (against the Kafka timestamp each was sent
    with): the valid ones go into `trades` (ON CONFLICT (trade_id): never twice) and leave
    dead_letters; the others stay, their reason brought up to date. One transaction per batch."""
    from tradewatch.events import InvalidTrade, parse_trade
    done, after = Replayed(), 0
    while True:
        with conn, conn.cursor() as cur:
            cur.execute(
                "SELECT id, kafka_partition, kafka_offset, raw, reason,"
                " (extract(epoch FROM coalesce(sent_at, received_at)) * 1000)::bigint FROM dead_letters"
                " WHERE id > %s AND (%s::text IS NULL OR strpos(lower(reason), lower(%s::text)) > 0)"
                " AND (%s::timestamptz IS NULL OR received_at >= %s::timestamptz) ORDER BY id LIMIT %s FOR UPDATE",
                (after, reason, reason, since, since, batch))
            rows = cur.fetchall()
            if not rows:
                return done
            after = rows[-1][0]
            lines, ids, times, changed = [], [], [], []
            for letter_id, partition, offset, raw, old_reason, sent_ms in rows:
                try:
                    trade = parse_trade(bytes(raw) if raw is not None else None, sent_ms, max_skew_ms)
                    lines.append(copy_line(trade, partition, offset))
                    ids.append(letter_id)
                    times.append(trade.timestamp_ms)
                except InvalidTrade as error:
                    done.still_invalid += 1
                    if str(error) != old_reason:
                        changed.append((str(error), letter_id))
            result = write_batch(cur, lines, [])
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


def copy_line(t: Trade, partition: int | None, offset: int | None) -> str:
    """One trade in COPY text format (columns `COLUMNS`). symbol, side and injected_anomaly are
    validated against patterns without special characters; the free-text fields are escaped.
    `t` may be any record with the Trade's attribute names (the decoder's own, on the fast path)."""
    return (f"{_text(t.trade_id)}\t{t.symbol}\t{_timestamp(t.timestamp_ms)}\t{t.price!r}\t{t.quantity!r}\t"
            f"{t.side}\t{_text(t.exchange)}\t{_number(t.bid)}\t{_number(t.ask)}\t{_text(t.condition)}\t"
            f"{t.schema_version}\t{t.injected_anomaly or NULL}\t{_number(partition)}\t{_number(offset)}")


NULL = r"\N"
_SECONDS: dict[int, str] = {}


def _timestamp(ms: int) -> str:
    """Epoch ms as a timestamptz literal; the date-time part is cached per second (trades of
    one second share it)."""
    second, milli = divmod(ms, 1000)
    prefix = _SECONDS.get(second)
    if prefix is None:
        if len(_SECONDS) > 100_000:
            _SECONDS.clear()
        prefix = _SECONDS[second] = datetime.fromtimestamp(second, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
    return f"{prefix}.{milli:03d}+00"


def _text(value: str | None) -> str:
    if value is None:
        return NULL
    if "\\" in value or "\t" in value or "\n" in value or "\r" in value:
        return value.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")
    return value


def _number(value: float | int | None) -> str:
    return NULL if value is None else repr(value)
