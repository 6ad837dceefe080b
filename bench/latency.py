#!/usr/bin/env python3
"""Latency at a steady rate with the whole pipeline running, on a private stack: producer at
`--rate` trades/s (1,000) with injected anomalies → Kafka → consumer.py, aggregator.py,
anomaly_detector.py run and api.py, all at their defaults. Each of `--runs` runs (3) gets fresh
topics and groups and measures, from a trade's event time (the producer stamps it as it sends):

- to its row in `trades` (`ingested_at`: the storing transaction's start),
- to its alert on the `alerts` topic (a Kafka client of the topic: the time it receives it),
- to its alert on SSE clients of api.py's /alerts/stream (the time each receives it),

and each stage's RSS and share of a core over the run. Prints JSON; goals (#39): p99 ≤ 50 ms to
the row, ≤ 50 ms to the topic, ≤ 100 ms to a client.

The alert cooldowns are 0 so that a run of a minute has alerts enough for a p99: a cooldown
decides which alerts are raised, not how fast they travel. `--model`: the detector runs with an
Isolation Forest, as after `anomaly_detector.py train` (without, rules only: a fresh install).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import threading
import time
import uuid

import psutil
from common import (bench_settings, free_port, percentile, query, report, sse_reader, start_stage, wait_until_up,
                    with_model)

from tradewatch import bus

STAGES = {"consumer": ("consumer.py",), "aggregator": ("aggregator.py",), "detector": ("anomaly_detector.py", "run"),
          "api": ("api.py",)}


def topic_reader(settings, topic: str, received: list[tuple[float, dict]], stop: threading.Event) -> None:
    """A client of the alerts topic: each alert with the wall time it was received."""
    from confluent_kafka import Consumer
    consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap_servers, "group.id": f"latency-{uuid.uuid4()}",
                         "auto.offset.reset": "earliest", "enable.auto.commit": False, "fetch.wait.max.ms": 10})
    consumer.subscribe([topic])
    try:
        while not stop.is_set():
            message = consumer.poll(0.1)
            if message is not None and not message.error():
                received.append((time.time(), json.loads(message.value())))
    finally:
        consumer.close()


def ms_stats(values: list[float]) -> dict:
    return {q: round(percentile(values, int(q[1:])), 1) for q in ("p50", "p95", "p99")} | {
        "max": round(max(values), 1) if values else None, "count": len(values)}


def one_run(base, rate: int, seconds: int, clients: int, anomaly_rate: float, seed: int) -> dict:
    tag = uuid.uuid4().hex[:6]
    run = base.with_overrides(trades_topic=f"lat-{tag}", alerts_topic=f"lat-alerts-{tag}",
                              candles_topic=f"lat-candles-{tag}", consumer_group=f"c-{tag}",
                              aggregator_group=f"a-{tag}", detector_group=f"d-{tag}", api_port=free_port(),
                              alert_cooldown_critical_seconds=0.0, alert_cooldown_high_seconds=0.0,
                              alert_cooldown_medium_seconds=0.0)
    bus.ensure_topic(run, run.trades_topic, run.trades_partitions)
    bus.ensure_topic(run, run.alerts_topic, 1)
    stages = {name: start_stage(run, *argv) for name, argv in STAGES.items()}
    on_topic: list[tuple[float, dict]] = []
    stop = threading.Event()
    reader = threading.Thread(target=topic_reader, args=(run, run.alerts_topic, on_topic, stop))
    try:
        wait_until_up(run.api_port)
        reader.start()
        time.sleep(5)       # the stages join their groups before the first trade
        processes = {name: psutil.Process(p.pid) for name, p in stages.items()}
        cpu_before = {name: sum(p.cpu_times()[:2]) for name, p in processes.items()}
        started_s = time.time()

        async def clients_and_producer() -> list[tuple[float, dict]]:
            received: list[tuple[float, dict]] = []
            ready, counter = asyncio.Event(), [0]
            readers = [asyncio.create_task(sse_reader(run.api_port, "/alerts/stream", received, ready, counter,
                                                      clients)) for _ in range(clients)]
            await asyncio.wait_for(ready.wait(), 60)
            await asyncio.to_thread(lambda: start_stage(
                run, "producer.py", "--rate", str(rate), "--duration", str(seconds), "--anomaly-rate",
                str(anomaly_rate), "--seed", str(seed)).wait())
            await asyncio.sleep(3)      # the last alerts on their way
            for task in readers:
                task.cancel()
            return received

        on_clients = asyncio.run(clients_and_producer())
        elapsed = time.time() - started_s
        cpu = {name: round((sum(p.cpu_times()[:2]) - cpu_before[name]) / elapsed, 3) for name, p in processes.items()}
        rss = {name: round(p.memory_info().rss / 2**20, 1) for name, p in processes.items()}
    finally:
        stop.set()
        for process in stages.values():
            process.terminate()
        for process in stages.values():
            process.wait(60)
        if reader.is_alive():
            reader.join(30)
    rows = [float(r[0]) for r in query(run, "SELECT extract(epoch FROM ingested_at - ts) * 1000 FROM trades"
                                            " WHERE ts >= to_timestamp(%s)", started_s)]
    alerts = {a["alert_id"] for _, a in on_topic}
    return {
        "trades": len(rows), "alerts": len(alerts),
        "every_client_got_every_alert": len(on_clients) == len(alerts) * clients,
        "trade_to_row_ms": ms_stats(rows),
        "trade_to_alerts_topic_ms": ms_stats([at * 1000 - a["timestamp_ms"] for at, a in on_topic]),
        "trade_to_sse_client_ms": ms_stats([at * 1000 - a["timestamp_ms"] for at, a in on_clients]),
        "rss_mib": rss, "cores": cpu,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=int, default=1000, help="trades/s")
    parser.add_argument("--seconds", type=int, default=60, help="length of each run")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--clients", type=int, default=10, help="SSE clients of /alerts/stream")
    parser.add_argument("--anomaly-rate", type=float, default=0.005, help="the producer's injected anomalies")
    parser.add_argument("--model", action="store_true", help="the detector with a trained Isolation Forest")
    args = parser.parse_args()
    settings = with_model(bench_settings()) if args.model else bench_settings()
    runs = []
    for _ in range(args.runs):
        runs.append(one_run(settings, args.rate, args.seconds, args.clients, args.anomaly_rate, seed=len(runs) + 1))
        print(json.dumps(runs[-1]), flush=True, file=sys.stderr)
    worst = lambda key: max(r[key]["p99"] for r in runs)
    report({"benchmark": "latency", "rate_per_s": args.rate, "seconds_per_run": args.seconds, "runs": runs,
            "worst_p99_ms": {"row": worst("trade_to_row_ms"), "alerts_topic": worst("trade_to_alerts_topic_ms"),
                             "sse_client": worst("trade_to_sse_client_ms")},
            "goal_p99_ms": {"row": 50, "alerts_topic": 50, "sse_client": 100},
            "cores": psutil.cpu_count(), "detector_model": args.model, "kafka_client": settings.kafka_client})


if __name__ == "__main__":
    main()
