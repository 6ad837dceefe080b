#!/usr/bin/env python3
"""Flink benchmark, beside the Python aggregator on the same input, on a private stack.

1. Throughput: the SPY day (250,601 trades) pre-loaded in a topic; trades/s from job submission
   until every minute is in flink_metrics, and for aggregator.py until it has folded every trade.
2. Window latency: a live simulated stream (event time = now) at --rate; for each 1-minute window,
   the wall time its final row appears minus its end, for both (allowed lateness included).
"""
from __future__ import annotations

import argparse
import signal
import time
import uuid
from datetime import datetime, timezone

from common import bench_settings, percentile, query, report, start_stage

from tradewatch import bus
from tradewatch.config import shared_data_dir
from tradewatch.events import Trade
from tradewatch.store import db

SPY = shared_data_dir() / "lean" / "spy_20131007_trades.csv.gz"



def run_until(settings, script: str, done, *args: str) -> float:
    process = start_stage(settings, script, *args)
    started = time.perf_counter()
    while not done():
        time.sleep(0.2)
    elapsed = time.perf_counter() - started
    process.send_signal(signal.SIGINT)
    process.wait(timeout=60)
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rate", type=int, default=1000)
    parser.add_argument("--seconds", type=int, default=200)
    args = parser.parse_args()
    tag = uuid.uuid4().hex[:6]
    settings = bench_settings(trades_topic=f"flinkbench-{tag}", flink_group=f"f-{tag}", aggregator_group=f"a-{tag}",
                              idle_timeout_seconds=2.0)
    conn = db.connect(settings)
    with conn.cursor() as cur:
        cur.execute("TRUNCATE stock_metrics, stage_positions, late_trades, indicators")
    conn.commit()
    conn.close()
    bus.ensure_topic(settings, settings.trades_topic, settings.trades_partitions)
    loader = start_stage(settings, "producer.py", "--replay", str(SPY), "--speed", "max")
    loader.wait()
    publisher = bus.publisher(settings)
    publisher.send(settings.trades_topic, b"SPY",   # closes the day's last minute for Flink
                   Trade("SPY-close", "SPY", 1381190400000 + 600_000, 167.0, 1, "buy", "X").to_json_bytes())
    publisher.flush()
    count = 250_602

    python_s = run_until(settings, "aggregator.py", lambda: query(
        settings, "SELECT coalesce(sum(next_offset), 0) FROM stage_positions WHERE consumer_group = %s",
        settings.aggregator_group)[0][0] >= count)
    minutes = query(settings, "SELECT count(*) FROM stock_metrics WHERE symbol = 'SPY' AND window_size = '1m'"
                               " AND window_start < '2013-10-08'")[0][0]
    flink = start_stage(settings, "flink_job.py", "--fresh")
    started = time.perf_counter()
    while query(settings, "SELECT count(*) FROM flink_metrics WHERE symbol = 'SPY'"
                          " AND window_start < '2013-10-08'")[0][0] < minutes:
        time.sleep(0.2)
    flink_with_startup_s = time.perf_counter() - started

    # live latency, both running
    aggregator = start_stage(settings, "aggregator.py")
    producer = start_stage(settings, "producer.py", "--rate", str(args.rate), "--duration", str(args.seconds),
                           "--symbols", "AAPL,MSFT,NVDA")
    seen: dict[tuple[str, datetime], float] = {}
    latencies: dict[str, list[float]] = {"flink_metrics": [], "stock_metrics": []}
    while producer.poll() is None:
        now = datetime.now(timezone.utc)
        conn = db.connect(settings)
        with conn.cursor() as cur:
            for table in latencies:
                final = "AND is_final" if table == "stock_metrics" else ""
                cur.execute(f"SELECT symbol, window_end FROM {table} WHERE window_size = '1m' {final}"
                            " AND window_end > now() - interval '10 minutes'")
                for symbol, end in cur.fetchall():
                    if (table, symbol, end) not in seen:
                        seen[(table, symbol, end)] = 1
                        latencies[table].append((now - end).total_seconds())
        conn.close()
        time.sleep(0.2)
    for process in (aggregator, flink):
        process.send_signal(signal.SIGINT)
        process.wait(timeout=60)
    publisher.close()
    report({
        "benchmark": "flink",
        "spy_trades": count,
        "python_aggregator_trades_per_s": round(count / python_s),
        "flink_trades_per_s_including_jvm_and_job_start": round(count / flink_with_startup_s),
        "flink_seconds_including_start": round(flink_with_startup_s, 1),
        "live_rate_per_s": args.rate,
        "window_latency_s": {t: {"windows": len(v), "p50": round(percentile(v, 50), 2), "max": round(max(v), 2)}
                             for t, v in latencies.items() if v},
        "allowed_lateness_s": settings.allowed_lateness_seconds,
    })


if __name__ == "__main__":
    main()
