from tradewatch.runtime import DOWN_AFTER_S, stage_statuses


def row(stage, age, state="running", lag=0, partitions=6, error=None):
    return {"stage": stage, "beat_age_s": age, "state": state, "lag": lag, "partitions": partitions,
            "last_error": error}


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
