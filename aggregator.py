#!/usr/bin/env python3
"""Maintain windowed market metrics (table stock_metrics) and indicators from the Kafka topic `trades`."""
from __future__ import annotations

import argparse
import sys
from datetime import datetime, timezone

from tradewatch.stages.aggregator import run
from tradewatch import runtime, volatility
from tradewatch.cli import StopFlag, iso_time, setup_logging
from tradewatch.config import Settings
from tradewatch.store import db
from tradewatch.store.candles import backfill




def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Event-time tumbling windows (WINDOW_SIZES, default 1m,5m,15m) per symbol: OHLC, volume, "
                    "VWAP, counts, buy/sell volume, and SMA/EMA/RSI/MACD/Bollinger over final candles. "
                    "Restart-safe: kill it at any time and start it again.")
    parser.add_argument("--windows", help="comma-separated sizes, e.g. 1m,5m,15m,1h,1d")
    parser.add_argument("--lateness", type=float, help="allowed lateness in seconds")
    parser.add_argument("--backfill", action="store_true",
                        help="rebuild the windows of --since/--until from the trades table, then exit")
    parser.add_argument("--since", type=iso_time, help="backfill start (ISO-8601, UTC if no offset)")
    parser.add_argument("--until", type=iso_time,
                        help="backfill end (default: now); both ends move to window boundaries, and windows "
                             "the running aggregator still holds open are left to it")
    args = parser.parse_args(argv)
    setup_logging()
    overrides = {k: v for k, v in {"window_sizes": args.windows, "allowed_lateness_seconds": args.lateness}.items()
                 if v is not None}
    try:
        settings = Settings.load(**overrides)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        db.apply_schema(settings)
    except (db.DatabaseUnavailable, db.DatabaseRefused) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if args.backfill:
        if not args.since:
            print("error: --backfill needs --since", file=sys.stderr)
            return 2
        until = args.until or datetime.now(timezone.utc)
        conn = db.connect(settings)
        written = backfill(conn, args.since, until, settings.window_sizes_ms, settings.ohlc_excluded,
                           settings.aggregator_group, settings.trades_topic, volatility.load(settings.model_path))
        conn.close()
        print(f"backfilled {written} windows from {args.since.isoformat()} to {until.isoformat()}")
        return 0
    try:
        run(settings, StopFlag())
    except runtime.StageFailed:
        return 1            # the stage logged why
    return 0


if __name__ == "__main__":
    sys.exit(main())
