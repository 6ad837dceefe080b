"""Partitions of the tables that grow with the feed (schema.sql): a day, or a whole year for days
far from today. A writer calls `ensure` with the days of the rows it is about to write, inside its
transaction; a day no partition holds gets one (tw_ensure_partition). `maintain` creates today's
and tomorrow's ahead of time and archives and drops expired ones (tradewatch/maintain.py)."""
from __future__ import annotations

from datetime import date, timedelta
from typing import Iterable

DAY_MS = 86_400_000
PARTITIONED = {"trades": "ts", "trade_flags": "ts", "late_trades": "ts", "alerts": "ts", "dead_letters": "sent_at"}
_EPOCH = date(1970, 1, 1)


def day_of(ms: int) -> int:
    return ms // DAY_MS


def ensure(cur, table: str, days: Iterable[int]) -> None:
    """Make sure `table` has partitions for `days` (days since the epoch, UTC). Asked afresh each
    time (a catalog lookup per day per batch): `maintain` may have dropped one meanwhile."""
    wanted = sorted(set(days))
    if not wanted:
        return
    cur.execute("SELECT d FROM unnest(%s::int[]) AS d, LATERAL (SELECT date '1970-01-01' + d AS day) AS x"
                " WHERE to_regclass(%s || '_p' || to_char(day, 'YYYYMMDD')) IS NULL"
                " AND to_regclass(%s || '_y' || to_char(day, 'YYYY')) IS NULL", (wanted, table, table))
    for (day,) in cur.fetchall():
        cur.execute("SELECT tw_ensure_partition(%s, %s)", (table, _EPOCH + timedelta(days=day)))
