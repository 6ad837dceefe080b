#!/usr/bin/env python3
"""Backtest benchmark (#37): `anomaly_detector.py backtest` over a week of the demo's default feed
(20 trades/s: 12,096,000 simulated trades in day partitions), run as a user runs it, once with
today's settings and once with one changed (two detectors over the same trades), with its default
workers (one process per core, each replaying its own symbols), and with today's settings in one
process; beside it the live detector's own in-process speed on the same feed (DetectionPipeline, one
process, as bench/detect.py measures it) and the database's ceiling for reading those rows (a
server-side cursor fetching them, nothing else). Goals: the week in under 10 minutes, with one
change too; never slower per trade than the live detector.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from datetime import timedelta
from itertools import islice

from common import bench_settings, report

from tradewatch.cli import cores
from tradewatch.config import PROJECT_ROOT
from tradewatch.detect.pipeline import DetectionPipeline
from tradewatch.market.simulator import MarketSimulator
from tradewatch.stages.detector import rule_detector
from tradewatch.store import db, partitions
from tradewatch.store.writer import copy_data, copy_row, copy_trades

START_MS = 1_767_225_600_000            # 2026-01-01: day partitions, as the last days of a running demo
WEEK = 20 * 86_400 * 7


def simulator(settings) -> MarketSimulator:
    """The demo's feed with its defaults (DEMO_RATE 20 trades/s, DEMO_ANOMALY_RATE 0.005)."""
    return MarketSimulator(seed=42, rate=settings.demo_rate, anomaly_rate=settings.demo_anomaly_rate,
                           start_ms=START_MS)


def load(settings, count: int) -> float:
    conn = db.connect(settings)
    cur = conn.cursor()
    cur.execute("TRUNCATE trades, trade_flags, alerts, alert_dispositions")
    span_ms = int(count / settings.demo_rate * 1000)
    days = range(partitions.day_of(START_MS), partitions.day_of(START_MS + span_ms) + 2)
    partitions.ensure(cur, "trades", days)
    sim, started = simulator(settings), time.perf_counter()
    for offset in range(0, count, 200_000):
        copy_trades(cur, copy_data([copy_row(t, 0, offset + i)
                                    for i, t in enumerate(islice(sim, min(200_000, count - offset)))]))
        conn.commit()
    conn.autocommit = True
    cur.execute("VACUUM ANALYZE trades")
    conn.close()
    return time.perf_counter() - started


def read_ceiling(settings) -> float:
    """Rows/s of reading the trades back in the backtest's order, doing nothing with them."""
    conn = db.connect(settings)
    started = time.perf_counter()
    with conn.cursor(name="ceiling") as cur:
        cur.itersize = 20_000
        cur.execute("SELECT trade_id, symbol, (extract(epoch FROM ts) * 1000)::bigint, price, quantity, side,"
                    " exchange, bid, ask, condition, injected_anomaly FROM trades ORDER BY ts, kafka_partition,"
                    " kafka_offset")
        rows = sum(1 for _ in cur)
    conn.close()
    return rows / (time.perf_counter() - started)


def in_process(settings, count: int = 300_000) -> float:
    """The live detector's detection alone (no Kafka, no database), trades/s, on the second day of
    the same feed (the first minutes are cheaper: windows not full yet)."""
    day = int(settings.demo_rate * 86_400)
    trades = list(islice(simulator(settings), day, day + count))
    pipeline = DetectionPipeline(rule_detector(settings))
    started = time.perf_counter()
    for i in range(0, len(trades), 2000):
        pipeline.process(trades[i:i + 2000])
    return len(trades) / (time.perf_counter() - started)


def backtest(settings, since: str, until: str, *extra: str) -> dict:
    started = time.perf_counter()
    out = subprocess.run([sys.executable, str(PROJECT_ROOT / "anomaly_detector.py"), "backtest", "--since", since,
                          "--until", until, "--json", *extra], cwd=PROJECT_ROOT, env=settings.as_env(),
                         capture_output=True, text=True, check=True)
    wall = time.perf_counter() - started
    result = json.loads(out.stdout)
    return {"trades": result["trades"], "wall_s": round(wall, 1), "trades_per_s": round(result["trades"] / wall),
            "alerts": {name: len(ids) for name, ids in result["alert_ids"].items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--trades", type=int, default=WEEK, help="default: a week at 20 trades/s")
    args = parser.parse_args()
    settings = bench_settings()
    load_s = load(settings, args.trades)
    first, last = (db_time.isoformat() for db_time in _range(settings))
    today = backtest(settings, first, last)
    changed = backtest(settings, first, last, "--set", "zscore_threshold=10")
    alone = backtest(settings, first, last, "--workers", "1")
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    live = in_process(settings)
    report({
        "benchmark": "backtest", "trades": args.trades, "load_s": round(load_s, 1),
        "cores": cores(),
        "backtest_todays_settings": today, "backtest_with_one_change": changed, "backtest_in_one_process": alone,
        "backtest_peak_rss_mb_of_one_process": round(peak_mb),     # the command or one of its workers
        "live_detector_in_process_trades_per_s": round(live),
        "ceiling_database_read_rows_per_s": round(read_ceiling(settings)),
        "goal": "a week at 20 trades/s (12,096,000 trades) in under 600 s, with one change too (two detectors); "
                "trades/s with today's settings at least the live detector's in-process",
    })


def _range(settings):
    conn = db.connect(settings)
    with conn.cursor() as cur:
        cur.execute("SELECT min(ts), max(ts) FROM trades")
        first, last = cur.fetchone()
    conn.close()
    return first, last + timedelta(milliseconds=1)


if __name__ == "__main__":
    main()
