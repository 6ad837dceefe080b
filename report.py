#!/usr/bin/env python3
"""Market surveillance reports: HTML (self-contained) and Markdown for a day, an hour or any period,
on demand or for every period as it closes (see tradewatch/report/)."""
from __future__ import annotations

import argparse
import logging
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

from tradewatch.cli import StopFlag, iso_time, load_settings, setup_logging
from tradewatch.config import Settings

log = logging.getLogger("tradewatch.report")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  python report.py --date 2013-10-07\n"
               "  python report.py --since 2013-10-07T13:30:00Z --until 2013-10-07T20:00:00Z --symbols SPY\n"
               "  python report.py --every 1h --out reports/")
    when = parser.add_mutually_exclusive_group(required=True)
    when.add_argument("--date", help="a UTC day, e.g. 2013-10-07")
    when.add_argument("--since", type=iso_time, help="start of the period (ISO-8601; with --until)")
    when.add_argument("--every", choices=("1h", "1d"), help="write a report for each period as it closes")
    parser.add_argument("--until", type=iso_time, help="end of the period, exclusive")
    parser.add_argument("--symbols", help="comma-separated symbols (default: all)")
    parser.add_argument("--out", type=Path, default=Path("reports"), help="folder for the reports (default reports/)")
    parser.add_argument("--check-seconds", type=float, default=30.0, help="with --every: how often to look")
    parser.add_argument("--backlog", type=int, default=24,
                        help="with --every, in an empty folder: how many closed periods before now to write "
                             "(default 24); later starts go on after the newest report there")
    args = parser.parse_args(argv)
    if args.date:
        try:
            day = datetime.strptime(args.date, "%Y-%m-%d").replace(tzinfo=timezone.utc)
        except ValueError:
            parser.error(f"--date must be a day like 2013-10-07, not {args.date!r}")
        args.since, args.until = day, day + timedelta(days=1)
    elif args.since and not args.until:
        parser.error("--since needs --until")
    elif args.until and not args.since:
        parser.error("--until needs --since")
    if args.backlog < 1:
        parser.error("--backlog must be at least 1")
    if args.since and args.until <= args.since:
        parser.error("--until must be after --since")
    args.symbols = [s.strip().upper() for s in args.symbols.split(",") if s.strip()] if args.symbols else None
    return args


def archived_days(settings: Settings, since: datetime, until: datetime) -> list[str]:
    """The days (or years) of [since, until) whose trades `maintain` moved to the Parquet archive."""
    day, found = since.date(), []
    while datetime(day.year, day.month, day.day, tzinfo=timezone.utc) < until:
        for label in (day.isoformat(), str(day.year)):
            if label not in found and any((settings.home / "archive" / "trades" / f"date={label}").glob("part-*.parquet")):
                found.append(label)
        day += timedelta(days=1)
    return found


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    from sqlalchemy.exc import OperationalError

    from tradewatch.report import build
    from tradewatch.report.render import write
    from tradewatch.report.schedule import STEPS, ReportSchedule
    from tradewatch.store import queries
    settings = load_settings()
    engine = queries.engine_for(settings.sqlalchemy_url)
    if not args.every:
        try:
            report = build(engine, settings, args.since, args.until, args.symbols)
        except OperationalError as error:
            print(f"error: cannot read the database at {settings.postgres_host}:{settings.postgres_port} — start it"
                  f" with `make services` ({str(error).splitlines()[0]})", file=sys.stderr)
            return 1
        archived = archived_days(settings, args.since, args.until) if report.empty else []
        if archived:
            print(f"error: the trades of {', '.join(archived)} are archived (past RETENTION_DAYS_TRADES) in "
                  f"{settings.home / 'archive' / 'trades'}; reports read the database only — query the archive "
                  "with pandas or DuckDB (README, Bounds on disk)", file=sys.stderr)
            return 1
        md, page = write(report, args.out)
        print(f"{'no trades in this period; ' if report.empty else ''}wrote {page} and {md}")
        return 0
    logging.getLogger("apscheduler").setLevel(logging.WARNING)     # not two lines per check
    stop = StopFlag()
    schedule = ReportSchedule(settings, engine, STEPS[args.every], args.out, args.symbols, args.backlog)
    scheduler = schedule.start(args.check_seconds)
    log.info("writing a report for every %s period as it closes into %s/ (checking every %gs)",
             args.every, args.out, args.check_seconds)
    while not stop():
        time.sleep(0.2)
    scheduler.shutdown(wait=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
