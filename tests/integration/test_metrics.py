"""Every stage's Prometheus metrics, scraped from the running processes: they parse as Prometheus
text and move when trades flow (issue 13)."""
from __future__ import annotations

import signal
import urllib.request
from datetime import datetime, timedelta, timezone

import pandas as pd

from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import metrics_url, query, run_script, start_script, wait_for
from tradewatch import bus, disk, heartbeat
from tradewatch.store import queries

STAGES = {"consumer": ("consumer.py",), "aggregator": ("aggregator.py",), "detector": ("anomaly_detector.py", "run")}


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def total(samples, name: str, **labels) -> float:
    return sum(v for (n, ls), v in samples.items() if n == name and all(dict(ls).get(k) == x for k, x in labels.items()))


def test_stage_metrics_parse_and_move_with_the_trades(settings, tmp_path):
    logs = {name: tmp_path / f"{name}.log" for name in STAGES}
    running = {name: start_script(settings, *STAGES[name], log=logs[name]) for name in STAGES}
    urls = {name: metrics_url(logs[name], name) for name in STAGES}
    run_script(settings, "producer.py", "--count", "3000", "--rate", "max", "--seed", "5", "--anomaly-rate", "0.02")
    publisher = bus.publisher(settings)
    for raw in (b"not json", b"[]", b'{"schema_version": 7}'):
        publisher.send(settings.trades_topic, b"AAPL", raw)
    assert publisher.flush(30)
    publisher.close()
    wait_for(lambda: total(scrape(urls["consumer"]), "tradewatch_rows_written_total", table="trades") == 3000
             and total(scrape(urls["consumer"]), "tradewatch_dead_letters_total") == 3
             and total(scrape(urls["detector"]), "tradewatch_messages_in_total") == 3003
             and total(scrape(urls["aggregator"]), "tradewatch_messages_in_total") == 3003
             and total(scrape(urls["aggregator"]), "tradewatch_rows_written_total", table="stock_metrics") > 0,
             timeout=120, message="3000 rows and 3 dead letters written, every message examined by each stage")
    wait_for(lambda: query(settings, "SELECT count(*) FROM alerts WHERE published_at IS NOT NULL")[0][0] ==
             total(scrape(urls["detector"]), "tradewatch_alerts_total") > 0, timeout=60, message="alerts counted")

    consumer = scrape(urls["consumer"])
    assert total(consumer, "tradewatch_messages_in_total", stage="consumer") == 3003
    assert total(consumer, "tradewatch_dead_letters_total") == 3
    assert total(consumer, "tradewatch_dead_letters_total", reason="not json") == 1
    assert total(consumer, "tradewatch_latency_seconds_count", path="trade_to_row") >= 3000 // 64
    assert total(consumer, "tradewatch_checkpoint_records_sum") == 3003
    assert total(consumer, "tradewatch_stage_starts_total") == 1
    # a gauge the stage samples once a second from Kafka's last answer: it settles at 0 once caught up
    # (read right after the last row it still said 1,204 in one CI run)
    wait_for(lambda: total(scrape(urls["consumer"]), "tradewatch_lag_records") == 0, timeout=30,
             message="the consumer's lag gauge at 0")
    # the disk holding TRADEWATCH_HOME, measured when scraped (the rule TradeWatchDiskLow reads it)
    found = disk.usage(settings.home)
    assert total(consumer, "tradewatch_disk_size_bytes", folder=str(found.folder)) == found.total
    free = total(consumer, "tradewatch_disk_free_bytes", folder=str(found.folder))
    assert abs(free - found.free) < 0.01 * found.total
    aggregator = scrape(urls["aggregator"])
    assert total(aggregator, "tradewatch_rows_written_total", table="stock_metrics") > 0
    detector = scrape(urls["detector"])
    alerts = query(settings, "SELECT alert_type, severity, count(*) FROM alerts GROUP BY 1, 2")
    for kind, severity, count in alerts:
        assert total(detector, "tradewatch_alerts_total", type=kind, severity=severity) == count
    assert total(detector, "tradewatch_latency_seconds_count", path="trade_to_alert") == sum(c for *_, c in alerts)

    run_script(settings, "producer.py", "--count", "500", "--rate", "max", "--seed", "6")
    wait_for(lambda: total(scrape(urls["consumer"]), "tradewatch_rows_written_total", table="trades") == 3500,
             message="the counters move with the next trades")
    for name, process in running.items():
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0, name


def test_the_stages_sample_the_pipeline_over_time(settings, tmp_path):
    """What the dashboard's pipeline panel and GET /pipeline show: real stages fed at a known rate
    record it, with the latency they measured (consumer: trade → row, detector: trade → alert)."""
    running = {name: start_script(settings, *STAGES[name], log=tmp_path / f"{name}.log") for name in STAGES}
    engine = queries.engine_for(settings.sqlalchemy_url)
    started = datetime.now(timezone.utc)
    run_script(settings, "producer.py", "--rate", "200", "--duration", "35", "--seed", "8", "--anomaly-rate", "0.02")
    ended = datetime.now(timezone.utc)
    wait_for(lambda: (frame := queries.pipeline(engine, started))["at"].max() >= pd.Timestamp(ended) + timedelta(
        seconds=heartbeat.SAMPLE_INTERVAL_S), timeout=60, message="a sample after the producer stopped")
    frame = queries.pipeline(engine, started)
    assert set(frame.stage) == set(STAGES)
    # samples whose whole interval lies inside the producing: every stage kept up with 200 trades/s
    inside = frame[(frame["at"] >= pd.Timestamp(started) + timedelta(seconds=heartbeat.SAMPLE_INTERVAL_S + 2))
                   & (frame["at"] <= pd.Timestamp(ended))]
    assert len(inside) >= 2 * len(STAGES), inside
    for stage, rows in inside.groupby("stage"):
        # a stage that fell behind for a moment (a loaded machine) catches up faster than 200/s: each
        # sample within reason, their mean the producer's rate
        assert rows.per_s.between(100, 400).all() and 150 <= rows.per_s.mean() <= 250, (stage, rows.per_s.tolist())
        assert rows.lag.max() < 1000, (stage, rows.lag.tolist())
    consumer = inside[inside.stage == "consumer"]
    assert consumer.arriving_per_s.between(150, 250).all(), consumer.arriving_per_s.tolist()
    assert (consumer.measured > 0).all() and consumer.p99_ms.between(0, 5000).all()
    assert (consumer.p50_ms <= consumer.p99_ms).all()
    alerts = query(settings, "SELECT count(*) FROM alerts")[0][0]
    assert frame[frame.stage == "detector"].measured.sum() <= alerts and alerts > 0
    assert frame[frame.stage == "aggregator"].measured.sum() == 0, "the aggregator measures no latency"
    for name, process in running.items():
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0, name
