#!/usr/bin/env python3
"""Consume trades from Kafka and store each exactly once in PostgreSQL; bad messages go to dead_letters.
With --quotes: the order book stage instead (Kafka `quotes` → quotes, book_snapshots, order_books)."""
from __future__ import annotations

import argparse
import sys
from datetime import datetime, timezone

from tradewatch import bus, runtime
from tradewatch.cli import StopFlag, iso_time, load_settings, setup_logging
from tradewatch.config import Settings
from tradewatch.stages.consumer import run as run_consumer
from tradewatch.stages.quotes import run as run_quotes
from tradewatch.store import db, writer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Read the Kafka topic `trades` in a consumer group and write every trade once into "
                    "the PostgreSQL table `trades`, in batches. Start several to share the partitions. "
                    "Ctrl-C stores the batch in hand, commits and exits.")
    parser.add_argument("--quotes", action="store_true",
                        help="run the order book stage: read the topic `quotes` (QUOTES_TOPIC; `producer.py --book`"
                             " fills it), keep each symbol's book and store its quotes (every change of the best bid"
                             " or ask), depth snapshots and current book (what /orderbook reads)")
    parser.add_argument("--group", help="consumer group (default: CONSUMER_GROUP from .env; QUOTES_GROUP with"
                                        " --quotes)")
    parser.add_argument("--batch-size", type=int, help="most messages per database transaction")
    parser.add_argument("--client", choices=bus.CLIENTS, help="Kafka client library (default: KAFKA_CLIENT)")
    replay = parser.add_argument_group("dead letters, after a fix (a clock corrected, a limit relaxed)")
    replay.add_argument("--replay-dead-letters", action="store_true",
                        help="validate the dead letters of TRADES_TOPIC again with today's settings: store the "
                             "valid ones (never twice), keep the rest with their reason brought up to date; then exit")
    replay.add_argument("--reason", help="only those whose reason contains this text, e.g. 'ahead of'")
    replay.add_argument("--since", type=iso_time, help="only those received since (ISO-8601, UTC if no offset)")
    args = parser.parse_args(argv)
    setup_logging()
    settings = load_settings()
    if args.replay_dead_letters:
        return replay_dead_letters(settings, args.reason, args.since)
    if args.reason or args.since:
        parser.error("--reason and --since go with --replay-dead-letters")
    if args.batch_size:
        settings = settings.with_overrides(consumer_batch_size=args.batch_size)
    try:
        (run_quotes if args.quotes else run_consumer)(settings, StopFlag(), args.group, args.client)
    except runtime.StageFailed:
        return 1            # the stage logged why
    return 0


def replay_dead_letters(settings: Settings, reason: str | None, since) -> int:
    try:
        db.apply_schema(settings)
        conn = db.connect(settings)
    except (db.DatabaseUnavailable, db.DatabaseRefused) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    try:
        done = writer.replay_dead_letters(conn, settings.trades_topic, reason, since,
                                          int(settings.max_clock_skew_seconds * 1000))
    finally:
        conn.close()
    print(f"dead letters validated again: {done.stored} stored, {done.already_stored} already stored "
          f"(the stored trade kept), {done.still_invalid} still invalid (left with their reason)")
    if done.stored:
        first, last = (datetime.fromtimestamp(ms / 1000, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
                       for ms in (done.first_ms, done.last_ms + 1000))
        print(f"the stored trades lie between {first} and {last}; their candles: "
              f"python aggregator.py --backfill --since {first} --until {last}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
