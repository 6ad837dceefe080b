import os
import socket
import subprocess
import sys

from tradewatch.store.health import DOWN_AFTER_S, gone_from_this_host, stage_statuses


def row(stage, age, state="running", lag=0, partitions=6, error=None, pid=1):
    return {"stage": stage, "beat_age_s": age, "state": state, "lag": lag, "partitions": partitions,
            "last_error": error, "host": socket.gethostname(), "pid": pid}


def by_stage(rows):
    return {s.stage: s for s in stage_statuses(rows)}


def test_fresh_beats_are_up_and_missing_stages_are_down():
    s = by_stage([row("consumer", 0.4), row("aggregator", 0.9, lag=12)])
    assert s["consumer"].status == "up" and "lag 0" in s["consumer"].detail
    assert s["aggregator"].status == "up" and "lag 12" in s["aggregator"].detail
    assert s["detector"].status == "down" and s["detector"].detail == "not started"
    assert "flink" not in s


def test_a_killed_process_turns_down_and_its_restart_turns_it_up_again():
    killed = row("detector", DOWN_AFTER_S + 1)
    assert by_stage([killed])["detector"].status == "down"
    assert by_stage([killed, row("detector", 0.2)])["detector"].status == "up"


def test_slow_beats_or_a_big_lag_are_late_and_a_clean_exit_is_stopped():
    assert by_stage([row("consumer", 4.0)])["consumer"].status == "late"
    assert by_stage([row("consumer", 0.1, lag=50_000)])["consumer"].status == "late"
    stopped = by_stage([row("flink", 30, state="stopped", error="job FAILED")])["flink"]
    assert stopped.status == "stopped" and "job FAILED" in stopped.detail


def test_several_consumers_add_up():
    s = by_stage([row("consumer", 0.1, lag=5, partitions=3), row("consumer", 0.3, lag=7, partitions=3)])
    assert s["consumer"].detail == "2 processes · lag 12 · 6 partitions"


def test_a_stage_without_partitions_is_late_and_unknown_partitions_are_not_shown():
    assert by_stage([row("consumer", 0.2, partitions=0)])["consumer"].status == "late"
    flink = by_stage([row("flink", 0.5, partitions=float("nan"), lag=None)])["flink"]
    assert flink.status == "up" and flink.detail == "lag 0"


def test_a_process_gone_from_this_host_is_down_at_once_and_its_restart_is_noted():
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    killed = row("detector", 0.5, pid=dead.pid)
    assert gone_from_this_host(killed) and not gone_from_this_host(row("detector", 0.5, pid=os.getpid()))
    assert stage_statuses([killed], gone_from_this_host)[2].status == "down"
    back = by_stage_with_probe([killed, row("detector", 0.2, pid=os.getpid())])["detector"]
    assert back.status == "up" and "restarted, a process died" in back.detail


def by_stage_with_probe(rows):
    return {s.stage: s for s in stage_statuses(rows, gone_from_this_host)}
