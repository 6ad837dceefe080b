"""Heartbeats in the real PostgreSQL, read back the way the dashboard's strip reads them."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from datetime import timedelta

import pandas as pd
import pytest

from tests.conftest import PROJECT_ROOT, query, wait_for
from tradewatch import heartbeat
from tradewatch.store import health, queries


def statuses(settings) -> dict[str, health.StageStatus]:
    frame = queries.stage_health(queries.engine_for(settings.sqlalchemy_url))
    return {s.stage: s for s in health.stage_statuses(frame.to_dict("records"), health.gone_from_this_host)}


def test_heartbeat_rows_are_rate_limited_and_read_back_as_up_then_stopped(settings):
    beat = heartbeat.Heartbeat(settings, "consumer")
    for processed in range(50):        # a busy loop calls it far more often than once a second
        beat.beat(processed, lag=3, partitions=[0, 1, 2])
    mine = "FROM stage_health WHERE stage = 'consumer' AND pid = %s"   # (a Flink job may beat beside us)
    assert query(settings, f"SELECT processed, lag, partitions, state {mine}", (os.getpid(),)) == \
        [(0, 3, [0, 1, 2], "running")]
    time.sleep(heartbeat.BEAT_INTERVAL_S)
    beat.beat(77, lag=0, partitions=[0, 1, 2])
    assert query(settings, f"SELECT processed {mine}", (os.getpid(),))[0][0] == 77
    shown = statuses(settings)
    assert shown["consumer"].status == "up" and shown["consumer"].detail == "lag 0 · 3 partitions"
    assert shown["aggregator"].status == "down"      # never started
    beat.stopped(80)
    assert statuses(settings)["consumer"].status == "stopped"


def test_a_killed_stage_process_is_down_at_once(settings):
    # a real stage process that beats, then dies without a word
    child = subprocess.Popen([sys.executable, "-c", (
        "import time; from tradewatch.config import Settings; from tradewatch import heartbeat;"
        "b = heartbeat.Heartbeat(Settings.load(), 'detector'); b.beat(1, 0, [0]); time.sleep(60)")],
        cwd=PROJECT_ROOT, env={**os.environ, **settings.as_env()})
    wait_for(lambda: query(settings, "SELECT 1 FROM stage_health WHERE stage = 'detector'"), timeout=30,
             interval=0.1, message="the child's beat")
    assert statuses(settings)["detector"].status == "up"
    child.kill()
    child.wait()
    assert statuses(settings)["detector"].status == "down", "seen down at once, not after the beat timeout"


def test_heartbeat_never_raises_when_the_database_is_unreachable(settings):
    beat = heartbeat.Heartbeat(settings.with_overrides(postgres_port=1), "aggregator")
    beat.beat(1, force=True)       # logged once, no exception
    beat.stopped(1)


def test_each_beat_past_a_whole_interval_samples_the_stage_with_the_latency_measured_since(settings):
    from tradewatch import prometheus

    timing = prometheus.LATENCY.labels("consumer", "trade_to_row")
    beat = heartbeat.Heartbeat(settings, "consumer", sample_interval_s=1.0)
    query(settings, "INSERT INTO stage_samples (stage, host, pid, at, processed) VALUES"
                    " ('consumer', 'gone', 1, now() - interval '2 days', 5)")
    began = time.time()
    beat.beat(0, lag=5, force=True)
    for _ in range(100):
        timing.observe(0.004)
    timing.observe(3.0)
    mine = "FROM stage_samples WHERE pid = %s ORDER BY at"
    wait_for(lambda: beat.beat(50, lag=2, force=True) or len(query(settings, f"SELECT 1 {mine}", (os.getpid(),))) == 2,
             timeout=5, interval=0.05, message="a second sample")
    elapsed = time.time() - began
    (first, p50_0, count_0, lag_0, rate_0), (second, p50, count, lag, rate, arriving) = (
        row[:5] if i == 0 else row for i, row in enumerate(query(
            settings, f"SELECT at, latency_p50_ms, latency_count, lag, per_s, arriving_per_s {mine}", (os.getpid(),))))
    assert (p50_0, count_0, lag_0, lag, rate_0) == (None, 0, 5, 2, None), "the first sample measured nothing yet"
    assert count == 101 and 2.5 < p50 <= 5.0, "the 101 observations since the first, p50 in the 4 ms bucket"
    assert first.microsecond == second.microsecond == 0 and (second - first).total_seconds() >= 1, \
        "on whole seconds of the clock"
    seconds = 50 / rate
    assert 0 < seconds <= elapsed and arriving == pytest.approx(47 / seconds), \
        "50 records handled, and 47 arrived (the lag fell by 3)"
    assert query(settings, "SELECT count(*) FROM stage_samples WHERE host = 'gone'") == [(0,)], \
        "a sample older than SAMPLES_KEPT is deleted"


def test_the_pipeline_read_model_sums_processes_and_steps_never_hide_a_stall(settings):
    # two consumer processes and a restarted detector, samples 10 s apart over one minute
    rows = [("consumer", 1, 0, 100.0, 100.0, 40, 4.0, 40.0, 16), ("consumer", 2, 0, 50.0, 60.0, 0, 6.0, 90.0, 8),
            ("consumer", 1, 10, 100.0, 100.0, 0, 3.0, 30.0, 16), ("consumer", 1, 20, 90.0, 90.0, 900, 5.0, 500.0, 9),
            ("detector", 3, 0, 150.0, 150.0, 10, None, None, 0), ("detector", 4, 10, None, None, 0, 120.0, 800.0, 2)]
    minute = query(settings, "SELECT date_trunc('minute', now()) - interval '2 minutes'")[0][0]
    for stage, pid, seconds, per_s, arriving, lag, p50, p99, count in rows:
        query(settings, "INSERT INTO stage_samples (stage, host, pid, at, processed, per_s, arriving_per_s, lag,"
                        " latency_p50_ms, latency_p99_ms, latency_count) VALUES (%s, 'h', %s, %s, 0, %s, %s, %s, %s, %s, %s)",
              (stage, pid, minute + timedelta(seconds=seconds), per_s, arriving, lag, p50, p99, count))
    engine = queries.engine_for(settings.sqlalchemy_url)
    by_sample = queries.pipeline(engine, minute)
    first = by_sample[by_sample["at"] == minute].set_index("stage")
    assert first.loc["consumer", ["per_s", "arriving_per_s", "lag", "p50_ms", "p99_ms", "measured"]].tolist() == \
        [150.0, 160.0, 40, 6.0, 90.0, 24], "processes summed, latencies of the slowest"
    assert len(by_sample) == 5 and pd.isna(by_sample.set_index(["at", "stage"]).loc[
        (minute + timedelta(seconds=10), "detector"), "per_s"]), "a new process has no rate at its first sample"
    (consumer, detector) = queries.pipeline(engine, minute, 30).set_index("stage").loc[["consumer", "detector"]] \
        .to_dict("records")
    assert consumer == {"at": consumer["at"], "per_s": (150 + 100 + 90) / 3, "arriving_per_s": (160 + 100 + 90) / 3,
                        "lag": 900, "p50_ms": 6.0, "p99_ms": 500.0, "measured": 49}, "the step's worst lag and p99"
    assert (detector["per_s"], detector["p99_ms"]) == (150.0, 800.0)
    assert queries.pipeline(engine, minute + timedelta(minutes=5)).empty


def test_the_demo_starts_its_later_stages_once_the_path_to_the_page_has_caught_up(settings):
    """tradewatch/demo.caught_up, on the real heartbeats: the API, the quotes stage, reports and
    maintenance wait while a stage on the way to the page is missing or far behind (a slow
    machine's start still reading the simulated past)."""
    from tradewatch.demo import caught_up

    assert not caught_up(settings), "no stage has beaten yet"
    beats = {stage: heartbeat.Heartbeat(settings, stage) for stage in health.EXPECTED_STAGES}
    for stage, beat in beats.items():
        beat.beat(100, lag=health.LATE_LAG_RECORDS * 4 if stage == "detector" else 0, partitions=[0, 1])
    assert not caught_up(settings), "the detector is 20,000 trades behind"
    time.sleep(heartbeat.BEAT_INTERVAL_S)
    beats["detector"].beat(20_100, lag=12, partitions=[0, 1])
    assert caught_up(settings)
    assert not caught_up(settings.with_overrides(postgres_port=1)), "no database: wait (at most LATER_MAX_S)"
