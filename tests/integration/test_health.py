"""Heartbeats in the real PostgreSQL, read back the way the dashboard's strip reads them."""
from __future__ import annotations

import os
import subprocess
import sys
import time

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
