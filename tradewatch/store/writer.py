"""Batched, idempotent writes of trades: COPY straight into `trades`, or — when the batch holds a
trade_id already stored (a re-delivery after a crash or rebalance, a replayed file) — COPY into a
session temp table and INSERT … ON CONFLICT DO NOTHING.

The direct COPY runs at the database's bulk-load speed and is what happens in steady state; it
sits in a savepoint, so a duplicate key only rolls back that attempt, and the same buffer then
takes the merge path. The conflict clause on (trade_id, ts) is what makes "offsets after commit"
exactly-once: a re-delivered trade carries the same timestamp (the table is partitioned by day of
ts, and PostgreSQL wants the partition key in the unique key).

A row the database refuses although validation passed it (a data error, or a constraint an
operator added) never stops ingestion: the batch is split in halves, each in its own savepoint,
until the refused rows are found; they become dead letters with PostgreSQL's own message, and
every other row is stored.
"""
from __future__ import annotations

import hashlib
import re
import time
from dataclasses import dataclass
from datetime import date, datetime, timezone

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


def write_batch(cur: psycopg2.extensions.cursor, lines: list[str], dead_letters: list[DeadLetter],
                days: set[int] | None = None, newest: list[int] | None = None) -> BatchResult:
    """Write one batch — trades as `copy_line`s, of the event days `days` (found from the lines
    when not given) — inside the caller's transaction (the stage runtime commits it, then the
    Kafka offsets), and bring `latest_trades` up to date from the batch's newest line of each
    symbol (`newest`: their positions, found from the lines when not given). Lines the database
    refuses are not written and come back in `refused`; the caller dead-letters them
    (`write_dead_letters`)."""
    if lines:
        partitions.ensure(cur, "trades", days if days is not None else {_day_of_line(line) for line in lines})
    inserted, refused = _store(cur, lines, 0, 0) if lines else (0, [])
    if lines:
        gone = {r.index for r in refused}
        if newest is None or gone.intersection(newest):
            newest = newest_lines(lines, gone)
        keep_latest(cur, [lines[i] for i in newest])
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
        db.copy_in(cur, f"COPY trades ({COLUMNS}) FROM STDIN", text)
        cur.execute("RELEASE SAVEPOINT direct_copy")
        return text.count("\n")
    except psycopg2.errors.UniqueViolation:
        cur.execute("ROLLBACK TO SAVEPOINT direct_copy")
        cur.execute("RELEASE SAVEPOINT direct_copy")
    cur.execute(_CREATE_STAGE)
    db.copy_in(cur, f"COPY trades_incoming ({COLUMNS}) FROM STDIN", text)
    cur.execute(_MERGE)
    return cur.rowcount


def newest_lines(lines: list[str], skip: set[int] = frozenset()) -> list[int]:
    """The position of each symbol's newest line (by ts, then trade_id, as `latest_trades` orders
    them), leaving out the positions in `skip`. The consumer finds them as it decodes (cheaper)."""
    best: dict[str, tuple[str, str, int]] = {}
    for i, line in enumerate(lines):
        if i in skip:
            continue
        trade_id, symbol, ts, _ = line.split("\t", 3)
        old = best.get(symbol)
        # the ts literals are fixed-width (sorting as text sorts by time); trade_id compares as the
        # database's C collation does, on its unescaped text
        if old is None or (ts, _unescape(trade_id)) > old[:2]:
            best[symbol] = (ts, _unescape(trade_id), i)
    return [i for *_, i in best.values()]


_KEEP_LATEST = """
INSERT INTO latest_trades (symbol, ts, trade_id, price, quantity, side, exchange) VALUES %s
ON CONFLICT (symbol) DO UPDATE SET ts = EXCLUDED.ts, trade_id = EXCLUDED.trade_id, price = EXCLUDED.price,
    quantity = EXCLUDED.quantity, side = EXCLUDED.side, exchange = EXCLUDED.exchange
WHERE (latest_trades.ts, latest_trades.trade_id) < (EXCLUDED.ts, EXCLUDED.trade_id)
"""


def keep_latest(cur, lines: list[str]) -> None:
    """Upsert the given stored lines (one per symbol) into `latest_trades`, where newer than the
    row kept. In symbol order: two writers lock shared symbols in the same order. In the writer's
    transaction, so a rolled-back batch leaves no trace; one statement of a few rows per batch,
    where the trigger it replaced cost 8-10 % of the consumer's speed."""
    rows = []
    for line in lines:
        trade_id, symbol, ts, price, quantity, side, exchange, _ = line.split("\t", 7)
        rows.append((symbol, ts, _unescape(trade_id), float(price), float(quantity), side, _unescape(exchange)))
    rows.sort()
    execute_values(cur, _KEEP_LATEST, rows, template="(%s, %s::timestamptz, %s, %s, %s, %s, %s)", page_size=10_000)


def _unescape(value: str) -> str:
    """The inverse of `_text` (COPY text escapes)."""
    if "\\" not in value:
        return value
    return re.sub(r"\\(.)", lambda m: _ESCAPES.get(m.group(1), m.group(1)), value)


_ESCAPES = {"t": "\t", "n": "\n", "r": "\r", "\\": "\\"}


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


def _day_of_line(line: str) -> int:
    """The event day of a copy_line (its third field, 'YYYY-MM-DD HH:MM:SS.mmm+00')."""
    stamp = line.split("\t", 3)[2]
    return (date.fromisoformat(stamp[:10]) - date(1970, 1, 1)).days


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
            lines = [copy_line(t, partition, offset) for _, partition, offset, t in valid]
            ids, times = [v[0] for v in valid], [v[3].timestamp_ms for v in valid]
            cur.execute("DELETE FROM dead_letters WHERE id = ANY(%s)", (known,))
            done.already_stored += len(known)
            result = write_batch(cur, lines, [], {partitions.day_of(ms) for ms in times})
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
    return (f"{_text(t.trade_id)}\t{t.symbol}\t{copy_timestamp(t.timestamp_ms)}\t{t.price!r}\t{t.quantity!r}\t"
            f"{t.side}\t{_text(t.exchange)}\t{copy_number(t.bid)}\t{copy_number(t.ask)}\t{_text(t.condition)}\t"
            f"{t.schema_version}\t{t.injected_anomaly or NULL}\t{copy_number(partition)}\t{copy_number(offset)}")


NULL = r"\N"
_SECONDS: dict[int, str] = {}


def copy_timestamp(ms: int) -> str:
    """Epoch ms as a timestamptz literal; the date-time part is cached per second (trades of
    one second share it)."""
    second, milli = divmod(ms, 1000)
    prefix = _SECONDS.get(second)
    if prefix is None:
        if len(_SECONDS) > 4_096:      # a feed is roughly in time order: recent seconds are enough, and
            _SECONDS.clear()            # the consumer's memory stays flat over days of sparse trades
        prefix = _SECONDS[second] = datetime.fromtimestamp(second, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
    return f"{prefix}.{milli:03d}+00"


def _text(value: str | None) -> str:
    if value is None:
        return NULL
    if "\\" in value or "\t" in value or "\n" in value or "\r" in value:
        return value.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")
    return value


def copy_number(value: float | int | None) -> str:
    return NULL if value is None else repr(value)
