"""Chaos in time (issue 22): what a run of hours meets, compressed — bursts of trades with quiet
spells longer than the idle timeout between them (windows closed by the idle rule, then a stage
restarted inside the quiet: SIGTERM and SIGKILL), a Kafka outage three idle timeouts long while
the producer keeps producing, an alerts topic that refuses every alert for a while, and a webhook
that is down for its first minute. At the end the trades, candles, indicators, flags, alerts and
breakers equal those of an undisturbed run of the same trades, nothing is late, and every alert is
on the topic and at the webhook at least once."""
from __future__ import annotations

import json
import signal
import threading
import time
from datetime import datetime, timezone
from itertools import islice

from confluent_kafka.admin import AlterConfigOpType, ConfigEntry, ConfigResource, NewTopic

from tests.conftest import query, wait_for
from tests.integration.test_chaos import PROGRESS, TABLES, assert_same, progress, snapshot
from tests.integration.test_commit_protocol import STAGES, alerts_on_topic, start, stop_all, truncate, with_groups
from tests.integration.test_outbox import Webhook
from tradewatch import bus, stack
from tradewatch.events import Trade
from tradewatch.market.simulator import MarketSimulator

IDLE_S = 3.0
QUIET_S = 2 * IDLE_S + 1                  # each quiet spell: longer than the idle timeout
WEBHOOK_DOWN_S = 60.0
BURSTS = 6
START_MS = 1_767_571_200_000              # 2026-01-05T00:00:00Z


CLOSE_MS = START_MS + 7_200_000          # one closing print per symbol, after every burst


def bursts() -> list[list[tuple[bytes, bytes]]]:
    """Six bursts of 1,500 simulated trades, each ten minutes of event time after the last, each
    ending with a print per symbol in the last millisecond of its minute (so one idle timeout of
    quiet closes every 1-minute window of the burst); then a closing print per symbol two hours on
    (its own windows stay open and are left out of the comparison)."""
    out, last = [], {}
    for b in range(BURSTS):
        trades = list(islice(MarketSimulator(["AAPL", "MSFT", "JPM"], rate=20.0, seed=40 + b, anomaly_rate=0.01,
                                             start_ms=START_MS + b * 600_000), 1500))
        last = {t.symbol: t for t in trades}
        end = (max(t.timestamp_ms for t in trades) // 60_000 + 1) * 60_000 - 1
        trades += [Trade(f"end-{b}-{s}", s, end, t.price, 1.0, "unknown", t.exchange) for s, t in sorted(last.items())]
        out.append(trades)
    out[-1] += [Trade(f"close-{s}", s, CLOSE_MS, t.price, 1.0, "unknown", t.exchange) for s, t in sorted(last.items())]
    return [[(t.symbol.encode(), t.to_json_bytes()) for t in part] for part in out]


def open_windows(settings, size: str | None = None) -> int:
    return query(settings, "SELECT count(*) FROM stock_metrics WHERE NOT is_final AND (%s::text IS NULL OR"
                           " window_size = %s) AND window_start < timestamptz 'epoch' + %s * interval '1 ms'",
                 (size, size, CLOSE_MS))[0][0]


def settled(settings, n: int, published: bool = True, size: str | None = None) -> bool:
    """Every trade stored, folded and examined, the windows closed (the idle rule; those of `size`
    only if given), and — unless the alerts topic refuses them now — every alert published."""
    now = progress(settings)
    done = all(now[k] == n for k in ("stored", "folded", "examined")) and (not published or now["unpublished"] == 0)
    return done and open_windows(settings, size) == 0


def before_close(snapshot_: dict) -> dict:
    """The closing prints' own windows (open, how long depends on how long the test waited) left out."""
    cut = datetime.fromtimestamp(CLOSE_MS / 1000, timezone.utc)
    return {table: [r for r in rows if table not in ("stock_metrics", "indicators") or r[2] < cut]
            for table, rows in snapshot_.items()}


def set_alert_limit(settings, max_bytes: int) -> None:
    admin = bus.admin_client(settings)
    resource = ConfigResource("topic", settings.alerts_topic, incremental_configs=[
        ConfigEntry("max.message.bytes", str(max_bytes), incremental_operation=AlterConfigOpType.SET)])
    admin.incremental_alter_configs([resource])[resource].result(10)


def test_quiet_spells_restarts_outages_and_failing_deliveries_end_like_an_undisturbed_run(settings, tmp_path):
    parts = bursts()
    n = sum(len(p) for p in parts)

    clean = with_groups(settings, "clean").with_overrides(idle_timeout_seconds=IDLE_S)
    publisher = bus.publisher(clean)
    publisher.send_many(clean.trades_topic, [m for part in parts for m in part])
    assert publisher.flush(60)
    publisher.close()
    processes = [start(clean, stage, tmp_path / f"clean-{stage}.log") for stage in STAGES]
    wait_for(lambda: settled(clean, n), timeout=300, interval=1, message="the undisturbed run")
    stop_all(processes)
    expected = before_close(snapshot(clean))
    assert expected["alerts"] and not expected["late_trades"]
    truncate(settings)

    webhook = Webhook()
    chaos = with_groups(settings.with_overrides(trades_topic=f"{settings.trades_topic}-time"), "time") \
        .with_overrides(idle_timeout_seconds=IDLE_S, alert_webhook_url=webhook.url)
    bus.ensure_topic(chaos, chaos.trades_topic, chaos.trades_partitions)
    admin = bus.admin_client(chaos)
    admin.create_topics([NewTopic(chaos.alerts_topic, 1, 1, config={"message.timestamp.type": "LogAppendTime"})])[
        chaos.alerts_topic].result(10)
    logs = {stage: tmp_path / f"time-{stage}.log" for stage in STAGES}
    running = {stage: start(chaos, stage, logs[stage]) for stage in STAGES}
    threading.Timer(WEBHOOK_DOWN_S, lambda: setattr(webhook, "up", True)).start()
    publisher = bus.publisher(chaos)          # one producer throughout, as producer.py
    sent = 0
    done = []

    def burst(b: int, flush: bool = True) -> None:
        nonlocal sent
        publisher.send_many(chaos.trades_topic, parts[b])
        sent += len(parts[b])
        if flush:
            assert publisher.flush(120)

    def quiet_then_restart(stage: str, how: signal.Signals, published: bool = True) -> None:
        # the quiet spell: the idle rule closes every window of what was sent, then a restart
        try:
            wait_for(lambda: settled(chaos, sent, published, "1m"), timeout=120, interval=0.5,
                     message="the burst settled")
        except AssertionError as error:
            raise AssertionError(f"{error} after {done}: {PROGRESS}, open 1m windows "
                                 f"{open_windows(chaos, '1m')}") from None
        running[stage].send_signal(how)
        running[stage].wait(timeout=60)
        running[stage] = start(chaos, stage, logs[stage])
        done.append(f"{how.name} {stage} in a quiet spell")
        time.sleep(QUIET_S)                  # the rest of the spell: the restarted stage sees only quiet

    try:
        burst(0)
        quiet_then_restart("aggregator", signal.SIGTERM)
        burst(1)
        quiet_then_restart("aggregator", signal.SIGKILL)
        set_alert_limit(chaos, 200)          # Kafka now refuses every alert
        burst(2)
        quiet_then_restart("detector", signal.SIGKILL, published=False)
        stack.stop_kafka(chaos)              # an outage of three idle timeouts; the producer holds a burst
        outage_started = time.monotonic()
        burst(3, flush=False)
        time.sleep(max(3 * IDLE_S - (time.monotonic() - outage_started), 0))
        stack.start_kafka(chaos)
        bus.wait_for_kafka(chaos, 60)
        assert publisher.flush(120)
        done.append("kafka outage of 3 idle timeouts while producing")
        refused = query(chaos, "SELECT count(*) FROM alerts WHERE published_at IS NULL")[0][0]
        set_alert_limit(chaos, 1_048_588)    # and accepts them again
        done.append(f"{refused} alerts refused by the topic meanwhile")
        burst(4)
        quiet_then_restart("consumer", signal.SIGKILL)
        burst(5)
    finally:
        publisher.close()
    wait_for(lambda: settled(chaos, n), timeout=300, interval=1, message="the disturbed run to settle")
    ids = {r[0] for r in query(chaos, "SELECT alert_id FROM alerts")}
    wait_for(lambda: set(webhook.ids()) >= ids, timeout=WEBHOOK_DOWN_S + 120, interval=1,
             message="every alert at the webhook")
    stop_all(running.values())
    webhook.server.shutdown()

    got = before_close(snapshot(chaos))
    for table in TABLES:
        assert_same(got[table], expected[table], table)
    assert alerts_on_topic(chaos, ids) >= ids, "every stored alert reached the alerts topic"
    assert refused > 0, "the topic refused alerts during the test"
    assert webhook.refused > 0, "the webhook was down during the test"
    for stage, log in logs.items():
        assert "Traceback" not in log.read_text(), f"{stage} crashed"
    print(json.dumps({"messages": n, "events": done, "webhook_refused": webhook.refused,
                      "tables_equal": {t: len(rows) for t, rows in got.items()}}))
