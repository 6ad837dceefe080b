"""What every stage process shares: the heartbeat, and how the heartbeats are read.

A stage (consumer, aggregator, detector, Flink job) calls `Heartbeat.beat()` from its main loop.
The heartbeat writes one row per running process into `stage_health` (this module is that table's
only writer) at most once a second: when it last beat, how many records it handled, how far it is
behind the end of the Kafka log and which partitions it holds. A process that dies stops beating,
so the dashboard's health strip turns it red within seconds; nothing has to report the death.

The heartbeat never stops the stage: when PostgreSQL is down it skips beats (and says so once).
"""
from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import psycopg2

from tradewatch.config import Settings
from tradewatch.store import db

log = logging.getLogger("tradewatch.runtime")

BEAT_INTERVAL_S = 1.0
RECONNECT_INTERVAL_S = 5.0
# A beat older than this means the process is gone (or stuck): the strip shows it down.
DOWN_AFTER_S = 6.0
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

    def stopped(self, processed: int) -> None:
        """A clean exit: the strip shows the stage as stopped rather than crashed."""
        self.beat(processed, state="stopped", force=True)
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


# ---------------------------------------------------------------- reading the heartbeats

EXPECTED_STAGES = ("consumer", "aggregator", "detector")   # `flink` is shown once it has beaten
LATE_AFTER_S = 3.0           # a beat this old: the loop is slow or blocked
LATE_LAG_RECORDS = 5_000     # this far behind the log end: falling behind
RECOVERED_NOTE_S = 60.0      # how long a stage that came back after a crash says so


@dataclass(frozen=True)
class StageStatus:
    stage: str
    status: str              # up | late | down | stopped
    detail: str              # for people: lag, partitions, how long ago it beat, the last error

    @property
    def color(self) -> str:
        return {"up": "green", "late": "orange", "down": "red", "stopped": "gray"}[self.status]


def stage_statuses(rows: list[dict], process_gone: Callable[[dict], bool] = lambda row: False) -> list[StageStatus]:
    """One status per stage from `stage_health` rows (stage, host, pid, beat_age_s, state, lag,
    partitions, last_error). Up: a running process beat within LATE_AFTER_S, holds partitions and
    is not far behind; late: it beat within DOWN_AFTER_S, lags, or the group gave it no partition;
    down: no running process has beaten for DOWN_AFTER_S (killed, crashed, stuck), or
    `process_gone(row)` says its process no longer exists (the reader can check processes on its
    own host at once), or the stage never started; stopped: its last process exited cleanly.
    A stage that is up again after a crash says so for RECOVERED_NOTE_S."""
    by_stage: dict[str, list[dict]] = {}
    for row in rows:
        by_stage.setdefault(row["stage"], []).append(row)
    names = list(EXPECTED_STAGES) + sorted(set(by_stage) - set(EXPECTED_STAGES))
    statuses = []
    for name in names:
        stage_rows = by_stage.get(name, [])
        running = [r for r in stage_rows if r["state"] == "running"]
        alive = [r for r in running if r["beat_age_s"] < DOWN_AFTER_S and not process_gone(r)]
        crashed = [r for r in running if r not in alive]
        if alive:
            lag = sum(int(r["lag"]) for r in alive if _known(r["lag"]))
            held = [int(r["partitions"]) for r in alive if _known(r["partitions"])]
            processes = f"{len(alive)} processes · " if len(alive) > 1 else ""
            detail = f"{processes}lag {lag:,}" + (f" · {sum(held)} partitions" if held else "")
            recent = [r for r in crashed if r["beat_age_s"] < RECOVERED_NOTE_S]
            if recent:
                detail += f" · restarted, a process died {min(r['beat_age_s'] for r in recent):.0f} s ago"
            slow = max(r["beat_age_s"] for r in alive) >= LATE_AFTER_S
            waiting = bool(held) and sum(held) == 0    # in the group but given nothing (yet)
            status = "late" if slow or waiting or lag > LATE_LAG_RECORDS else "up"
            statuses.append(StageStatus(name, status, detail))
        elif not stage_rows:
            statuses.append(StageStatus(name, "down", "not started"))
        else:
            newest = min(stage_rows, key=lambda r: r["beat_age_s"])
            error = f" · {newest['last_error']}" if newest.get("last_error") else ""
            if newest["state"] == "stopped":
                statuses.append(StageStatus(name, "stopped", f"stopped {newest['beat_age_s']:.0f} s ago{error}"))
            else:
                statuses.append(StageStatus(name, "down", f"last heartbeat {newest['beat_age_s']:.0f} s ago{error}"))
    return statuses


def gone_from_this_host(row: dict) -> bool:
    """True when `row`'s process ran on this machine and no longer exists (or is a zombie)."""
    if row["host"] != socket.gethostname():
        return False
    try:
        state = Path(f"/proc/{int(row['pid'])}/stat").read_text().rsplit(")", 1)[-1].split()[0]
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return state == "Z"


def _known(value: object) -> bool:
    """Not None and not NaN (pandas turns a NULL in a numeric column into NaN)."""
    return value is not None and value == value
