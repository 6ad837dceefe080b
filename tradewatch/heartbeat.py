"""The heartbeat: each stage process's row in `stage_health` (the only writer of that table), at
most once a second — alive, records handled, lag, partitions held, the last error. Rows of
processes dead for longer than STALE_ROWS_AFTER go at the next start of their stage.
tradewatch/store/health.py reads them back into the statuses the health strip, /health and
`doctor` show."""
from __future__ import annotations

import logging
import os
import socket
import time
from datetime import datetime, timezone

import psycopg2

from tradewatch.config import Settings
from tradewatch.store import db

log = logging.getLogger("tradewatch.runtime")

BEAT_INTERVAL_S = 1.0
RECONNECT_INTERVAL_S = 5.0
STALE_ROWS_AFTER = "10 minutes"   # rows of dead processes are removed by the next start of the stage


class Heartbeat:
    def __init__(self, settings: Settings, stage: str):
        self.settings = settings
        self.stage = stage
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.started_at = datetime.now(timezone.utc)
        self._conn = None
        self._last_beat = 0.0
        self._last_attempt = 0.0
        self._down_logged = False
        self.last_error: str | None = None

    def beat(self, processed: int, lag: int | None = None, partitions: list[int] | None = None,
             state: str = "running", force: bool = False) -> None:
        """Record that the stage is alive; cheap to call on every loop (writes at most once a second)."""
        now = time.monotonic()
        if not force and now - self._last_beat < BEAT_INTERVAL_S:
            return
        if self._conn is None:
            if not force and now - self._last_attempt < RECONNECT_INTERVAL_S:
                return
            self._last_attempt = now
            try:
                self._conn = db.connect(self.settings)
                self._conn.autocommit = True
                self._forget_dead_instances()
            except (db.DatabaseUnavailable, psycopg2.Error):
                self._drop()
                self._say_down()
                return
        try:
            with self._conn.cursor() as cur:
                cur.execute(
                    "INSERT INTO stage_health (stage, host, pid, started_at, last_beat, processed, lag, partitions,"
                    " state, last_error) VALUES (%s, %s, %s, %s, now(), %s, %s, %s, %s, %s)"
                    " ON CONFLICT (stage, host, pid) DO UPDATE SET last_beat = now(),"
                    " processed = EXCLUDED.processed, lag = EXCLUDED.lag, partitions = EXCLUDED.partitions,"
                    " state = EXCLUDED.state, last_error = EXCLUDED.last_error",
                    (self.stage, self.host, self.pid, self.started_at, processed, lag, partitions, state,
                     self.last_error))
            self._last_beat = now
            self._down_logged = False
        except psycopg2.Error:   # server gone, or anything else: never the stage's problem
            self._drop()
            self._say_down()

    def error(self, message: str) -> None:
        """Remember the latest error so the strip can show it (written with the next beat)."""
        self.last_error = message[:500]

    def stopped(self, processed: int, state: str = "stopped") -> None:
        """The last beat: `stopped` (a clean exit, the strip shows it stopped rather than crashed)
        or `failed` (it shows the stage down with its last error)."""
        self.beat(processed, state=state, force=True)
        self._drop()

    def _forget_dead_instances(self) -> None:
        with self._conn.cursor() as cur:
            cur.execute("DELETE FROM stage_health WHERE stage = %s AND host = %s AND pid <> %s"
                        f" AND last_beat < now() - interval '{STALE_ROWS_AFTER}'", (self.stage, self.host, self.pid))

    def _say_down(self) -> None:
        if not self._down_logged:
            log.warning("%s: heartbeat paused, cannot write stage_health in PostgreSQL", self.stage)
            self._down_logged = True

    def _drop(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception:  # noqa: BLE001 - already broken
                pass
            self._conn = None
