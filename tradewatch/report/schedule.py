"""`report.py --every 1h|1d`: a report for each period as soon as it has closed in event time.

A period [start, end) is closed when a trade of a later period has arrived (event time has moved
past `end`) and every aggregator window starting before `end` is final. APScheduler checks every
`check_seconds`. Restart-safe without any state of its own: the reports in the folder are the
state. A report appears whole or not at all (write to a temporary file, then rename), so after a
kill -9 the next start writes exactly the periods whose report is missing, starting after the
newest report there — or, in an empty folder, `backlog` periods before the newest closed one
(a fresh start after replaying a year does not schedule a report for every hour of it).

A window that is still not final more than STUCK_AFTER of event time behind the newest trade (e.g.
of a window size the aggregator no longer computes) is reported once in the log, and later
reports stop waiting for it.
"""
from __future__ import annotations

import logging
from datetime import datetime, timedelta, timezone
from pathlib import Path

from apscheduler.schedulers.background import BackgroundScheduler
from sqlalchemy.engine import Engine

from tradewatch.config import Settings
from tradewatch.report import build
from tradewatch.report.render import STEM_FORMATS, file_stem, write, write_index
from tradewatch.store import queries

log = logging.getLogger("tradewatch.report")
EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
STEPS = {"1h": timedelta(hours=1), "1d": timedelta(days=1)}
BACKLOG = 24                       # periods written at the first start in an empty folder
STUCK_AFTER = timedelta(days=1)    # a window not final this far behind the newest trade is not waited for


def floor(moment: datetime, step: timedelta) -> datetime:
    return EPOCH + ((moment - EPOCH) // step) * step


class ReportSchedule:
    def __init__(self, settings: Settings, engine: Engine, step: timedelta, out: Path, symbols: list[str] | None,
                 backlog: int = BACKLOG):
        self.settings, self.engine, self.step, self.out, self.symbols = settings, engine, step, out, symbols
        self.backlog = backlog
        self._stuck_told = 0
        for left in out.glob(".*.tmp"):          # a write a kill -9 cut short; its report is written again
            left.unlink()

    def _newest_written(self) -> datetime | None:
        kind = "day" if self.step == STEPS["1d"] else "hour"
        starts = []
        for page in self.out.glob("report-*.html"):
            try:
                starts.append(datetime.strptime(page.stem, STEM_FORMATS[kind]).replace(tzinfo=timezone.utc))
            except ValueError:
                continue         # a report of another kind
        return max(starts, default=None)

    def due(self) -> list[tuple[datetime, datetime]]:
        """The closed periods without a report, oldest first."""
        newest = queries.data_anchor(self.engine)
        if newest is None:
            return []
        newest = newest.to_pydatetime()
        closed_until = floor(newest, self.step)                        # periods ending by here have ended
        stuck_before = newest - STUCK_AFTER
        stuck, example = queries.stuck_windows(self.engine, stuck_before)
        if stuck and stuck != self._stuck_told:
            log.warning("reports: %d windows starting before %s are still not final (e.g. %s) — an old window "
                        "size, or a stopped aggregator; reports no longer wait for them", stuck,
                        stuck_before.isoformat(), example)
        self._stuck_told = stuck
        oldest_open = queries.oldest_open_window(self.engine, stuck_before)
        if oldest_open is not None:                                    # not final yet: wait for the windows
            closed_until = min(closed_until, floor(oldest_open.to_pydatetime(), self.step))
        written = self._newest_written()
        oldest = floor(queries.oldest_trade(self.engine).to_pydatetime(), self.step)
        start = written + self.step if written else max(oldest, closed_until - self.backlog * self.step)
        periods = []
        while start + self.step <= closed_until:
            if not (self.out / f"{file_stem(start, start + self.step)}.html").exists():
                periods.append((start, start + self.step))
            start += self.step
        return periods

    def run_once(self) -> int:
        written = 0
        for since, until in self.due():
            _, page = write(build(self.engine, self.settings, since, until, self.symbols), self.out, index=False)
            log.info("report for %s written: %s", since.isoformat(), page)
            written += 1
        if written:
            write_index(self.out)          # once per check, not once per report
        return written

    def start(self, check_seconds: float) -> BackgroundScheduler:
        scheduler = BackgroundScheduler(timezone=timezone.utc)
        scheduler.add_job(self._check, "interval", seconds=check_seconds, next_run_time=datetime.now(timezone.utc),
                          max_instances=1, coalesce=True)
        scheduler.start()
        return scheduler

    def _check(self) -> None:
        try:
            self.run_once()
        except Exception as error:  # noqa: BLE001 - the next check tries again; a user sees why
            log.warning("reports: %s; trying again at the next check", str(error).splitlines()[0])
