"""Retention by day partitions with a Parquet archive (issue 23), on the real PostgreSQL: ten days of
trades, flags, alerts, late trades and dead letters; `maintain` with a 3-day retention archives and
drops the six oldest days of each; archive + database hold every row exactly once; a kill -9
after each step is finished by the next run; a re-delivered trade is never doubled, and one re-sent
with another timestamp is a second row that `maintain` reports."""
from __future__ import annotations

import os
import subprocess
import sys
from datetime import datetime, timedelta, timezone

import pyarrow.parquet as pq
import pytest

from tests.conftest import query
from tradewatch.alerts import alerts_for
from tradewatch.config import PROJECT_ROOT
from tradewatch.detect.rules import Detection
from tradewatch.events import Trade
from tradewatch.store import db, detections
from tradewatch.store.writer import DeadLetter, copy_line, write_batch, write_dead_letters

START = datetime(2013, 10, 1, tzinfo=timezone.utc)
DAYS = 10
TABLES = ("trades", "trade_flags", "alerts", "dead_letters")


def load(settings) -> list[Trade]:
    start_ms = int(START.timestamp() * 1000)
    trades = [Trade(f"t{i}", "SPY", start_ms + i * 3_600_000, 170.0, 10.0, "buy", "X") for i in range(DAYS * 24)]
    conn = db.connect(settings)
    try:
        with conn.cursor() as cur:
            write_batch(cur, [copy_line(t, 0, i) for i, t in enumerate(trades)], [])
            flagged = [Detection(t, None, ["PRICE_SPIKE"], 2.0) for t in trades[::6]]
            detections.write_flags(cur, flagged, "test")
            detections.write_alerts(cur, [(0, a) for d in flagged for a in alerts_for(d)], webhook=False)
            write_dead_letters(cur, [DeadLetter("trades", 0, 10_000 + i, b"SPY", b"not json", "not JSON", t.timestamp_ms)
                                     for i, t in enumerate(trades[::12])])
        conn.commit()
    finally:
        conn.close()
    return trades


def maintain(settings, *args: str, crash_after: str = "", days: int = 3) -> subprocess.CompletedProcess:
    env = {**os.environ, **settings.as_env(), "TRADEWATCH_MAINTAIN_CRASH_AFTER": crash_after,
           **{f"RETENTION_DAYS_{t.upper()}": str(days) for t in (*TABLES, "late_trades")}}
    return subprocess.run([sys.executable, "-m", "tradewatch", "maintain", *args], cwd=PROJECT_ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def archived_ids(settings, table: str, column: str) -> list:
    found = []
    for part in sorted((settings.home / "archive" / table).glob("date=*/part-*.parquet")):
        found += pq.read_table(part, columns=[column]).column(column).to_pylist()
    return found


@pytest.fixture
def archive_home(settings, tmp_path):
    return settings.with_overrides(tradewatch_home=str(tmp_path / "home"))


def test_expired_days_are_archived_verified_and_dropped_and_every_row_is_in_one_place(archive_home):
    settings = archive_home
    trades = load(settings)
    before = {t: query(settings, f"SELECT count(*) FROM {t}")[0][0] for t in TABLES}

    out = maintain(settings, "--dry-run")
    assert out.returncode == 0, out.stderr
    # the newest row is at 23:00 of day ten; a day goes once it ended 3 days before that: days one to six
    assert out.stdout.count("would archive") == 4 * 6, out.stdout
    assert {t: query(settings, f"SELECT count(*) FROM {t}")[0][0] for t in TABLES} == before, "a dry run changes nothing"
    assert not (settings.home / "archive").exists()

    for step in ("write", "record", "detach"):       # killed after each step, then run again
        assert maintain(settings, crash_after=step).returncode == 9
    out = maintain(settings)
    assert out.returncode == 0, out.stderr

    newest = START + timedelta(hours=DAYS * 24 - 1)
    kept_from = (newest - timedelta(days=3)).replace(hour=0)          # whole days of the last three
    stored = [r[0] for r in query(settings, "SELECT trade_id FROM trades")]
    archived = archived_ids(settings, "trades", "trade_id")
    assert sorted(stored + archived) == sorted(t.trade_id for t in trades), "every trade once, db or archive"
    assert not set(stored) & set(archived)
    assert query(settings, "SELECT min(ts) FROM trades")[0][0] == kept_from
    for table, column in (("trade_flags", "trade_id"), ("alerts", "alert_id"), ("dead_letters", "kafka_offset")):
        total = query(settings, f"SELECT count(*) FROM {table}")[0][0] + len(archived_ids(settings, table, column))
        assert total == before[table], table
    names = [r[0] for r in query(settings, "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
                                           " WHERE i.inhparent = 'trades'::regclass ORDER BY 1")]
    assert names[0] == f"trades_p{kept_from:%Y%m%d}" and f"trades_p{START:%Y%m%d}" not in names
    days = sorted(p.name for p in (settings.home / "archive" / "trades").iterdir())
    assert days == [f"date={(START + timedelta(days=d)).date()}" for d in range(6)]
    assert maintain(settings).stdout.startswith("0 day(s)"), "nothing more to do"
    report = subprocess.run([sys.executable, "report.py", "--date", "2013-10-02", "--out", str(settings.home / "r")],
                            cwd=PROJECT_ROOT, env={**os.environ, **settings.as_env()}, capture_output=True, text=True,
                            timeout=120)
    assert report.returncode == 1 and "the trades of 2013-10-02 are archived" in report.stderr, report.stderr


def test_a_redelivered_trade_is_never_doubled_and_one_resent_with_another_time_is_reported(archive_home):
    settings = archive_home
    trade = Trade("same", "SPY", int(START.timestamp() * 1000), 170.0, 10.0, "buy", "X")
    later = Trade("same", "SPY", trade.timestamp_ms + 5 * 86_400_000, 170.0, 10.0, "buy", "X")
    conn = db.connect(settings)
    try:
        for batch in ([trade], [trade], [later]):          # the same trade delivered twice, then re-sent later
            with conn.cursor() as cur:
                result = write_batch(cur, [copy_line(t, 0, 0) for t in batch], [])
            conn.commit()
    finally:
        conn.close()
    assert result.trades_inserted == 1
    assert query(settings, "SELECT count(*) FROM trades WHERE trade_id = 'same'")[0][0] == 2, "two timestamps: two rows"
    out = maintain(settings, days=30)
    assert out.returncode == 0 and "1 trade_ids stored more than once with different timestamps (e.g. same)" \
        in out.stdout, out.stdout + out.stderr
