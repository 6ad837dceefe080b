"""Soak, accelerated (issue 23): ten days of event time, compressed into a couple of minutes, for a
symbol set that keeps changing — 600 symbols active at a time, 60 new ones each day and 60
gone quiet for good, each active symbol trading one hour in four (quiet gaps of three hours) —
through the real consumer, aggregator and detector, with every feed table's retention at 3 days
and `python -m tradewatch maintain --every` running beside them as in `make demo`. Each stage is
killed with SIGKILL once, PostgreSQL is restarted once and the tables the stages write are locked
for LOCK_S (as a long maintenance lock would) while the trades arrive.

At the end the database holds only the retained days; database + archive hold every produced
trade exactly once; the retained candles, indicators and flags equal those of an undisturbed run
of the same trades, and the candles and indicators equal a clean `aggregator.py --backfill` of the
retained days from the stored trades; each stage's memory after the last day is within 20 % of its
memory on day 5.5 (after the disruptions of days 1 to 5, once caught up: the lock leaves a backlog
larger than every stage's batch, so each has already held full batches and a full fetch-ahead —
a catch-up's high-water mark is a bound, not growth); and no stage exited other than by the kills. (`bench/soak.py` runs it for longer.)"""
from __future__ import annotations

import signal
import sys
import threading
import time
from datetime import datetime, timedelta, timezone

import pyarrow.parquet as pq

from tests.conftest import FEED_FLUSH_S, Feeder, query, run_script, start_script, wait_for
from tests.integration.test_chaos import assert_same
from tests.integration.test_commit_protocol import STAGES, start, stop_all, truncate, with_groups
from tradewatch import bus, stack
from tradewatch.events import Trade
from tradewatch.market.simulator import rotating_days
from tradewatch.store import db

DAYS, ACTIVE, NEW_PER_DAY = 10, 600, 60
RETENTION = 3
# recent days (day partitions): the ten days end yesterday
START = datetime.now(timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0) - timedelta(days=DAYS + 1)
START_MS = int(START.timestamp() * 1000)
COMPARED = {   # the retained range of each, beside an undisturbed run
    "stock_metrics": ("symbol, window_size, window_start, open, high, low, close, volume, trade_count, is_final",
                      "window_start", "1, 2, 3"),
    "indicators": ("symbol, window_size, window_start, close, sma_20, sma_50, ema_12, ema_26, rsi_14, macd,"
                   " macd_signal, bollinger_upper, bollinger_lower", "window_start", "1, 2, 3"),
    "trade_flags": ("trade_id, anomaly_types, anomaly_score, anomaly_severity", "ts", "1"),
}


FEED_RATE = 2_000.0            # trades a second into the soak run
OUTAGE_S = 1.0                 # how long PostgreSQL stays down in each restart
LOCK_S = 6.0                   # how long the stages' tables stay locked: a backlog of 12,000 trades

def feed() -> list[Trade]:
    return [t for hour in rotating_days(START_MS, DAYS, ACTIVE, NEW_PER_DAY) for t in hour]


def publish(settings, trades: list[Trade], on_progress=lambda share: None, per_second: float | None = None) -> None:
    publisher = bus.publisher(settings)
    started = time.monotonic()
    for i, t in enumerate(trades):
        publisher.send(settings.trades_topic, t.symbol.encode(), t.to_json_bytes())
        if i % 500 == 0:
            on_progress(i / len(trades))
            if per_second:
                time.sleep(max(started + i / per_second - time.monotonic(), 0))
    assert publisher.flush(FEED_FLUSH_S), f"Kafka did not take every trade within {FEED_FLUSH_S}s"
    publisher.close()


def handled(settings) -> dict[str, int]:
    """Messages each stage's group has committed (all three commit only what they stored)."""
    out = {}
    for stage, group in (("consumer", settings.consumer_group), ("aggregator", settings.aggregator_group),
                         ("detector", settings.detector_group)):
        try:
            out[stage] = sum(c for c, _ in bus.group_lag(settings, group, settings.trades_topic).values())
        except bus.KafkaUnavailable:
            out[stage] = -1
    return out


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) / 1024


def retained(settings, table: str, columns: str, key: str, order: str, keep_from: datetime) -> list[tuple]:
    return query(settings, f"SELECT {columns} FROM {table} WHERE {key} >= %s ORDER BY {order}", (keep_from,))


def archived_trade_ids(settings) -> list[str]:
    found = []
    for part in sorted((settings.home / "archive" / "trades").glob("date=*/part-*.parquet")):
        found += pq.read_table(part, columns=["trade_id"]).column("trade_id").to_pylist()
    return found


def test_ten_days_of_a_changing_symbol_set_with_retention_kills_and_a_restart(settings, tmp_path):
    trades = feed()
    n = len(trades)
    newest = datetime.fromtimestamp(max(t.timestamp_ms for t in trades) / 1000, timezone.utc)
    keep_from = (newest - timedelta(days=RETENTION)).replace(hour=0, minute=0, second=0, microsecond=0)
    ids = sorted(t.trade_id for t in trades)

    began = time.monotonic()
    clean = with_groups(settings, "clean")
    publish(clean, trades)
    processes = [start(clean, stage, tmp_path / f"clean-{stage}.log") for stage in STAGES]
    wait_for(lambda: set(handled(clean).values()) == {n}, timeout=600, interval=1, message="the undisturbed run")
    wait_for(lambda: query(clean, "SELECT count(*) FROM alerts WHERE published_at IS NULL")[0][0] == 0,
             timeout=60, message="the undisturbed run's alerts published")
    stop_all(processes)
    took = {"clean run": round(time.monotonic() - began)}
    expected = {table: retained(clean, table, *spec, keep_from) for table, spec in COMPARED.items()}
    assert expected["trade_flags"] and expected["indicators"], "the retained days have flags and indicators"
    truncate(settings)

    soak = with_groups(settings.with_overrides(trades_topic=f"{settings.trades_topic}-soak"), "soak") \
        .with_overrides(**{f"retention_days_{t}": RETENTION
                           for t in ("trades", "trade_flags", "late_trades", "dead_letters", "alerts")})
    bus.ensure_topic(soak, soak.trades_topic, soak.trades_partitions)
    logs = {stage: tmp_path / f"soak-{stage}.log" for stage in STAGES}
    running = {stage: start(soak, stage, logs[stage]) for stage in STAGES}
    maintainer = start_script(soak, "-m", "tradewatch", "maintain", "--every", "5", log=tmp_path / "maintain.log")
    first_rss: dict[str, float] = {}
    events = ["consumer", "postgres", "aggregator", "detector", "lock"]
    done: list[str] = []

    def lock_tables() -> None:
        locker = db.connect(soak)
        with locker.cursor() as cur:
            cur.execute("LOCK TABLE trades, stock_metrics, trade_flags IN ACCESS EXCLUSIVE MODE")
        threading.Timer(LOCK_S, locker.close).start()      # the feed goes on meanwhile

    def on_progress(share: float) -> None:
        while events and share >= 0.10 + 0.05 * len(done):   # one disruption at 10, 15, 20, 25 and 30 %
            event = events.pop(0)
            if event == "lock":
                lock_tables()
            elif event == "postgres":
                stack.stop_postgres(soak)
                time.sleep(OUTAGE_S)       # an outage of the database, not a wait for anything
                stack.start_postgres(soak)
            else:
                running[event].kill()                   # SIGKILL: no flush, no commit, no goodbye
                running[event].wait()
                running[event] = start(soak, event, logs[event])
            done.append(event)
        if share >= 0.55 and not first_rss:
            # memory once the processes that run to the end have caught up after the disruptions
            # (a restart's catch-up in big batches is not growth), then again after the last day
            wait_for(lambda: min(handled(soak).values()) >= 0.52 * n, timeout=120, interval=0.5,
                     message="every stage caught up after the disruptions")
            first_rss.update({stage: rss_mb(p.pid) for stage, p in running.items()})

    feeder = Feeder(target=publish, args=(soak, trades, on_progress, FEED_RATE))
    feeder.start()
    feeder.join()
    took["soak feed"] = round(time.monotonic() - began - took["clean run"])
    assert done == ["consumer", "postgres", "aggregator", "detector", "lock"] and first_rss
    wait_for(lambda: set(handled(soak).values()) == {n}, timeout=600, interval=1, message="the soak run to settle")
    wait_for(lambda: query(soak, "SELECT count(*) FROM alerts WHERE published_at IS NULL")[0][0] == 0,
             timeout=60, message="the soak run's alerts published")
    took["soak settled"] = round(time.monotonic() - began - took["clean run"] - took["soak feed"])
    last_rss = {stage: rss_mb(p.pid) for stage, p in running.items()}
    exited = {stage: p.poll() for stage, p in running.items() if p.poll() is not None}
    assert not exited, f"stages exited on their own: {exited}"

    # one last pass of the maintenance job after the last trade, then it stops like the stages
    maintainer.send_signal(signal.SIGTERM)
    assert maintainer.wait(timeout=60) == 0
    run = start_script(soak, "-m", "tradewatch", "maintain", log=tmp_path / "maintain.log")
    assert run.wait(timeout=300) == 0, (tmp_path / "maintain.log").read_text()[-3000:]
    stop_all(running.values())

    oldest = query(soak, "SELECT min(ts) FROM trades")[0][0]
    assert oldest >= keep_from, f"trades older than the retained days are still stored: {oldest}"
    assert query(soak, "SELECT min(ts) FROM trade_flags")[0][0] >= keep_from
    stored = [r[0] for r in query(soak, "SELECT trade_id FROM trades")]
    assert sorted(stored + archived_trade_ids(soak)) == ids, "every trade exactly once, in the database or archive"
    streamed = {table: retained(soak, table, *spec, keep_from) for table, spec in COMPARED.items()}
    for table in COMPARED:
        assert_same(streamed[table], expected[table], table)
    # the retained days rebuilt from the trades table (it updates final windows, adds missing ones
    # and recomputes the indicators of every series it touches): nothing may change
    until = (newest + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    run_script(soak, "aggregator.py", "--backfill", "--since", keep_from.isoformat(), "--until", until.isoformat())
    for table in ("stock_metrics", "indicators"):
        assert_same(retained(soak, table, *COMPARED[table], keep_from), streamed[table], f"{table} vs a backfill")
    grown = {stage: round(last_rss[stage] / first_rss[stage], 2) for stage in STAGES}
    assert all(g <= 1.2 for g in grown.values()), (f"RSS after the last day / on day 5.5: {grown}"
                                                     f" (MB {first_rss} -> {last_rss}; {took} s)")
    for stage, log in logs.items():
        assert "Traceback" not in log.read_text(), f"{stage} crashed"
    print(f"soak: {n} trades, RSS first {first_rss} last {last_rss}, seconds {took}", file=sys.stderr)
