"""The health read model: `stage_health` rows (written by tradewatch/heartbeat.py) read back as
one status per stage — what the dashboard's health strip, the API's /health and `doctor` show."""
from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

# A beat older than this means the process is gone (or stuck): the strip shows it down.
DOWN_AFTER_S = 6.0
# one row per stage process, the columns stage_statuses reads
STAGE_HEALTH_SQL = """
    SELECT stage, host, pid, state, extract(epoch FROM now() - last_beat)::float8 AS beat_age_s,
           processed, lag, cardinality(partitions) AS partitions, last_error, started_at
    FROM stage_health ORDER BY stage, started_at DESC"""


def read(cur) -> list[dict]:
    """The heartbeat rows through a psycopg2 cursor ([] before the table exists)."""
    cur.execute("SELECT to_regclass('stage_health') IS NOT NULL")
    if not cur.fetchone()[0]:
        return []
    cur.execute(STAGE_HEALTH_SQL)
    names = [column.name for column in cur.description]
    return [dict(zip(names, row)) for row in cur.fetchall()]


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
