"""What the data takes, at the user's defaults, and what that means at 20 and at 1,000 trades/s.

Runs `make demo` (`python -m tradewatch.demo`: an hour of simulated past, then 20 trades/s with
order books, every stage, in an empty data folder) for --minutes, then measures each table's bytes
per row in PostgreSQL, each topic's bytes per message in Kafka, and the Parquet archive's bytes per
row (today's partitions archived to a scratch folder, as `maintain` writes them). From those, at
each rate (10 symbols, books on) and the default retentions: what PostgreSQL holds once every table
is at its age bound, what Kafka holds at most, what the archive grows a day, and when STORAGE_MAX_GB
(the database plus the archive) is reached.

    ../.venv/bin/python storage.py --minutes 10
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import report  # noqa: E402
from tests.e2e.demo_driver import Demo  # noqa: E402
from tradewatch import bus, maintain  # noqa: E402
from tradewatch.store import db  # noqa: E402

GIB = 1024**3
DAY_S = 86_400
SYMBOLS = 10                 # the simulator's, as the demo sends them
# rows a symbol makes in a day of event time, whatever the trade rate: a candle per window
# (stock_metrics and indicators: 1,440 + 288 + 96 for 1m, 5m, 15m) and a depth snapshot every
# BOOK_SNAPSHOT_SECONDS (10 s)
TIME_ROWS = {"stock_metrics": 1440 + 288 + 96, "indicators": 1440 + 288 + 96, "book_snapshots": DAY_S // 10}


def table_sizes(cur) -> dict[str, tuple[int, int]]:
    """(rows, bytes with indexes and TOAST) of every partitioned table, over all its partitions."""
    cur.execute("SELECT c.relname FROM pg_partitioned_table p JOIN pg_class c ON c.oid = p.partrelid"
                " WHERE NOT c.relispartition")
    found = {}
    for (table,) in cur.fetchall():
        cur.execute(f"SELECT count(*) FROM {table}")
        rows = cur.fetchone()[0]
        cur.execute("SELECT coalesce(sum(pg_total_relation_size(relid)), 0) FROM pg_partition_tree(%s)"
                    " WHERE isleaf", (table,))
        found[table] = (rows, int(cur.fetchone()[0]))
    return found


def archived_bytes_per_row(conn, settings, table: str) -> float | None:
    """Today's partition of `table` written to Parquet in a scratch folder, as maintain does."""
    scratch = Path(tempfile.mkdtemp(prefix="storage-bench-"))
    try:
        with conn.cursor() as cur:
            days = maintain.day_partitions(cur, table, "ts")
            day = max(days, key=lambda d: maintain.measure(cur, d)[0])
            rows, checksum = maintain.measure(cur, day)
        conn.commit()
        if not rows:
            return None
        record = maintain.archive(conn, settings.with_overrides(tradewatch_home=str(scratch)), day, rows, checksum)
        return (maintain.folder(settings.with_overrides(tradewatch_home=str(scratch)), day)
                / record["file"]).stat().st_size / rows
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def topic_bytes(home: Path, topic: str) -> int:
    return sum(p.stat().st_size for p in (home / "kafka").glob(f"**/{topic}-*/*.log"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0, help="how long the demo runs live")
    args = parser.parse_args()
    demo = Demo("storage-bench")
    settings = demo.settings
    launched = datetime.now(timezone.utc)
    demo.start()
    try:
        time.sleep(args.minutes * 60)
        live_from = launched + timedelta(minutes=1)     # the hour of past has trades only; books come live
        conn = db.connect(settings)
        with conn.cursor() as cur:
            sizes = table_sizes(cur)
            cur.execute("SELECT pg_database_size(current_database())")
            database = cur.fetchone()[0]
            cur.execute("SELECT (SELECT count(*) FROM trades WHERE ts >= %s), (SELECT count(*) FROM quotes WHERE ts >= %s),"
                        " (SELECT count(*) FROM trades WHERE ts < %s)", (live_from, live_from, launched))
            live_trades, live_quotes, history_trades = cur.fetchone()
        conn.commit()
        parquet = {t: archived_bytes_per_row(conn, settings, t) for t in ("trades", "quotes", "trade_flags")}
        conn.close()
        messages = {t: sum(end for _, end in bus.group_lag(settings, "storage-bench", t).values())
                    for t in (settings.trades_topic, settings.quotes_topic)}
        kafka = {t: topic_bytes(demo.home, t) for t in messages}
        demo.interrupt_and_wait()
    finally:
        demo.kill_everything()
    trades = sizes["trades"][0]
    per_row = {t: b / r for t, (r, b) in sizes.items() if r}
    per_trade_rows = {t: sizes[t][0] / trades for t in ("trades", "trade_flags", "alerts", "late_trades",
                                                        "dead_letters")}
    per_trade_rows["quotes"] = live_quotes / max(live_trades, 1)
    quote_messages_per_trade = messages[settings.quotes_topic] / max(messages[settings.trades_topic] - history_trades, 1)
    retention = {"trades": settings.retention_days_trades, "trade_flags": settings.retention_days_trade_flags,
                 "alerts": settings.retention_days_alerts, "late_trades": settings.retention_days_late_trades,
                 "dead_letters": settings.retention_days_dead_letters, "quotes": settings.retention_days_quotes,
                 "book_snapshots": settings.retention_days_quotes,
                 "stock_metrics": settings.retention_days_minute_candles,
                 "indicators": settings.retention_days_minute_candles}
    fixed = database - sum(b for _, b in sizes.values())
    kafka_per_message = {t: kafka[t] / messages[t] for t in messages if messages[t]}
    projections = {}
    for rate in (20, 1000):
        per_day = {t: rate * DAY_S * per_trade_rows[t] * per_row.get(t, 0) for t in per_trade_rows}
        per_day.update({t: SYMBOLS * TIME_ROWS[t] * per_row.get(t, 0) for t in TIME_ROWS})
        # each table at its age bound: its retention in whole days, plus the day being written
        held = {t: per_day[t] * (retention[t] + 1) for t in per_day}
        archive_per_day = sum(rate * DAY_S * per_trade_rows[t] * (parquet[t] or 0) for t in parquet)
        kafka_day = {t: rate * DAY_S * (quote_messages_per_trade if t == settings.quotes_topic else 1)
                     * kafka_per_message.get(t, 0) for t in messages}
        partitions = settings.trades_partitions
        kafka_cap = 2 * partitions * (settings.kafka_retention_mb + 64) * 2**20      # trades and quotes
        kafka_held = sum(min(kafka_day[t] * settings.kafka_retention_hours / 24,
                             partitions * (settings.kafka_retention_mb + 64) * 2**20) for t in kafka_day)
        database_held = fixed + sum(held.values())
        bound = settings.storage_max_gb * GIB
        newest_day = sum(per_day.values())
        projections[f"{rate}_trades_per_s"] = {
            "postgres_per_day_gib": round(newest_day / GIB, 3),
            "postgres_at_age_bound_gib": round(database_held / GIB, 2),
            "postgres_by_table_gib": {t: round(v / GIB, 3) for t, v in sorted(held.items(), key=lambda i: -i[1])},
            "archive_per_day_gib": round(archive_per_day / GIB, 3),
            "kafka_held_gib": round(kafka_held / GIB, 2), "kafka_cap_gib": round(kafka_cap / GIB, 2),
            "kafka_hours_kept": {t: round(min(settings.kafka_retention_hours, partitions * settings.kafka_retention_mb
                                              * 2**20 / max(kafka_day[t] / 24, 1)), 1) for t in kafka_day},
            "storage_max_gb": settings.storage_max_gb,
            # days from an empty folder until the database and the archive pass the bound
            "bound_reached_after_days": round(_days_to(bound, fixed, per_day, retention, archive_per_day), 2),
            "newest_day_fits_the_bound": fixed + newest_day < bound,
        }
    report({
        "benchmark": f"what the data takes: make demo's defaults, {args.minutes:g} minutes live after its hour of past",
        "measured": {"trades": trades, "quote_rows_per_trade": round(per_trade_rows["quotes"], 2),
                     "quote_messages_per_trade": round(quote_messages_per_trade, 2),
                     "postgres_bytes_per_row": {t: round(v) for t, v in per_row.items()},
                     "postgres_fixed_mib": round(fixed / 2**20, 1),
                     "archive_bytes_per_row": {t: round(v) if v else None for t, v in parquet.items()},
                     "kafka_bytes_per_message": {t: round(v) for t, v in kafka_per_message.items()}},
        "defaults": {"retention_days": retention, "storage_max_gb": settings.storage_max_gb,
                     "kafka_retention_hours": settings.kafka_retention_hours,
                     "kafka_retention_mb_per_partition": settings.kafka_retention_mb},
        **projections,
    })


def _days_to(bound: float, fixed: float, per_day: dict, retention: dict, archive_per_day: float) -> float:
    """Days until fixed + the tables (each growing a day's bytes a day up to its age bound) + the
    archive (growing once a table's days expire) pass `bound`, by hours."""
    hours = 0
    while hours < 24 * 3650:
        days = hours / 24
        held = fixed + sum(per_day[t] * min(days, retention[t] + 1) for t in per_day)
        archived = archive_per_day * max(days - 8, 0)        # trades expire after a week: roughly from then
        if held + archived > bound:
            return days
        hours += 1
    return float("inf")


if __name__ == "__main__":
    main()
