"""Partitions of the tables that grow with the feed (schema.sql): a day (a month for alerts, UNIT),
or a whole year for days far from today; the candle tables (stock_metrics, indicators) by window
size, then by month. A writer calls `ensure` (`ensure_candles`) with the days of the rows it is
about to write, inside its transaction; a day no partition holds gets one (tw_ensure_partition).
`maintain` creates today's and tomorrow's ahead of time and archives and drops expired ones (tradewatch/maintain.py).

Flink's table (flink_metrics, by month) is written by a writer that cannot ask first: what lands in
its DEFAULT partition is moved into months of its own by `adopt_flink` (maintain, flink_job.py)."""
from __future__ import annotations

from datetime import date, timedelta
from typing import Iterable

DAY_MS = 86_400_000
PARTITIONED = {"trades": "ts", "trade_flags": "ts", "late_trades": "ts", "alerts": "ts", "dead_letters": "sent_at",
               "quotes": "ts", "book_snapshots": "ts"}
UNIT = {"alerts": "month"}                         # the others by day (schema.sql says why)
CANDLES = ("stock_metrics", "indicators")          # by window size, then month of window_start
FLINK = "flink_metrics"                            # by month of window_start, with a DEFAULT partition
_EPOCH = date(1970, 1, 1)


def day_of(ms: int) -> int:
    return ms // DAY_MS


def ensure(cur, table: str, days: Iterable[int], unit: str | None = None) -> None:
    """Make sure `table` has partitions for `days` (days since the epoch, UTC), by `unit` (day or
    month; by default the table's, UNIT), and that none of them is dropped before this transaction
    ends. Asked afresh each time (a catalog lookup per batch): `maintain` may have dropped one since."""
    wanted = sorted(set(days))
    if not wanted:
        return
    unit = unit or UNIT.get(table, "day")
    fine = "'_m' || to_char(day, 'YYYYMM')" if unit == "month" else "'_p' || to_char(day, 'YYYYMMDD')"
    # The lock, held until this transaction ends: `maintain` waits for it before dropping one of
    # them. Then the days no partition holds. Two statements in one round trip, run in this order.
    cur.execute("SELECT pg_advisory_xact_lock_shared(hashtext('tw_keep:' || %s));"
                " SELECT d FROM unnest(%s::int[]) AS d, LATERAL (SELECT date '1970-01-01' + d AS day) AS x"
                f" WHERE to_regclass(%s || {fine}) IS NULL AND to_regclass(%s || '_p' || to_char(day, 'YYYYMMDD'))"
                " IS NULL AND to_regclass(%s || '_y' || to_char(day, 'YYYY')) IS NULL",
                (table, wanted, table, table, table))
    for (day,) in cur.fetchall():
        cur.execute("SELECT tw_ensure_partition(%s, %s, %s)", (table, _EPOCH + timedelta(days=day), unit))


def hold_writers(cur, table: str) -> None:
    """For `maintain`'s drop: wait until no transaction that ensured `table`'s partitions is open,
    and keep new ones waiting until this transaction ends."""
    cur.execute("SELECT pg_advisory_xact_lock(hashtext('tw_keep:' || %s))", (table,))


def ensure_candles(cur, table: str, rows: Iterable[tuple[str, int]]) -> None:
    """Make sure candle table `table` has partitions for `rows`: (window size label, window start ms)."""
    by_size: dict[str, set[int]] = {}
    for label, start_ms in rows:
        by_size.setdefault(label, set()).add(month_of(start_ms))
    for label, months in by_size.items():
        child = f"{table}_{label}"
        cur.execute("SELECT to_regclass(%s) IS NOT NULL", (child,))
        if not cur.fetchone()[0]:
            cur.execute("SELECT tw_ensure_size(%s, %s)", (table, label))
        ensure(cur, child, months, unit="month")


def month_of(ms: int) -> int:
    """The first day (days since the epoch) of the month of `ms`."""
    day = _EPOCH + timedelta(days=ms // DAY_MS)
    return (day.replace(day=1) - _EPOCH).days


def adopt_flink(cur, today: date) -> int:
    """The rows flink_metrics' DEFAULT partition holds moved into partitions of their own, then this
    month's and tomorrow's month's made ahead of Flink (in this order: a partition cannot be made
    over rows the default holds; the move locks the table until commit). Returns the rows moved."""
    cur.execute("SELECT tw_adopt_default(%s, 'month')", (FLINK,))
    moved = int(cur.fetchone()[0])
    for day in (today, today + timedelta(days=1)):
        cur.execute("SELECT tw_ensure_partition(%s, %s, 'month')", (FLINK, day))
    return moved
