#!/usr/bin/env python3
"""Run flink_job.sql with PyFlink: locally in a mini-cluster (default) or on a Flink cluster."""
from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import sys
import time
from datetime import date
from pathlib import Path

import psycopg2

from tradewatch import bus
from tradewatch.cli import load_settings, setup_logging
from tradewatch.config import PROJECT_ROOT, Settings
from tradewatch.heartbeat import Heartbeat
from tradewatch.stack import JARS_DIR
from tradewatch.store import db, partitions

SQL_FILE = PROJECT_ROOT / "flink_job.sql"
log = logging.getLogger("tradewatch.flink")


def placeholders(settings: Settings) -> dict[str, str]:
    codes = [c.strip() for c in settings.ohlc_exclude_conditions.split(",") if c.strip()]
    # every setting sits inside a quoted literal of flink_job.sql: a quote in a value is doubled
    values = {k: v.replace("'", "''") for k, v in settings.as_env().items()}
    values["IDLE_TIMEOUT_SECONDS"] = f"{settings.idle_timeout_seconds:g}"
    skew_ms = int(settings.max_clock_skew_seconds * 1000)
    days, rest = divmod(skew_ms, 86_400_000)
    values["MAX_CLOCK_SKEW_INTERVAL"] = (f"INTERVAL '{days} {rest // 3_600_000:02d}:{rest // 60_000 % 60:02d}:"
                                         f"{rest // 1000 % 60:02d}.{rest % 1000:03d}' DAY TO SECOND(3)")
    # NOT IN needs at least one item; '' is never a real condition code
    values["OHLC_EXCLUDE_SQL_LIST"] = ", ".join("'" + c.replace("'", "''") + "'" for c in codes) or "''"
    return values


def render(settings: Settings, sql: str | None = None) -> str:
    values = placeholders(settings)
    sql = sql if sql is not None else SQL_FILE.read_text()

    def fill(match: re.Match) -> str:
        if match.group(1) not in values:
            raise KeyError(f"flink_job.sql uses ${{{match.group(1)}}}, which is not a setting")
        return values[match.group(1)]
    return re.sub(r"\$\{(\w+)\}", fill, sql)


def statements(sql: str) -> list[str]:
    """The statements of the filled-in SQL, without its `--` comments. A comment or a `;` counts
    only outside a quoted literal or name: a value (a generated password) may hold `--` or `;`."""
    found, current, quote, i = [], [], "", 0
    while i < len(sql):
        char = sql[i]
        if quote or char not in "'`-;" or (char == "-" and not sql.startswith("--", i)):
            current.append(char)
            quote = "" if char == quote else quote      # a doubled '' closes and opens again
        elif char in "'`":
            current.append(char)
            quote = char
        elif char == ";":
            found.append("".join(current))
            current = []
        else:                                           # a comment: up to the end of its line
            i = sql.find("\n", i)
            if i < 0:
                break
            continue
        i += 1
    found.append("".join(current))
    return [s.strip() for s in found if s.strip()]


def jar_urls() -> list[str]:
    jars = sorted((JARS_DIR / "flink").glob("*.jar"))
    if not jars:
        raise SystemExit(f"error: no connector jars in {JARS_DIR / 'flink'} — run `make jars`")
    return [jar.resolve().as_uri() for jar in jars]


def latest_checkpoint(directory: Path) -> Path | None:
    found = [p.parent for p in directory.glob("*/chk-*/_metadata")]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Compute 1-minute metrics with Flink SQL from the Kafka topic "
                                     "`trades` into the PostgreSQL table flink_metrics. Runs until Ctrl-C.")
    parser.add_argument("--print-sql", action="store_true", help="print the filled-in SQL (for the SQL client)")
    parser.add_argument("--jobmanager", metavar="HOST:PORT", help="submit to a Flink cluster instead of locally")
    parser.add_argument("--parallelism", type=int, help="default: FLINK_PARALLELISM (1)")
    parser.add_argument("--fresh", action="store_true", help="ignore earlier checkpoints, start from the topic's start")
    args = parser.parse_args(argv)
    settings = load_settings()
    sql = render(settings)
    if args.print_sql:
        print(sql)
        return 0
    setup_logging()
    try:
        db.apply_schema(settings)
    except db.DatabaseUnavailable as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    adopt(settings)
    from pyflink.table import EnvironmentSettings, TableEnvironment

    env = TableEnvironment.create(EnvironmentSettings.in_streaming_mode())
    logging.getLogger().setLevel(logging.INFO)  # PyFlink lowers the root logger to WARNING
    config = env.get_config()
    config.set("pipeline.jars", ";".join(jar_urls()))
    config.set("parallelism.default", str(args.parallelism or settings.flink_parallelism))
    checkpoints = settings.home / "flink" / "checkpoints" / settings.flink_group
    checkpoints.mkdir(parents=True, exist_ok=True)
    config.set("execution.checkpointing.dir", checkpoints.resolve().as_uri())
    config.set("execution.checkpointing.externalized-checkpoint-retention", "RETAIN_ON_CANCELLATION")
    restore = None if args.fresh else latest_checkpoint(checkpoints)
    if restore:
        config.set("execution.state-recovery.path", restore.resolve().as_uri())
        log.info("resuming from checkpoint %s", restore)
    if args.jobmanager:
        host, port = args.jobmanager.rsplit(":", 1)
        config.set("execution.target", "remote")
        config.set("rest.address", host)
        config.set("rest.port", port)
    insert = None
    for statement in statements(sql):
        match = re.match(r"SET\s+'([^']+)'\s*=\s*'([^']*)'$", statement, re.IGNORECASE)
        if match:
            config.set(match.group(1), match.group(2))
        elif statement.upper().startswith("INSERT"):
            insert = statement
        else:
            env.execute_sql(statement)
    log.info("submitting the job: topic %s -> flink_metrics at %s:%s", settings.trades_topic,
             settings.postgres_host, settings.postgres_port)
    signal.signal(signal.SIGTERM, _interrupt)       # a supervisor's stop ends the job as Ctrl-C does
    client = env.execute_sql(insert).get_job_client()
    try:
        return watch(settings, client)
    except KeyboardInterrupt:
        # A job on a cluster outlives its client: cancel it, or a restarted flink_job.py would run
        # a second copy beside it (its last checkpoint is kept: the next start resumes from there)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        log.info("stopping: cancelling Flink job %s", client.get_job_id())
        try:
            client.cancel().result()
        except Exception as error:      # noqa: BLE001 - already ended, or the cluster is gone
            log.warning("could not cancel Flink job %s: %s", client.get_job_id(), error)
        log.info("stopped")
    finally:
        stop_gateway()
    return 0


def stop_gateway(timeout_s: float = 30.0) -> None:
    """End PyFlink's gateway JVM (our child) before we end. It would exit by itself once our end
    of its stdin closes, but only after its shutdown hooks: seconds in which a restarted
    flink_job.py would run beside a JVM that still holds the old mini-cluster."""
    me = os.getpid()
    children = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == me:
                children.append(int(entry.name))
        except (OSError, ValueError, IndexError):
            continue
    for pid in children:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout_s
    for pid in children:
        while True:
            try:
                if os.waitpid(pid, os.WNOHANG)[0] == pid:
                    break
            except ChildProcessError:       # already reaped
                break
            if time.monotonic() > deadline:
                log.warning("the Flink gateway JVM (pid %d) did not stop within %.0fs; killing it", pid, timeout_s)
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                break
            time.sleep(0.1)


def _interrupt(_signum, _frame) -> None:
    raise KeyboardInterrupt


ADOPT_EVERY_S = 60.0


def adopt(settings: Settings) -> None:
    """Give the windows Flink wrote into flink_metrics' DEFAULT partition months of their own (and
    make this month's ahead), as `maintain` does, for a flink_job.py that runs without it."""
    try:
        conn = db.connect(settings)
        try:
            with conn.cursor() as cur:
                moved = partitions.adopt_flink(cur, date.today())
            conn.commit()
        finally:
            conn.close()
    except (db.DatabaseUnavailable, psycopg2.Error) as error:
        log.warning("flink_metrics partitions not checked (%s); trying again in %.0f s",
                    str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__, ADOPT_EVERY_S)
        return
    if moved:
        log.info("flink_metrics: %d rows moved from its default partition into their months", moved)


def watch(settings: Settings, client) -> int:
    """Beat the `flink` heartbeat while the job runs; its lag is the Flink group's committed offsets
    (committed at each checkpoint) behind the end of the topic. Every ADOPT_EVERY_S: `adopt`."""
    heartbeat = Heartbeat(settings, "flink")
    processed, lag, last_lag_check, last_adopt = 0, None, 0.0, time.monotonic()
    while True:
        if time.monotonic() - last_adopt >= ADOPT_EVERY_S:
            last_adopt = time.monotonic()
            adopt(settings)
        status = str(client.get_job_status().result())
        if status.rsplit(".", 1)[-1] in ("FINISHED", "FAILED", "CANCELED"):
            log.error("the Flink job ended: %s", status)
            heartbeat.error(f"job {status}")
            heartbeat.stopped(processed)
            return 1
        if time.monotonic() - last_lag_check >= 5:
            last_lag_check = time.monotonic()
            try:
                offsets = bus.group_lag(settings, settings.flink_group, settings.trades_topic)
                processed = sum(committed for committed, _ in offsets.values())
                lag = sum(end - committed for committed, end in offsets.values())
            except bus.KafkaUnavailable:
                lag = None
        heartbeat.beat(processed, lag, state="running")
        time.sleep(1)


if __name__ == "__main__":
    sys.exit(main())
