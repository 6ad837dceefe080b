"""The heartbeat: each stage process's row in `stage_health` (the only writer of that table), at
most once a second — alive, records handled, lag, partitions held, the last error. Rows of
processes dead for longer than STALE_ROWS_AFTER go at the next start of their stage.
tradewatch/store/health.py reads them back into the statuses the health strip, /health and
`doctor` show.

Every SAMPLE_INTERVAL_S it also appends a sample to `stage_samples` (the only writer of that
table too): records handled per second and arriving per second, lag, and the p50/p99 of the
latency the stage measured since the previous sample (its Prometheus histogram, tradewatch/prometheus.py) — the pipeline's history
over time, what the dashboard's pipeline panel and GET /pipeline show. Samples older than
SAMPLES_KEPT are deleted as new ones are written."""
from __future__ import annotations

import logging
import os
import socket
import time
from datetime import datetime, timezone

import psycopg2

from tradewatch import prometheus
from tradewatch.config import Settings
from tradewatch.store import db

log = logging.getLogger("tradewatch.runtime")

BEAT_INTERVAL_S = 1.0
RECONNECT_INTERVAL_S = 5.0
STALE_ROWS_AFTER = "10 minutes"   # rows of dead processes are removed by the next start of the stage
# 360 points an hour per process: a chart of the last hour shows a stall of 10 s, and a day of
# samples is 8,640 small rows per process
SAMPLE_INTERVAL_S = 10.0
SAMPLES_KEPT = "1 day"
# what each stage's latency histogram measures (from the Kafka append time of a trade)
LATENCY_MEANS = {"consumer": "trade → row", "detector": "trade → alert"}


class Heartbeat:
    def __init__(self, settings: Settings, stage: str, sample_interval_s: float = SAMPLE_INTERVAL_S):
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
        self.sample_interval_s = sample_interval_s
        self._next_sample = 0.0                       # wall clock: samples of all processes share their times
        self._latency_before = prometheus.latency_buckets(stage)
        self._previous: tuple[float, int, int | None] | None = None   # the last sample: time, processed, lag

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
                if time.time() >= self._next_sample:
                    self._sample(cur, processed, lag)
            self._last_beat = now
            self._down_logged = False
        except psycopg2.Error:   # server gone, or anything else: never the stage's problem
            self._drop()
            self._say_down()

    def _sample(self, cur, processed: int, lag: int | None) -> None:
        """Append a sample to `stage_samples`, at the latest whole SAMPLE_INTERVAL_S of the clock
        (so the samples of every process of a stage fall on the same times), with the rates and
        latency quantiles since the previous one."""
        now = time.time()
        at = now - now % self.sample_interval_s
        self._next_sample = at + self.sample_interval_s
        per_s = arriving_per_s = None
        if self._previous is not None:
            then, handled, behind = self._previous
            per_s = (processed - handled) / (now - then)
            if lag is not None and behind is not None:
                arriving_per_s = (processed + lag - handled - behind) / (now - then)
        self._previous = (now, processed, lag)
        latency = prometheus.latency_buckets(self.stage)
        since = {bound: count - self._latency_before.get(bound, 0.0) for bound, count in latency.items()}
        self._latency_before = latency
        p50, p99 = (prometheus.quantile(q, since) for q in (0.5, 0.99))
        cur.execute(
            "INSERT INTO stage_samples (stage, host, pid, at, processed, per_s, arriving_per_s, lag, latency_p50_ms,"
            " latency_p99_ms, latency_count) VALUES (%s, %s, %s, to_timestamp(%s), %s, %s, %s, %s, %s, %s, %s)"
            " ON CONFLICT DO NOTHING",
            (self.stage, self.host, self.pid, at, processed, per_s, arriving_per_s, lag,
             None if p50 is None else p50 * 1000, None if p99 is None else p99 * 1000,
             int(max(since.values(), default=0))))
        cur.execute(f"DELETE FROM stage_samples WHERE at < now() - interval '{SAMPLES_KEPT}'")

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
