#!/usr/bin/env python3
"""Scale-out benchmark on a private stack, printed as JSON:

1. Consumers: --trades simulated trades of the ten default symbols pre-loaded in a topic; 1, 2 and
   3 `consumer.py` processes in a fresh group each time, timed from their start until every trade
   is stored, with the CPU seconds each process used. The ceiling beside them: one process's rate
   times the number of processes.
2. Flink: the SPY day (250,601 trades) pre-loaded; the job timed from submission until every
   minute is in flink_metrics, in PyFlink's mini-cluster and on the standalone cluster
   (tradewatch/flink_cluster.py, two TaskManagers) at parallelism 1 and 2.
"""
from __future__ import annotations

import argparse
import os
import signal
import time
import uuid

from common import bench_settings, query, report, start_stage

from tradewatch import bus, flink_cluster
from tradewatch.config import shared_data_dir
from tradewatch.events import Trade

SPY = shared_data_dir() / "lean" / "spy_20131007_trades.csv.gz"
SPY_MINUTES = 828


def execute(settings, sql: str) -> None:
    from tradewatch.store import db
    conn = db.connect(settings)
    with conn.cursor() as cur:
        cur.execute(sql)
    conn.commit()
    conn.close()


def cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def consumers(settings, trades: int) -> dict:
    topic = f"scale-{uuid.uuid4().hex[:6]}"
    loaded = settings.with_overrides(trades_topic=topic)
    bus.ensure_topic(loaded, topic, loaded.trades_partitions)
    start_stage(loaded, "producer.py", "--count", str(trades), "--rate", "max", "--seed", "8").wait()
    results = {}
    for processes in (1, 2, 3):
        run = loaded.with_overrides(consumer_group=f"scale-{uuid.uuid4().hex[:6]}")
        execute(run, "TRUNCATE trades, dead_letters")
        started = time.perf_counter()
        running = [start_stage(run, "consumer.py") for _ in range(processes)]
        while query(run, "SELECT count(*) FROM trades")[0][0] < trades:
            time.sleep(0.1)
        elapsed = time.perf_counter() - started
        cpu = [round(cpu_seconds(p.pid), 1) for p in running]
        for process in running:
            process.send_signal(signal.SIGINT)
        for process in running:
            process.wait(timeout=60)
        results[f"{processes}_processes"] = {"trades_per_s": round(trades / elapsed), "seconds": round(elapsed, 1),
                                             "cpu_seconds_each": cpu}
    one = results["1_processes"]["trades_per_s"]
    for processes in (2, 3):
        results[f"{processes}_processes"]["ratio_to_linear"] = round(
            results[f"{processes}_processes"]["trades_per_s"] / (one * processes), 2)
    return {"trades": trades, **results}


def flink_run(settings, topic: str, *args: str) -> float:
    run = settings.with_overrides(trades_topic=topic, flink_group=f"scale-{uuid.uuid4().hex[:6]}")
    execute(run, "DELETE FROM flink_metrics WHERE symbol = 'SPY'")
    job = start_stage(run, "flink_job.py", "--fresh", *args)
    started = time.perf_counter()
    try:
        while query(run, "SELECT count(*) FROM flink_metrics WHERE symbol = 'SPY'")[0][0] < SPY_MINUTES:
            if job.poll() is not None:
                raise SystemExit(f"flink_job.py {' '.join(args)} exited with {job.returncode}")
            time.sleep(0.2)
        return time.perf_counter() - started
    finally:
        job.send_signal(signal.SIGINT)
        job.wait(timeout=60)


def flink(settings) -> dict:
    topic = f"scale-spy-{uuid.uuid4().hex[:6]}"
    loaded = settings.with_overrides(trades_topic=topic)
    bus.ensure_topic(loaded, topic, loaded.trades_partitions)
    start_stage(loaded, "producer.py", "--replay", str(SPY), "--speed", "max").wait()
    publisher = bus.publisher(loaded)
    publisher.send(topic, b"SPY", Trade("SPY-close", "SPY", 1381190400000 + 600_000, 167.0, 1, "buy",
                                        "X").to_json_bytes())      # closes the day's last minute
    publisher.flush()
    publisher.close()
    count = 250_602
    results = {"mini_cluster_p1": flink_run(settings, topic)}
    flink_cluster.start(settings, taskmanagers=2)
    try:
        for parallelism in (1, 2):
            results[f"cluster_p{parallelism}"] = flink_run(
                settings, topic, "--jobmanager", f"127.0.0.1:{settings.flink_rest_port}", "--parallelism",
                str(parallelism))
    finally:
        flink_cluster.stop(settings)
    return {"trades": count, **{name: {"seconds_from_submission": round(s, 1), "trades_per_s": round(count / s)}
                                for name, s in results.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trades", type=int, default=600_000)
    parser.add_argument("--skip-flink", action="store_true")
    args = parser.parse_args()
    settings = bench_settings(flink_rest_port=28081, flink_rpc_port=28123, idle_timeout_seconds=2.0)
    result = {"benchmark": "scale", "cores": 2, "consumers": consumers(settings, args.trades)}
    if not args.skip_flink:
        result["flink"] = flink(settings)
    report(result)


if __name__ == "__main__":
    main()
