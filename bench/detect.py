#!/usr/bin/env python3
"""Detection benchmark.

1. In-process: trades/s of the rules + Isolation Forest pipeline (the ceiling of one detector), on
   simulated trades and on the recorded SPY day.
2. Accuracy: `evaluate` on seeds not used for tuning (precision/recall/F1, false alerts per 10k);
   on real recorded trades with injected anomalies (tuned on SPY, scored on IBM); NAB score.
3. Live: producer at the ingest benchmark's rate with an anomaly rate, consumer.py and
   `anomaly_detector.py run` on a private stack; the detector's lag and trade → alert latency
   (alert row created − trade event time, where event time = send time) p50/p99.
"""
from __future__ import annotations

import argparse
import signal
import time
import uuid

from common import bench_settings, percentile, report, start_stage

from tradewatch import bus
from tradewatch.config import shared_data_dir
from tradewatch.detect import evaluate
from tradewatch.market import replay
from tradewatch.detect.pipeline import DetectionPipeline
from tradewatch.detect.rules import DetectorConfig
from tradewatch.store import db


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rate", type=int, default=1000)
    parser.add_argument("--seconds", type=int, default=30)
    args = parser.parse_args()

    config = DetectorConfig()
    model = evaluate.train_on_simulation(1, 50_000, 0.005, config)
    trades = evaluate.simulated_stream(7, 100_000, 0.005)
    pipeline = DetectionPipeline(model=model)
    started = time.perf_counter()
    for i in range(0, len(trades), 2000):
        pipeline.process(trades[i:i + 2000])
    core_rate = len(trades) / (time.perf_counter() - started)
    real = replay.load(shared_data_dir() / "lean" / "spy_20131007_trades.csv.gz").trades
    pipeline = DetectionPipeline(model=model)
    started = time.perf_counter()
    for i in range(0, len(real), 2000):
        pipeline.process(real[i:i + 2000])
    real_rate = len(real) / (time.perf_counter() - started)
    accuracy = evaluate.score_simulated([301, 302, 303], 50_000, 0.005, config, model)
    real_accuracy = evaluate.score_real(shared_data_dir() / "lean", config, model)
    nab = evaluate.score_nab(shared_data_dir() / "nab")["score"]

    tag = uuid.uuid4().hex[:6]
    settings = bench_settings(trades_topic=f"det-{tag}", alerts_topic=f"alerts-{tag}", consumer_group=f"c-{tag}",
                              detector_group=f"d-{tag}")
    bus.ensure_topic(settings, settings.trades_topic, settings.trades_partitions)
    conn = db.connect(settings)
    with conn.cursor() as cur:
        cur.execute("TRUNCATE alerts, circuit_breakers")
    conn.commit()
    stages = [start_stage(settings, "consumer.py"), start_stage(settings, "anomaly_detector.py", "run")]
    time.sleep(5)
    producer = start_stage(settings, "producer.py", "--rate", str(args.rate), "--duration", str(args.seconds),
                           "--anomaly-rate", "0.01")
    lag = []
    while producer.poll() is None:
        time.sleep(0.5)
        positions = bus.group_lag(settings, settings.detector_group, settings.trades_topic)
        lag.append(sum(e - c for c, e in positions.values()))
    time.sleep(3)
    for stage in stages:
        stage.send_signal(signal.SIGTERM)
        stage.wait(timeout=60)
    with conn.cursor() as cur:
        cur.execute("SELECT extract(epoch FROM created_at - ts) * 1000 FROM alerts")
        latencies = [float(r[0]) for r in cur.fetchall()]
    conn.close()
    report({
        "benchmark": "detect",
        "core_trades_per_s_rules_and_forest": round(core_rate),
        "core_trades_per_s_on_the_spy_day": round(real_rate),
        "goal_trades_per_s": 40_000,
        "accuracy_unseen_seeds": {k: v["f1"] for k, v in accuracy["per_type"].items()},
        "false_alerts_per_10k_normal": accuracy["false_alerts_per_10k_normal"],
        "real_trades": {role: {k: r[k] for k in ("day", "recall", "false_alarms_per_10k",
                                                 "false_alarms_per_10k_besides_natural_whales")}
                        for role, r in real_accuracy.items()},
        "nab_standard_profile": nab,
        "live_rate_per_s": args.rate,
        "detector_lag_trades": {"p50": percentile(lag, 50), "max": max(lag) if lag else None},
        "alerts": len(latencies),
        "trade_to_alert_latency_ms": {"p50": round(percentile(latencies, 50), 1),
                                      "p99": round(percentile(latencies, 99), 1)},
    })


if __name__ == "__main__":
    main()
