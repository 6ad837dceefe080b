#!/usr/bin/env python3
"""Consume trades from Kafka and store each exactly once in PostgreSQL; bad messages go to dead_letters."""
from __future__ import annotations

import argparse
import sys
import time

from tradewatch.cli import StopFlag, setup_logging
from tradewatch.config import Settings
from tradewatch.ingest import Ingestor
from tradewatch.store import db


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Read the Kafka topic `trades` in a consumer group and write every trade once into "
                    "the PostgreSQL table `trades`, in batches. Start several to share the partitions. "
                    "Ctrl-C stores the batch in hand, commits and exits.")
    parser.add_argument("--group", help="consumer group (default: CONSUMER_GROUP from .env)")
    parser.add_argument("--batch-size", type=int, help="messages per database transaction")
    parser.add_argument("--batch-wait-ms", type=int, help="longest wait to fill a batch")
    args = parser.parse_args(argv)
    setup_logging()
    settings = Settings.load()
    overrides = {k: v for k, v in {"consumer_batch_size": args.batch_size,
                                   "consumer_batch_wait_ms": args.batch_wait_ms}.items() if v}
    settings = settings.with_overrides(**overrides)
    stop = StopFlag()
    while not stop():
        try:
            db.apply_schema(settings)
            break
        except db.DatabaseUnavailable as error:
            print(f"waiting: {error}", file=sys.stderr)
            time.sleep(2)
    Ingestor(settings, stop, args.group).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
