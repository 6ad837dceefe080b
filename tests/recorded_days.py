"""The recorded SPY and IBM days of 2013-10-07 (../shared/data/lean), replayed through the real
pipeline (producer -> Kafka -> consumer, aggregator, detector -> PostgreSQL) as a user would: the
data of the report and backtest tests."""
from __future__ import annotations

import csv
import gzip
import heapq
import signal
from datetime import datetime, timezone
from pathlib import Path

from tests.conftest import fresh_settings, query, run_script, start_script, wait_for
from tradewatch import bus
from tradewatch.config import Settings, shared_data_dir

LEAN = shared_data_dir() / "lean"
DAY = datetime(2013, 10, 7, tzinfo=timezone.utc)
SYMBOLS = ("IBM", "SPY")


def replay_recorded_days(services: Settings, logs: Path) -> Settings:
    """Both days through producer, consumer, aggregator and detector, to the end: the settings of
    the tables they filled."""
    settings = fresh_settings(services)
    stages = [start_script(settings, script, *args, log=logs / f"{script}.log")
              for script, *args in (("consumer.py",), ("aggregator.py",), ("anomaly_detector.py", "run"))]
    # one feed of both days in time order, as a venue would send them (a file after the other would
    # put the second day's trades behind the first's event time in their shared partition)
    readers = []
    for symbol in SYMBOLS:
        handle = gzip.open(LEAN / f"{symbol.lower()}_20131007_trades.csv.gz", "rt")
        readers.append(csv.DictReader(handle))
    merged = logs / "both.csv"
    total = 0
    with open(merged, "w", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=readers[0].fieldnames)
        writer.writeheader()
        for row in heapq.merge(*readers, key=lambda r: r["timestamp"]):
            writer.writerow(row)
            total += 1
    run_script(settings, "producer.py", "--replay", str(merged), "--speed", "max", timeout=600)

    def done():
        examined = sum(c for c, _ in bus.group_lag(settings, settings.detector_group, settings.trades_topic).values())
        folded = query(settings, "SELECT coalesce(sum(next_offset), 0) FROM stage_positions"
                                 " WHERE consumer_group = %s", (settings.aggregator_group,))[0][0]
        return (query(settings, "SELECT count(*) FROM trades")[0][0] == total == examined == folded
                and not query(settings, "SELECT 1 FROM stock_metrics WHERE NOT is_final LIMIT 1"))
    wait_for(done, timeout=600, interval=1, message="the days stored, examined, folded, every window final")
    for stage in stages:
        stage.send_signal(signal.SIGTERM)
    for stage in stages:
        assert stage.wait(timeout=60) == 0
    return settings
