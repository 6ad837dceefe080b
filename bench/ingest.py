#!/usr/bin/env python3
"""Ingest benchmark: producer → Kafka → consumer.py → PostgreSQL, on a private local stack.

Prints JSON: sustained end-to-end throughput (all trades produced as fast as possible, until the
last row is committed), latency p50/p99 (event sent → row written) at a fixed moderate rate, and
the machine's raw ceilings measured in the same run: PostgreSQL COPY rows/s into a table of the
same shape, and Kafka publish rate of this client.
"""
from __future__ import annotations

import argparse
import signal
import time
import uuid
from itertools import islice

from common import bench_settings, percentile, query, raw_copy_rate, report, start_stage

from tradewatch import bus
from tradewatch.market.simulator import MarketSimulator
from tradewatch.store import db



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--trades", type=int, default=100_000, help="trades for the throughput run")
    parser.add_argument("--rate", type=int, default=1000, help="trades/s for the latency run")
    parser.add_argument("--seconds", type=int, default=20, help="length of the latency run")
    args = parser.parse_args()

    tag = uuid.uuid4().hex[:6]
    settings = bench_settings(trades_topic=f"bench-{tag}", consumer_group=f"bench-{tag}")
    bus.ensure_topic(settings, settings.trades_topic, settings.trades_partitions)
    conn = db.connect(settings)
    with conn.cursor() as cur:
        cur.execute("TRUNCATE trades, dead_letters")
    conn.commit()
    conn.close()

    trades = list(islice(MarketSimulator(seed=1, rate=1000.0, start_ms=int(time.time() * 1000) - 3_600_000),
                         args.trades))
    blobs = [(t.symbol.encode(), t.to_json_bytes()) for t in trades]

    # Ceiling 1: how fast this client publishes to Kafka (to a scratch topic).
    publisher = bus.publisher(settings)
    bus.ensure_topic(settings, f"scratch-{tag}", settings.trades_partitions)
    started = time.perf_counter()
    for key, value in blobs:
        publisher.send(f"scratch-{tag}", key, value)
    publisher.flush()
    kafka_publish_rate = len(blobs) / (time.perf_counter() - started)

    # Ceiling 2: raw PostgreSQL COPY of the same rows.
    copy_rate = raw_copy_rate(settings, trades)

    # Throughput: consumer running, publish everything, wait for the last row.
    consumer = start_stage(settings, "consumer.py")
    time.sleep(3)
    started = time.perf_counter()
    for key, value in blobs:
        publisher.send(settings.trades_topic, key, value)
    publisher.flush()
    while query(settings, "SELECT count(*) FROM trades")[0][0] < len(trades):
        time.sleep(0.05)
    throughput = len(trades) / (time.perf_counter() - started)

    # Latency: a fixed moderate rate; each trade's event time is its send time.
    sim = MarketSimulator(seed=2, rate=float(args.rate), start_ms=0)
    sent = 0
    started = time.perf_counter()
    end = started + args.seconds
    while time.perf_counter() < end:
        due = started + sent / args.rate
        now = time.perf_counter()
        if now < due:
            time.sleep(due - now)
        trade = sim.next_trade()
        trade.timestamp_ms = int(time.time() * 1000)
        trade.trade_id = f"lat-{tag}-{sent}"
        publisher.send(settings.trades_topic, trade.symbol.encode(), trade.to_json_bytes())
        sent += 1
    publisher.flush()
    while query(settings, "SELECT count(*) FROM trades WHERE trade_id LIKE %s", f"lat-{tag}-%")[0][0] < sent:
        time.sleep(0.05)
    latencies = [float(r[0]) for r in query(settings, """
        SELECT extract(epoch FROM ingested_at - ts) * 1000 FROM trades WHERE trade_id LIKE %s""", f"lat-{tag}-%")]
    consumer.send_signal(signal.SIGTERM)
    consumer.wait(timeout=30)
    publisher.close()

    report({
        "benchmark": "ingest",
        "trades": len(trades),
        "end_to_end_trades_per_s": round(throughput),
        "ceiling_postgres_copy_rows_per_s": round(copy_rate),
        "ceiling_kafka_publish_per_s": round(kafka_publish_rate),
        "latency_run": {"rate_per_s": args.rate, "trades": sent,
                        "p50_ms": round(percentile(latencies, 50), 1),
                        "p99_ms": round(percentile(latencies, 99), 1),
                        "max_ms": round(max(latencies), 1)},
        "consumer_batch_size": settings.consumer_batch_size,
        "kafka_client": settings.kafka_client,
    })


if __name__ == "__main__":
    main()
