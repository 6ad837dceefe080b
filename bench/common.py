"""Shared by the benchmarks: a private stack (own ports and data directory) and small helpers."""
from __future__ import annotations

import asyncio
import atexit
import http.client
import json
import os
import random
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tradewatch import stack  # noqa: E402
from tradewatch.config import PROJECT_ROOT, Settings  # noqa: E402


def bench_settings(**overrides: object) -> Settings:
    # below the kernel's ephemeral range (32768-60999), where a client's outgoing socket can hold a
    # port, and clear of the suite's (tests/conftest.py: 25432/29092 + 1000 per worker, 10000-19999)
    settings = Settings.load(tradewatch_home=".tradewatch/bench", kafka_bootstrap_servers="127.0.0.1:22092",
                             kafka_controller_port=22093, postgres_port=22432, **overrides)
    stack.start(settings)
    atexit.register(stack.stop, settings)   # a broker left idling takes a fifth of a core from the next measure
    return settings


def with_model(settings: Settings) -> Settings:
    """`settings` with an Isolation Forest for the detector, as a user has after `python
    anomaly_detector.py train` (here trained on 50,000 simulated trades: the same model each run)."""
    from tradewatch.detect import evaluate, forest
    from tradewatch.detect.rules import DetectorConfig

    directory = settings.home / "models"
    if forest.latest(directory) is None:
        forest.save(evaluate.train_on_simulation(1, 50_000, 0.005, DetectorConfig()), directory)
    return settings.with_overrides(model_dir=str(directory))


def tree(pid: int) -> list[psutil.Process]:
    """A process and all its descendants (none once it has ended)."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def cpu_seconds(processes: list[psutil.Process]) -> dict[int, float]:
    seconds = {}
    for process in processes:
        try:
            times = process.cpu_times()
            seconds[process.pid] = times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return seconds


def services(settings: Settings) -> dict[str, list[psutil.Process]]:
    """The private stack's Kafka broker and PostgreSQL server (with its backends) as processes."""
    home = str(settings.home)
    mine = [p for p in psutil.process_iter(["name", "cmdline"]) if home in " ".join(p.info["cmdline"] or [])]
    return {"kafka": [p for p in mine if p.info["name"] == "java"],
            "postgres": [q for p in mine if p.info["name"] == "postgres" for q in tree(p.pid)]}


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


def free_port(low: int = 23000, high: int = 23999) -> int:
    """A free TCP port for a bench server, below the kernel's ephemeral range (32768-60999), where a
    client's outgoing socket could take it between this check and the server's bind."""
    for port in random.sample(range(low, high + 1), high - low + 1):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise SystemExit(f"no free port in {low}-{high}")


def wait_until_up(port: int, timeout: float = 60) -> None:
    """Until an HTTP server (api.py) answers GET /metrics on `port`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            connection.request("GET", "/metrics")
            if connection.getresponse().status == 200:
                return
        except OSError:
            time.sleep(0.2)
    raise SystemExit(f"api.py did not answer on port {port}")


async def sse_reader(port: int, path: str, received: list[tuple[float, dict]], ready: asyncio.Event,
                     counter: list[int], clients: int) -> None:
    """One client of an SSE stream: each event's JSON with the wall time it arrived, in `received`;
    sets `ready` once `clients` readers are connected (`counter` counts them)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 20)
    writer.write(b"GET %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nAccept: text/event-stream\r\n\r\n" % (path.encode(), port))
    await writer.drain()
    status = await reader.readline()
    if b" 200 " not in status:                  # a refused stream would look like a quiet one
        raise RuntimeError(f"{path} answered {status.decode(errors='replace').strip()!r}")
    while (await reader.readline()) not in (b"\r\n", b""):
        pass
    counter[0] += 1
    if counter[0] == clients:
        ready.set()
    while True:
        line = await reader.readline()
        if not line:
            return
        if line.startswith(b"data: "):
            received.append((time.time(), json.loads(line[6:])))


def raw_copy_rate(settings: Settings, trades) -> float:
    """PostgreSQL COPY rows/s into a temp table of the trades shape: the database ceiling."""
    from tradewatch.store import db
    from tradewatch.store.writer import copy_data, copy_row, copy_trades

    conn = db.connect(settings)
    with conn.cursor() as cur:
        cur.execute("CREATE TEMP TABLE copy_ceiling (trade_id text, symbol text, ts timestamptz, price float8,"
                    " quantity float8, side text, exchange text, bid float8, ask float8, condition text,"
                    " schema_version smallint, injected_anomaly text, kafka_partition int, kafka_offset bigint)")
        data = copy_data([copy_row(t, 0, i) for i, t in enumerate(trades)])
        started = time.perf_counter()
        copy_trades(cur, data, "copy_ceiling")
        conn.commit()
        elapsed = time.perf_counter() - started
    conn.close()
    return len(trades) / elapsed


def report(result: dict) -> None:
    print(json.dumps(result, indent=2))


START_MS = 1_767_225_600_000


SIMULATED_AT_MOST = 10_000_000
# what a copy shifts in time, and what it renames (keys stay unique: each copy is other days)
COPIED = {"trades": (("ts",), ("trade_id",)), "trade_flags": (("ts",), ("trade_id",)),
          "alerts": (("ts",), ("alert_id", "trade_id")), "stock_metrics": (("window_start", "window_end"), ()),
          "indicators": (("window_start",), ())}


def load_trades(settings: Settings, count: int) -> dict:
    """`count` simulated trades by COPY, their flags and alerts, and their windows and indicators
    (the aggregator's backfill): the large database of the dashboard and API benchmarks. Beyond
    SIMULATED_AT_MOST (a multiple of it), the simulated days are copied by SQL into the days after
    them, shifted by whole days (ids suffixed ~k): 100 million trades as ten copies of ten million
    across 20 day partitions, in minutes instead of the hour simulating them would take."""
    base = min(count, SIMULATED_AT_MOST)
    if count % base:
        raise SystemExit(f"--trades beyond {SIMULATED_AT_MOST:,} must be a multiple of it")
    loading = _load_simulated(settings, base)
    if count > base:
        loading.update(_copy_days(settings, count // base - 1))
    from tradewatch.store import db
    with db.connect(settings) as conn, conn.cursor() as cur:
        cur.execute("SELECT tw_refill_latest_trades()")     # the bulk load bypassed writer.write_batch
    conn.close()
    return loading


def _copy_days(settings: Settings, copies: int) -> dict:
    from tradewatch.store import db, partitions

    started = time.perf_counter()
    conn = db.connect(settings)
    cur = conn.cursor()
    cur.execute("SET synchronous_commit = off")
    cur.execute("SELECT min(ts), max(ts) FROM trades")
    first, last = cur.fetchone()
    span = timedelta(days=(last - first).days + 2)     # whole days: the copies' windows stay aligned
    until = first.replace(hour=0, minute=0, second=0, microsecond=0) + span
    columns = {}
    for table in COPIED:
        cur.execute("SELECT column_name FROM information_schema.columns WHERE table_schema = 'public'"
                    " AND table_name = %s ORDER BY ordinal_position", (table,))
        columns[table] = [c for (c,) in cur.fetchall()]
    cur.execute("SELECT DISTINCT window_size FROM stock_metrics")     # once, before the copies grow it
    sizes = [size for (size,) in cur.fetchall()]
    for k in range(1, copies + 1):
        shift = span * k
        day0 = partitions.day_of(int((first + shift).timestamp() * 1000))
        for table in ("trades", "trade_flags", "alerts"):
            partitions.ensure(cur, table, range(day0 - 1, day0 + span.days + 1))
        for table in partitions.CANDLES:
            partitions.ensure_candles(cur, table, [(size, int((first + shift + timedelta(days=d)).timestamp() * 1000))
                                                   for size in sizes for d in range(-1, span.days + 1)])
        for table, (times, ids) in COPIED.items():
            values = [f"{c} + %(shift)s" if c in times else f"{c} || '~{k}'" if c in ids else c
                      for c in columns[table]]
            cur.execute(f"INSERT INTO {table} ({', '.join(columns[table])}) SELECT {', '.join(values)} FROM {table}"
                        f" WHERE {times[0]} < %(until)s", {"shift": shift, "until": until})
        conn.commit()
    conn.autocommit = True
    conn.cursor().execute("VACUUM ANALYZE")
    conn.close()
    return {"copies": copies, "copy_days": span.days, "copy_s": round(time.perf_counter() - started, 1)}


def _load_simulated(settings: Settings, count: int) -> dict:
    from tradewatch.market.simulator import MarketSimulator
    from tradewatch.store import db, partitions
    from tradewatch.store.candles import backfill
    from tradewatch.store.writer import copy_data, copy_row, copy_trades
    from tradewatch.windows import parse_size

    conn = db.connect(settings)
    cur = conn.cursor()
    cur.execute("TRUNCATE trades, trade_flags, stock_metrics, indicators, alerts, late_trades, stage_positions")
    sim = MarketSimulator(seed=42, rate=1000.0, anomaly_rate=0.001, start_ms=START_MS)
    days = range(partitions.day_of(START_MS), partitions.day_of(START_MS + count * 5) + 2)   # ~1 ms a trade
    for table in ("trades", "trade_flags", "alerts"):
        partitions.ensure(cur, table, days)
    started = time.perf_counter()
    chunk = 200_000
    for offset in range(0, count, chunk):
        copy_trades(cur, copy_data([copy_row(sim.next_trade(), 0, offset + i)
                                    for i in range(min(chunk, count - offset))]))
    generated = time.perf_counter() - started
    cur.execute("""
        INSERT INTO trade_flags (trade_id, symbol, ts, anomaly_types, anomaly_score, anomaly_severity, detector_version)
        SELECT trade_id, symbol, ts,
               CASE injected_anomaly WHEN 'price_spike' THEN ARRAY['PRICE_SPIKE'] WHEN 'price_drop' THEN ARRAY['PRICE_DROP']
                    WHEN 'volume_spike' THEN ARRAY['VOLUME_SPIKE'] ELSE ARRAY['CIRCUIT_BREAKER'] END, 2.0,
               CASE injected_anomaly WHEN 'flash_crash' THEN 'CRITICAL' WHEN 'volume_spike' THEN 'MEDIUM'
                    ELSE 'HIGH' END, 'bench'
        FROM trades WHERE injected_anomaly IS NOT NULL""")
    cur.execute("""
        INSERT INTO alerts (alert_id, ts, symbol, alert_type, severity, message, trade_id, published_at)
        SELECT trade_id || ':' || anomaly_types[1], ts, symbol, anomaly_types[1], anomaly_severity,
               anomaly_severity || ' ' || anomaly_types[1] || ' ' || symbol, trade_id, now()
        FROM trade_flags""")      # history: already sent, so a detector's outbox leaves them alone
    conn.commit()
    loaded = time.perf_counter() - started
    cur.execute("SELECT min(ts), max(ts) FROM trades")
    first, last = cur.fetchone()
    backfill(conn, first, last + timedelta(seconds=1), tuple(parse_size(s) for s in ("1m", "5m", "15m")),
             frozenset())
    conn.autocommit = True
    conn.cursor().execute("VACUUM ANALYZE")
    conn.close()
    return {"generate_and_copy_s": round(generated, 1), "load_s": round(loaded, 1),
            "windows_s": round(time.perf_counter() - started - loaded, 1)}
