#!/usr/bin/env python3
"""Our consumer against the peer a user would pick instead: quix-streams' PostgreSQLSink.

Same broker, same PostgreSQL, the same N simulated trades in one topic; runs alternate (ours,
peer, ours, peer, …), each with a fresh consumer group and an empty table. A run's rate is N
divided by the time from launching the process until the table holds N rows (start-up and group
join included for both; quix-streams writes at its 5 s checkpoints, so a first-row clock would
flatter whichever commits in steps). Beside them, measured in the same run: the raw COPY rate of PostgreSQL into a table of the
same shape, and the confluent-kafka consume-only rate of the topic (the two physical ceilings).
Prints JSON.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
import uuid
from itertools import islice
from pathlib import Path

from common import bench_settings, raw_copy_rate, report

from tradewatch import bus
from tradewatch.config import PROJECT_ROOT
from tradewatch.market.simulator import MarketSimulator

HERE = Path(__file__).resolve().parent
PEER_VENV = PROJECT_ROOT / ".tradewatch" / "bench" / "quix-venv"


def peer_python() -> Path:
    python = PEER_VENV / "bin" / "python"
    stamp = PEER_VENV / ".installed"
    requirements = HERE / "requirements-peer.txt"
    if not stamp.exists() or stamp.read_text() != requirements.read_text():
        subprocess.run([sys.executable, "-m", "venv", str(PEER_VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "-r", str(requirements)], check=True)
        stamp.write_text(requirements.read_text())
    return python


def timed_fill(settings, table: str, total: int, process: subprocess.Popen, timeout_s: float = 900) -> float:
    """Rows/s from the launch of `process` until `table` holds `total` rows. Counted on one
    connection, and seldom: a count(*) of a million rows takes PostgreSQL tens of ms on both cores,
    and ten a second (as this bench did) took a fifth of the machine from what it measured. The next
    count comes after half the time the rate so far says is left (at least 50 ms: the clock's grain)."""
    from tradewatch.store import db
    conn = db.connect(settings)
    conn.autocommit = True
    launched = time.monotonic()
    try:
        with conn.cursor() as cur:
            while time.monotonic() < launched + timeout_s:
                if process.poll() is not None:
                    raise RuntimeError(f"{process.args[1]} exited with {process.returncode}")
                cur.execute("SELECT to_regclass(%s) IS NOT NULL", (table,))
                stored = 0
                if cur.fetchone()[0]:
                    cur.execute(f"SELECT count(*) FROM {table}")
                    stored = cur.fetchone()[0]
                elapsed = time.monotonic() - launched
                if stored >= total:
                    return total / elapsed
                left = (total - stored) * elapsed / stored if stored else 1.0
                time.sleep(min(max(left / 2, 0.05), 1.0))
    finally:
        conn.close()
    raise RuntimeError(f"{table} did not reach {total} rows in {timeout_s}s")


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def run_ours(settings, total: int) -> float:
    from tradewatch.store import db
    with db.connect(settings) as conn, conn.cursor() as cur:
        cur.execute("TRUNCATE trades, dead_letters")
    conn.close()
    group = f"ours-{uuid.uuid4().hex[:6]}"
    env = {**os.environ, **settings.as_env(), "CONSUMER_GROUP": group}
    process = subprocess.Popen([sys.executable, str(PROJECT_ROOT / "consumer.py")], cwd=PROJECT_ROOT, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        return timed_fill(settings, "trades", total, process)
    finally:
        stop(process)


def run_peer(settings, python: Path, total: int) -> float:
    from tradewatch.store import db
    with db.connect(settings) as conn, conn.cursor() as cur:
        cur.execute("DROP TABLE IF EXISTS quix_trades")
    conn.close()
    group = f"quix-{uuid.uuid4().hex[:6]}"
    s = settings
    process = subprocess.Popen(
        [str(python), str(HERE / "peer_quix_app.py"), s.kafka_bootstrap_servers, s.trades_topic, group,
         s.postgres_host, str(s.postgres_port), s.postgres_db, s.postgres_user, "quix_trades"],
        cwd=PEER_VENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**os.environ, "PGPASSWORD": s.database_password})      # not on the command line: ps shows that
    try:
        return timed_fill(settings, "quix_trades", total, process)
    finally:
        stop(process)


def consume_only_rate(settings, total: int) -> float:
    consumer = bus.consumer(settings, f"raw-{uuid.uuid4().hex[:6]}", settings.trades_topic)
    got, started = 0, None
    while got < total:
        batch = consumer.poll(10_000, 1000)
        if batch and started is None:
            started = time.perf_counter()
        got += len(batch)
    elapsed = time.perf_counter() - started
    consumer.close()
    return got / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--trades", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=2, help="alternated runs of each")
    args = parser.parse_args()

    python = peer_python()
    tag = uuid.uuid4().hex[:6]
    settings = bench_settings(trades_topic=f"peer-{tag}")
    bus.ensure_topic(settings, settings.trades_topic, settings.trades_partitions)
    trades = list(islice(MarketSimulator(seed=3, rate=1000.0, start_ms=int(time.time() * 1000) - 3_600_000),
                         args.trades))
    publisher = bus.publisher(settings)
    for t in trades:
        publisher.send(settings.trades_topic, t.symbol.encode(), t.to_json_bytes())
    publisher.flush()
    publisher.close()

    ours, peer = [], []
    for _ in range(args.rounds):
        ours.append(run_ours(settings, args.trades))
        peer.append(run_peer(settings, python, args.trades))
    best_ours, best_peer = max(ours), max(peer)
    report({
        "benchmark": "peer",
        "trades": args.trades,
        "ours_rows_per_s": [round(r) for r in ours],
        "quixstreams_postgresql_sink_rows_per_s": [round(r) for r in peer],
        "ratio_best_vs_best": round(best_ours / best_peer, 2),
        "ratio_median": round(statistics.median(ours) / statistics.median(peer), 2),
        "ceiling_postgres_copy_rows_per_s": round(raw_copy_rate(settings, trades[:100_000])),
        "ceiling_consume_only_msgs_per_s": round(consume_only_rate(settings, args.trades)),  # bus.consumer, no decoding
        "kafka_client": settings.kafka_client,
        "consumer_batch_size": settings.consumer_batch_size,
    })


if __name__ == "__main__":
    main()
