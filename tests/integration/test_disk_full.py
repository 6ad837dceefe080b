"""A small disk for the data folder (issue 40): TRADEWATCH_HOME on a 200 MB tmpfs this test mounts —
Kafka's log, PostgreSQL's data folder and the Parquet archive in it — and the real consumer storing
a feed that would overfill it.

With the size bound (STORAGE_MAX_GB; and the disk's low line, which a disk this small is always
below) and `maintain` beside the consumer, 300,000 trades over six days end with the bound held,
the five oldest days archived and dropped early, every trade once in the database or the archive,
and the consumer never stopped.

Then with the bound off, 150,000 more trades in Kafka and another program's file leaving the disk
10 MB, the consumer fills it: PostgreSQL refuses each write that needs a new block (or stops, if
its WAL cannot grow); the demo's watch names it "full · no space left on device" (or down, failed) in the state file, on the
page and in `doctor`, the waiting consumer's log says why, and once the file is removed writes go on
and every trade is stored exactly once, by the same consumer."""
from __future__ import annotations

import os
import shutil
import subprocess
from datetime import datetime, timedelta, timezone

import pyarrow.parquet as pq
import pytest
import streamlit as st
from streamlit.testing.v1 import AppTest

from tests.conftest import query, start_script, wait_for, wait_for_progress
from tests.integration.test_soak import publish
from tests.integration.test_stack import lock_home
from tradewatch import disk, doctor, maintain, services, stack
from tradewatch.config import PROJECT_ROOT
from tradewatch.demo import ServiceWatch
from tradewatch.events import Trade

DISK_MB = 300
DAYS = 6
TRADES = 300_000             # ~90 MB in PostgreSQL, ~60 MB in Kafka: with the WAL, more than the disk holds
MORE = 150_000               # the second feed: ~45 MB in PostgreSQL
RATE = 10_000.0              # trades a second: a fast feed, not a burst
BOUND_GB = 0.05
LEFT_MB = 10                 # what another program's file leaves free for the second feed
SYMBOLS = [f"S{i:02d}" for i in range(20)]


def feed(prefix: str, start: datetime, end: datetime, count: int) -> list[Trade]:
    start_ms, step = int(start.timestamp() * 1000), (end - start).total_seconds() * 1000 / count
    return [Trade(f"{prefix}{i}", SYMBOLS[i % len(SYMBOLS)], start_ms + int(i * step), 100.0 + i % 7 * 0.01, 10.0,
                  "buy", "X") for i in range(count)]


def archived_trades(settings) -> list[str]:
    """trade_ids in the archive's recorded files (maintain.archived: a file without its record is not
    part of it)."""
    found = []
    for _, files in maintain.archived(settings, "trades", "ts"):
        for file in files:
            found += pq.read_table(file, columns=["trade_id"]).column("trade_id").to_pylist()
    return found


def stored(settings) -> list[str]:
    return [r[0] for r in query(settings, "SELECT trade_id FROM trades")]


def every_trade_once(settings, trades: list[Trade]) -> bool:
    try:
        return sorted(stored(settings) + archived_trades(settings)) == sorted(t.trade_id for t in trades)
    except Exception:  # noqa: BLE001 - PostgreSQL on its way back: not yet
        return False


def count(settings) -> int:
    try:
        return query(settings, "SELECT count(*) FROM trades")[0][0] + len(archived_trades(settings))
    except Exception:  # noqa: BLE001 - PostgreSQL down: no progress
        return 0


@pytest.fixture
def small_disk():
    settings = lock_home("disk")
    settings.home.mkdir(parents=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK_MB}m,mode=0755", "tmpfs", str(settings.home)],
                             capture_output=True, text=True)
    assert mounted.returncode == 0, f"this test mounts a {DISK_MB} MB tmpfs for the data folder: {mounted.stderr}"
    try:
        yield settings
    finally:
        stack.stop(settings)
        subprocess.run(["umount", str(settings.home)], capture_output=True)
        shutil.rmtree(settings.home, ignore_errors=True)


def test_a_small_disk_holds_its_bound_and_a_full_one_is_named_and_resumed_exactly_once(small_disk, tmp_path,
                                                                                      monkeypatch):
    settings = small_disk
    stack.start(settings)
    assert query(settings, "SHOW max_wal_size")[0][0] == "64MB", "the WAL sized to the disk (stack.wal_size_mb)"
    now = datetime.now(timezone.utc) - timedelta(minutes=1)
    newest_day = now.replace(hour=0, minute=0, second=0, microsecond=0)
    first = feed("a", newest_day - timedelta(days=DAYS - 1), now, TRADES)
    consumer = start_script(settings, "consumer.py", log=tmp_path / "consumer.log")
    keeper = start_script(settings, "-m", "tradewatch", "maintain", "--every", "5", log=tmp_path / "maintain.log",
                          env={"STORAGE_MAX_GB": str(BOUND_GB)})
    publish(settings, first, per_second=RATE)
    wait_for_progress(lambda: count(settings), TRADES, message="the first feed stored or archived",
                      details=lambda: (tmp_path / "consumer.log").read_text()[-3000:])
    wait_for(lambda: every_trade_once(settings, first), timeout=60, message="every trade once")
    wait_for(lambda: query(settings, "SELECT min(ts) FROM trades")[0][0] >= newest_day, timeout=60,
             message="only the newest day left in the database")
    assert every_trade_once(settings, first)
    archive_days = sorted(p.name for p in (settings.home / "archive" / "trades").iterdir())
    assert archive_days == [f"date={(newest_day - timedelta(days=d)).date()}" for d in range(DAYS - 1, 0, -1)]
    held = query(settings, "SELECT pg_database_size(current_database())")[0][0] + disk.archive_bytes(settings.home)
    assert held <= BOUND_GB * 1024**3, f"{held / 1024**2:.1f} MiB stored, the bound is {BOUND_GB} GiB"
    maintained = (tmp_path / "maintain.log").read_text()
    assert "partition dropped, before its time: " in maintained and "below the line" in maintained, maintained
    server_log = (settings.home / "postgres" / "server.log").read_text()
    assert "No space left on device" not in server_log, server_log[-2000:]
    assert consumer.poll() is None and keeper.poll() is None, "no stage exited"
    keeper.terminate()
    keeper.wait(30)

    # the bound off (no maintain): a second feed waits in Kafka, then another program's file leaves
    # the disk LEFT_MB, and the consumer starts storing it
    consumer.terminate()
    consumer.wait(60)
    second = feed("b", now - timedelta(minutes=50), now, MORE)
    publish(settings, second)
    watch = ServiceWatch(settings)
    watch.check()
    filler = settings.home / "another-programs-file"
    with open(filler, "wb") as out:
        os.posix_fallocate(out.fileno(), 0, disk.usage(settings.home).free - LEFT_MB * 1024**2)
    consumer = start_script(settings, "consumer.py", log=tmp_path / "consumer.log")

    def disk_full() -> bool:
        watch.check()
        state = watch.states["postgres"]
        return state.status in ("full", "down", "failed") and state.cause.startswith("no space left on device")
    wait_for(disk_full, timeout=120, interval=0.5, message="PostgreSQL out of space, and named")
    state = services.read_states(settings)["postgres"]
    assert state.cause.startswith("no space left on device") and "STORAGE_MAX_GB" in state.fix, state
    print(f"PostgreSQL {state.status}: {state.cause} ({state.evidence[:200]})")
    [check, *_] = doctor.check_postgres(settings)
    assert not check.ok and "no space left on device" in check.detail and "free space" in check.fix, check
    for key, value in settings.as_env().items():
        monkeypatch.setenv(key, value)
    st.cache_data.clear()
    st.cache_resource.clear()
    page = AppTest.from_file(str(PROJECT_ROOT / "dashboard.py"), default_timeout=60).run()
    strip = [m.value for m in page.markdown if m.value.startswith("**Pipeline**")]
    assert strip and f"postgres {state.status} · no space left on device" in strip[0], strip
    if state.status != "full":          # stopped: the page's database error names it too
        assert any("no space left on device" in e.value for e in page.error), [e.value for e in page.error]
    assert "No space left on device" in (tmp_path / "consumer.log").read_text(), "the consumer's log says why it waits"
    assert consumer.poll() is None, "the consumer waits"

    filler.unlink()

    def back() -> bool:
        watch.check()
        return watch.states["postgres"].status == "up"
    wait_for(back, timeout=120, interval=0.5, message="PostgreSQL back once there is room")
    watch.close()
    wait_for_progress(lambda: count(settings), TRADES + MORE, message="the second feed stored after the outage",
                      details=lambda: (tmp_path / "consumer.log").read_text()[-3000:])
    wait_for(lambda: every_trade_once(settings, first + second), timeout=60, message="every trade exactly once")
    assert consumer.poll() is None, "no stage exited"
