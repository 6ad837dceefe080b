#!/usr/bin/env python3
"""Dashboard benchmark: load N trades (default 10 million) with COPY, build their windows and
indicators (the aggregator's backfill), flag the injected anomalies and raise their alerts, then
time every query of one dashboard refresh (p50/p95 per query and for the whole refresh).
Target: p95 of a whole refresh <= 250 ms. The loaded data stays in .tradewatch/bench for reruns
(pass --reload to rebuild it)."""
from __future__ import annotations

import argparse
import time
from datetime import datetime, timedelta, timezone

from common import bench_settings, load_trades, percentile, report

from tradewatch import heartbeat
from tradewatch.store import db, queries


# what this bench timed before the page gained the candles' anomaly markers, the events panel and the
# health strip's storage line (#27): its total is comparable with the README's earlier figures
BEFORE_27 = {"data_anchor", "kpis", "kpis_previous", "candles", "price_series", "anomaly_points", "per_symbol",
             "scanner", "whale_trades", "trade_tape", "trade_tape_anomalies", "stage_health", "alerts_feed"}
# the page draws one tape: all trades, or the anomalies only
NOT_IN_ONE_REFRESH = {"trade_tape_anomalies"}


def refresh_queries(engine, anchor, symbols, home):
    """Every read of one refresh of the page's overview (dashboard.py's `live`), in its order, and
    the anomalies-only tape."""
    until = anchor + timedelta(milliseconds=1)
    since = until - timedelta(hours=1)
    previous = since - timedelta(hours=1)
    first = symbols[0]
    return [
        ("table_exists", lambda: queries.table_exists(engine, "stage_health")),
        ("stage_health", lambda: queries.stage_health(engine)),
        ("storage", lambda: queries.storage(engine, home)),
        ("data_anchor", lambda: queries.data_anchor(engine)),
        ("kpis", lambda: queries.kpis(engine, "stock_metrics", None, since, until)),
        ("kpis_previous", lambda: queries.kpis(engine, "stock_metrics", None, previous, since)),
        ("symbols", lambda: queries.symbols(engine, "stock_metrics")),
        ("candles", lambda: queries.candles(engine, "stock_metrics", first, "1m", since, until)),
        ("candle_markers", lambda: queries.anomaly_points(engine, [first], since, until)),
        ("price_series", lambda: queries.price_series(engine, "stock_metrics", None, since, until)),
        ("anomaly_points", lambda: queries.anomaly_points(engine, None, since, until)),
        ("per_symbol", lambda: queries.per_symbol(engine, "stock_metrics", None, since, until)),
        ("scanner", lambda: queries.scanner(engine, "stock_metrics", None, since, until)),
        ("whale_trades", lambda: queries.whale_trades(engine, None, since, until)),
        ("trade_tape", lambda: queries.trade_tape(engine, None, False)),
        ("trade_tape_anomalies", lambda: queries.trade_tape(engine, None, True)),
        ("manipulation_events", lambda: queries.manipulation_events(engine, None, None, 50)),
        ("alerts_feed", lambda: queries.alerts_feed(engine, ["CRITICAL", "HIGH", "MEDIUM", "LOW"], None)),
        # the pipeline panel: the last hour in the dashboard's 30-s steps (PIPELINE_STEP_S)
        ("pipeline", lambda: queries.pipeline(engine, datetime.now(timezone.utc) - timedelta(hours=1), 30)),
    ]


def day_of_samples(settings) -> None:
    """What `stage_samples` holds at its bound (heartbeat.SAMPLES_KEPT): a day of samples every
    SAMPLE_INTERVAL_S for each of the three stages, ending now (the pipeline panel reads the last hour)."""
    conn = db.connect(settings)
    with conn, conn.cursor() as cur:
        cur.execute(f"DELETE FROM stage_samples WHERE at < now() - interval '{heartbeat.SAMPLES_KEPT}'"
                    " OR host = 'bench'")
        cur.execute(
            "INSERT INTO stage_samples (stage, host, pid, at, processed, per_s, arriving_per_s, lag, latency_p50_ms,"
            " latency_p99_ms, latency_count) SELECT stage, 'bench', 1, to_timestamp(floor(extract(epoch FROM now())"
            " / %(s)s) * %(s)s) - i * %(s)s * interval '1 second', 100000000 - i * 200, 20, 20, i %% 50, 5.0, 40.0, 20"
            " FROM unnest(ARRAY['consumer', 'aggregator', 'detector']) stage,"
            " generate_series(0, (extract(epoch FROM interval %(kept)s) / %(s)s)::int - 1) i",
            {"s": heartbeat.SAMPLE_INTERVAL_S, "kept": heartbeat.SAMPLES_KEPT})
        cur.execute("ANALYZE stage_samples")       # as autovacuum soon would, after a day of inserts
    conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--trades", type=int, default=10_000_000)
    parser.add_argument("--refreshes", type=int, default=30)
    parser.add_argument("--reload", action="store_true")
    args = parser.parse_args()
    settings = bench_settings()
    conn = db.connect(settings)
    with conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM trades")
        present = cur.fetchone()[0]
    conn.close()
    loading = load_trades(settings, args.trades) if args.reload or present != args.trades else {"reused": present}
    db.apply_schema(settings)        # as every stage does at start: a home loaded by an older build gains new tables
    day_of_samples(settings)
    engine = queries.engine_for(settings.sqlalchemy_url)
    anchor = queries.data_anchor(engine)
    symbols = queries.symbols(engine)
    timings: dict[str, list[float]] = {}
    totals, totals_before = [], []
    for _ in range(args.refreshes):
        total = total_before = 0.0
        for name, run in refresh_queries(engine, anchor, symbols, settings.home):
            started = time.perf_counter()
            run()
            elapsed = (time.perf_counter() - started) * 1000
            timings.setdefault(name, []).append(elapsed)
            total += 0.0 if name in NOT_IN_ONE_REFRESH else elapsed
            total_before += elapsed if name in BEFORE_27 else 0.0
        totals.append(total)
        totals_before.append(total_before)
    report({
        "benchmark": "dashboard",
        "trades": args.trades, "loading": loading,
        "per_query_ms": {n: {"p50": round(percentile(v, 50), 1), "p95": round(percentile(v, 95), 1)}
                         for n, v in timings.items()},
        "refresh_ms": {"p50": round(percentile(totals, 50), 1), "p95": round(percentile(totals, 95), 1)},
        "refresh_before_27_ms": {"p50": round(percentile(totals_before, 50), 1),
                                 "p95": round(percentile(totals_before, 95), 1)},
        "target_refresh_p95_ms": 250,
    })


if __name__ == "__main__":
    main()
