"""Shared by the benchmarks: a private stack (own ports and data directory) and small helpers."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tradewatch import stack  # noqa: E402
from tradewatch.config import PROJECT_ROOT, Settings  # noqa: E402


def bench_settings(**overrides: object) -> Settings:
    settings = Settings.load(tradewatch_home=".tradewatch/bench", kafka_bootstrap_servers="127.0.0.1:39092",
                             kafka_controller_port=39093, postgres_port=35432, **overrides)
    stack.start(settings)
    return settings


def query(settings: Settings, sql: str, *params: object) -> list[tuple]:
    from tradewatch.store import db

    conn = db.connect(settings)
    try:
        with conn.cursor() as cur:
            cur.execute(sql, params)
            return cur.fetchall()
    finally:
        conn.close()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def start_stage(settings: Settings, script: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(PROJECT_ROOT / script), *args], cwd=PROJECT_ROOT,
                            env={**os.environ, **settings.as_env()},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def raw_copy_rate(settings: Settings, trades) -> float:
    """PostgreSQL COPY rows/s into a temp table of the trades shape: the database ceiling."""
    from tradewatch.store import db
    from tradewatch.store.writer import copy_line

    conn = db.connect(settings)
    with conn.cursor() as cur:
        cur.execute("CREATE TEMP TABLE copy_ceiling (trade_id text, symbol text, ts timestamptz, price float8,"
                    " quantity float8, side text, exchange text, bid float8, ask float8, condition text,"
                    " schema_version smallint, injected_anomaly text, kafka_partition int, kafka_offset bigint)")
        buffer = io.StringIO("\n".join(copy_line(t, 0, i) for i, t in enumerate(trades)) + "\n")
        started = time.perf_counter()
        cur.copy_expert("COPY copy_ceiling FROM STDIN", buffer)
        conn.commit()
        elapsed = time.perf_counter() - started
    conn.close()
    return len(trades) / elapsed


def report(result: dict) -> None:
    print(json.dumps(result, indent=2))
