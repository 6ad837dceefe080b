"""`python -m tradewatch doctor|maintain`: the project's own commands that are not a stage."""
from __future__ import annotations

import argparse
import sys

from tradewatch import doctor
from tradewatch.cli import load_settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tradewatch")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("doctor", help="check Java, jars, Kafka, PostgreSQL, the stages, ports and disk")
    maintain_cmd = commands.add_parser("maintain", help="archive to Parquet and drop the days past their "
                                                        "retention (RETENTION_DAYS_*)")
    maintain_cmd.add_argument("--dry-run", action="store_true", help="print what would be archived and dropped")
    maintain_cmd.add_argument("--every", type=float, help="run again every this many seconds, until stopped")
    args = parser.parse_args(argv)
    settings = load_settings()
    if args.command == "doctor":
        return doctor.run(settings)
    from tradewatch import maintain
    from tradewatch.cli import StopFlag, setup_logging
    from tradewatch.store import db
    setup_logging()
    try:
        db.apply_schema(settings)
        if args.every:
            maintain.main_loop(settings, args.every, StopFlag())
            return 0
        done = maintain.run(settings, args.dry_run)
    except (db.DatabaseUnavailable, db.DatabaseRefused) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"{done} day(s) {'would be ' if args.dry_run else ''}archived and dropped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
