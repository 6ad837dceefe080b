"""`python -m tradewatch doctor` (`make doctor`): is everything TradeWatch needs here and working?

One line per check, ✔ or ✘, and for each failure what to do about it. Exit code 1 when anything
failed. Checks: Java, the Kafka jars, Kafka (metadata, the trades and alerts topics and their
partitions), PostgreSQL (connection, every table of the schema; a service that does not answer is
named with its cause: tradewatch/services.py), each stage's heartbeat and lag,
the dashboard and API ports, free disk under TRADEWATCH_HOME.
"""
from __future__ import annotations

import re
import socket
import subprocess
from dataclasses import dataclass
from typing import Callable

from tradewatch import bus, disk, services
from tradewatch.config import Settings
from tradewatch.stack import JARS_DIR
from tradewatch.store import db, health


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""

    def line(self) -> str:
        text = f"{'✔' if self.ok else '✘'} {self.name}: {self.detail}"
        return text if self.ok or not self.fix else f"{text}\n    fix: {self.fix}"


def check_java(_settings: Settings) -> list[Check]:
    try:
        out = subprocess.run(["java", "-version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as error:
        return [Check("Java", False, f"not runnable ({error})", "install Java 17 (Debian: apt-get install openjdk-17-jre-headless)")]
    version = (out.stderr or out.stdout).strip().splitlines()[0] if (out.stderr or out.stdout).strip() else "?"
    major = re.search(r'version "(\d+)', version)
    ok = out.returncode == 0 and major is not None and int(major.group(1)) >= 17
    return [Check("Java", ok, version, "" if ok else "Kafka and Flink need Java 17 or newer")]


def check_jars(_settings: Settings) -> list[Check]:
    kafka = sorted((JARS_DIR / "kafka").glob("kafka_*.jar")) if (JARS_DIR / "kafka").is_dir() else []
    return [Check("Kafka jars", bool(kafka), kafka[0].name if kafka else f"none in {JARS_DIR / 'kafka'}",
                  "run `make jars` (Maven fetches them from Maven Central)")]


def down(name: str, settings: Settings, error: Exception) -> Check:
    """A service that does not answer, with the cause a demo watching it saw, else the cause its
    own log (on this machine) gives for its last stop."""
    detail, _, fix = str(error).partition(" — ")
    service = "postgres" if name == "PostgreSQL" else "kafka"
    watched = (services.read_states(settings) or {}).get(service)
    if watched is not None and watched.status != "up":
        return Check(name, False, f"{detail} — {watched.words()}",
                     watched.fix or "`make demo` starts it again by itself")
    found = services.last_words(settings, service) if not services.running(settings, service) else None
    if found is not None:
        cause, line, its_fix = found
        return Check(name, False, f"{detail} — its log says it stopped: {cause} ({line[:200]})", its_fix or fix)
    return Check(name, False, detail, fix)


def check_kafka(settings: Settings) -> list[Check]:
    try:
        bus.wait_for_kafka(settings, 5)
    except bus.KafkaUnavailable as error:
        return [down("Kafka", settings, error)]
    checks = [Check("Kafka", True, f"answers at {settings.kafka_bootstrap_servers}")]
    if settings.kafka_brokers > 1:
        try:
            bus.wait_for_kafka(settings, 3, brokers=settings.kafka_brokers)
            checks.append(Check("Kafka nodes", True, f"all {settings.kafka_brokers} registered"))
        except bus.KafkaUnavailable:
            checks.append(Check("Kafka nodes", False, f"fewer than {settings.kafka_brokers} registered",
                                "`make services` starts the missing ones (each partition has three replicas: "
                                "the cluster works on with one node down)"))
    partitions = bus.topic_partitions(settings)
    for topic, wanted in ((settings.trades_topic, settings.trades_partitions), (settings.alerts_topic, 1),
                           (settings.candles_topic, 1)):
        have = partitions.get(topic)
        if have is None:
            checks.append(Check(f"topic {topic}", False, "missing", "`make services` creates it (or any stage does)"))
        else:
            ok = have >= wanted
            checks.append(Check(f"topic {topic}", ok, f"{have} partition{'s' if have != 1 else ''}",
                                "" if ok else f"TRADES_PARTITIONS is {wanted}: recreate the topic or lower the setting"))
    return checks


def check_postgres(settings: Settings) -> list[Check]:
    try:
        conn = db.connect(settings)
    except db.DatabaseUnavailable as error:
        return [down("PostgreSQL", settings, error)]
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
            present = {r[0] for r in cur.fetchall()}
            cur.execute("SHOW server_version")
            version = cur.fetchone()[0]
    finally:
        conn.close()
    expected = set(re.findall(r"CREATE TABLE IF NOT EXISTS (\w+)", db.SCHEMA_FILE.read_text()))
    missing = sorted(expected - present)
    where = f"{version} at {settings.postgres_host}:{settings.postgres_port}"
    watched = (services.read_states(settings) or {}).get("postgres")
    full = watched is not None and watched.status == "full"      # up, but refusing writes for want of disk
    return [Check("PostgreSQL", not full, f"{where} — {watched.words()}" if full else where,
                  watched.fix if full else ""),
            Check("schema", not missing, f"all {len(expected)} tables" if not missing else f"missing {', '.join(missing)}",
                  "start any stage (each applies the schema) or `python -m tradewatch.stack start`")]


STAGE_COMMANDS = {"consumer": "python consumer.py", "aggregator": "python aggregator.py",
                  "detector": "python anomaly_detector.py run", "quotes": "python consumer.py --quotes"}


def check_stages(settings: Settings) -> list[Check]:
    try:
        conn = db.connect(settings)
    except db.DatabaseUnavailable:
        return [Check("stages", False, "cannot read their heartbeats (PostgreSQL is down)", "start PostgreSQL first")]
    try:
        with conn.cursor() as cur:
            rows = health.read(cur)
    finally:
        conn.close()
    checks = []
    for status in health.stage_statuses(rows, health.gone_from_this_host):
        command = STAGE_COMMANDS.get(status.stage, f"the {status.stage} stage")
        fix = {"down": f"start it: `{command}` (or `make demo` for everything)",
               "stopped": f"start it again: `{command}`",
               "late": "it is behind or has no partition: see its log; more consumers need more partitions"}
        checks.append(Check(f"stage {status.stage}", status.status == "up", f"{status.status} · {status.detail}",
                            fix.get(status.status, "")))
    return checks


def check_ports(settings: Settings) -> list[Check]:
    checks = []
    for name, host, port, fix in (
            ("dashboard port", settings.dashboard_address, settings.dashboard_port,
             "start the dashboard: `streamlit run dashboard.py` (or `make demo`)"),
            ("API port", settings.api_address, settings.api_port, "start the API: `python api.py` (or `make demo`)")):
        with socket.socket() as probe:
            probe.settimeout(1)
            listening = probe.connect_ex(("127.0.0.1" if host == "0.0.0.0" else host, port)) == 0
        checks.append(Check(name, listening, f"{host}:{port} {'answers' if listening else 'has no listener'}", fix))
    return checks


def check_storage(settings: Settings) -> list[Check]:
    """The database's size and data span, and the free disk (✘ when low: tradewatch/disk.py)."""
    from tradewatch.store import queries
    checks = []
    try:
        found = queries.storage(queries.engine_for(settings.sqlalchemy_url), settings.home)
    except Exception:  # noqa: BLE001 - PostgreSQL down: its own check says so; the disk is still measured
        found = None
    if found is not None:
        span = (f"; trades from {found['oldest_trade'][:19]} to {found['newest_trade'][:19]}"
                if found["oldest_trade"] else "; no trades yet")
        checks.append(Check("database", True, f"{found['database_bytes'] / 1024**3:.2f} GiB{span}"
                            f"; oldest partition {found['oldest_partition'] or 'none'}"
                            f"; archive {found['archive_bytes'] / 1024**3:.2f} GiB in {settings.home / 'archive'}"))
    found = disk.usage(settings.home)
    checks.append(Check("free disk", not found.low,
                        f"{found.free / 1024**3:.1f} GiB free ({found.free_percent:.0f} %) at {found.folder}",
                        f"Kafka and PostgreSQL keep their data under {settings.home}: free space, lower "
                        "KAFKA_RETENTION_*, or `make clean`"))
    return checks


CHECKS: list[Callable[[Settings], list[Check]]] = [check_java, check_jars, check_kafka, check_postgres, check_stages,
                                                    check_ports, check_storage]


def run(settings: Settings, out=print) -> int:
    failed = 0
    for check in CHECKS:
        for result in check(settings):
            out(result.line())
            failed += not result.ok
    out(f"{failed} check{'s' if failed != 1 else ''} failed" if failed else "everything is fine")
    return 1 if failed else 0
