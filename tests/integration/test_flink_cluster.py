"""flink_job.sql on a real Flink standalone cluster (tradewatch/flink_cluster.py: a JobManager and two
TaskManagers, each its own JVM) at parallelism 2: the IBM day's windows equal the Python
aggregator's, also when one TaskManager is killed with SIGKILL mid-replay and started again (the
job restarts from its checkpoint; nothing lost, nothing counted twice)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import urllib.request
import uuid

import pytest

from tests.conftest import SHARED_DATA, query, start_script, started_for, wait_for
from tests.integration.test_flink import assert_same_windows, folded, rows
from tradewatch import bus, flink_cluster

IBM_DAY = SHARED_DATA / "lean" / "ibm_20131007_trades.csv.gz"


@pytest.fixture(scope="module")
def cluster(services):
    settings = services.with_overrides(flink_rest_port=28081, flink_rpc_port=26123)
    flink_cluster.start(settings, taskmanagers=2)
    yield settings
    flink_cluster.stop(settings)


def rest(settings, path: str) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{settings.flink_rest_port}{path}", timeout=5) as response:
        return json.loads(response.read())


def test_ibm_day_on_two_taskmanagers_survives_a_killed_taskmanager(cluster, tmp_path):
    tag = uuid.uuid4().hex[:6]
    settings = cluster.with_overrides(trades_topic=f"cluster-{tag}", flink_group=f"cluster-{tag}",
                                      aggregator_group=f"agg-{tag}", idle_timeout_seconds=1.0,
                                      flink_checkpoint_seconds=2)
    bus.ensure_topic(settings, settings.trades_topic, settings.trades_partitions)
    query(settings, "DELETE FROM flink_metrics WHERE symbol = 'IBM'")
    assert rest(settings, "/overview")["taskmanagers"] == 2
    producer = start_script(settings, "producer.py", "--replay", str(IBM_DAY), "--speed", "600",
                            log=tmp_path / "producer.log")
    job = start_script(settings, "flink_job.py", "--fresh", "--jobmanager", f"127.0.0.1:{settings.flink_rest_port}",
                       "--parallelism", "2", log=tmp_path / "job.log")
    try:
        wait_for(lambda: [j for j in rest(settings, "/jobs/overview")["jobs"] if j["state"] == "RUNNING"],
                 timeout=180, message="the job running on the cluster")
        running = next(j for j in rest(settings, "/jobs/overview")["jobs"] if j["state"] == "RUNNING")
        vertices = rest(settings, f"/jobs/{running['jid']}")["vertices"]
        assert max(v["parallelism"] for v in vertices) == 2
        wait_for(lambda: rest(settings, "/overview")["slots-available"] == 0, timeout=60,
                 message="the job's subtasks in both TaskManagers' slots (one slot each)")
        wait_for(lambda: len(rows(settings, "flink_metrics", "IBM")) > 50, timeout=180, message="first windows")
        wait_for(lambda: rest(settings, f"/jobs/{running['jid']}/checkpoints")["counts"]["completed"] > 0,
                 timeout=60, message="a completed checkpoint")
        victim = flink_cluster.taskmanager_pids(settings)[0]
        os.kill(victim, signal.SIGKILL)
        written = len(rows(settings, "flink_metrics", "IBM"))
        assert written < 452, "killed mid-replay"
        with started_for("cluster"):
            flink_cluster.start_taskmanager(settings)     # a TaskManager comes back, as a supervisor would
        assert producer.wait(timeout=180) == 0
        wait_for(lambda: len(rows(settings, "flink_metrics", "IBM")) == 452, timeout=300,
                 message="every closed IBM minute from the cluster")
        assert rest(settings, f"/jobs/{running['jid']}")["state"] == "RUNNING"
    finally:
        job.send_signal(signal.SIGTERM)
        try:
            assert job.wait(timeout=60) == 0
        except subprocess.TimeoutExpired:
            job.kill()
            raise
    # the job does not outlive flink_job.py (a restarted one would run beside it)
    wait_for(lambda: all(j["state"] == "CANCELED" for j in rest(settings, "/jobs/overview")["jobs"]), timeout=30,
             message="the cluster's job cancelled when flink_job.py stopped")
    aggregator = start_script(settings, "aggregator.py", log=tmp_path / "aggregator.log")
    wait_for(lambda: folded(settings) >= 24_293, timeout=180, message="the aggregator folded the day")
    aggregator.send_signal(signal.SIGTERM)
    assert aggregator.wait(timeout=60) == 0
    flink_rows = rows(settings, "flink_metrics", "IBM")
    python_rows = [r for r in rows(settings, "stock_metrics", "IBM") if r[0] <= flink_rows[-1][0]]
    assert sum(r[8] for r in flink_rows) == 24_292, "each trade counted once across the kill"
    assert_same_windows(flink_rows, python_rows)
