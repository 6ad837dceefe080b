"""flink_job.sql on a real Kafka topic and real PostgreSQL: its 1-minute windows equal aggregator.py's.
The tests of this module share one running job (one JVM start): the `flink` module fixture."""
from __future__ import annotations

import signal
import subprocess
import time
import uuid

import pytest
from tests.conftest import SHARED_DATA, query, run_script, start_script, wait_for
from tradewatch import bus, candles
from tradewatch.events import Trade, iso_to_ms

COLUMNS = candles.names(tuple(c for c in candles.FLINK_SINK if c.name not in candles.KEY + ("window_end",)))


@pytest.fixture(scope="module")
def flink(services, tmp_path_factory):
    tag = uuid.uuid4().hex[:6]
    settings = services.with_overrides(trades_topic=f"flink-{tag}", flink_group=f"flink-{tag}",
                                       idle_timeout_seconds=1.0, flink_checkpoint_seconds=2)
    bus.ensure_topic(settings, settings.trades_topic, settings.trades_partitions)
    log = tmp_path_factory.mktemp("flink") / "flink_job.log"
    # a JVM far from UTC (as a remote TaskManager may be): the job must keep its windows in UTC itself
    job = start_script(settings, "flink_job.py", "--fresh", log=log, env={"TZ": "Asia/Kolkata"})
    wait_for(lambda: "submitting the job" in log.read_text() or job.poll() is not None, timeout=180,
             message="Flink job submitted")
    assert job.poll() is None, log.read_text()[-3000:]
    # the running job beats for the dashboard's health strip
    wait_for(lambda: query(settings, "SELECT 1 FROM stage_health WHERE stage = 'flink' AND state = 'running'"
                                     " AND last_beat > now() - interval '3 seconds'"), timeout=60,
             message="the Flink job's heartbeat")
    yield settings
    job.send_signal(signal.SIGINT)
    try:    # it cancels the job, then gives its gateway JVM up to 30 s (flink_job.stop_gateway)
        job.wait(timeout=120)
    except subprocess.TimeoutExpired:
        job.kill()


def rows(settings, table: str, symbol: str, before_ms: int | None = None) -> list[tuple]:
    return query(settings, f"SELECT (extract(epoch FROM window_start) * 1000)::bigint, {COLUMNS} FROM {table}"
                           " WHERE symbol = %s AND window_size = '1m' AND (%s::bigint IS NULL OR"
                           " window_start < timestamptz 'epoch' + %s::bigint * interval '1 millisecond')"
                           " ORDER BY window_start", (symbol, before_ms, before_ms))


def assert_same_windows(flink_rows, python_rows):
    assert [r[0] for r in flink_rows] == [r[0] for r in python_rows]
    for f, p in zip(flink_rows, python_rows):
        assert f[8] == p[8], f"trade count differs at {f[0]}"
        assert f[1:] == pytest.approx(p[1:], rel=1e-9, abs=1e-12), f"window {f[0]} differs"


def same_partition_symbol(other: str, partitions: int) -> str:
    def partition(key: str) -> int:
        return bus.murmur2_partition(key.encode(), partitions)   # Kafka's default partitioner
    while partition(symbol := f"OOO{uuid.uuid4().hex[:4].upper()}") != partition(other):
        pass
    return symbol


def folded(settings) -> int:
    return query(settings, "SELECT coalesce(sum(next_offset), 0) FROM stage_positions WHERE consumer_group = %s",
                 (settings.aggregator_group,))[0][0]


def test_ibm_day_windows_equal_the_python_aggregator(flink, tmp_path):
    settings = flink.with_overrides(aggregator_group=f"agg-{uuid.uuid4().hex[:6]}")
    run_script(settings, "producer.py", "--replay", str(SHARED_DATA / "lean" / "ibm_20131007_trades.csv.gz"),
               "--speed", "max")
    # one trade ten minutes after the day's last lets Flink's watermark pass every window of the day
    sentinel_ms = iso_to_ms("2013-10-08T00:10:00Z")
    publisher = bus.publisher(settings)
    publisher.send(settings.trades_topic, b"IBM",
                   Trade("IBM-sentinel", "IBM", sentinel_ms, 180.0, 1.0, "buy", "X").to_json_bytes())
    publisher.flush()
    publisher.close()
    aggregator = start_script(settings, "aggregator.py", log=tmp_path / "aggregator.log")
    end = sum(e for _, e in bus.group_lag(settings, settings.aggregator_group, settings.trades_topic).values())
    wait_for(lambda: folded(settings) >= end, timeout=180, message="aggregator caught up")
    aggregator.send_signal(signal.SIGTERM)
    assert aggregator.wait(timeout=60) == 0
    python_rows = rows(settings, "stock_metrics", "IBM", sentinel_ms - 60_000)
    assert len(python_rows) == 453 and sum(r[8] for r in python_rows) == 24_293
    wait_for(lambda: len(rows(settings, "flink_metrics", "IBM", sentinel_ms - 60_000)) == len(python_rows),
             timeout=240, message="Flink emitted every IBM minute")
    assert_same_windows(rows(settings, "flink_metrics", "IBM", sentinel_ms - 60_000), python_rows)


def test_out_of_order_and_late_trades_are_treated_alike(flink, tmp_path):
    settings = flink.with_overrides(aggregator_group=f"agg-{uuid.uuid4().hex[:6]}", allowed_lateness_seconds=5.0)
    # On the partition that carried the IBM day: Flink's watermark is the minimum over its partitions,
    # and here that partition (idle, but stuck at its 2013 watermark) held the other ones back.
    symbol = same_partition_symbol("IBM", settings.trades_partitions)
    t0 = iso_to_ms("2026-03-02T10:00:00Z")
    publisher = bus.publisher(settings)

    def send(*trades: tuple[int, float, float, str]) -> None:
        for n, (offset_ms, price, qty, side) in enumerate(trades):
            trade = Trade(f"{symbol}-{offset_ms}-{n}", symbol, t0 + offset_ms, price, qty, side, "X")
            publisher.send(settings.trades_topic, symbol.encode(), trade.to_json_bytes())
        publisher.flush()

    aggregator = start_script(settings, "aggregator.py", log=tmp_path / "aggregator.log")
    try:
        check_out_of_order_and_late(settings, symbol, t0, send)
    finally:
        aggregator.send_signal(signal.SIGTERM)
        assert aggregator.wait(timeout=60) == 0
        publisher.close()
    python_rows = rows(settings, "stock_metrics", symbol, t0 + 1_200_000)
    assert_same_windows(rows(settings, "flink_metrics", symbol), python_rows)
    first = python_rows[0]
    assert (first[1], first[4], first[8]) == (10.0, 10.4, 6)   # open/close by event time; the late trade left out


def check_out_of_order_and_late(settings, symbol: str, t0: int, send) -> None:
    # minute 0 arrives out of order: the first trade by event time comes third, the last comes first;
    # one trade from a clock 23 h ahead (issue 11) must move neither engine's event time
    send((50_000, 10.5, 3, "buy"), (20_000, 10.2, 5, "sell"), (1_000, 10.0, 7, "buy"), (30_000, 10.9, 1, "sell"),
         (int(time.time() * 1000) + 23 * 3_600_000 - t0, 500.0, 1, "buy"),
         (58_000, 10.4, 2, "buy"), (61_000, 11.0, 4, "buy"),
         (56_000, 10.1, 6, "sell"),                  # late, but within the 5 s lateness: counts in both
         (66_000, 11.2, 1, "sell"))                  # watermark 61 s: minute 0 closes in both
    minute0 = t0 // 60_000 * 60_000
    wait_for(lambda: rows(settings, "flink_metrics", symbol) and
             query(settings, "SELECT bool_and(is_final) FROM stock_metrics WHERE symbol = %s AND window_start ="
                             " timestamptz 'epoch' + %s * interval '1 millisecond' AND window_size = '1m'",
                   (symbol, minute0))[0][0], timeout=120, message="minute 0 final in both")
    send((40_000, 99.0, 100, "buy"))                 # beyond the lateness: dropped by both, audited by Python
    send((600_000, 11.5, 1, "buy"))                  # closes minute 1 (dropped by both had the 23 h trade
    send((1_300_000, 11.6, 1, "buy"))                # moved event time); closes minute 10
    wait_for(lambda: len(rows(settings, "flink_metrics", symbol)) == 3, timeout=120, message="Flink minutes 1, 10")
    wait_for(lambda: len(rows(settings, "stock_metrics", symbol, t0 + 1_200_000)) == 3 and
             query(settings, "SELECT count(*) FROM late_trades WHERE symbol = %s", (symbol,))[0][0] == 1,
             timeout=60, message="Python minute 1 and the late trade")


def test_killed_job_resumes_from_its_checkpoint_without_double_counting(services, tmp_path):
    """Necessarily two JVM starts of its own (kill -9, then restart), so not the shared job."""
    tag = uuid.uuid4().hex[:6]
    settings = services.with_overrides(trades_topic=f"flinkkill-{tag}", flink_group=f"flinkkill-{tag}",
                                       idle_timeout_seconds=1.0, flink_checkpoint_seconds=2)
    bus.ensure_topic(settings, settings.trades_topic, settings.trades_partitions)
    query(settings, "DELETE FROM flink_metrics WHERE symbol = 'IBM'")  # the shared job's IBM day
    producer = start_script(settings, "producer.py", "--replay",
                            str(SHARED_DATA / "lean" / "ibm_20131007_trades.csv.gz"), "--speed", "1200")
    job = start_script(settings, "flink_job.py", "--fresh", log=tmp_path / "first.log")
    wait_for(lambda: len(rows(settings, "flink_metrics", "IBM")) > 100, timeout=180, message="first windows")
    checkpoints = settings.home / "flink" / "checkpoints" / settings.flink_group
    wait_for(lambda: list(checkpoints.glob("*/chk-*/_metadata")), timeout=60, message="a checkpoint")
    subprocess.run(["pkill", "-9", "-P", str(job.pid)])
    job.kill()
    job.wait()
    written_before = len(rows(settings, "flink_metrics", "IBM"))
    assert producer.wait(timeout=180) == 0 and written_before < 452, "killed mid-stream"
    job = start_script(settings, "flink_job.py", log=tmp_path / "second.log")
    try:
        wait_for(lambda: len(rows(settings, "flink_metrics", "IBM")) == 452, timeout=240, message="all windows")
        assert "resuming from checkpoint" in (tmp_path / "second.log").read_text()
        windows = rows(settings, "flink_metrics", "IBM")
        # every trade of the day counted once: the 452 closed minutes hold all but the last minute's trade
        assert sum(r[8] for r in windows) == 24_292
    finally:
        job.send_signal(signal.SIGINT)
        try:
            job.wait(timeout=120)       # as in the fixture: cancel, then up to 30 s for the gateway
        except subprocess.TimeoutExpired:
            job.kill()


def test_a_quiet_partition_does_not_hold_the_others_back(flink):
    """One partition got an old trade and then nothing; new trades on the five others: Flink's
    windows still close within the allowed lateness and the idle timeout (the Kafka source's
    per-partition idleness, 'scan.watermark.idle-timeout')."""
    settings = flink
    partitions = settings.trades_partitions
    quiet = bus.murmur2_partition(b"IBM", partitions)
    busy = {}
    while len(busy) < partitions - 1:
        symbol = f"Q{uuid.uuid4().hex[:5].upper()}"
        p = bus.murmur2_partition(symbol.encode(), partitions)
        if p != quiet and p not in busy:
            busy[p] = symbol
    t0 = iso_to_ms("2026-06-01T10:00:00Z")
    publisher = bus.publisher(settings)
    publisher.send(settings.trades_topic, b"IBM", Trade("IBM-old", "IBM", iso_to_ms("2013-10-09T10:00:00Z"), 180.0,
                                                        1.0, "buy", "X").to_json_bytes())
    publisher.flush()
    time.sleep(settings.idle_timeout_seconds + 1)        # and then the IBM partition stays quiet

    def send(n: int, offset_ms: int) -> None:
        for symbol in busy.values():
            trade = Trade(f"{symbol}-{n}", symbol, t0 + offset_ms, 10.0 + n, 1.0, "buy", "X")
            publisher.send(settings.trades_topic, symbol.encode(), trade.to_json_bytes())
        publisher.flush()
    # Minute 0 of every busy partition first, read by Flink (its group's offsets are committed with
    # each checkpoint) before anything closes the minute. Sent together with the closing trades,
    # a partition whose records Flink happened to fetch a moment after the others' would come out of
    # idleness behind a watermark they had already moved past minute 0: Flink's idleness drops
    # those trades as late (the source's watermark is one for all partitions).
    send(0, 1_000)
    send(1, 30_000)
    wait_for(lambda: all(committed >= end for committed, end in
                         bus.group_lag(settings, settings.flink_group, settings.trades_topic).values()),
             timeout=60, message="Flink to have read minute 0 of every busy partition")
    sent_at = time.monotonic()
    send(2, 70_000)                                   # closes minute 0 (5 s lateness)
    publisher.close()
    wait_for(lambda: all(len(rows(settings, "flink_metrics", s)) == 1 for s in busy.values()), timeout=60,
             message="minute 0 of the five busy partitions from Flink")
    took = time.monotonic() - sent_at
    print({"quiet_partition_windows_closed_after_s": round(took, 1)})
    assert took < settings.allowed_lateness_seconds + settings.idle_timeout_seconds + 15
    assert all(rows(settings, "flink_metrics", s)[0][8] == 2 for s in busy.values())
