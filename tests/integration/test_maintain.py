"""Retention by partitions with a Parquet archive (issue 23), on the real PostgreSQL: ten recent days
of trades, flags, alerts, late trades and dead letters; `maintain` with a 3-day retention archives
and drops the six oldest days of each; archive + database hold every row exactly once; a kill -9
after each step is finished by the next run; a re-delivered trade is never doubled, and one re-sent
with another timestamp is a second row that `maintain` reports. Days far from today share a year
partition, so a sender spreading trades over decades cannot make a partition per day."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime, timedelta, timezone

import pyarrow.parquet as pq
import pytest

from tests.conftest import query, scratch_database, wait_for
from tradewatch.alerts import alerts_for
from tradewatch.config import PROJECT_ROOT
from tradewatch.detect.evidence import Evidence, trades_named
from tradewatch.detect.rules import Detection
from tradewatch.events import Trade
from tradewatch.store import db, detections, queries
from tradewatch.store.writer import DeadLetter, copy_row, write_batch, write_dead_letters

# recent days are day partitions (schema.sql): the ten days end two days ago
START = datetime.now(timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0) - timedelta(days=12)
DAYS = 10
TABLES = ("trades", "trade_flags", "alerts", "dead_letters")


def flagged(t: Trade) -> Detection:
    """A trade flagged PRICE_SPIKE, with the evidence every alert carries."""
    d = Detection(t, None)
    d.flag("PRICE_SPIKE", 2.0, Evidence("PRICE_SPIKE", {}, "price", t.price, t.price, "a test's", 0.0, 5.0, "test",
                                        "%", "a test's spike", trades_named(t.trade_id, [], None, t.timestamp_ms)))
    return d


def load(settings) -> list[Trade]:
    start_ms = int(START.timestamp() * 1000)
    trades = [Trade(f"t{i}", "SPY", start_ms + i * 3_600_000, 170.0, 10.0, "buy", "X") for i in range(DAYS * 24)]
    # and 6,000 more on the first day: the sum of their event times in µs is past an int64 (the
    # checksum once overflowed there, and no day could be dropped)
    trades += [Trade(f"b{i}", "SPY", start_ms + 1 + i, 170.0, 1.0, "sell", "X") for i in range(6_000)]
    conn = db.connect(settings)
    try:
        with conn.cursor() as cur:
            write_batch(cur, [copy_row(t, 0, i) for i, t in enumerate(trades)], [])
            spikes = [flagged(t) for t in trades[::6]]
            detections.write_flags(cur, spikes, "test")
            detections.write_alerts(cur, [(0, a) for d in spikes for a in alerts_for(d)])
            write_dead_letters(cur, [DeadLetter("trades", 0, 10_000 + i, b"SPY", b"not json", "not JSON", t.timestamp_ms)
                                     for i, t in enumerate(trades[::12])])
        conn.commit()
    finally:
        conn.close()
    return trades


def maintain(settings, *args: str, crash_after: str = "", days: int = 3,
             alert_days: int = 365, **more: str) -> subprocess.CompletedProcess:
    env = {**os.environ, **settings.as_env(), "TRADEWATCH_MAINTAIN_CRASH_AFTER": crash_after,
           **{f"RETENTION_DAYS_{t.upper()}": str(days) for t in (*TABLES, "late_trades")},
           "RETENTION_DAYS_ALERTS": str(alert_days), **more}
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
    # (of trades, flags and dead letters; alerts are kept by month, a year: none goes)
    assert out.stdout.count("would archive") == 3 * 6, out.stdout
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
    second_day = (START + timedelta(days=1)).date().isoformat()
    report = subprocess.run([sys.executable, "report.py", "--date", second_day, "--out", str(settings.home / "r")],
                            cwd=PROJECT_ROOT, env={**os.environ, **settings.as_env()}, capture_output=True, text=True,
                            timeout=120)
    assert report.returncode == 1 and f"the trades of {second_day} are archived" in report.stderr, report.stderr


def stored_once(settings, trades: list[Trade]) -> list:
    """The trade_ids in the database, after checking that database and archive hold each once."""
    stored = [r[0] for r in query(settings, "SELECT trade_id FROM trades")]
    assert sorted(stored + archived_ids(settings, "trades", "trade_id")) == sorted(t.trade_id for t in trades)
    return stored


def test_past_the_size_bound_the_oldest_days_go_early_and_the_newest_day_stays(archive_home):
    """STORAGE_MAX_GB (issue 40): nothing has expired by age (30 days), but the database is over a
    bound of a kilobyte: every day but each table's newest is archived and dropped early, the one
    furthest through its retention first (the trades' first day: 20 days kept, the others 30), each
    saying why; what is left over the bound is said with what to do. With the bound off, nothing."""
    settings = archive_home
    trades = load(settings)
    before = {t: query(settings, f"SELECT count(*) FROM {t}")[0][0] for t in TABLES}
    off = maintain(settings, days=30, STORAGE_MAX_GB="0")
    assert off.returncode == 0 and "before its time" not in off.stdout, off.stdout
    tight = {"STORAGE_MAX_GB": "0.000001", "RETENTION_DAYS_TRADES": "20"}
    dry = maintain(settings, "--dry-run", days=30, **tight)
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.startswith(f"trades {START.date()}: would archive 6,024 rows"), dry.stdout
    assert {t: query(settings, f"SELECT count(*) FROM {t}")[0][0] for t in TABLES} == before, "a dry run: no change"

    out = maintain(settings, days=30, **tight)
    assert out.returncode == 0, out.stderr
    early = [line for line in out.stdout.splitlines() if "before its time" in line]
    assert early[0].startswith(f"trades {START.date()}: archived 6,024 rows"), out.stdout
    assert all("take more than STORAGE_MAX_GB (1e-06 GiB)" in line for line in early), early
    newest_day = START + timedelta(days=DAYS - 1)
    for table, key in (("trades", "ts"), ("trade_flags", "ts"), ("dead_letters", "sent_at")):
        assert query(settings, f"SELECT min({key}) FROM {table}")[0][0] == newest_day, f"{table} keeps its newest day"
        assert len([line for line in early if line.startswith(f"{table} ")]) == DAYS - 1, out.stdout
    newest_ms = newest_day.timestamp() * 1000
    assert set(stored_once(settings, trades)) == {t.trade_id for t in trades if t.timestamp_ms >= newest_ms}
    for table, column in (("trade_flags", "trade_id"), ("alerts", "alert_id"), ("dead_letters", "kafka_offset")):
        total = query(settings, f"SELECT count(*) FROM {table}")[0][0] + len(archived_ids(settings, table, column))
        assert total == before[table], table
    assert "storage: still the database" in out.stdout and "raise STORAGE_MAX_GB" in out.stdout, out.stdout


def test_a_low_disk_takes_the_oldest_days_early_without_a_bound(archive_home, monkeypatch):
    """Below the free-disk line (tradewatch/disk.py: the one doctor and the health strip use) the
    oldest days go early even with STORAGE_MAX_GB off, and the line is named."""
    from tradewatch import disk
    from tradewatch import maintain as maintenance
    settings = archive_home.with_overrides(storage_max_gb=0, **{f"retention_days_{t}": 30 for t in TABLES})
    trades = load(settings)
    said: list[str] = []
    conn = db.connect(settings)
    try:
        assert maintenance.bound(conn, settings, out=said.append) == 0 and not said, "the disk here is not low"
        monkeypatch.setattr(disk, "LOW_FREE_BYTES", disk.usage(settings.home).total + 1)
        assert maintenance.bound(conn, settings, out=said.append) >= 3 * (DAYS - 1)
    finally:
        conn.close()
    assert "GiB free" in said[0] and "below the line of 10% or" in said[0], said[0]
    assert said[-1].startswith("storage: still") and "free disk" in said[-1]
    newest_day = START + timedelta(days=DAYS - 1)
    assert query(settings, "SELECT min(ts) FROM trades")[0][0] == newest_day
    stored_once(settings, trades)


def test_a_column_empty_in_the_first_chunk_keeps_its_type_in_the_archive(archive_home, monkeypatch):
    """The archive is written a chunk at a time and Parquet takes its column types from the first:
    a column NULL all through it (trades without bid and ask, then a feed that sends them) once
    became Arrow's null type, and the first bid in a later chunk failed the whole day."""
    from tradewatch import maintain as maintenance
    settings = archive_home
    start_ms = int(START.timestamp() * 1000)
    trades = [Trade(f"q{i}", "SPY", start_ms + i, 170.0, 1.0, "buy", "X", *((169.9, 170.1) if i >= 3 else ()))
              for i in range(6)]
    with db.connect(settings) as conn, conn.cursor() as cur:
        write_batch(cur, [copy_row(t, 0, i) for i, t in enumerate(trades)], [])
        day = next(d for d in maintenance.day_partitions(cur, "trades", "ts") if d.day == START.date())
        rows, checksum = maintenance.measure(cur, day)
    monkeypatch.setattr(maintenance, "CHUNK_ROWS", 3)
    record = maintenance.archive(conn, settings, day, rows, checksum)
    conn.close()
    table = pq.read_table(maintenance.folder(settings, day) / record["file"]).sort_by("trade_id")
    assert table.schema.field("bid").type == "double" and table.schema.field("condition").type == "string"
    assert table.column("bid").to_pylist() == [None] * 3 + [169.9] * 3


def test_a_redelivered_trade_is_never_doubled_and_one_resent_with_another_time_is_reported(archive_home):
    settings = archive_home
    trade = Trade("same", "SPY", int(START.timestamp() * 1000), 170.0, 10.0, "buy", "X")
    later = Trade("same", "SPY", trade.timestamp_ms + 5 * 86_400_000, 170.0, 10.0, "buy", "X")
    conn = db.connect(settings)
    try:
        for batch in ([trade], [trade], [later]):          # the same trade delivered twice, then re-sent later
            with conn.cursor() as cur:
                result = write_batch(cur, [copy_row(t, 0, 0) for t in batch], [])
            conn.commit()
    finally:
        conn.close()
    assert result.trades_inserted == 1
    assert query(settings, "SELECT count(*) FROM trades WHERE trade_id = 'same'")[0][0] == 2, "two timestamps: two rows"
    out = maintain(settings, days=30)
    assert out.returncode == 0 and "1 trade_ids stored more than once with different timestamps (e.g. same)" \
        in out.stdout, out.stdout + out.stderr
    # hours later: a pass looks only at the trades stored since the last one (not every stored trade)
    query(settings, "UPDATE trades SET ingested_at = ingested_at - interval '3 hours'")
    query(settings, "UPDATE maintain_checks SET checked_to = checked_to - interval '2 hours'")
    out = maintain(settings, days=30)
    assert out.returncode == 0 and "stored more than once" not in out.stdout, out.stdout
    again = Trade("again", "SPY", trade.timestamp_ms + 60_000, 170.0, 10.0, "buy", "X")
    moved = Trade("again", "SPY", again.timestamp_ms + 86_400_000, 170.0, 10.0, "buy", "X")
    conn = db.connect(settings)
    try:
        with conn.cursor() as cur:
            cur.execute("INSERT INTO trades (trade_id, symbol, ts, price, quantity, side, exchange, schema_version,"
                        " ingested_at) VALUES ('again', 'SPY', %s, 170, 10, 'buy', 'X', 1, now() - interval '1 day')",
                        (datetime.fromtimestamp(again.timestamp_ms / 1000, timezone.utc),))
            write_batch(cur, [copy_row(moved, 0, 1)], [])      # the old one stored long ago, re-sent now
        conn.commit()
    finally:
        conn.close()
    out = maintain(settings, days=30)
    assert out.returncode == 0 and "1 trade_ids stored more than once with different timestamps (e.g. again)" \
        in out.stdout, out.stdout + out.stderr


def test_a_database_made_before_partitioning_keeps_its_rows(settings):
    """An existing installation: its plain tables are copied into the partitioned ones, once."""
    with scratch_database(settings, f"tw_upgrade_{os.getpid()}") as old:
        with db.connect(old) as conn, conn.cursor() as cur:      # the tables as they were
            cur.execute("""
                CREATE TABLE trades (trade_id text PRIMARY KEY, symbol text NOT NULL, ts timestamptz NOT NULL,
                    price double precision NOT NULL, quantity double precision NOT NULL, side text NOT NULL,
                    exchange text NOT NULL, bid double precision, ask double precision, condition text,
                    schema_version smallint NOT NULL, injected_anomaly text, kafka_partition integer,
                    kafka_offset bigint, ingested_at timestamptz NOT NULL DEFAULT now());
                CREATE INDEX trades_symbol_ts ON trades (symbol, ts);
                CREATE TABLE dead_letters (id bigserial PRIMARY KEY, received_at timestamptz NOT NULL DEFAULT now(),
                    topic text NOT NULL, kafka_partition integer NOT NULL, kafka_offset bigint NOT NULL,
                    message_key bytea, raw bytea, reason text NOT NULL, UNIQUE (topic, kafka_partition, kafka_offset));
                INSERT INTO trades VALUES ('a', 'SPY', '2013-10-07 13:30:00+00', 170, 1, 'buy', 'X', NULL, NULL, NULL, 1,
                                           NULL, 0, 0), ('b', 'SPY', '2013-10-08 13:30:00+00', 171, 1, 'sell', 'X',
                                           NULL, NULL, NULL, 1, NULL, 0, 1);
                INSERT INTO dead_letters (topic, kafka_partition, kafka_offset, raw, reason)
                    VALUES ('trades', 0, 7, 'x', 'not JSON');
                CREATE TABLE indicators (symbol text NOT NULL, window_size text NOT NULL,
                    window_start timestamptz NOT NULL, close double precision NOT NULL, sma_20 double precision,
                    PRIMARY KEY (symbol, window_size, window_start));
                INSERT INTO indicators VALUES ('SPY', '1m', '2013-10-07 13:30:00+00', 170, NULL),
                                              ('SPY', '5m', '2013-10-07 13:30:00+00', 170, 169.5);""")
        conn.close()
        db.apply_schema(old)
        with db.connect(old) as conn, conn.cursor() as cur:
            cur.execute("SELECT relkind FROM pg_class WHERE relname IN ('trades', 'dead_letters') ORDER BY relname")
            assert [r[0] for r in cur.fetchall()] == ["p", "p"]
            cur.execute("SELECT trade_id, tableoid::regclass::text FROM trades ORDER BY 1")
            assert cur.fetchall() == [("a", "trades_y2013"), ("b", "trades_y2013")]      # far from today: a year
            cur.execute("SELECT symbol, trade_id FROM latest_trades")
            assert cur.fetchall() == [("SPY", "b")], "the copied trades keep /latest"
            cur.execute("SELECT kafka_offset, reason, sent_at = received_at FROM dead_letters")
            assert cur.fetchall() == [(7, "not JSON", True)]
            cur.execute("SELECT window_size, sma_20, tableoid::regclass::text FROM indicators ORDER BY 1")
            assert cur.fetchall() == [("1m", None, "indicators_1m_y2013"), ("5m", 169.5, "indicators_5m_y2013")]
            cur.execute("SELECT to_regclass('trades_unpartitioned'), to_regclass('dead_letters_unpartitioned'),"
                        " to_regclass('indicators_unpartitioned')")
            assert cur.fetchone() == (None, None, None)
        conn.close()


def partition_names(settings, table: str) -> list[str]:
    return [r[0] for r in query(settings, "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
                                          " WHERE i.inhparent = %s::regclass ORDER BY 1", (table,))]


def write_alerts_at(settings, days_ago: list[int]) -> list[str]:
    now = datetime.now(timezone.utc)
    trades = [Trade(f"a{d}", "SPY", int((now - timedelta(days=d)).timestamp() * 1000), 170.0, 1.0, "buy", "X")
              for d in days_ago]
    alerts = [a for t in trades for a in alerts_for(flagged(t))]
    conn = db.connect(settings)
    try:
        with conn.cursor() as cur:
            detections.write_alerts(cur, [(0, a) for a in alerts])
        conn.commit()
    finally:
        conn.close()
    return [a.alert_id for a in alerts]


def test_alerts_are_kept_by_month_and_dropped_by_whole_months(archive_home):
    """Alerts are few and kept a year: by day that is 366 partitions, and every query of alerts
    plans over each (6 ms at 22 day partitions for the API's newest 100, the query itself 0.7 ms).
    By month: 13. A month goes once it ended the retention before the newest alert."""
    settings = archive_home
    ids = write_alerts_at(settings, [130, 100, 70, 40, 10, 9])
    engine = queries.engine_for(settings.sqlalchemy_url)
    for alert_id in ids:                   # a verdict on each: its history goes with its alert
        detections.set_disposition(engine, alert_id, "false_positive", "noise", "ana", "api")
    engine.dispose()
    names = partition_names(settings, "alerts")
    assert names and all(n.startswith("alerts_m") for n in names), names
    assert len(names) <= 5
    out = maintain(settings, alert_days=30)
    assert out.returncode == 0, out.stderr
    newest = datetime.now(timezone.utc) - timedelta(days=9)
    cutoff = newest - timedelta(days=30)
    first_kept = cutoff.replace(day=1, hour=0, minute=0, second=0, microsecond=0)   # its month stays
    stored = [r[0] for r in query(settings, "SELECT alert_id FROM alerts")]
    archived = archived_ids(settings, "alerts", "alert_id")
    assert sorted(stored + archived) == sorted(ids) and not set(stored) & set(archived)
    assert archived, "the oldest months are archived"
    assert query(settings, "SELECT min(ts) FROM alerts")[0][0] >= first_kept
    evidence = [json.loads(e) for e in archived_ids(settings, "alerts", "evidence")]   # as JSON text
    assert [e["sentence"] for e in evidence] == ["a test's spike"] * len(archived)
    assert sorted(r[0] for r in query(settings, "SELECT alert_id FROM alert_dispositions")) == sorted(stored)
    assert archived_ids(settings, "alerts", "disposition") == ["false_positive"] * len(archived)
    assert {p.name for p in (settings.home / "archive" / "alerts").iterdir()} == {
        f"date={n[8:12]}-{n[12:14]}" for n in set(names) - set(partition_names(settings, "alerts"))}


def test_a_month_that_already_has_day_partitions_goes_on_by_day(archive_home):
    """A database from before kept alerts by day: the month it is in goes on by day (a month
    partition would overlap them); the next month is one partition."""
    from tradewatch.store import partitions
    settings = archive_home
    month = (datetime.now(timezone.utc) - timedelta(days=70)).replace(day=3)
    with db.connect(settings) as conn, conn.cursor() as cur:
        cur.execute("SELECT tw_ensure_partition('alerts', %s, 'day')", (month.date(),))
    conn.close()
    days_ago = (datetime.now(timezone.utc) - month).days
    write_alerts_at(settings, [days_ago, days_ago - 10, 10])
    names = partition_names(settings, "alerts")
    later = datetime.now(timezone.utc) - timedelta(days=10)
    assert f"alerts_p{month:%Y%m}03" in names and f"alerts_p{month:%Y%m}13" in names, names
    assert f"alerts_m{later:%Y%m}" in names and not any(n.startswith(f"alerts_m{month:%Y%m}") for n in names)
    assert partitions.UNIT["alerts"] == "month"
    assert query(settings, "SELECT count(*) FROM alerts")[0][0] == 3


def test_days_far_from_today_share_a_year_and_a_wrong_clock_expires_nothing(archive_home):
    """5,000 trades spread over 1990 to today (as the fuzz test sends) make one partition for each
    year before the last 400 days, not one a day; a dead letter whose Kafka time is past year 9999 is stored (clamped);
    a trade stamped in 2400 does not make the recent days expire."""
    import random
    settings = archive_home
    rng = random.Random(5)
    now_ms = int(datetime.now(timezone.utc).timestamp() * 1000)
    spread = [Trade(f"s{i}", "SPY", rng.randint(631_152_000_000, now_ms), 10.0, 1.0, "buy", "X") for i in range(5_000)]
    recent = [Trade(f"r{i}", "SPY", now_ms - i * 3_600_000, 10.0, 1.0, "buy", "X") for i in range(48)]
    wrong = Trade("far", "SPY", int(datetime(2400, 1, 1, tzinfo=timezone.utc).timestamp() * 1000), 10.0, 1.0, "buy", "X")
    conn = db.connect(settings)
    try:
        with conn.cursor() as cur:
            write_batch(cur, [copy_row(t, 0, i) for i, t in enumerate(spread + recent + [wrong])], [])
            write_dead_letters(cur, [DeadLetter("trades", 0, 1, None, b"x", "not JSON", 300_000_000_000_000)])
        conn.commit()
    finally:
        conn.close()
    names = partition_names(settings, "trades")
    years = [n for n in names if n.startswith("trades_y")]
    days = [n for n in names if n.startswith("trades_p")]
    assert "trades_y2400" in years and "trades_y1990" in years
    this_year = datetime.now(timezone.utc).year
    assert all(n[8:12] in (str(this_year), str(this_year - 1)) for n in days), days
    assert len(years) <= this_year - 1990 + 1, years
    assert query(settings, "SELECT count(*) FROM trades")[0][0] == len(spread) + len(recent) + 1
    assert query(settings, "SELECT extract(year FROM sent_at)::int FROM dead_letters")[0][0] == 9999

    out = maintain(settings, days=3)
    assert out.returncode == 0, out.stderr
    # retention counts back from now (the 2400 trade is newer than now): the last three days stay
    kept = {r[0] for r in query(settings, "SELECT trade_id FROM trades")}
    assert {t.trade_id for t in recent if t.timestamp_ms > now_ms - 2 * 86_400_000} <= kept
    assert not any(i.startswith("s") and t.timestamp_ms < now_ms - 40 * 86_400_000
                   for t in spread for i in (t.trade_id,) if i in kept), "the old years are archived"
    archived = archived_ids(settings, "trades", "trade_id")
    assert sorted(archived + list(kept)) == sorted(t.trade_id for t in spread + recent + [wrong])
    assert (settings.home / "archive" / "trades" / "date=1990").is_dir()


def test_candles_are_kept_by_window_size_and_dropped_by_whole_months(archive_home):
    """1-minute candles and their indicators go after RETENTION_DAYS_MINUTE_CANDLES (here 30), longer
    ones after RETENTION_DAYS_CANDLES (here 400): a month at a time, archived first."""
    from tradewatch.store.candles import indicator_rows, new_series, write_indicators, write_windows
    from tradewatch.volatility import Forecasters
    from tradewatch.windows import Window, parse_size, size_label
    settings = archive_home
    now_ms = int(datetime.now(timezone.utc).timestamp() * 1000)
    starts = [(now_ms - k * 30 * 86_400_000) // 300_000 * 300_000 for k in range(4)]      # this month … 3 back
    windows = []
    for size in ("1m", "5m"):
        for start in starts:
            w = Window("SPY", parse_size(size), start)
            w.add(Trade(f"{size}{start}", "SPY", start, 10.0, 1.0, "buy", "X"), 0)
            w.is_final = True
            windows.append(w)
    final = sorted((w.symbol, size_label(w.size_ms), w.start_ms, w.open, w.high, w.low, w.close, w.sum_quantity,
                    w.trade_count) for w in windows)
    conn = db.connect(settings)
    try:
        with conn.cursor() as cur:
            write_windows(cur, windows)
            write_indicators(cur, indicator_rows({("SPY", size): new_series(size) for size in ("1m", "5m")},
                                                 Forecasters(), final))
        conn.commit()
    finally:
        conn.close()
    assert {"stock_metrics_1m", "stock_metrics_5m"} <= set(partition_names(settings, "stock_metrics"))
    assert all(n.startswith("stock_metrics_1m_m") for n in partition_names(settings, "stock_metrics_1m"))

    env = {"RETENTION_DAYS_MINUTE_CANDLES": "30", "RETENTION_DAYS_CANDLES": "400"}
    out = subprocess.run([sys.executable, "-m", "tradewatch", "maintain"], cwd=PROJECT_ROOT, capture_output=True,
                         text=True, timeout=300, env={**os.environ, **settings.as_env(), **env})
    assert out.returncode == 0, out.stderr
    oldest_1m = query(settings, "SELECT min(window_start) FROM stock_metrics WHERE window_size = '1m'")[0][0]
    assert oldest_1m > datetime.fromtimestamp(starts[3] / 1000, timezone.utc), "three months back: gone"
    assert query(settings, "SELECT count(*) FROM stock_metrics WHERE window_size = '5m'")[0][0] == 4
    assert query(settings, "SELECT count(*) FROM indicators WHERE window_size = '5m'")[0][0] == 4
    for table in ("stock_metrics_1m", "indicators_1m"):
        kept = query(settings, f"SELECT count(*) FROM {table}")[0][0]
        assert kept + len(archived_ids(settings, table, "window_start")) == 4, table


def flink_upsert(settings, rows: list[tuple[str, datetime, float]]) -> None:
    """What Flink's JDBC sink sends (an upsert on the key), for 1-minute windows (symbol, start, close)."""
    with db.connect(settings) as conn, conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO flink_metrics (symbol, window_size, window_start, window_end, open, high, low, close, volume,"
            " traded_value, vwap, trade_count, avg_price, min_price, max_price, sum_price, avg_quantity, min_quantity,"
            " max_quantity, sum_quantity, buy_volume, sell_volume) VALUES (%s, '1m', %s, %s + interval '1 minute',"
            " %s, %s, %s, %s, 1, %s, %s, 1, %s, %s, %s, %s, 1, 1, 1, 1, 1, 0)"
            " ON CONFLICT (symbol, window_size, window_start) DO UPDATE SET close = EXCLUDED.close",
            [(s_, start, start, *[close] * 10) for s_, start, close in rows])
    conn.close()


def test_flink_windows_get_months_of_their_own_and_expire_with_the_minute_candles(archive_home):
    """Flink writes flink_metrics without making partitions first: what it writes lands in the
    DEFAULT partition, `maintain` moves it into months (a year far from today), and the months past
    RETENTION_DAYS_MINUTE_CANDLES are archived and dropped like the minute candles."""
    settings = archive_home
    env = {**os.environ, **settings.as_env(), "RETENTION_DAYS_MINUTE_CANDLES": "45"}

    def maintain_flink() -> str:
        out = subprocess.run([sys.executable, "-m", "tradewatch", "maintain"], cwd=PROJECT_ROOT, capture_output=True,
                             text=True, timeout=300, env=env)
        assert out.returncode == 0, out.stderr
        return out.stdout

    maintain_flink()         # the schema applied (it moves what an older database's default held), nothing else
    now = datetime.now(timezone.utc).replace(second=0, microsecond=0)
    starts, month = [], now.replace(day=1, hour=12, minute=0)
    for _ in range(3):                                            # noon on the 1st of the three months before
        month = (month - timedelta(days=1)).replace(day=1)
        starts.append(month)
    starts.append(datetime(2013, 10, 7, 13, 30, tzinfo=timezone.utc))
    flink_upsert(settings, [("IBM", start, 10.0) for start in starts])
    flink_upsert(settings, [("IBM", starts[0], 11.0)])           # a window written again: updated, not doubled
    assert query(settings, "SELECT count(*) FROM flink_metrics_default")[0][0] == len(starts)
    flink_upsert(settings, [("IBM", now, 10.0)])                 # this month's partition exists already
    assert query(settings, "SELECT tableoid::regclass::text FROM flink_metrics WHERE window_start = %s",
                 (now,))[0][0] == f"flink_metrics_m{now:%Y%m}"
    starts.append(now)

    out = maintain_flink()
    assert "4 rows moved from its default partition" in out, out
    assert query(settings, "SELECT count(*) FROM flink_metrics_default")[0][0] == 0
    names = partition_names(settings, "flink_metrics")
    assert f"flink_metrics_m{now:%Y%m}" in names and "flink_metrics_y2013" not in names, names
    kept = [r[0] for r in query(settings, "SELECT window_start FROM flink_metrics ORDER BY 1")]
    archived = archived_ids(settings, "flink_metrics", "window_start")
    assert sorted(kept + archived) == sorted(starts), "every window once, in the database or the archive"
    assert min(kept) >= now - timedelta(days=45 + 31) and datetime(2013, 10, 7, 13, 30, tzinfo=timezone.utc) in archived
    assert query(settings, "SELECT close FROM flink_metrics WHERE window_start = %s", (starts[0],))[0][0] == 11.0
    flink_upsert(settings, [("IBM", starts[0], 12.0)])           # its month's partition takes it now
    assert query(settings, "SELECT close, tableoid::regclass::text FROM flink_metrics WHERE window_start = %s",
                 (starts[0],))[0] == (12.0, f"flink_metrics_m{starts[0]:%Y%m}")


def test_a_partition_a_writer_is_about_to_fill_is_not_dropped_from_under_it(archive_home):
    """The soak test found 1,501 trades in dead_letters ('no partition of relation "trades" found
    for row'): maintain dropped an empty, expired day between a consumer's check that the day's
    partition exists and its COPY. Now a writer's check holds the partitions until it commits, and
    the drop waits for it (then sees the rows and keeps the day)."""
    import threading

    from tradewatch import maintain as maintenance
    from tradewatch.store import partitions
    settings = archive_home
    day_ms = int(START.timestamp() * 1000)
    old = Trade("old", "SPY", day_ms, 10.0, 1.0, "buy", "X")
    writer = db.connect(settings)
    with writer.cursor() as cur:                      # the day exists, empty, long expired
        partitions.ensure(cur, "trades", [partitions.day_of(day_ms)])
    writer.commit()
    cur = writer.cursor()
    partitions.ensure(cur, "trades", [partitions.day_of(day_ms)])      # a writer between check and write
    day = next(d for d in maintenance.day_partitions(cur, "trades", "ts") if d.day == START.date())
    dropped: list[bool] = []
    maintainer = db.connect(settings)
    thread = threading.Thread(target=lambda: dropped.append(maintenance.drop(maintainer, day, {"rows": 0, "checksum": 0})))
    thread.start()
    thread.join(2)
    assert thread.is_alive(), "the drop waits for the writer"
    write_batch(cur, [copy_row(old, 0, 0)], [])
    writer.commit()
    thread.join(30)
    writer.close()
    maintainer.close()
    assert dropped == [False], "it saw the new row and kept the day"
    assert query(settings, "SELECT trade_id FROM trades") == [("old",)]


def test_a_reader_of_the_table_is_never_deadlocked_by_a_drop(archive_home):
    """CI found `SELECT min(ts) FROM trades` killed by PostgreSQL's deadlock detector while maintain
    dropped a day: a query locks the table, then its partitions; the drop locked the partition, then
    waited for the table. Now the drop reads the partition without shutting readers out of it and
    takes the table first: the reader ends, then the day goes."""
    import threading

    from tradewatch import maintain as maintenance
    from tradewatch.store import partitions
    settings = archive_home
    day_ms = int(START.timestamp() * 1000)
    maintainer, reader = db.connect(settings), db.connect(settings)
    with maintainer.cursor() as cur:                  # the day exists, empty, long expired
        partitions.ensure(cur, "trades", [partitions.day_of(day_ms)])
        maintainer.commit()
        day = next(d for d in maintenance.day_partitions(cur, "trades", "ts") if d.day == START.date())
    maintainer.commit()
    read = reader.cursor()
    read.execute("LOCK TABLE ONLY trades IN ACCESS SHARE MODE")  # a query between its table and its partitions
    outcome: list = []

    def drop():
        try:
            outcome.append(maintenance.drop(maintainer, day, {"rows": 0, "checksum": 0}))
        except Exception as e:  # noqa: BLE001 - the outcome the test reports
            outcome.append(e)
    thread = threading.Thread(target=drop)
    thread.start()
    waiting = ("SELECT EXISTS (SELECT 1 FROM pg_locks WHERE pid = %s AND NOT granted"
               " AND relation = 'trades'::regclass)", (maintainer.get_backend_pid(),))
    wait_for(lambda: query(settings, *waiting)[0][0] or outcome, timeout=30, message="the drop waits for the table")
    read.execute("SELECT min(ts) FROM trades")       # its partitions: the expired day among them
    assert read.fetchone() == (None,)
    reader.commit()
    thread.join(30)
    reader.close()
    maintainer.close()
    assert outcome == [True], "the reader ended, then the day went"
    assert f"trades_p{START:%Y%m%d}" not in partition_names(settings, "trades")
