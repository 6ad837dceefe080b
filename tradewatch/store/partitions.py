"""Day partitions of the tables that grow with the feed (schema.sql): a writer calls `ensure`
with the days of the rows it is about to write, inside its transaction; a missing day is created
(tw_ensure_day). `maintain` creates today's and tomorrow's ahead of time and drops expired ones
(tradewatch/maintain.py)."""
from __future__ import annotations

from datetime import date, timedelta
from typing import Iterable

DAY_MS = 86_400_000
PARTITIONED = {"trades": "ts", "trade_flags": "ts", "late_trades": "ts", "alerts": "ts", "dead_letters": "sent_at"}
_EPOCH = date(1970, 1, 1)


def day_of(ms: int) -> int:
    return ms // DAY_MS


def ensure(cur, table: str, days: Iterable[int]) -> None:
    """Make sure `table` has the partitions of `days` (days since the epoch, UTC). Asked afresh
    each time (a catalog lookup per day per batch): `maintain` may have dropped a day meanwhile."""
    wanted = sorted(set(days))
    if not wanted:
        return
    cur.execute("SELECT d FROM unnest(%s::int[]) AS d WHERE to_regclass(%s || '_p' ||"
                " to_char(date '1970-01-01' + d, 'YYYYMMDD')) IS NULL", (wanted, table))
    for (day,) in cur.fetchall():
        cur.execute("SELECT tw_ensure_day(%s, %s)", (table, _EPOCH + timedelta(days=day)))
