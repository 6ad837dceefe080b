"""`anomaly_detector.py backtest` (#37) on the recorded SPY and IBM days replayed through the real
pipeline: today's settings raise the live run's alert ids again and write nothing; a stricter
threshold gives a subset, scored against the analysts' verdicts; a range reaching into spans
`maintain` archived reads the Parquet archive; a bad --set is one line and exit status 2."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime

import pytest

from tests.conftest import PROJECT_ROOT, query, scratch_database
from tests.recorded_days import replay_recorded_days
from tradewatch import backtest, maintain
from tradewatch.events import Trade
from tradewatch.store import db, detections, queries
from tradewatch.store.writer import copy_row, write_batch

DAY = ("--since", "2013-10-07T00:00:00Z", "--until", "2013-10-08T00:00:00Z")
WRITTEN = ("alerts", "trade_flags", "alert_dispositions", "manipulation_events", "breaker_transitions",
           "detector_symbols", "trades")
NO_COOLDOWNS = {f"ALERT_COOLDOWN_{s}_SECONDS": "0" for s in ("CRITICAL", "HIGH", "MEDIUM")}


@pytest.fixture(scope="module")
def replayed(services, tmp_path_factory):
    return replay_recorded_days(services, tmp_path_factory.mktemp("pipeline"))


def run_backtest(settings, *args: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, str(PROJECT_ROOT / "anomaly_detector.py"), "backtest", *args],
                            cwd=PROJECT_ROOT, env={**os.environ, **settings.as_env(), **(env or {})},
                            capture_output=True, text=True, timeout=600)
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


def counts(settings) -> dict[str, int]:
    return {t: query(settings, f"SELECT count(*) FROM {t}")[0][0] for t in WRITTEN}


def test_todays_settings_raise_the_live_alerts_again_and_write_nothing(replayed):
    settings = replayed
    before = counts(settings)
    stored = sorted(a for a, in query(settings, "SELECT alert_id FROM alerts"))
    assert stored, "the live detector raised alerts on the real days"
    out = json.loads(run_backtest(settings, *DAY, "--json").stdout)
    assert out["alert_ids"] == {"today": stored}
    assert out["reproduced"] == {"stored": len(stored), "again": len(stored), "not_again": [], "not_stored": []}
    assert out["trades"] == before["trades"] and out["read"] == {"database": before["trades"]}
    per_day = query(settings, "SELECT to_char(ts AT TIME ZONE 'UTC', 'YYYY-MM-DD'), alert_type, count(*) FROM alerts"
                              " GROUP BY 1, 2 ORDER BY 1, 2")
    assert [(d["day"], d["rule"], d["today"]) for d in out["days"]] == per_day
    assert counts(settings) == before, "a backtest writes nothing"
    alone = json.loads(run_backtest(settings, *DAY, "--json", "--workers", "1").stdout)
    side_by_side = json.loads(run_backtest(settings, *DAY, "--json", "--workers", "2").stdout)
    assert {k: v for k, v in alone.items() if k not in ("seconds", "trades_per_s")} == \
        {k: v for k, v in side_by_side.items() if k not in ("seconds", "trades_per_s")} == \
        {k: v for k, v in out.items() if k not in ("seconds", "trades_per_s")}
    with db.connect(settings) as conn:
        since, until = (datetime.fromisoformat(t.replace("Z", "+00:00")) for t in DAY[1::2])
        assert backtest.split(settings, conn, since, until, None, 3) in ([["IBM"], ["SPY"]], [["SPY"], ["IBM"]]), \
            "one symbol per process, no more processes than symbols"
        assert backtest.split(settings, conn, since, until, ["SPY"], 2) == [["SPY"]]
    conn.close()

    spy = json.loads(run_backtest(settings, *DAY, "--symbols", "spy", "--json").stdout)
    assert spy["alert_ids"]["today"] == sorted(a for a, in query(settings, "SELECT alert_id FROM alerts"
                                                                          " WHERE symbol = 'SPY'"))
    # from the middle of the day: warmed up on the day before, as the live detector had been (the
    # whales' reference is the past day's largest)
    midday = json.loads(run_backtest(settings, "--since", "2013-10-07T17:00:00Z", "--until", "2013-10-08T00:00:00Z",
                                 "--json").stdout)
    assert midday["alert_ids"]["today"] == sorted(a for a, in query(settings, "SELECT alert_id FROM alerts"
                                                                               " WHERE ts >= '2013-10-07T17:00Z'"))
    assert midday["read"]["warm_up"] == query(settings, "SELECT count(*) FROM trades WHERE ts >= '2013-10-06T17:00Z'"
                                                        " AND ts < '2013-10-07T17:00Z'")[0][0] > 0
    text = run_backtest(settings, *DAY, "--symbols", "ibm").stdout
    ibm = query(settings, "SELECT count(*) FROM alerts WHERE symbol = 'IBM'")[0][0]
    assert ibm > 0 and f"today's settings raised {ibm:,} of the {ibm:,} alerts stored for this range" in text


def test_a_stricter_threshold_gives_a_subset_scored_by_the_analysts_verdicts(replayed):
    """Without cooldowns (one alert may silence another) a stricter whale threshold flags a subset
    of the trades; the analysts' verdicts on the stored alerts score both."""
    settings = replayed
    out = json.loads(run_backtest(settings, *DAY, "--set", "whale_factor=4", "--json", env=NO_COOLDOWNS).stdout)
    today, changed = (set(out["alert_ids"][n]) for n in ("today", "changed"))
    assert changed < today, (len(changed), len(today))
    assert out["changes"] == {"whale_factor": {"today": 2.8, "changed": 4.0}}
    stored = {a for a, in query(settings, "SELECT alert_id FROM alerts WHERE alert_type = 'VOLUME_SPIKE'")}
    gone, kept = sorted((today - changed) & stored), sorted(changed & stored)
    assert len(gone) >= 3 and len(kept) >= 3, (len(gone), len(kept))
    engine = queries.engine_for(settings.sqlalchemy_url)
    try:
        for alert_id in gone[:3]:
            detections.set_disposition(engine, alert_id, "false_positive", None, "test", "api")
        for alert_id in kept[:3]:
            detections.set_disposition(engine, alert_id, "true_positive", None, "test", "api")
        result = run_backtest(settings, *DAY, "--set", "whale_factor=4", "--json", env=NO_COOLDOWNS)
        (rule,) = [r for r in json.loads(result.stdout)["rules"] if r["rule"] == "VOLUME_SPIKE"]
        assert (rule["today"]["true_positive"], rule["today"]["false_positive"], rule["today"]["precision"]) == \
            (3, 3, 0.5)
        assert (rule["changed"]["true_positive"], rule["changed"]["false_positive"], rule["changed"]["precision"]) \
            == (3, 0, None), "a precision once five are marked"
        whales = [{a for a in ids if a.endswith(":VOLUME_SPIKE")} for ids in (today, changed)]
        assert (rule["today"]["alerts"], rule["changed"]["alerts"]) == tuple(map(len, whales))
        text = run_backtest(settings, *DAY, "--set", "whale_factor=4", env=NO_COOLDOWNS).stdout
        assert "changed: whale_factor 2.8 -> 4" in text and "3/3 (50%) -> 3/0 (—)" in text, text
    finally:
        with engine.begin() as conn:
            conn.exec_driver_sql("UPDATE alerts SET disposition = NULL")
            conn.exec_driver_sql("DELETE FROM alert_dispositions")
        engine.dispose()


def test_a_range_reaching_into_archived_spans_reads_the_archive(replayed, tmp_path):
    """A database whose 2013 `maintain` archived and dropped (the replayed year's archive, in a
    database of its own), one trade of 2013 that came in since, and days of 2014 still stored: the
    range reads the archive merged with the late trade, then the database; the recorded day's
    alerts are the live run's."""
    with scratch_database(replayed, f"tw_backtest_{os.getpid()}") as scratch:
        scratch = scratch.with_overrides(tradewatch_home=str(tmp_path / "home"))
        db.apply_schema(scratch)
        with db.connect(replayed) as conn, conn.cursor() as cur:
            (year,) = [d for d in maintain.day_partitions(cur, "trades", "ts") if d.name == "trades_y2013"]
            rows, checksum = maintain.measure(cur, year)
        record = maintain.archive(conn, scratch, year, rows, checksum)
        conn.close()
        assert record["rows"] == rows
        late = Trade("late", "IBM", 1_381_190_400_000, 185.0, 100.0, "buy", "X")            # 2013-10-08
        later = [Trade(f"n{i}", "SPY", 1_388_664_000_000 + i * 1000, 184.0, 10.0, "sell", "X") for i in range(50)]
        with db.connect(scratch) as conn, conn.cursor() as cur:
            write_batch(cur, [copy_row(t, 0, i) for i, t in enumerate([late, *later])], [])
        conn.close()
        out = json.loads(run_backtest(scratch, "--since", "2013-10-07T00:00:00Z", "--until", "2014-01-03T00:00:00Z",
                                      "--json", "--workers", "2").stdout)
        assert out["read"] == {"archive": rows + 1, "database": len(later)}
        live = sorted(a for a, in query(replayed, "SELECT alert_id FROM alerts"))
        added = {t.trade_id for t in (late, *later)}
        assert sorted(a for a in out["alert_ids"]["today"] if a.split(":")[0] not in added) == live
        assert out["reproduced"]["stored"] == 0, "the scratch database stores no alert"


def test_a_bad_set_or_range_is_one_line_and_exit_status_2(replayed):
    for args, message in ((["--set", "nope=1"], "--set nope: not something detection reads; one of zscore_window"),
                          (["--set", "whale_factor=big"], "--set whale_factor must be a number, got 'big'"),
                          (["--set", "whale_factor=-1"], "must be a finite number more than 0"),
                          (["--set", "run_length=2.5"], "--set run_length must be a whole number"),
                          (["--set", "ZSCORE_THRESHOLD=0"], "setting ZSCORE_THRESHOLD must be more than 0"),
                          (["--set", "whale_factor"], "--set needs NAME=VALUE"),
                          (["--set", "whale_factor=nan"], "must be a finite number more than 0")):
        result = run_backtest(replayed, *DAY, *args, check=False)
        assert result.returncode == 2 and not result.stdout, (args, result.stdout)
        assert result.stderr.count("\n") == 1 and message in result.stderr, (args, result.stderr)
    result = run_backtest(replayed, *DAY, "--workers", "0", check=False)
    assert result.returncode == 2 and "argument --workers: must be a whole number above 0, got '0'" in result.stderr
    result = run_backtest(replayed, "--since", "2013-10-08T00:00:00Z", "--until", "2013-10-07T00:00:00Z", check=False)
    assert result.returncode == 2 and result.stderr == "error: --until must be after --since\n"
