#!/usr/bin/env python3
"""Aggregator benchmark.

1. In-process: trades/s the windowing core sustains (1m, 5m, 15m) on the recorded SPY day, with and
   without JSON decoding of each message — the machine's ceiling for one aggregator process.
2. Live: producer at the ingest benchmark's rate with consumer.py and aggregator.py running on a
   private stack; lag behind the log end (in trades) of the consumer and of the aggregator, sampled
   twice a second.
"""
from __future__ import annotations

import argparse
import signal
import time
import uuid

from common import bench_settings, percentile, query, report, start_stage

from tradewatch import bus
from tradewatch.config import shared_data_dir
from tradewatch.events import parse_trade
from tradewatch.market import replay
from tradewatch.windows import WindowSet, parse_size


def core_rate(trades, decode: bool) -> float:
    sizes = tuple(parse_size(s) for s in ("1m", "5m", "15m"))
    windows = WindowSet(sizes, 5000, float("inf"))
    blobs = [t.to_json_bytes() for t in trades] if decode else None
    started = time.perf_counter()
    for i in range(len(trades)):
        trade = parse_trade(blobs[i]) if decode else trades[i]
        windows.add(trade, i)
        if i % 5000 == 0:
            windows.pop_final()
    return len(trades) / (time.perf_counter() - started)



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rate", type=int, default=1000)
    parser.add_argument("--seconds", type=int, default=30)
    args = parser.parse_args()

    trades = replay.load(shared_data_dir() / "lean" / "spy_20131007_trades.csv.gz").trades
    core = core_rate(trades, decode=False)
    core_with_json = core_rate(trades, decode=True)

    tag = uuid.uuid4().hex[:6]
    settings = bench_settings(trades_topic=f"agg-{tag}", consumer_group=f"c-{tag}", aggregator_group=f"a-{tag}")
    bus.ensure_topic(settings, settings.trades_topic, settings.trades_partitions)
    stages = [start_stage(settings, "consumer.py"), start_stage(settings, "aggregator.py")]
    time.sleep(5)
    producer = start_stage(settings, "producer.py", "--rate", str(args.rate), "--duration", str(args.seconds))
    consumer_lag, aggregator_lag = [], []
    while producer.poll() is None:
        time.sleep(0.5)
        positions = bus.group_lag(settings, settings.consumer_group, settings.trades_topic)
        end = sum(e for _, e in positions.values())
        consumer_lag.append(end - sum(c for c, _ in positions.values()))
        aggregator_lag.append(end - int(query(settings, "SELECT coalesce(sum(next_offset), 0) FROM stage_positions"
                                                      " WHERE consumer_group = %s", settings.aggregator_group)[0][0]))
    for stage in stages:
        stage.send_signal(signal.SIGTERM)
        stage.wait(timeout=60)
    report({
        "benchmark": "aggregate",
        "core_trades_per_s": round(core),
        "core_with_json_decode_trades_per_s": round(core_with_json),
        "window_sizes": ["1m", "5m", "15m"],
        "live_rate_per_s": args.rate,
        "consumer_lag_trades": {"p50": percentile(consumer_lag, 50), "max": max(consumer_lag)},
        "aggregator_lag_trades": {"p50": percentile(aggregator_lag, 50), "max": max(aggregator_lag)},
        "aggregator_flush_ms": settings.aggregator_flush_ms,
    })


if __name__ == "__main__":
    main()
