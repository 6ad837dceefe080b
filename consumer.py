#!/usr/bin/env python3
"""Consume trades from Kafka and store each exactly once in PostgreSQL; bad messages go to dead_letters."""
from __future__ import annotations

import argparse
import sys

from tradewatch import bus, ingest, runtime
from tradewatch.cli import StopFlag, setup_logging
from tradewatch.config import Settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Read the Kafka topic `trades` in a consumer group and write every trade once into "
                    "the PostgreSQL table `trades`, in batches. Start several to share the partitions. "
                    "Ctrl-C stores the batch in hand, commits and exits.")
    parser.add_argument("--group", help="consumer group (default: CONSUMER_GROUP from .env)")
    parser.add_argument("--batch-size", type=int, help="most messages per database transaction")
    parser.add_argument("--client", choices=bus.CLIENTS, help="Kafka client library (default: KAFKA_CLIENT)")
    args = parser.parse_args(argv)
    setup_logging()
    settings = Settings.load()
    if args.batch_size:
        settings = settings.with_overrides(consumer_batch_size=args.batch_size)
    try:
        ingest.run(settings, StopFlag(), args.group, args.client)
    except runtime.StageFailed:
        return 1            # the stage logged why
    return 0


if __name__ == "__main__":
    sys.exit(main())
