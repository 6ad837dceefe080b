"""Shared fixtures. Integration tests run against a real Kafka broker and PostgreSQL server that
this suite starts on its own ports and data directory (.tradewatch/test, one per xdist worker), so
a running demo is never touched. Set TRADEWATCH_KEEP_SERVICES=1 to leave them running after the
suite."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests import processes
from tradewatch.config import PROJECT_ROOT, Settings, shared_data_dir

SHARED_DATA = shared_data_dir()


# Measured seconds of the longest modules (make test, two workers). Longest first is how two
# workers finish together (`--no-loadscope-reorder` keeps this order); a module not listed goes
# after them in its usual place. A stale number costs balance, never a test.
EXPECTED_SECONDS = {
    "tests/integration/test_ingest.py": 180, "tests/integration/test_flink_cluster.py": 150,
    "tests/integration/test_flink.py": 125, "tests/integration/test_kafka_cluster.py": 95,
    "tests/integration/test_commit_protocol.py": 85, "tests/integration/test_report.py": 85,
    "tests/integration/test_chaos.py": 70, "tests/integration/test_aggregator.py": 70,
    "tests/integration/test_chaos_time.py": 100, "tests/integration/test_outbox.py": 45,
    "tests/integration/test_api.py": 60, "tests/integration/test_fuzz.py": 50, "tests/e2e/test_browser.py": 50,
    "tests/integration/test_soak.py": 110, "tests/integration/test_bounded_state.py": 95,
    "tests/integration/test_maintain.py": 40, "tests/integration/test_bus.py": 40, "tests/integration/test_detector.py": 40, "tests/unit/test_detect.py": 35,
    "tests/integration/test_candle_stream.py": 80,
}


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: -EXPECTED_SECONDS.get(item.nodeid.split("::")[0], 0))   # stable


_PORTS_GIVEN: set[int] = set()


def free_port() -> int:
    """A port nobody listens on, never one this process handed out before, nor one another xdist
    worker can be handed: each worker draws from its own slice of 10000-19999, below the kernel's
    ephemeral range (32768-60999), so neither a client's outgoing connection nor a port 0 bind
    elsewhere can take it between this call and the server's bind (a fixed port up there once met
    a client's socket and PostgreSQL could not listen; binding port 0 twice can answer the same port)."""
    import random
    import socket
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    width = 10_000 // workers
    low = 10_000 + worker_index() * width
    while True:
        port = random.randrange(low, low + width)
        if port in _PORTS_GIVEN:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _PORTS_GIVEN.add(port)
        return port


def worker_index() -> int:
    """0, 1, … for pytest-xdist's workers gw0, gw1, … (make test runs two); 0 without xdist."""
    return int(os.environ.get("PYTEST_XDIST_WORKER", "gw0")[2:])


def make_test_settings() -> Settings:
    """Each xdist worker has services of its own (ports 1000 apart, its own data folder), so a test
    that stops Kafka or PostgreSQL never touches the other worker's tests."""
    n = worker_index()
    return Settings.load(
        tradewatch_home=".tradewatch/test" + (f"-gw{n}" if n else ""),
        kafka_bootstrap_servers=f"127.0.0.1:{29092 + 1000 * n}",
        kafka_controller_port=29093 + 1000 * n,
        postgres_port=25432 + 1000 * n,
        consumer_metrics_port=9101 + 300 * n, aggregator_metrics_port=9102 + 300 * n,
        detector_metrics_port=9103 + 300 * n, producer_metrics_port=9104 + 300 * n,
        quotes_metrics_port=9105 + 300 * n,
        trades_partitions=6,
    )


@pytest.fixture(scope="session")
def services() -> Settings:
    from tradewatch import stack

    settings = make_test_settings()
    stack.start(settings)
    # the generated password, carried explicitly: a test that gives its settings another home
    # (where no password file is) still reaches this PostgreSQL
    settings = settings.with_overrides(postgres_password=settings.database_password)
    yield settings
    if not os.environ.get("TRADEWATCH_KEEP_SERVICES"):
        stack.stop(settings)


@pytest.fixture
def settings(services: Settings) -> Settings:
    """Per test: a fresh topic and consumer group, and empty tables."""
    return fresh_settings(services)


def fresh_settings(services: Settings) -> Settings:
    """New topics and groups of their own, the trades topic created, every table emptied."""
    from tradewatch import bus

    tag = uuid.uuid4().hex[:8]
    fresh = services.with_overrides(trades_topic=f"trades-{tag}", alerts_topic=f"alerts-{tag}",
                                    candles_topic=f"candles-{tag}", quotes_topic=f"quotes-{tag}",
                                    consumer_group=f"group-{tag}", aggregator_group=f"aggregator-{tag}",
                                    detector_group=f"detector-{tag}", quotes_group=f"quotes-{tag}")
    bus.ensure_topic(fresh, fresh.trades_topic, fresh.trades_partitions)
    empty_tables(fresh)
    return fresh


@contextmanager
def scratch_database(settings: Settings, name: str):
    """Settings for a database of its own on the suite's server (to build one as an older version
    left it), dropped afterwards."""
    from tradewatch.store import db

    admin = db.connect(settings)
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS {name}")
        cur.execute(f"CREATE DATABASE {name}")
    try:
        yield settings.with_overrides(postgres_db=name)
    finally:
        with admin.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.close()


def empty_tables(settings: Settings) -> None:
    """Every table emptied, and the Parquet archive of what `maintain` dropped from them."""
    from tradewatch.store import db

    shutil.rmtree(settings.home / "archive", ignore_errors=True)

    conn = db.connect(settings)
    conn.autocommit = True
    with conn.cursor() as cur:
        # day partitions go (a few hundred per statement: each one is a lock), then the rest is emptied
        # (a DEFAULT partition stays: schema.sql made it, and writers need it)
        cur.execute("SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid WHERE c.relkind = 'r'"
                    " AND pg_get_expr(c.relpartbound, c.oid) <> 'DEFAULT'")
        parts = [r[0] for r in cur.fetchall()]
        for n in range(0, len(parts), 200):
            cur.execute("DROP TABLE " + ", ".join(f'"{p}"' for p in parts[n:n + 200]))
        cur.execute("SELECT string_agg(format('%I', tablename), ', ') FROM pg_tables WHERE schemaname = 'public'")
        tables = cur.fetchone()[0]
        cur.execute(f"TRUNCATE {tables} RESTART IDENTITY")
    conn.close()


def run_script(settings: Settings, script: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run one of the project's CLIs with the test settings; fail with its output when it fails."""
    result = subprocess.run([sys.executable, str(PROJECT_ROOT / script), *args], cwd=PROJECT_ROOT,
                            env={**os.environ, **settings.as_env()}, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, f"{script} {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result


_STARTED: list[subprocess.Popen] = []
# The one session fixture that may keep processes beyond a module: the suite's Kafka and PostgreSQL.
GUARD = processes.Guard(session_owners={"services"})


def start_script(settings: Settings, script: str, *args: str, log: Path | None = None,
                 env: dict[str, str] | None = None) -> subprocess.Popen:
    out = open(log, "ab") if log else subprocess.DEVNULL
    target = [script] if script.startswith("-") else [str(PROJECT_ROOT / script)]     # "-m", "tradewatch", …
    process = subprocess.Popen([sys.executable, *target, *args], cwd=PROJECT_ROOT,
                               env={**os.environ, **settings.as_env(), **(env or {})}, stdout=out,
                               stderr=subprocess.STDOUT)
    process.log = log       # for a failure message: its stack dump and last lines
    _STARTED.append(process)
    return process


def pytest_configure(config):
    # a plugin, not conftest hooks: those never see session fixtures (their node is above tests/)
    config.pluginmanager.register(GUARD, "tradewatch-process-guard")


@contextmanager
def started_for(fixture: str, scope: str = "module"):
    """Processes started inside belong to `fixture` (e.g. a TaskManager a test restarts in the
    module's cluster), which stops them at its teardown, not to the test."""
    before = set(processes.ours())
    yield
    started = [p for pid, p in processes.ours().items() if pid not in before]
    GUARD.owners.claim(started, processes.Guard.owner_label(fixture, scope))


@pytest.fixture(autouse=True)
def no_process_outlives_its_test():
    """Stages a test started with start_script are stopped when it ends (a failed test must not
    leave stages writing into the next test's tables). Any other process the test started and
    left running (a child of a killed stage, a server started by hand) fails the test loudly."""
    mark = len(_STARTED)
    before = set(processes.ours())
    yield
    started, _STARTED[mark:] = _STARTED[mark:], []
    processes.stop_trees([p.pid for p in started if p.poll() is None])
    for process in started:
        process.wait()
    running = processes.ours()
    left = [p for pid, p in running.items() if pid not in before and GUARD.owners.owner(p, running) is None]
    if left:
        pytest.fail(processes.leftovers(left, "the test that started them"))


def wait_for(condition, timeout: float = 60, interval: float = 0.2, message: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {message}")


def metrics_url(log: Path, name: str = "stage") -> str:
    """The /metrics URL a started stage logged (it takes the next free port when its own is taken)."""
    import re
    return "http://" + wait_for(lambda: (re.search(r"metrics of the \w+ on http://([\d.:]+)/metrics",
                                                   log.read_text() if log.exists() else "") or [None, None])[1],
                                message=f"{name} metrics port") + "/metrics"


PROMETHEUS_TOOLS = PROJECT_ROOT / ".tradewatch" / "tools" / "prometheus"


def prometheus_tool(name: str) -> Path:
    """promtool or prometheus from Debian's package, unpacked by `make system` (make test runs it)."""
    path = PROMETHEUS_TOOLS / name
    assert path.exists(), f"{path} is missing: `make system` unpacks it (make test runs that first)"
    return path


def wait_for_progress(measure, target: int, stalled_after: float = 60, interval: float = 0.2,
                      message: str = "progress", details=lambda: "") -> int:
    """Wait until `measure()` reaches `target` for as long as it keeps growing: fails only when it
    has not moved for `stalled_after` seconds (a stall), not after a fixed time that a loaded
    machine may need (the rate is not this test's to control). `details()` goes into the failure."""
    value, moved_at = measure(), time.monotonic()
    while value < target:
        time.sleep(interval)
        now_value = measure()
        if now_value > value:
            value, moved_at = now_value, time.monotonic()
        elif time.monotonic() - moved_at > stalled_after:
            raise AssertionError(f"{message}: stalled at {value} of {target} for {stalled_after:.0f}s\n{details()}")
    return value


class Feeder(threading.Thread):
    """A thread that feeds a test while the test disrupts the pipeline; `join()` raises what the
    feeding raised (a plain thread's failure is only a warning, and the test would then time out
    waiting for trades that were never sent, with no word of why)."""

    error: BaseException | None = None

    def run(self) -> None:
        try:
            super().run()
        except BaseException as error:       # noqa: BLE001 - handed to join()
            self.error = error

    def join(self, timeout: float | None = None) -> None:
        super().join(timeout)
        if self.error is not None:
            raise AssertionError(f"the feeder failed: {self.error!r}") from self.error


# how long a feeder waits for Kafka to take what it sent, through broker restarts on a loaded
# machine (a flush ends as soon as everything is delivered; this bounds a stall)
FEED_FLUSH_S = 600


def publish_trades(settings: Settings, trades: list) -> None:
    """Send `trades` to the settings' trades topic (key = symbol) and wait until Kafka has them all."""
    from tradewatch import bus

    publisher = bus.publisher(settings)
    for t in trades:
        publisher.send(settings.trades_topic, t.symbol.encode(), t.to_json_bytes())
    assert publisher.flush(60)
    publisher.close()


def query(settings: Settings, sql: str, params: tuple = ()) -> list[tuple]:
    """Run one statement in its own committed transaction; rows if it returns any."""
    from tradewatch.store import db

    conn = db.connect(settings)
    try:
        with conn.cursor() as cur:
            cur.execute(sql, params)
            result = cur.fetchall() if cur.description else []
        conn.commit()
        return result
    finally:
        conn.close()
