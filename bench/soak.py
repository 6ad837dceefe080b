#!/usr/bin/env python3
"""Soak benchmark on a private stack, printed as JSON: --days of event time (30) for a symbol set
that keeps changing (--symbols active at a time, a tenth of them new each day, each trading one
hour in four: tradewatch/market/simulator.py rotating_days), --per-hour trades per active
symbol-hour, fed into the real consumer, aggregator and detector with the `.env` defaults a user
gets (RETENTION_DAYS_TRADES 7, …) at --day-seconds of wall time per simulated day (20: a feed the
stages keep up with, so the samples show the days as they pass; 0: as fast as Kafka takes them),
and `maintain` run every --maintain-every seconds beside them, as `make demo` does hourly.

Reported while it runs (a sample every 10 s): the simulated day the stages have reached, the
database size (and the trades' and 1-minute candles' own), the archive size, Kafka's data size
and each stage's RSS — disk should stop growing
once retention starts, memory should stay flat. At the end: each maintenance pass's duration, and
the checks of tests/integration/test_soak.py — only the retained days in the database, every trade
exactly once in the database or the archive, no stage exited.
"""
from __future__ import annotations

import argparse
import threading
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pyarrow.parquet as pq
from common import bench_settings, percentile, query, report, start_stage

from tradewatch import bus, maintain
from tradewatch.market.simulator import rotating_days

STAGES = {"consumer": ("consumer.py",), "aggregator": ("aggregator.py",), "detector": ("anomaly_detector.py", "run")}


def folder_mb(path: Path) -> float:
    return round(sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20, 1) if path.exists() else 0.0


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        return round(next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) / 1024, 1)


def table_mb(settings, table: str) -> float:
    """A partitioned table's size on disk: every partition's, indexes and TOAST included."""
    size = query(settings, "SELECT coalesce(sum(pg_total_relation_size(relid)), 0)::bigint"
                           " FROM pg_partition_tree(%s)", table)[0][0]
    return round(size / 2**20, 1)


def committed(settings, group: str) -> int:
    try:
        return sum(c for c, _ in bus.group_lag(settings, group, settings.trades_topic).values())
    except bus.KafkaUnavailable:
        return -1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--symbols", type=int, default=1_000)
    parser.add_argument("--per-hour", type=int, default=4, help="trades per active symbol-hour")
    parser.add_argument("--maintain-every", type=float, default=30.0)
    parser.add_argument("--day-seconds", type=float, default=20.0, help="wall seconds per simulated day (0: at once)")
    args = parser.parse_args()

    tag = uuid.uuid4().hex[:6]
    settings = bench_settings(trades_topic=f"soak-{tag}", alerts_topic=f"soak-alerts-{tag}",
                              consumer_group=f"soak-c-{tag}", aggregator_group=f"soak-a-{tag}",
                              detector_group=f"soak-d-{tag}")
    archive = settings.home / "archive"
    today = datetime.now(timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)
    start = today - timedelta(days=args.days + 1)         # ends yesterday: recent days, day partitions
    start_ms = int(start.timestamp() * 1000)
    bus.ensure_topic(settings, settings.trades_topic, settings.trades_partitions)
    for table in ("trades", "trade_flags", "late_trades", "alerts", "dead_letters"):
        query(settings, f"SELECT count(*) FROM {table}")       # the schema exists before anyone reads
    earlier = query(settings, "SELECT count(*) FROM trades WHERE trade_id LIKE 'S%%'")[0][0]
    if earlier or (archive / "trades").exists():
        # the simulated ids are the same every run: an earlier run's trades would count as this one's
        raise SystemExit(f"bench/soak.py needs a bench home without an earlier soak ({earlier:,} of its trades "
                         f"stored, archive {'present' if (archive / 'trades').exists() else 'absent'}): stop the "
                         f"bench services and remove {settings.home}")
    baseline_db = query(settings, "SELECT pg_database_size(current_database())")[0][0]
    archive_before = folder_mb(archive)

    stages = {name: start_stage(settings, *script) for name, script in STAGES.items()}
    produced, ours = 0, set()
    samples, passes, stop = [], [], threading.Event()
    began = time.monotonic()

    def maintainer() -> None:
        while not stop.wait(args.maintain_every):
            t = time.perf_counter()
            try:
                maintain.run(settings, out=lambda line: None)
                passes.append(round(time.perf_counter() - t, 2))
            except Exception as error:       # noqa: BLE001 - reported, the next pass tries again
                passes.append(f"failed: {error}")

    def sampler() -> None:
        while not stop.wait(10):
            # this soak's trades only: the bench database may hold other benches' (newer) trades
            newest = query(settings, "SELECT max(ts) FROM trades WHERE ts >= %s AND ts < %s AND trade_id LIKE 'S%%'",
                           (start, start + timedelta(days=args.days)))[0][0]
            samples.append({
                "s": round(time.monotonic() - began), "day": round((newest - start).total_seconds() / 86400, 2)
                if newest else None,
                "db_mb": round((query(settings, "SELECT pg_database_size(current_database())")[0][0] - baseline_db)
                               / 2**20, 1),
                "trades_mb": table_mb(settings, "trades"), "candles_1m_mb": table_mb(settings, "stock_metrics_1m"),
                "archive_mb": round(folder_mb(archive) - archive_before, 1),
                "kafka_mb": folder_mb(settings.home / "kafka"),
                "rss_mb": {name: rss_mb(p.pid) for name, p in stages.items() if p.poll() is None}})

    threads = [threading.Thread(target=maintainer, daemon=True), threading.Thread(target=sampler, daemon=True)]
    for thread in threads:
        thread.start()
    publisher = bus.publisher(settings)
    for n, hour in enumerate(rotating_days(start_ms, args.days, args.symbols, max(args.symbols // 10, 1),
                                           args.per_hour)):
        time.sleep(max(0.0, began + n * args.day_seconds / 24 - time.monotonic()))
        for t in hour:
            publisher.send(settings.trades_topic, t.symbol.encode(), t.to_json_bytes())
        produced += len(hour)
        ours.update(t.trade_id for t in hour)
    assert publisher.flush(300)
    publisher.close()
    fed_s = time.monotonic() - began
    groups = (settings.consumer_group, settings.aggregator_group, settings.detector_group)
    while min(committed(settings, g) for g in groups) < produced:
        if any(p.poll() is not None for p in stages.values()):
            break           # a stage exited: reported below (stages_exited), never waited on for ever
        time.sleep(2)
    settled_s = time.monotonic() - began
    stop.set()
    t = time.perf_counter()
    maintain.run(settings, out=lambda line: None)
    passes.append(round(time.perf_counter() - t, 2))
    exited = {name: p.poll() for name, p in stages.items() if p.poll() is not None}
    for p in stages.values():
        p.terminate()
    for p in stages.values():
        p.wait(120)

    newest = query(settings, "SELECT least(max(ts), now()) FROM trades")[0][0]
    keep_from = (newest - timedelta(days=settings.retention_days_trades)).replace(hour=0, minute=0, second=0,
                                                                                  microsecond=0)
    stored = {r[0] for r in query(settings, "SELECT trade_id FROM trades WHERE trade_id LIKE 'S%%'")}
    archived: list[str] = []
    for part in sorted((archive / "trades").glob("date=*/part-*.parquet")):
        archived += pq.read_table(part, columns=["trade_id"]).column("trade_id").to_pylist()
    archived_ours = [i for i in archived if i in ours]
    numeric = [p for p in passes if isinstance(p, float)]
    report({
        "days": args.days, "symbols_active": args.symbols, "trades": produced, "day_seconds": args.day_seconds,
        "fed_s": round(fed_s), "settled_s": round(settled_s), "trades_per_s_end_to_end": round(produced / settled_s),
        "samples": samples,
        "maintenance_passes": len(passes), "maintenance_s_p50": percentile(numeric, 50),
        "maintenance_s_max": max(numeric, default=None), "maintenance_failures": [p for p in passes if isinstance(p, str)],
        "checks": {
            "oldest_stored_at_or_after_retention": query(settings, "SELECT min(ts) FROM trades")[0][0] >= keep_from,
            "every_trade_once": len(stored) + len(archived_ours) == produced and not stored & set(archived_ours)
            and (stored | set(archived_ours)) == ours,
            "stages_exited": exited,
        },
    })


if __name__ == "__main__":
    main()
