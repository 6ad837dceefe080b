"""Shared fixtures. Integration tests run against a real Kafka broker and PostgreSQL server that
this suite starts on its own ports and data directory (.tradewatch/test), so a running demo is
never touched. Set TRADEWATCH_KEEP_SERVICES=1 to leave them running after the suite."""
from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests import processes
from tradewatch.config import PROJECT_ROOT, Settings, shared_data_dir

SHARED_DATA = shared_data_dir()


def make_test_settings() -> Settings:
    return Settings.load(
        tradewatch_home=".tradewatch/test",
        kafka_bootstrap_servers="127.0.0.1:29092",
        kafka_controller_port=29093,
        postgres_port=25432,
        trades_partitions=6,
    )


@pytest.fixture(scope="session")
def services() -> Settings:
    from tradewatch import stack

    settings = make_test_settings()
    stack.start(settings)
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
                                    consumer_group=f"group-{tag}", aggregator_group=f"aggregator-{tag}",
                                    detector_group=f"detector-{tag}")
    bus.ensure_topic(fresh, fresh.trades_topic, fresh.trades_partitions)
    empty_tables(fresh)
    return fresh


def empty_tables(settings: Settings) -> None:
    from tradewatch.store import db

    with db.connect(settings) as conn, conn.cursor() as cur:
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
    process = subprocess.Popen([sys.executable, str(PROJECT_ROOT / script), *args], cwd=PROJECT_ROOT,
                               env={**os.environ, **settings.as_env(), **(env or {})}, stdout=out,
                               stderr=subprocess.STDOUT)
    _STARTED.append(process)
    return process


def pytest_configure(config):
    # a plugin, not conftest hooks: those never see session fixtures (their node is above tests/)
    config.pluginmanager.register(GUARD, "tradewatch-process-guard")


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
