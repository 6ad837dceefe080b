#!/usr/bin/env python3
"""The whole pipeline under load: producer → Kafka → consumer + aggregator + detector, on a
private stack. For each producer rate (ascending) it runs every stage for `--seconds` and samples
each stage's lag behind the log end once a second; a rate *holds* when, after a 10 s ramp-up, no
stage is ever more than one second of trades behind (lag < rate). Prints JSON: per rate the worst
lag of each stage, the highest rate that holds, and the trade→row latency p50/p99 at 1k trades/s
(ingested_at - event time, the producer stamping event time = wall time); beside them the
machine's ceiling, its cores, and how much of it each part used (each stage, the producer, the
Kafka broker, PostgreSQL), with each stage's peak RSS. `--model`: the detector runs with an
Isolation Forest, as after `anomaly_detector.py train` (without, rules only: a fresh install).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import uuid

import psutil
from common import bench_settings, cpu_seconds, percentile, query, report, services, tree, with_model

from tradewatch import bus
from tradewatch.config import PROJECT_ROOT

STAGES = {"consumer": ["consumer.py"], "aggregator": ["aggregator.py"], "detector": ["anomaly_detector.py", "run"]}


def start(settings, *argv: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *argv], cwd=PROJECT_ROOT, env={**os.environ, **settings.as_env()},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def lags(settings) -> dict[str, int]:
    """Records each stage is behind the log end: the consumer's and detector's own report (their
    heartbeat: log end minus position), the aggregator's position stored with its windows."""
    end = sum(e for _, e in bus.group_lag(settings, settings.consumer_group, settings.trades_topic).values())
    reported = dict(query(settings, "SELECT stage, sum(lag) FROM stage_health WHERE state = 'running'"
                                    " AND last_beat > now() - interval '3 seconds' GROUP BY stage"))
    aggregator = query(settings, "SELECT coalesce(sum(next_offset), 0) FROM stage_positions WHERE consumer_group = %s",
                       settings.aggregator_group)[0][0]
    return {"consumer": int(reported.get("consumer") or 0), "aggregator": end - int(aggregator),
            "detector": int(reported.get("detector") or 0)}


def run_at(base, rate: int, seconds: int) -> dict:
    tag = uuid.uuid4().hex[:6]
    settings = base.with_overrides(trades_topic=f"pipe-{tag}", alerts_topic=f"pipe-alerts-{tag}",
                                   consumer_group=f"c-{tag}", aggregator_group=f"a-{tag}", detector_group=f"d-{tag}")
    bus.ensure_topic(settings, settings.trades_topic, settings.trades_partitions)
    stages = {name: start(settings, *argv) for name, argv in STAGES.items()}
    time.sleep(5)   # stages join their groups before the load starts
    producer = start(settings, "producer.py", "--rate", str(rate), "--duration", str(seconds), "--seed", "4")
    started = time.monotonic()
    worst = {name: 0 for name in STAGES}
    rss = {name: 0.0 for name in STAGES}
    measured, cpu_before, window_s = None, {}, 0.0
    while producer.poll() is None:
        time.sleep(1.0)
        if time.monotonic() - started < 10:
            continue
        roles = ({name: tree(p.pid) for name, p in stages.items()} | {"producer": tree(producer.pid)}
                 | services(settings))
        if measured is None:       # the cores each part used from the end of the ramp-up to the producer's end
            measured, cpu_before = time.monotonic(), {name: cpu_seconds(ps) for name, ps in roles.items()}
        else:
            cpu_after, window_s = {name: cpu_seconds(ps) for name, ps in roles.items()}, time.monotonic() - measured
        for name, lag in lags(settings).items():
            worst[name] = max(worst[name], lag)
        for name in STAGES:
            rss[name] = max([rss[name], *(p.memory_info().rss / 2**20 for p in roles[name] if p.is_running())])
    sent = sum(end for _, end in bus.group_lag(settings, settings.consumer_group, settings.trades_topic).values())
    latencies = []
    if rate <= 1000:
        latencies = [float(r[0]) for r in query(
            settings, "SELECT extract(epoch FROM ingested_at - ts) * 1000 FROM trades WHERE ts > now() - interval '1 hour'")]
    for process in stages.values():
        process.terminate()
    for process in stages.values():
        process.wait(timeout=60)
    achieved = sent / seconds
    holds = all(lag < rate for lag in worst.values()) and achieved >= 0.95 * rate
    cores = {name: round(sum(t - cpu_before[name].get(pid, 0.0) for pid, t in after.items()) / window_s, 2)
             for name, after in cpu_after.items()} if window_s else {}
    result = {"rate_per_s": rate, "producer_achieved_per_s": round(achieved), "worst_lag": worst, "holds": holds,
              "cores": cores, "rss_mib": {name: round(mib) for name, mib in rss.items()}}
    if latencies:
        result["latency_ms"] = {"p50": round(percentile(latencies, 50), 1), "p99": round(percentile(latencies, 99), 1)}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rates", default="1000,5000,10000,15000,20000,25000")
    parser.add_argument("--seconds", type=int, default=60)
    parser.add_argument("--model", action="store_true", help="the detector with a trained Isolation Forest")
    args = parser.parse_args()
    settings = with_model(bench_settings()) if args.model else bench_settings()
    from tradewatch.store import db
    with db.connect(settings) as conn, conn.cursor() as cur:
        cur.execute("TRUNCATE trades, stock_metrics, indicators, late_trades, alerts, trade_flags, circuit_breakers,"
                    " stage_health")
    conn.close()
    runs = []
    for rate in (int(r) for r in args.rates.split(",")):
        runs.append(run_at(settings, rate, args.seconds))
        print(runs[-1], file=sys.stderr, flush=True)
        if not runs[-1]["holds"] and rate > 1000:
            break
    held = [r["rate_per_s"] for r in runs if r["holds"]]
    report({
        "benchmark": "pipeline",
        "seconds_per_rate": args.seconds,
        "runs": runs,
        "highest_rate_every_stage_within_1s": max(held) if held else None,
        "latency_at_1k_per_s": next((r.get("latency_ms") for r in runs if r["rate_per_s"] == 1000), None),
        "cores": psutil.cpu_count(), "detector_model": args.model, "kafka_client": settings.kafka_client,
    })


if __name__ == "__main__":
    main()
