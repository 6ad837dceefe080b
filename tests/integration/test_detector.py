"""anomaly_detector.py end to end through the real Kafka and PostgreSQL, with a local webhook."""
from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
from tests.conftest import SHARED_DATA, publish_trades, query, run_script, start_script, wait_for
from tradewatch import bus
from tradewatch.config import PROJECT_ROOT
from tradewatch.detect import forecast, inject, versions
from tradewatch.events import Trade
from tradewatch.store import db, queries


@pytest.fixture
def webhook():
    received: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/hook", received
    server.shutdown()


def test_train_with_too_little_data_stops_with_a_clear_message(settings, tmp_path):
    run_script(settings, "producer.py", "--count", "300", "--rate", "max", "--seed", "3", "--symbols", "AAPL")
    consumer = start_script(settings, "consumer.py")
    wait_for(lambda: query(settings, "SELECT count(*) FROM trades")[0][0] == 300, message="300 rows")
    consumer.send_signal(signal.SIGTERM)
    consumer.wait(timeout=30)
    env = {**settings.as_env(), "MODEL_DIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "anomaly_detector.py", "train"], cwd=PROJECT_ROOT, capture_output=True,
                         text=True, env={**os.environ, **env})
    assert out.returncode == 2
    assert "300 trades" in out.stderr and "at least 1000" in out.stderr and "Traceback" not in out.stderr
    out = subprocess.run([sys.executable, "anomaly_detector.py", "train", "--symbols", "AAPL"], cwd=PROJECT_ROOT,
                         capture_output=True, text=True, env={**os.environ, **env})
    assert out.returncode == 2 and "AAPL has 300 trades" in out.stderr
    assert not list(tmp_path.glob("*.joblib"))


def test_train_fits_the_volatility_forecaster_on_the_aggregators_final_candles(settings, tmp_path):
    # two hours of simulated history (2 trades/s over two symbols) through the consumer and the aggregator
    settings = settings.with_overrides(model_dir=str(tmp_path / "models"), window_sizes="1m,5m")
    run_script(settings, "producer.py", "--history", "7200", "--rate", "2", "--symbols", "AAPL,MSFT", "--seed", "9",
               "--duration", "0.5")
    stages = [start_script(settings, "consumer.py", log=tmp_path / "consumer.log"),
              start_script(settings, "aggregator.py", log=tmp_path / "aggregator.log")]
    wait_for(lambda: query(settings, "SELECT count(*) FROM stock_metrics WHERE window_size = '1m' AND is_final"
                                     " AND window_start < now() - interval '3 minutes'")[0][0] >= 2 * 115,
             timeout=180, message="two hours of final 1-minute candles")
    for stage in stages:
        stage.send_signal(signal.SIGTERM)
        assert stage.wait(timeout=60) == 0
    forecasters = "SELECT window_size, forecaster, count(*) FROM indicators WHERE forecaster IS NOT NULL GROUP BY 1, 2"
    assert {(size, name) for size, name, _ in query(settings, forecasters)} == {("1m", "ewma (untrained)"),
                                                                              ("5m", "ewma (untrained)")}
    out = json.loads(run_script(settings, "anomaly_detector.py", "train").stdout)
    fc = out["forecast"]
    assert fc["model"] == str(tmp_path / "models" / "forecast-v1.joblib") and fc["version"] == "v1"
    assert fc["sizes"]["1m"]["chosen"] in ("ewma", "model") and fc["sizes"]["1m"]["windows"] >= 90
    assert "training needs" in fc["sizes"]["5m"]["skipped"]          # 24 five-minute windows are too few
    meta = json.loads((tmp_path / "models" / "forecast-v1.json").read_text())
    assert meta["training"]["symbols"] == ["AAPL", "MSFT"]
    assert set(meta["sizes"]["1m"]["walk_forward"]) == {"last", "ewma", "har", "model"}
    assert 0.6 <= meta["sizes"]["1m"]["walk_forward"][fc["sizes"]["1m"]["chosen"]]["coverage_90"] <= 1.0
    # what it forecasts for the stored candles: a band that covers most of the next windows
    fitted, _ = forecast.load(tmp_path / "models" / "forecast-v1.joblib")
    conn = db.connect(settings)
    table = forecast.rows(queries.final_candles_frame(conn))
    conn.close()
    one = table[table["size_ms"] == 60_000].dropna(subset=["next_v"])
    band = fitted["1m"].forecast(one)["band"]
    assert (band > 0).all() and 0.75 <= (one["next_excursion"] <= band).mean() <= 1.0
    # a second training is a new version; the first stays for a detector that loaded it
    again = json.loads(run_script(settings, "anomaly_detector.py", "train").stdout)
    assert again["forecast"]["version"] == "v2" and (tmp_path / "models" / "forecast-v1.joblib").exists()
    # the aggregator forecasts with the latest: its rebuild of the two hours says so on every 1m forecast
    run_script(settings, "aggregator.py", "--backfill", "--since",
               (datetime.now(timezone.utc) - timedelta(hours=3)).isoformat())
    chosen = again["forecast"]["sizes"]["1m"]["chosen"]
    assert {(size, name) for size, name, _ in query(settings, forecasters)} == {("1m", f"{chosen} (forecast-v2)"),
                                                                              ("5m", "ewma (untrained)")}


def test_stream_with_injected_anomalies_gives_flags_alerts_topic_and_webhook(settings, webhook, tmp_path):
    url, received = webhook
    settings = settings.with_overrides(alert_webhook_url=url, model_dir=str(tmp_path / "models"))
    run_script(settings, "producer.py", "--count", "20000", "--rate", "max", "--seed", "77",
               "--anomaly-rate", "0.004", "--start", "2026-01-01T00:00:00Z")
    consumer = start_script(settings, "consumer.py", log=tmp_path / "consumer.log")
    wait_for(lambda: query(settings, "SELECT count(*) FROM trades")[0][0] == 20000, timeout=120, message="stored")
    # a model trained on the stored trades, then live detection with it
    run_script(settings, "anomaly_detector.py", "train")
    assert list((tmp_path / "models").glob("model-v1.joblib"))
    detector = start_script(settings, "anomaly_detector.py", "run", log=tmp_path / "detector.log")
    wait_for(lambda: sum(c for c, _ in bus.group_lag(settings, settings.detector_group,
                                                     settings.trades_topic).values()) == 20000,
             timeout=180, message="detector examined every trade")
    wait_for(lambda: len(received) >= 5, timeout=60, message="webhook posts")
    detector.send_signal(signal.SIGTERM)
    assert detector.wait(timeout=60) == 0
    consumer.send_signal(signal.SIGTERM)
    consumer.wait(timeout=30)

    labelled, caught, false_flags = query(settings, """
        SELECT count(*) FILTER (WHERE injected_anomaly IN ('price_spike', 'price_drop', 'volume_spike')),
               count(*) FILTER (WHERE injected_anomaly IN ('price_spike', 'price_drop', 'volume_spike')
                                AND f.trade_id IS NOT NULL),
               count(*) FILTER (WHERE injected_anomaly IS NULL AND f.trade_id IS NOT NULL)
        FROM trades t LEFT JOIN trade_flags f USING (trade_id)""")[0]
    assert labelled > 30 and caught / labelled >= 0.9
    assert false_flags <= 5
    row = query(settings, "SELECT anomaly_types, anomaly_score, anomaly_severity, detector_version"
                          " FROM trade_flags JOIN trades USING (trade_id)"
                          " WHERE injected_anomaly = 'price_spike' LIMIT 1")[0]
    assert "PRICE_SPIKE" in row[0] and row[1] > 1 and row[2] in ("HIGH", "CRITICAL") and "forest-v1" in row[3]
    assert query(settings, "SELECT count(*) FROM trades")[0][0] == 20000, "flags never add rows"
    assert query(settings, "SELECT count(*) FROM trade_flags LEFT JOIN trades t USING (trade_id)"
                           " WHERE t.trade_id IS NULL")[0][0] == 0, "every flag is on a stored trade"

    alerts = query(settings, "SELECT alert_id, alert_type, severity, message, acknowledged FROM alerts")
    assert {a[1] for a in alerts} >= {"PRICE_SPIKE", "PRICE_DROP", "VOLUME_SPIKE"}
    assert all(not a[4] and a[3] for a in alerts)
    states = dict(query(settings, "SELECT symbol, state FROM circuit_breakers"))
    assert set(states.values()) <= {"OPEN", "HALF_OPEN", "CLOSED"}
    current = set(query(settings, "SELECT symbol, state, since FROM circuit_breakers"))
    history = set(query(settings, "SELECT symbol, state, at FROM breaker_transitions"))
    assert current <= history, "each breaker's current state is a transition in its history (reports read it)"

    published = [json.loads(m.value) for m in bus.read_topic(
        settings, settings.alerts_topic, lambda got: len(got) >= len(alerts), timeout_s=30)]
    assert {p["alert_id"] for p in published} == {a[0] for a in alerts}
    assert all("text" in post and post["alert"]["alert_id"] for post in received)

    # every alert says why it fired, the same in the table, on the topic and in the webhook
    stored = {alert_id: evidence for alert_id, evidence in query(settings, "SELECT alert_id, evidence FROM alerts")}
    messages = {a[0]: a[3] for a in alerts}
    assert all(e and e["version"] == 1 and e["sentence"] in messages[i] for i, e in stored.items())
    assert all(p["evidence"] == stored[p["alert_id"]] for p in published)
    assert all(post["alert"]["evidence"] == stored[post["alert"]["alert_id"]] for post in received)
    assert all(post["text"].endswith(stored[post["alert"]["alert_id"]]["sentence"]) for post in received)
    # a spike's baseline, re-derived from the stored trades it names
    spikes = [e for e in stored.values() if e["rule"] == "PRICE_SPIKE"]
    for e in spikes[:5]:
        prices = query(settings, "SELECT price FROM trades WHERE trade_id = ANY(%s)", (e["trades"]["ids"],))
        price = query(settings, "SELECT price FROM trades WHERE trade_id = %s", (e["trades"]["trade_id"],))[0][0]
        mean = sum(p for p, in prices) / len(prices)
        assert 20 <= len(prices) == e["trades"]["count"] <= settings.zscore_window
        assert e["baseline"] == pytest.approx(mean, rel=1e-9) and e["value"] == price
        assert e["change"] == pytest.approx((price / mean - 1) * 100, rel=1e-6) and e["change"] > e["threshold"]
    whales = [e for e in stored.values() if e["rule"] == "VOLUME_SPIKE"]
    for e in whales[:5]:
        (largest,) = query(settings, "SELECT quantity FROM trades WHERE trade_id = ANY(%s)", (e["trades"]["ids"],))
        assert e["baseline"] == largest[0] and e["value"] / e["baseline"] == pytest.approx(e["change"])
    assert spikes and whales

    report = json.loads(run_script(settings, "anomaly_detector.py", "analyze", "--json").stdout)
    assert sum(s["trades"] for s in report["symbols"].values()) == 20000
    assert report["top_anomalies"][0]["score"] >= report["top_anomalies"][-1]["score"]
    text = run_script(settings, "anomaly_detector.py", "analyze", "AAPL").stdout
    assert "AAPL" in text and "top" in text


def test_a_jump_on_the_recorded_ibm_day_raises_one_out_of_range_alert_that_explains_itself(settings, tmp_path):
    """Issue 28, through Kafka, consumer.py and `anomaly_detector.py run`: the recorded IBM day's
    regular hours with one lasting 1 % jump injected (some 20 σ of its minutes, under the price
    rules' 5 %) raise exactly one OUT_OF_RANGE alert, on the first trade after the jump that sets a
    price; the six and a half hours around it, none. The detector judges with the trained
    forecaster's band, and the alert's centre and σ follow from the stored trades."""
    from tradewatch.market import replay

    day = [t for t in replay.load(SHARED_DATA / "lean" / "ibm_20131007_trades.csv.gz").trades
           if 13 * 60 + 30 <= t.timestamp_ms // 60_000 % 1440 < 20 * 60]
    changed, (jump,) = inject.jumps(day, 5, 1, 0.01)
    expected = next(t for t in changed[jump:] if t.condition not in settings.ohlc_excluded)
    models = tmp_path / "models"
    versions.save(models, "forecast", {"sizes": {}}, {"features": [], "training": {}, "sizes": {
        "1m": {"chosen": "ewma", "band_ratio": 2.2, "range_ratio": 1.7}}})        # what `train` writes for an EWMA
    settings = settings.with_overrides(model_dir=str(models))
    publish_trades(settings, changed)
    consumer = start_script(settings, "consumer.py", log=tmp_path / "consumer.log")
    detector = start_script(settings, "anomaly_detector.py", "run", log=tmp_path / "detector.log")
    wait_for(lambda: query(settings, "SELECT count(*) FROM trades")[0][0] == len(changed), timeout=120,
             message="stored")
    wait_for(lambda: sum(c for c, _ in bus.group_lag(settings, settings.detector_group,
                                                     settings.trades_topic).values()) == len(changed),
             timeout=180, message="detector examined every trade")
    for process in (detector, consumer):
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0

    alerts = query(settings, "SELECT alert_id, trade_id, severity, message, evidence FROM alerts"
                             " WHERE alert_type = 'OUT_OF_RANGE'")
    assert [(a[1], a[2]) for a in alerts] == [(expected.trade_id, "HIGH")]
    alert_id, _, _, message, e = alerts[0]
    assert e["sentence"] in message and "ewma (forecast-v1)" in e["sentence"]
    assert e["params"]["band_ratio"] == 2.2 and e["threshold"] == pytest.approx(2.2 * 3)
    # the centre: the last trade that sets a price in the window the evidence names, as stored
    start = e["trades"]["first_ms"]
    closes = query(settings, "SELECT price, condition FROM trades WHERE ts >= to_timestamp(%s / 1000.0)"
                             " AND ts < to_timestamp(%s / 1000.0) ORDER BY ts, kafka_offset", (start, start + 60_000))
    assert e["baseline"] == [p for p, c in closes if c not in settings.ohlc_excluded][-1]
    assert e["trades"]["count"] == len(closes) and e["value"] == expected.price
    assert e["change"] == pytest.approx(math.log(expected.price / e["baseline"]) / e["extra"]["sigma"])
    assert abs(e["change"]) > e["threshold"] > 0
    assert min(e["baseline"], expected.price) < e["level"] < max(e["baseline"], expected.price)
    published = [json.loads(m.value) for m in bus.read_topic(
        settings, settings.alerts_topic, lambda got: any(b"OUT_OF_RANGE" in m.value for m in got), timeout_s=30)]
    assert [p["evidence"] for p in published if p["alert_id"] == alert_id] == [e]


T0 = 1_767_312_000_000                     # 2026-01-02T00:00:00Z
WARM = [Trade(f"n-{i}", "AAPL", T0 + i * 100, 100.0 + (i % 2) * 0.01, 1.0, "buy", "X") for i in range(100)]


def spike(name: str, at_ms: int, price: float) -> Trade:
    return Trade(name, "AAPL", at_ms, price, 1.0, "buy", "X")



def owners(settings) -> dict[int, str]:
    return dict(query(settings, "SELECT kafka_partition, owner FROM partition_owners WHERE consumer_group = %s",
                      (settings.detector_group,)))


def test_cooldowns_and_breakers_follow_a_partition_to_its_next_owner(settings, tmp_path):
    """Issue 22, item 5: cooldowns and breaker states were loaded once per process, when it first
    got partitions. A detector that took over AAPL's partition from another one (stopped) still
    had the cooldowns of its own start: a second spike 10 s after the first raised the alerts again
    (HIGH cooldown 60 s) and re-opened an open breaker. They now travel with the partition's state."""
    detectors = {}
    for n in (1, 2):
        process = start_script(settings, "anomaly_detector.py", "run", log=tmp_path / f"detector{n}.log")
        detectors[f"{socket.gethostname()}:{process.pid}"] = process
    wait_for(lambda: set(owners(settings).values()) == set(detectors), timeout=60, message="both detectors hold some")
    publish_trades(settings, WARM + [spike("s-1", T0 + 10_100, 120.0)])
    wait_for(lambda: query(settings, "SELECT count(*) FROM alerts WHERE trade_id = 's-1'")[0][0] >= 2,
             timeout=60, message="the first spike's alerts")
    stored = lambda: query(settings, "SELECT kafka_partition FROM detector_symbols WHERE consumer_group = %s"
                                     " AND symbol = 'AAPL'", (settings.detector_group,))
    wait_for(stored, timeout=30, message="AAPL's state in a checkpoint (alerts go out before it)")
    partition = stored()[0][0]
    first = owners(settings)[partition]
    detectors[first].send_signal(signal.SIGTERM)
    assert detectors[first].wait(timeout=30) == 0
    wait_for(lambda: owners(settings)[partition] != first, timeout=60, message="the other detector takes AAPL over")
    publish_trades(settings, [spike("s-2", T0 + 20_000, 121.0)])
    wait_for(lambda: sum(c for c, _ in bus.group_lag(settings, settings.detector_group,
                                                     settings.trades_topic).values()) == 102,
             timeout=60, message="the second spike examined")
    assert query(settings, "SELECT anomaly_types FROM trade_flags WHERE trade_id = 's-2'"), "the spike is flagged"
    kinds = query(settings, "SELECT alert_type, count(*) FROM alerts GROUP BY 1 ORDER BY 1")
    assert all(count == 1 for _, count in kinds), f"alerts raised again within their cooldown: {kinds}"
    assert query(settings, "SELECT count(*) FROM breaker_transitions WHERE state = 'OPEN'")[0][0] == 1


def test_alerts_dropped_with_a_lost_partition_hold_no_cooldown(settings):
    """Issue 22, item 5: a partition lost before its checkpoint drops its pending alerts; their
    cooldowns stayed, so when the partition came back and the trades were read again, the alert
    was suppressed for good."""
    from tradewatch import runtime
    from tradewatch.stages.detector import Detect

    trades = WARM + [spike("s-1", T0 + 10_100, 120.0)]
    messages = [bus.Message(settings.trades_topic, 0, i, t.symbol.encode(), t.to_json_bytes(), t.timestamp_ms)
                for i, t in enumerate(trades)]
    stage = Detect(settings)
    rt = runtime.Runtime(settings, stage, settings.detector_group, settings.trades_topic, stop=lambda: False)
    try:
        rt._assigned([0])
        stage.take(messages)
        assert [a.trade_id for a in stage.alerts_pending.items()].count("s-1") >= 2
        rt._lost([0])                              # e.g. a session timeout, before the checkpoint
        assert not stage.alerts_pending
        assert rt._assigned([0]) == {}             # nothing was stored: read again from the start
        stage.take(messages)
        assert [a.trade_id for a in stage.alerts_pending.items()].count("s-1") >= 2, "the re-read spike alerts again"
    finally:
        if rt.conn is not None:
            rt.conn.close()


class OffsetsOnly:
    """A stand-in for the Kafka consumer of a runtime driven by hand: it takes offset commits."""
    committed: dict = {}

    def commit(self, offsets, wait=True):
        self.committed = offsets


def test_alerts_go_out_before_the_checkpoint_and_once_after_a_crash(settings):
    """#39: the checkpoint stores each symbol's whole rolling state (20-90 ms with the pipeline
    running), and alerts waited behind it: trade -> alerts topic p99 151 ms at 1,000 trades/s.
    A batch's alerts are now stored at once in a fenced transaction of their own and sent to the
    topic; the position and state wait for the checkpoint. A crash before it reads the messages
    again: each alert is still stored and sent once. A stale owner's urgent write stores nothing."""
    from tradewatch import runtime
    from tradewatch.stages.detector import Detect

    trades = WARM + [spike("s-1", T0 + 10_100, 120.0)]
    messages = [bus.Message(settings.trades_topic, 0, i, t.symbol.encode(), t.to_json_bytes(), t.timestamp_ms)
                for i, t in enumerate(trades)]
    bus.ensure_topic(settings, settings.alerts_topic, 1)
    first, second = Detect(settings), Detect(settings)
    rts = [runtime.Runtime(settings, stage, settings.detector_group, settings.trades_topic, stop=lambda: False)
           for stage in (first, second)]
    stored = lambda: query(settings, "SELECT alert_id, published_at IS NOT NULL FROM alerts ORDER BY 1")
    try:
        rts[0]._assigned([0])
        first.take(messages)
        assert first.urgent()
        rts[0]._write_urgent()
        alerts = stored()
        assert len(alerts) >= 2 and all(published for _, published in alerts), alerts
        assert not first.urgent()
        for table in ("stage_positions", "detector_symbols"):
            assert not query(settings, f"SELECT 1 FROM {table} WHERE consumer_group = %s",
                             (settings.detector_group,)), f"{table} waits for the checkpoint"
        read_alerts = lambda: sorted(json.loads(m.value)["alert_id"] for m in bus.read_topic(
            settings, settings.alerts_topic, lambda got: len(got) > len(alerts), timeout_s=5))
        assert read_alerts() == [a for a, _ in alerts]

        rts[1]._assigned([0])                 # the first one died before its checkpoint
        second.take(messages)                 # nothing stored: read again from the start
        rts[1]._write_urgent()
        rts[1].offsets, rts[1].consumer = {0: len(messages)}, OffsetsOnly()
        rts[1].checkpoint()
        assert rts[1].consumer.committed == {0: len(messages)}
        assert stored() == alerts, "stored once"
        assert read_alerts() == [a for a, _ in alerts], "sent once"
        assert query(settings, "SELECT 1 FROM stage_positions WHERE consumer_group = %s", (settings.detector_group,))

        late = spike("s-2", T0 + 90_000, 60.0)
        first.take([bus.Message(settings.trades_topic, 0, len(messages), b"AAPL", late.to_json_bytes(),
                                late.timestamp_ms)])
        assert first.urgent()
        rts[0]._write_urgent()
        assert rts[0].fenced == 1 and not rts[0].epochs
        assert not query(settings, "SELECT 1 FROM alerts WHERE trade_id = 's-2'"), "the stale owner stored nothing"
    finally:
        for rt in rts:
            if rt.conn is not None:
                rt.conn.close()
            if rt.publisher is not None:
                rt.publisher.close()


def spike_through_a_running_stage(settings, stage, during=lambda: None) -> None:
    """Run `stage` on the stage runtime's loop, as `anomaly_detector.py run` does, while a spike
    after the warm-up raises alerts; `during` is called once they are stored and sent; then stop."""
    from tradewatch import runtime

    stopping = threading.Event()
    rt = runtime.Runtime(settings, stage, settings.detector_group, settings.trades_topic, stop=stopping.is_set)
    thread = threading.Thread(target=rt.run)
    thread.start()
    try:
        publish_trades(settings, WARM + [spike("s-1", T0 + 10_100, 120.0)])
        wait_for(lambda: query(settings, "SELECT count(*) FROM alerts WHERE trade_id = 's-1'"
                                         " AND published_at IS NOT NULL")[0][0] >= 2,
                 timeout=60, message="the spike's alerts, stored and sent")
        during()
    finally:
        stopping.set()
        thread.join(60)
    assert not thread.is_alive()


def test_a_running_detector_sends_an_alert_long_before_its_next_checkpoint(settings):
    """The stage loop writes a batch that raised an alert at once (Stage.urgent): with a
    checkpoint due only in an hour, the spike's alerts still reach the table and the topic, and
    the position waits for the checkpoint made on stopping."""
    from tradewatch.stages.detector import Detect

    stage = Detect(settings)
    stage.flush_interval_s = 3600.0

    def no_position_yet():
        assert not query(settings, "SELECT 1 FROM stage_positions WHERE consumer_group = %s",
                         (settings.detector_group,)), "the position waits for the checkpoint"
    spike_through_a_running_stage(settings, stage, during=no_position_yet)
    assert query(settings, "SELECT sum(next_offset) FROM stage_positions WHERE consumer_group = %s",
                 (settings.detector_group,))[0][0] == len(WARM) + 1


def test_alerts_raised_as_a_checkpoint_falls_due_go_out_ahead_of_it(settings):
    """A checkpoint also writes each changed symbol's rolling state and takes several times longer
    than the alerts alone: the alerts of the batch read as it falls due are stored and sent in
    their own transaction first, so the checkpoint finds none left to write."""
    from tradewatch.stages.detector import Detect

    alerts_at_checkpoint: list[int] = []

    class Watched(Detect):
        def write(self, conn, cur):
            alerts_at_checkpoint.append(len(self.alerts_pending))
            super().write(conn, cur)

    stage = Watched(settings)
    stage.flush_interval_s = 0.0          # a checkpoint falls due after every poll
    spike_through_a_running_stage(settings, stage)
    assert alerts_at_checkpoint and max(alerts_at_checkpoint) == 0, alerts_at_checkpoint
