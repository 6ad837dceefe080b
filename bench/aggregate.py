#!/usr/bin/env python3
"""Aggregator benchmark.

1. In-process: trades/s the windowing core sustains (1m, 5m, 15m) on the recorded SPY day, with and
   without JSON decoding of each message — the machine's ceiling for one aggregator process.
2. Live: producer at the ingest benchmark's rate with consumer.py and aggregator.py running on a
   private stack; lag behind the log end (in trades) of the consumer and of the aggregator, sampled
   twice a second.
3. Catch-up on fresh symbols: --fresh trades already in Kafka, each of a symbol that trades once and
   never again (a replay of many symbols, a day of new listings): each trade opens three windows
   that close and are published as candles. Seconds from the aggregator's start until every trade
   is folded and every candle published.
"""
from __future__ import annotations

import argparse
import signal
import time
import uuid

from common import bench_settings, percentile, query, report, start_stage

from tradewatch import bus
from tradewatch.config import shared_data_dir
from tradewatch.events import Trade, parse_trade
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



def fresh_symbols_catch_up(count: int) -> dict:
    tag = uuid.uuid4().hex[:6]
    settings = bench_settings(trades_topic=f"fresh-{tag}", aggregator_group=f"a-{tag}")
    bus.ensure_topic(settings, settings.trades_topic, settings.trades_partitions)
    publisher = bus.publisher(settings)
    for k in range(count):    # 90 ms apart: every 1m window, and most 5m ones, close on the way
        trade = Trade(f"f-{k}", f"F{tag.upper()}X{k:06d}", 1_767_657_600_000 + k * 90, 100.0 + k % 7, 1.0, "buy", "X")
        publisher.send(settings.trades_topic, trade.symbol.encode(), trade.to_json_bytes())
    assert publisher.flush(60)
    publisher.close()
    started = time.monotonic()
    stage = start_stage(settings, "aggregator.py")

    done = ("SELECT (SELECT coalesce(sum(next_offset), 0) FROM stage_positions WHERE consumer_group = %s) >= %s"
            " AND NOT EXISTS (SELECT FROM candle_outbox WHERE published_at IS NULL AND symbol LIKE %s)")
    while not query(settings, done, settings.aggregator_group, count, f"F{tag.upper()}X%")[0][0]:
        time.sleep(0.2)
    took = time.monotonic() - started
    stage.send_signal(signal.SIGTERM)
    stage.wait(timeout=60)
    return {"trades": count, "seconds": round(took, 1), "trades_per_s": round(count / took)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rate", type=int, default=1000)
    parser.add_argument("--seconds", type=int, default=30)
    parser.add_argument("--fresh", type=int, default=30_000, help="trades of the fresh-symbols catch-up")
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
        "fresh_symbols_catch_up": fresh_symbols_catch_up(args.fresh),
    })


if __name__ == "__main__":
    main()
