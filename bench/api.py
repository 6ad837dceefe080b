#!/usr/bin/env python3
"""Read API benchmark, four parts, printed as JSON:

1. Requests: the 10-million-trade database of bench/dashboard.py (loaded once, kept in
   .tradewatch/bench), api.py as a real process, CONCURRENCY keep-alive clients: requests/s and
   p50/p95 latency of /latest, /candles (1 hour of 1m), /alerts (newest 100) and /trades (one page),
   with 1 client and with CONCURRENCY. Beside each, the same query called in-process (the
   database's share), and /metrics, which reads no database (the HTTP layer's ceiling).
   Goal: p95 <= 50 ms.
2. Alert fan-out: producer at 1,000 trades/s with injected anomalies -> detector -> alerts topic
   -> api.py -> SSE clients. Latency from the trade's event time (stamped when the producer sends
   it) to each client receiving its alert, p50/p95/p99, beside the same for the alert reaching
   the topic (published_at in the table): the API's share is the difference. Goal: p99 <= 250 ms.
3. Candle fan-out: the producer (at DEMO_RATE, what `make demo` runs) -> aggregator -> candles
   topic -> api.py -> SSE clients on /candles/stream. Latency from the candle turning final (the
   start of the aggregator's checkpoint transaction, `final_at`) to each client receiving it,
   beside the same to the topic (`published_at`), and from the window's end (which includes
   ALLOWED_LATENESS_SECONDS: a window waits that long for late trades).
4. Trade fan-out: the producer (at DEMO_RATE unless `--trade-rate`) -> trades topic -> api.py ->
   SSE clients on /trades/stream, half of them on every trade, half on one symbol: latency from
   the trade's event time (stamped when the producer sends it) to each client. Then what the
   stream costs the API when nobody follows it: the API process's CPU while `--idle-trades`
   trades go through the topic as fast as the producer sends them, with no trade client and with
   one client of one symbol.

`--parts` picks some of them (e.g. `--parts candles`).
"""
from __future__ import annotations

import argparse
import asyncio
import http.client
import os
import statistics
import threading
import time
import uuid
from datetime import timedelta

from common import (bench_settings, free_port, load_trades, percentile, query, report, sse_reader, start_stage,
                    wait_until_up)

from tradewatch import bus
from tradewatch.store import queries


def hammer(port: int, path: str, requests: int, concurrency: int) -> tuple[float, list[float]]:
    """`requests` GETs of `path` from `concurrency` keep-alive connections: (req/s, latencies in ms)."""
    latencies: list[float] = []
    lock = threading.Lock()
    per_client = requests // concurrency

    def client() -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        mine = []
        for _ in range(per_client):
            started = time.perf_counter()
            connection.request("GET", path)
            response = connection.getresponse()
            body = response.read()
            if response.status != 200:
                raise SystemExit(f"{path}: {response.status} {body[:200]!r}")
            mine.append((time.perf_counter() - started) * 1000)
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return len(latencies) / (time.perf_counter() - started), latencies


def direct_ms(run, times: int = 30) -> float:
    timings = []
    for _ in range(times):
        started = time.perf_counter()
        run()
        timings.append((time.perf_counter() - started) * 1000)
    return statistics.median(timings)


def request_part(settings, trades: int, requests: int, concurrency: int) -> dict:
    present = query(settings, "SELECT count(*) FROM trades")[0][0]
    loading = load_trades(settings, trades) if present != trades else {"reused": present}
    engine = queries.engine_for(settings.sqlalchemy_url)
    anchor = queries.data_anchor(engine)
    symbol = queries.symbols(engine)[0]
    until = anchor + timedelta(milliseconds=1)
    since = until - timedelta(hours=1)
    iso = lambda t: t.isoformat().replace("+00:00", "Z")
    endpoints = {
        "latest": ("/latest", lambda: queries.latest_trades(engine)),
        "candles": (f"/candles?symbol={symbol}&size=1m&since={iso(since)}&until={iso(until)}",
                    lambda: queries.candles(engine, "stock_metrics", symbol, "1m", since, until)),
        "alerts": ("/alerts?limit=100", lambda: queries.alerts_page(engine, None, None, None, None, None, None, 100)),
        "trades_page": (f"/trades?symbol={symbol}&since={iso(since)}&limit=100",
                        lambda: queries.trades_page(engine, symbol, since, None, None, 100)),
    }
    api_settings = settings.with_overrides(api_port=free_port())
    process = start_stage(api_settings, "api.py")
    try:
        wait_until_up(api_settings.api_port)
        results = {}
        for name, (path, direct) in [("http_ceiling_metrics", ("/metrics", lambda: None)), *endpoints.items()]:
            hammer(api_settings.api_port, path, concurrency * 5, concurrency)        # warm-up
            results[name] = {"same_query_in_process_p50_ms": round(direct_ms(direct), 2)}
            for clients in sorted({1, concurrency}):
                rate, latencies = hammer(api_settings.api_port, path, requests, clients)
                results[name][f"{clients}_clients"] = {"requests_per_s": round(rate),
                                                       "p50_ms": round(percentile(latencies, 50), 1),
                                                       "p95_ms": round(percentile(latencies, 95), 1)}
    finally:
        process.terminate()
        process.wait(30)
    return {"trades": trades, "loading": loading, "requests_each": requests, "endpoints": results,
            "goal_p95_ms": 50}


async def fan_out(port: int, clients: int, run_producer, path: str = "/alerts/stream",
                  linger: float = 5) -> list[tuple[float, dict]]:
    received: list[tuple[float, dict]] = []
    ready, counter = asyncio.Event(), [0]
    readers = [asyncio.create_task(sse_reader(port, path, received, ready, counter, clients)) for _ in range(clients)]
    await asyncio.wait_for(ready.wait(), 60)
    await asyncio.to_thread(run_producer)
    await asyncio.sleep(linger)    # the last items on their way
    for reader in readers:
        reader.cancel()
    return received


def fan_out_part(settings, clients: int, seconds: int, rate: int) -> dict:
    tag = uuid.uuid4().hex[:8]
    run = settings.with_overrides(trades_topic=f"trades-api-{tag}", alerts_topic=f"alerts-api-{tag}",
                                  detector_group=f"detector-api-{tag}", api_port=free_port(),
                                  alert_cooldown_critical_seconds=0.0, alert_cooldown_high_seconds=0.0,
                                  alert_cooldown_medium_seconds=0.0)
    bus.ensure_topic(run, run.trades_topic, run.trades_partitions)
    bus.ensure_topic(run, run.alerts_topic, 1)
    query(run, "SELECT 1")
    stages = [start_stage(run, "api.py"), start_stage(run, "anomaly_detector.py", "run")]
    try:
        wait_until_up(run.api_port)
        time.sleep(3)       # the detector joins its group
        producer = lambda: start_stage(run, "producer.py", "--rate", str(rate), "--duration", str(seconds),
                                       "--anomaly-rate", "0.005", "--seed", "3").wait()
        received = asyncio.run(fan_out(run.api_port, clients, producer))
    finally:
        for stage in stages:
            stage.terminate()
        for stage in stages:
            stage.wait(30)
    to_client = [(at * 1000 - alert["timestamp_ms"]) for at, alert in received]
    ids = {alert["alert_id"] for _, alert in received}
    to_topic = [r[0] for r in query(run, "SELECT extract(epoch FROM published_at - ts) * 1000 FROM alerts"
                                         " WHERE alert_id = ANY(%s)", list(ids))]
    stats = lambda values: {"p50": round(percentile(values, 50)), "p95": round(percentile(values, 95)),
                            "p99": round(percentile(values, 99))}
    return {"clients": clients, "trades_per_s": rate, "seconds": seconds, "alerts": len(ids),
            "deliveries": len(received), "every_client_got_every_alert": len(received) == len(ids) * clients,
            "trade_to_client_ms": stats(to_client), "trade_to_alerts_topic_ms": stats(to_topic),
            "goal_p99_ms": 250}


def candle_fan_out_part(settings, clients: int, seconds: int, rate: float) -> dict:
    tag = uuid.uuid4().hex[:8]
    run = settings.with_overrides(trades_topic=f"trades-api-{tag}", candles_topic=f"candles-api-{tag}",
                                  aggregator_group=f"aggregator-api-{tag}", api_port=free_port())
    bus.ensure_topic(run, run.trades_topic, run.trades_partitions)
    bus.ensure_topic(run, run.candles_topic, 1)
    started = time.time()
    stages = [start_stage(run, "api.py"), start_stage(run, "aggregator.py")]
    try:
        wait_until_up(run.api_port)
        time.sleep(3)       # the aggregator joins its group
        producer = lambda: start_stage(run, "producer.py", "--rate", str(rate), "--duration", str(seconds),
                                       "--seed", "3").wait()
        # the last minute turns final once the watermark passes it: ALLOWED_LATENESS + IDLE_TIMEOUT after the end
        linger = run.allowed_lateness_seconds + run.idle_timeout_seconds + 65
        received = asyncio.run(fan_out(run.api_port, clients, producer, "/candles/stream", linger))
        stopped_reading = time.time()
    finally:
        for stage in stages:
            stage.terminate()
        for stage in stages:
            stage.wait(30)
    stored = {row[0]: row[1:] for row in query(run, """
        SELECT symbol || ':' || window_size || ':' || (extract(epoch FROM window_start) * 1000)::bigint,
               extract(epoch FROM final_at), extract(epoch FROM published_at) FROM candle_outbox
        WHERE final_at >= to_timestamp(%s)""", started)}
    final_to_client = [at - float(stored[c["candle_id"]][0]) for at, c in received]
    end_to_client = [at - c["window_end_ms"] / 1000 for at, c in received]
    final_to_topic = [float(published - final) for final, published in stored.values() if published is not None]
    ms = lambda values: {q: round(percentile(values, int(q[1:])) * 1000) for q in ("p50", "p95", "p99")}
    # what each client must have had: the candles final a second before the readers stopped
    due = {i for i, (final, _) in stored.items() if float(final) < stopped_reading - 1}
    got = [sum(1 for _, c in received if c["candle_id"] == i) for i in due]
    return {"clients": clients, "trades_per_s": rate, "seconds": seconds, "final_candles": len(stored),
            "streamed_candles": len({c["candle_id"] for _, c in received}), "deliveries": len(received),
            "every_client_got_every_candle": bool(due) and set(got) == {clients},
            "final_to_client_ms": ms(final_to_client), "final_to_candles_topic_ms": ms(final_to_topic),
            "window_end_to_client_ms": ms(end_to_client), "allowed_lateness_s": run.allowed_lateness_seconds}


def cpu_seconds(process) -> float:
    """User + system CPU time of a running process (Linux's /proc)."""
    with open(f"/proc/{process.pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def trade_fan_out_part(settings, clients: int, seconds: int, rate: float, idle_trades: int) -> dict:
    tag = uuid.uuid4().hex[:8]
    run = settings.with_overrides(trades_topic=f"trades-api-{tag}", api_port=free_port())
    bus.ensure_topic(run, run.trades_topic, run.trades_partitions)
    api = start_stage(run, "api.py")
    try:
        wait_until_up(run.api_port)
        producer = lambda: start_stage(run, "producer.py", "--rate", str(rate), "--duration", str(seconds),
                                       "--seed", "3", "--symbols", "AAPL,MSFT,BTC-USD").wait()

        async def both_kinds() -> list[tuple[float, dict]]:
            received: list[tuple[float, dict]] = []
            ready, counter = asyncio.Event(), [0]
            paths = ["/trades/stream", "/trades/stream?symbol=AAPL"]
            readers = [asyncio.create_task(sse_reader(run.api_port, paths[i % 2], received, ready, counter, clients))
                       for i in range(clients)]
            await asyncio.wait_for(ready.wait(), 60)
            await asyncio.to_thread(producer)
            await asyncio.sleep(5)
            for reader in readers:
                reader.cancel()
            return received
        received = asyncio.run(both_kinds())
        sent = {t["trade_id"]: t for _, t in received}
        aapl = sum(1 for t in sent.values() if t["symbol"] == "AAPL")
        to_client = [at * 1000 - t["timestamp_ms"] for at, t in received]

        def cpu_while_flowing(follow: str | None) -> dict:
            async def run_with_client() -> float:
                ready, counter = asyncio.Event(), [0]
                reader = follow and asyncio.create_task(sse_reader(run.api_port, follow, [], ready, counter, 1))
                if reader:
                    await asyncio.wait_for(ready.wait(), 60)
                before, started = cpu_seconds(api), time.monotonic()
                await asyncio.to_thread(lambda: start_stage(run, "producer.py", "--rate", "max", "--count",
                                                            str(idle_trades), "--seed", "4").wait())
                elapsed = time.monotonic() - started
                if reader:
                    reader.cancel()
                return (cpu_seconds(api) - before) / elapsed, idle_trades / elapsed
            share, trades_per_s = asyncio.run(run_with_client())
            return {"trades": idle_trades, "trades_per_s": round(trades_per_s),
                    "api_cpu_percent": round(share * 100, 1)}
        idle = {"no_trade_client": cpu_while_flowing(None),
                "one_client_of_one_symbol": cpu_while_flowing("/trades/stream?symbol=AAPL")}
    finally:
        api.terminate()
        api.wait(30)
    ms = lambda values: {q: round(percentile(values, int(q[1:]))) for q in ("p50", "p95", "p99")}
    return {"clients": clients, "trades_per_s": rate, "seconds": seconds, "streamed_trades": len(sent),
            "deliveries": len(received),
            "every_client_got_every_trade": bool(sent) and len(received) == (clients // 2) * (len(sent) + aapl)
            + (clients % 2) * len(sent),
            "trade_to_client_ms": ms(to_client), "api_while_trades_flow": idle}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trades", type=int, default=10_000_000)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--seconds", type=int, default=30)
    parser.add_argument("--rate", type=int, default=1000)
    parser.add_argument("--candle-seconds", type=int, default=150, help="the candle part's producer run")
    parser.add_argument("--candle-rate", type=float, help="the candle part's trades/s (default: DEMO_RATE, a user's)")
    parser.add_argument("--trade-rate", type=float, help="the trade part's trades/s (default: DEMO_RATE, a user's)")
    parser.add_argument("--trade-seconds", type=int, default=60, help="the trade part's producer run")
    parser.add_argument("--idle-trades", type=int, default=300_000,
                        help="trades sent at full speed to measure the API's cost of the trade stream")
    parser.add_argument("--parts", default="requests,alerts,candles,trades")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    settings = bench_settings()
    result = {"benchmark": "api"}
    if "requests" in parts:
        result["requests"] = request_part(settings, args.trades, args.requests, args.concurrency)
    if "alerts" in parts:
        result["alert_fan_out"] = fan_out_part(settings, args.clients, args.seconds, args.rate)
    if "candles" in parts:
        result["candle_fan_out"] = candle_fan_out_part(settings, args.clients, args.candle_seconds,
                                                       args.candle_rate or settings.demo_rate)
    if "trades" in parts:
        result["trade_fan_out"] = trade_fan_out_part(settings, args.clients, args.trade_seconds,
                                                     args.trade_rate or settings.demo_rate, args.idle_trades)
    report(result)


if __name__ == "__main__":
    main()
