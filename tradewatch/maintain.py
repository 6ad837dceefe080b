"""`python -m tradewatch maintain [--dry-run] [--every SECONDS]`: retention of the tables that grow
with the feed, by whole partitions (tradewatch/store/partitions.py), never by DELETE.

For each table — trades, trade_flags, late_trades, dead_letters, alerts, quotes and book_snapshots
(RETENTION_DAYS_QUOTES), each window size's
candle tables (stock_metrics_1m, indicators_1m, …: RETENTION_DAYS_MINUTE_CANDLES for windows up to
a minute, RETENTION_DAYS_CANDLES for longer ones) and Flink's 1-minute flink_metrics (as the
minute candles; first its DEFAULT partition's rows are moved into their months) — a partition (a day, a month for candles, or a
year far from today: schema.sql) is expired
when it ended more than RETENTION_DAYS_<TABLE> before the table's newest event time, or before now
if that is earlier (event time: a replay of 2013 keeps its last days; never past now: one trade
stamped in the year 3000 does not expire everything else). An expired partition is

1. **archived** to Parquet, `TRADEWATCH_HOME/archive/<table>/date=YYYY-MM-DD/part-<id>.parquet`
   (`date=YYYY` for a year),
   written under a temporary name and renamed;
2. **verified**: the file is read back, and its row count and checksum (the sum of the event
   times in microseconds) must equal the partition's; then `part-<id>.json` records them;
3. **dropped**: in one transaction — after every writer that made sure of the table's partitions
   has committed (partitions.hold_writers) — the partition is locked, checked against that record
   once more (a late row since? then the archive is deleted and the day archived again next
   time), detached and dropped.

The size bound beside the age bound (`bound`): when the database and the archive take more than
STORAGE_MAX_GB, or the disk holding TRADEWATCH_HOME is low (tradewatch/disk.py), partitions go
before their time — archived, verified and dropped the same way, the one furthest through its
table's retention first, never one holding its table's newest day — until neither holds, each
saying why. Checked in every pass and every BOUND_EVERY_S between passes.

A crash anywhere leaves either no record (the next run deletes the unrecorded file and archives
again) or a record that matches the partition (the next run only drops it): no row is lost, and
none is both in the database and twice in the archive. Each run also creates today's and
tomorrow's partitions ahead of the writers and reports trade_ids stored twice (a trade re-sent with
another timestamp is a second row: its trade_id is unique per timestamp only).
"""
from __future__ import annotations

import json
import logging
import os
import time
import uuid
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tradewatch import disk
from tradewatch.config import Settings
from tradewatch.store import db, partitions
from tradewatch.windows import parse_size

log = logging.getLogger("tradewatch.maintain")
CHUNK_ROWS = 200_000
CRASH_AFTER = os.environ.get("TRADEWATCH_MAINTAIN_CRASH_AFTER", "")   # fault injection for the tests


MINUTE_MS = 60_000


def retention_days(cur, settings: Settings) -> list[tuple[str, str, int]]:
    """(table, its time column, days kept) of every table `maintain` prunes: the feed's tables and
    each window size's candle tables (stock_metrics_1m, indicators_5m, …; found in the catalog)."""
    kept = [("trades", settings.retention_days_trades), ("trade_flags", settings.retention_days_trade_flags),
            ("late_trades", settings.retention_days_late_trades),
            ("dead_letters", settings.retention_days_dead_letters), ("alerts", settings.retention_days_alerts),
            ("quotes", settings.retention_days_quotes), ("book_snapshots", settings.retention_days_quotes)]
    found = [(t, partitions.PARTITIONED[t], days) for t, days in kept]
    found.append((partitions.FLINK, "window_start", settings.retention_days_minute_candles))   # 1m windows
    for table in partitions.CANDLES:
        for name in children(cur, table):
            size_ms = parse_size(name[len(table) + 1:])
            found.append((name, "window_start", settings.retention_days_minute_candles if size_ms <= MINUTE_MS
                          else settings.retention_days_candles))
    return found


@dataclass
class Day:
    """A partition: the day `day` (name <table>_pYYYYMMDD), or the month (<table>_mYYYYMM) or year
    (<table>_yYYYY) that begins on `day`."""
    table: str
    key: str             # its time column
    day: date
    name: str
    span: str = "day"    # day | month | year

    @property
    def end(self) -> datetime:
        if self.day.year == 9999 and self.span != "day" or self.day == date.max:
            return datetime.max.replace(tzinfo=timezone.utc)          # never expires: beyond Python's dates
        last = {"day": self.day + timedelta(days=1), "year": date(self.day.year + 1, 1, 1),
                "month": (self.day.replace(day=28) + timedelta(days=4)).replace(day=1)}[self.span]
        return datetime.combine(last, datetime.min.time(), timezone.utc)

    @property
    def start(self) -> datetime:
        return datetime.combine(self.day, datetime.min.time(), timezone.utc)

    @property
    def label(self) -> str:
        return {"day": self.day.isoformat(), "month": self.day.isoformat()[:7], "year": str(self.day.year)}[self.span]


def _crash(step: str) -> None:
    if CRASH_AFTER == step:
        os._exit(9)


def children(cur, table: str) -> list[str]:
    cur.execute("SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
                " WHERE i.inhparent = to_regclass(%s) ORDER BY 1", (table,))
    return [name for (name,) in cur.fetchall()]


def day_partitions(cur, table: str, key: str) -> list[Day]:
    found = []
    for name in children(cur, table):
        tail = name[len(table) + 1:]
        if tail[:1] == "p" and len(tail) == 9:
            found.append(Day(table, key, datetime.strptime(tail[1:], "%Y%m%d").date(), name))
        elif tail[:1] == "m" and len(tail) == 7:
            found.append(Day(table, key, datetime.strptime(tail[1:], "%Y%m").date(), name, "month"))
        elif tail[:1] == "y" and len(tail) == 5:
            found.append(Day(table, key, date(int(tail[1:]), 1, 1), name, "year"))
    return sorted(found, key=lambda d: d.day)


def expired(cur, table: str, key: str, days: int) -> list[Day]:
    cur.execute(f"SELECT max({key}), least(max({key}), now()) FROM {table}")
    found, newest = cur.fetchone()
    if found is None:          # an empty table: nothing expires (least() of NULL and now() is now)
        return []
    cutoff = newest - timedelta(days=days)
    return [d for d in day_partitions(cur, table, key) if d.end <= cutoff]


def measure(cur, day: Day) -> tuple[int, int]:
    """Rows and checksum (sum of the event times in µs) of a day partition."""
    cur.execute(f"SELECT count(*), coalesce(sum((extract(epoch FROM {day.key}) * 1000000)::bigint), 0)"
                f" FROM {day.name}")
    rows, checksum = cur.fetchone()
    return int(rows), int(checksum)


def folder(settings: Settings, day: Day) -> Path:
    return settings.home / "archive" / day.table / f"date={day.label}"


def records(where: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(where.glob("part-*.json"))]


SPANS = {10: ("day", "p", "%Y-%m-%d"), 7: ("month", "m", "%Y-%m"), 4: ("year", "y", "%Y")}   # by label length


def archived(settings: Settings, table: str, key: str) -> list[tuple[Day, list[Path]]]:
    """The spans of `table` in the archive, oldest first, each with its recorded files (a file
    without its record is not part of the archive); a span's Day names the partition it was."""
    found = []
    for where in (settings.home / "archive" / table).glob("date=*"):
        label = where.name[len("date="):]
        span, letter, pattern = SPANS.get(len(label), (None, "", ""))
        files = [where / r["file"] for r in records(where) if r.get("file")]
        if span and files:
            day = datetime.strptime(label, pattern).date()
            found.append((Day(table, key, day, f"{table}_{letter}{label.replace('-', '')}", span), files))
    return sorted(found, key=lambda f: f[0].day)


def _tidy(where: Path) -> None:
    """Files a crash left without their record: never part of the archive."""
    recorded = {r["file"] for r in records(where)}
    for leftover in list(where.glob("*.tmp")) + [p for p in where.glob("part-*.parquet") if p.name not in recorded]:
        leftover.unlink()


# json and jsonb columns (alerts' details and evidence) are archived as their JSON text: their shape
# varies from row to row, which a Parquet struct cannot hold
JSON_TYPES = {114, 3802}
# The archive's type of a column NULL all through the first chunk (Arrow would make it the null
# type, and a value in a later chunk could not be written), by PostgreSQL type oid: bool, int8,
# int2, int4, float4, float8, timestamp, timestamptz; any other (text, json) is archived as text.
ARROW_TYPES = {16: pa.bool_(), 20: pa.int64(), 21: pa.int16(), 23: pa.int32(), 700: pa.float32(),
               701: pa.float64(), 1114: pa.timestamp("us"), 1184: pa.timestamp("us", tz="UTC")}


def _json_as_text(row: tuple, columns: list[int]) -> tuple:
    values = list(row)
    for i in columns:
        if values[i] is not None:
            values[i] = json.dumps(values[i], separators=(",", ":"))
    return tuple(values)


def archive(conn, settings: Settings, day: Day, rows: int, checksum: int) -> dict:
    where = folder(settings, day)
    where.mkdir(parents=True, exist_ok=True)
    part = f"part-{uuid.uuid4().hex[:12]}"
    final, temporary = where / f"{part}.parquet", where / f"{part}.parquet.tmp"
    writer = None
    with conn.cursor(name=f"archive_{part}") as cur:          # server-side: a day never sits in memory
        cur.itersize = CHUNK_ROWS
        cur.execute(f"SELECT * FROM {day.name}")
        while batch := cur.fetchmany(CHUNK_ROWS):
            columns = [c.name for c in cur.description]
            texts = [i for i, c in enumerate(cur.description) if c.type_code in JSON_TYPES]
            if texts:
                batch = [_json_as_text(r, texts) for r in batch]
            table = pa.Table.from_pylist([dict(zip(columns, r)) for r in batch])
            for i, column in enumerate(cur.description):     # all NULL in this chunk: still its own type
                if i in texts or table.column(i).type == pa.null():
                    kind = pa.string() if i in texts else ARROW_TYPES.get(column.type_code, pa.string())
                    table = table.set_column(i, columns[i], table.column(i).cast(kind))
            if writer is None:
                writer = pq.ParquetWriter(temporary, table.schema)
            writer.write_table(table.cast(writer.schema))
    conn.commit()
    if writer is None:
        return {"file": None, "rows": 0, "checksum": 0}
    writer.close()
    os.replace(temporary, final)
    _crash("write")
    written = pq.read_table(final, columns=[day.key]).column(day.key)
    # summed as decimals: 5,000 event times in µs already overflow an int64
    micros = written.cast(pa.timestamp("us", tz="UTC")).cast(pa.int64()).cast(pa.decimal128(38, 0))
    got = (len(written), int(pc.sum(micros).as_py() or 0))
    if got != (rows, checksum):
        final.unlink()
        raise RuntimeError(f"{day.name}: the archive holds {got[0]} rows (checksum {got[1]}), the partition "
                           f"{rows} ({checksum}); not dropped")
    record = {"file": final.name, "rows": rows, "checksum": checksum, "table": day.table, "day": day.label,
              "archived_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    (where / f"{part}.json.tmp").write_text(json.dumps(record))
    os.replace(where / f"{part}.json.tmp", where / f"{part}.json")
    _crash("record")
    return record


def drop(conn, day: Day, record: dict) -> bool:
    """Detach and drop the partition if it still matches what was archived."""
    with conn.cursor() as cur:
        # waits for every writer that made sure of its partitions and has not committed yet (the
        # partition it is about to write into must not go from under it), and holds new ones back
        partitions.hold_writers(cur, day.table)
        # readers still read it (nobody writes it) while it is measured; then the table, then the
        # partition, in the order a query takes them: the other order deadlocks with a reader that
        # has the table and waits for the partition
        cur.execute(f"LOCK TABLE {day.name} IN SHARE MODE")
        if measure(cur, day) != (record["rows"], record["checksum"]):
            conn.rollback()
            return False
        cur.execute(f"LOCK TABLE ONLY {day.table} IN ACCESS EXCLUSIVE MODE")
        cur.execute(f"LOCK TABLE {day.name} IN ACCESS EXCLUSIVE MODE")
        cur.execute(f"ALTER TABLE {day.table} DETACH PARTITION {day.name}")
        if day.table == "trades":       # a symbol whose newest trade went has none in trades any more
            cur.execute("DELETE FROM latest_trades l WHERE l.ts < %s AND NOT EXISTS"
                        " (SELECT 1 FROM trades t WHERE t.trade_id = l.trade_id AND t.ts = l.ts)", (day.end,))
        _crash("detach")
        cur.execute(f"DROP TABLE {day.name}")
    conn.commit()
    return True


# a writer's rows carry its transaction's start time, and may commit after a pass began: each pass
# looks back this far before the last one's start as well (a trade_id found twice may be named twice)
RESENT_OVERLAP = timedelta(minutes=10)


def resent(conn, out, remember: bool = True) -> int:
    """Report the trade_ids stored since the last pass that are also stored with another timestamp
    (a producer re-sent them with another time). Costs what arrived since, not what is stored."""
    with conn.cursor() as cur:
        cur.execute("SELECT now(), (SELECT checked_to FROM maintain_checks WHERE name = 'trades_resent')")
        started, since = cur.fetchone()
        since = (since - RESENT_OVERLAP) if since else datetime(1, 1, 1, tzinfo=timezone.utc)
        cur.execute("SELECT count(DISTINCT n.trade_id), min(n.trade_id) FROM trades n WHERE n.ingested_at >= %s"
                    " AND EXISTS (SELECT 1 FROM trades o WHERE o.trade_id = n.trade_id AND o.ts <> n.ts)", (since,))
        twice, example = cur.fetchone()
        if remember:
            cur.execute("INSERT INTO maintain_checks (name, checked_to) VALUES ('trades_resent', %s)"
                        " ON CONFLICT (name) DO UPDATE SET checked_to = excluded.checked_to", (started,))
    conn.commit()
    if twice:
        log.warning("%d trade_ids are stored more than once with different timestamps (e.g. %s): a "
                    "producer re-sent trades with another time", twice, example)
        out(f"trades: {twice} trade_ids stored more than once with different timestamps (e.g. {example})")
    return twice


def run(settings: Settings, dry_run: bool = False, out=print) -> int:
    """One pass over every table; returns the number of days dropped (or that would be)."""
    conn = db.connect(settings)
    dropped = 0
    try:
        with conn.cursor() as cur:
            today = date.today()
            if not dry_run:
                for table in partitions.PARTITIONED:
                    for day in (today, today + timedelta(days=1)):
                        cur.execute("SELECT tw_ensure_partition(%s, %s, %s)",
                                    (table, day, partitions.UNIT.get(table, "day")))
                moved = partitions.adopt_flink(cur, today)
                conn.commit()
                if moved:
                    out(f"flink_metrics: {moved:,} rows moved from its default partition into their months")
            for table, key, days in retention_days(cur, settings):
                for day in expired(cur, table, key, days):
                    dropped += retire(conn, settings, day, dry_run, out)
            dropped += bound(conn, settings, dry_run, out)
            _old_events(conn, settings, dry_run, out)
            resent(conn, out, remember=not dry_run)
    finally:
        conn.close()
    return dropped


def retire(conn, settings: Settings, day: Day, dry_run: bool, out, why: str = "") -> bool:
    """Archive, verify and drop one partition (`why`: said when it goes before its time); whether it
    was dropped (or would be)."""
    with conn.cursor() as cur:
        rows, checksum = measure(cur, day)
    conn.commit()
    where = folder(settings, day)
    if dry_run:
        out(f"{day.table} {day.label}: would archive {rows:,} rows to {where} and drop {day.name}{why}")
        return True
    if where.exists():
        _tidy(where)
    record = next((r for r in records(where) if (r["rows"], r["checksum"]) == (rows, checksum)),
                  None) if where.exists() else None
    if record is None:
        record = archive(conn, settings, day, rows, checksum)
    if drop(conn, day, record):
        out(f"{day.table} {day.label}: archived {rows:,} rows to {where}, partition dropped{why}")
        return True
    if record.get("file"):            # rows arrived since: that archive is incomplete; next run does it again
        (where / record["file"]).unlink(missing_ok=True)
        (where / record["file"].replace(".parquet", ".json")).unlink(missing_ok=True)
    out(f"{day.table} {day.label}: changed while archived; archived again next time")
    return False


GIB = 1024**3


def pressure(conn, settings: Settings) -> tuple[str, int]:
    """Why the stored data must shrink now and by how many bytes, or ("", 0): the database and the
    archive take more than STORAGE_MAX_GB, or the disk holding TRADEWATCH_HOME is low (below
    tradewatch/disk.py's line)."""
    with conn.cursor() as cur:
        cur.execute("SELECT pg_database_size(current_database())")
        database = cur.fetchone()[0]
    conn.commit()
    stored, found = database + disk.archive_bytes(settings.home), disk.usage(settings.home)
    over = stored - settings.storage_max_gb * GIB if settings.storage_max_gb else 0
    if over > 0:
        return (f"the database ({database / GIB:.2f} GiB) and the archive ({(stored - database) / GIB:.2f} GiB) "
                f"take more than STORAGE_MAX_GB ({settings.storage_max_gb:g} GiB)"), int(over)
    if found.low:
        line = max(disk.LOW_FREE_FRACTION * found.total, disk.LOW_FREE_BYTES)
        return (f"{found.free / GIB:.2f} GiB free ({found.free_percent:.0f} %) on the disk of {found.folder}, "
                f"below the line of {disk.LOW_FREE_FRACTION:.0%} or {disk.LOW_FREE_BYTES / GIB:.0f} GiB"), \
            int(line - found.free)
    return "", 0


def early(cur, settings: Settings) -> list[Day]:
    """The partitions the size bound may take before their time, the first to go first: every one
    that holds none of its table's newest day (of the newest row, or today if a wrong clock stamped
    one later), ordered by how far through its table's retention it is (days since it ended, over
    the table's RETENTION_DAYS_*): a tight bound shortens every table's retention alike, and the
    quotes (2 days) go before the trades of the same day (7)."""
    found = []
    for table, key, days in retention_days(cur, settings):
        cur.execute(f"SELECT least(max({key}), now()) FROM {table}")
        newest = cur.fetchone()[0]
        if newest is None:
            continue
        newest_day = datetime.combine(newest.astimezone(timezone.utc).date(), datetime.min.time(), timezone.utc)
        found += [((newest - d.end) / timedelta(days=days), d) for d in day_partitions(cur, table, key)
                  if d.end <= newest_day]
    return [d for _, d in sorted(found, key=lambda f: (-f[0], f[1].day, f[1].table))]


def bound(conn, settings: Settings, dry_run: bool = False, out=print) -> int:
    """The size bound: while `pressure` names a reason, the next of the `early` partitions is
    archived, verified and dropped (never one that is not in the archive first); returns how many
    went (or would: a dry run counts each partition's size off what must go). What is left over the
    bound once only the newest days remain is said, with what to do."""
    why, excess = pressure(conn, settings)
    if not why:
        return 0
    with conn.cursor() as cur:
        candidates = early(cur, settings)
    conn.commit()
    log.warning("%s: archiving and dropping the oldest days early (%d partitions may go)", why, len(candidates))
    dropped = 0
    for day in candidates:
        if dry_run:
            with conn.cursor() as cur:
                cur.execute("SELECT pg_total_relation_size(%s)", (day.name,))
                excess -= cur.fetchone()[0]
            conn.commit()
        dropped += retire(conn, settings, day, dry_run, out, f", before its time: {why}")
        if not dry_run:
            why, excess = pressure(conn, settings)
        if excess <= 0:
            return dropped
    left = (f"storage: still {why}, with only each table's newest day left in the database: move old days of "
            f"{settings.home / 'archive'} elsewhere, free disk, or raise STORAGE_MAX_GB")
    log.warning("%s", left)
    out(left)
    return dropped


def _old_events(conn, settings: Settings, dry_run: bool, out) -> None:
    """Pump-and-dump events older than the alerts' retention, and the disposition history of alerts
    gone with their month (a few rows a day, not partitioned), go by DELETE."""
    gone = ("AND NOT EXISTS (SELECT 1 FROM alerts a WHERE a.alert_id = alert_dispositions.alert_id"
            " AND a.ts = alert_dispositions.alert_ts)")
    for table, column, what, also in (("manipulation_events", "started_at", "events", ""),
                                      ("alert_dispositions", "alert_ts", "disposition changes of dropped alerts",
                                       gone)):
        with conn.cursor() as cur:
            cur.execute(f"{'SELECT count(*) FROM' if dry_run else 'DELETE FROM'} {table}"
                        f" WHERE {column} < now() - %s * interval '1 day' {also}", (settings.retention_days_alerts,))
            n = cur.fetchone()[0] if dry_run else cur.rowcount
        conn.commit()
        if n:
            out(f"{table}: {'would delete' if dry_run else 'deleted'} {n:,} {what} older than"
                f" {settings.retention_days_alerts} days")


# the size bound is checked this often between full passes (two sizes and the free disk): a minute
# of 1,000 trades/s with books adds ~0.06 GiB (bench/storage.py), far less than the disk's low line leaves
BOUND_EVERY_S = 60.0


def main_loop(settings: Settings, every_s: float, stop) -> None:
    """A full pass every `every_s`, and the size bound alone every BOUND_EVERY_S between them."""
    next_pass = time.monotonic()
    while not stop():
        started = time.monotonic()
        try:
            if started >= next_pass:
                next_pass = started + every_s
                run(settings, out=log.info)
            else:
                conn = db.connect(settings)
                try:
                    bound(conn, settings, out=log.info)
                finally:
                    conn.close()
        except Exception as error:  # noqa: BLE001 - the next pass tries again; the log says why
            log.warning("maintenance pass failed (%s); trying again in %.0f s", str(error).splitlines()[0],
                        min(every_s, BOUND_EVERY_S))
        while not stop() and time.monotonic() < min(next_pass, started + BOUND_EVERY_S):
            time.sleep(0.5)
