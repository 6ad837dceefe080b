"""Topics the stages did not expect, on the real broker (issue 22, item 4): a topic deleted and
created again under the same name, a topic whose records carry the producer's timestamps, and a
broker that never creates a topic on first use."""
from __future__ import annotations

import re
import signal
import time

from confluent_kafka import KafkaException, Producer
from confluent_kafka.admin import ConfigResource, NewTopic

from tests.conftest import publish_trades, query, start_script, wait_for
from tradewatch import bus
from tradewatch.events import Trade

STAGES = {"consumer": ("consumer.py",), "aggregator": ("aggregator.py",), "detector": ("anomaly_detector.py", "run")}


def trades(prefix: str, n: int, start_ms: int) -> list[Trade]:
    return [Trade(f"{prefix}-{i}", ("AAPL", "MSFT", "NVDA")[i % 3], start_ms + i * 100, 100.0 + i % 7, 1.0, "buy", "X")
            for i in range(n)]



def topic_id(settings) -> str | None:
    from confluent_kafka import TopicCollection
    try:
        admin = bus.admin_client(settings)
        return str(admin.describe_topics(TopicCollection([settings.trades_topic]))[settings.trades_topic]
                   .result(10).topic_id)
    except Exception:   # noqa: BLE001 - not there (yet)
        return None


def examined(settings) -> int:
    return sum(c for c, _ in bus.group_lag(settings, settings.detector_group, settings.trades_topic).values())


def folded(settings, since_ms: int) -> int:
    return query(settings, "SELECT coalesce(sum(trade_count), 0) FROM stock_metrics WHERE window_size = '1m'"
                           " AND window_start >= timestamptz 'epoch' + %s * interval '1 ms'", (since_ms,))[0][0]


def run_stages(settings, tmp_path, run: str) -> dict:
    return {name: (start_script(settings, *args, log=tmp_path / f"{name}-{run}.log"), tmp_path / f"{name}-{run}.log")
            for name, args in STAGES.items()}


def stop_stages(stages: dict) -> None:
    for process, _ in stages.values():
        process.send_signal(signal.SIGTERM)
    for name, (process, log) in stages.items():
        assert process.wait(timeout=30) == 0, f"{name}:\n{log.read_text()[-3000:]}"


def test_a_topic_deleted_and_created_again_is_read_from_its_start(settings, tmp_path):
    """Before: positions were keyed by the topic's name, so after it was recreated the aggregator
    started at its old offsets and silently skipped the first records of every partition (200
    stored, 300 new sent: it folded about 100 of them). Now a stage sees the topic's identity change
    and reads the new topic from its start, saying so."""
    first_ms, second_ms = 1_767_398_400_000, 1_767_402_000_000      # 2026-01-03 00:00 and 01:00 UTC
    publish_trades(settings, trades("old", 200, first_ms))
    stages = run_stages(settings, tmp_path, "first")
    wait_for(lambda: query(settings, "SELECT count(*) FROM trades")[0][0] == 200
             and folded(settings, first_ms) == 200 and examined(settings) == 200, timeout=60,
             message="the first 200 trades stored, folded and examined")
    stop_stages(stages)
    old_id = topic_id(settings)

    admin = bus.admin_client(settings)
    admin.delete_topics([settings.trades_topic])[settings.trades_topic].result(10)
    wait_for(lambda: settings.trades_topic not in bus.topic_partitions(settings), message="the topic deleted")
    wait_for(lambda: _created(settings) and topic_id(settings) not in (None, old_id), timeout=60,
             message="the topic created again")
    publish_trades(settings, trades("new", 300, second_ms))

    stages = run_stages(settings, tmp_path, "second")
    wait_for(lambda: query(settings, "SELECT count(*) FROM trades")[0][0] == 500, timeout=60,
             message="the 300 new trades stored")
    wait_for(lambda: folded(settings, second_ms) == 300, timeout=60,
             message=f"the 300 new trades folded (folded {folded(settings, second_ms)})")
    wait_for(lambda: examined(settings) == 300, timeout=60, message="the detector at the new topic's end")
    stop_stages(stages)
    reports = re.findall(r"examined (\d+) trades", stages["detector"][1].read_text())
    assert reports and int(reports[-1]) == 300, reports
    for name in ("aggregator", "detector"):
        assert "was created again" in stages[name][1].read_text(), f"{name} says why it starts over"


def _created(settings) -> bool:
    try:
        bus.ensure_topic(settings, settings.trades_topic, settings.trades_partitions)
        return True
    except bus.KafkaUnavailable:
        return False


def test_a_trade_stamped_in_year_10000_is_a_dead_letter_and_the_stages_go_on(settings, tmp_path):
    """A topic with the producer's timestamps (CreateTime) on a broker that accepts any timestamp:
    the skew check measures against the producer's own clock, so a trade in year 10000 passed it,
    and storing it raised ValueError (year out of range): the consumer died on that offset on every
    start. Now it is a dead letter with the reason, and the trades after it are stored."""
    settings = settings.with_overrides(trades_topic=settings.trades_topic + "-createtime")
    admin = bus.admin_client(settings)
    admin.create_topics([NewTopic(settings.trades_topic, 1, 1, config={
        "message.timestamp.type": "CreateTime",
        "message.timestamp.after.max.ms": str(2**63 - 1)})])[settings.trades_topic].result(10)
    far = 253_402_300_800_000                # 10000-01-01T00:00:00Z
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap_servers})
    good = trades("ok", 20, int(time.time() * 1000) - 60_000)
    bad = Trade("y10k", "AAPL", far, 100.0, 1.0, "buy", "X")
    producer.produce(settings.trades_topic, bad.to_json_bytes(), b"AAPL", timestamp=far)
    for t in good:
        producer.produce(settings.trades_topic, t.to_json_bytes(), t.symbol.encode())
    assert producer.flush(30) == 0
    stages = run_stages(settings, tmp_path, "only")
    wait_for(lambda: query(settings, "SELECT count(*) FROM trades")[0][0] == 20, timeout=60,
             message="the trades after it stored")
    reason = query(settings, "SELECT reason FROM dead_letters")
    assert len(reason) == 1 and ("10000" in reason[0][0] or "9999" in reason[0][0]), reason
    wait_for(lambda: folded(settings, good[0].timestamp_ms - 60_000) == 20 and examined(settings) == 21,
             message="the good trades folded and examined")
    stop_stages(stages)
    for name, (_, log) in stages.items():
        assert "Traceback" not in log.read_text(), name


def test_the_broker_never_creates_a_topic_on_first_use_and_stages_create_theirs(settings, tmp_path):
    """An auto-created topic would carry producer timestamps (and the broker's default partition
    count): the local broker has auto-creation off, and each stage creates its topics at start."""
    admin = bus.admin_client(settings)
    broker = ConfigResource("broker", "1")
    config = admin.describe_configs([broker])[broker].result(10)
    assert config["auto.create.topics.enable"].value == "false"
    fresh = settings.with_overrides(trades_topic=settings.trades_topic + "-new",
                                    alerts_topic=settings.alerts_topic + "-new",
                                    candles_topic=settings.candles_topic + "-new")
    stages = run_stages(fresh, tmp_path, "only")
    made = {fresh.trades_topic, fresh.alerts_topic, fresh.candles_topic}
    wait_for(lambda: made <= set(bus.topic_partitions(fresh)), timeout=60, message="the stages' topics created")
    assert bus.topic_partitions(fresh)[fresh.trades_topic] == fresh.trades_partitions
    for topic in sorted(made):
        resource = ConfigResource("topic", topic)
        described = admin.describe_configs([resource])[resource].result(10)
        assert described["message.timestamp.type"].value == "LogAppendTime", topic
    stop_stages(stages)


def test_topics_get_bounded_retention_and_a_change_reaches_existing_topics(settings, tmp_path):
    """Issue 23: Kafka kept 7 days with no size cap. Every topic the stages create has
    KAFKA_RETENTION_HOURS and KAFKA_RETENTION_MB (per partition, in small segments so the cap is
    close), and a stage start brings an existing topic to changed settings."""
    def config(s, topic):
        resource, admin = ConfigResource("topic", topic), bus.admin_client(s)
        try:
            described = admin.describe_configs([resource])[resource].result(10)
        except KafkaException:
            return {}             # not created yet
        return {k: described[k].value for k in ("retention.ms", "retention.bytes", "segment.bytes",
                                                 "message.timestamp.type")}
    assert config(settings, settings.trades_topic) == {
        "retention.ms": str(168 * 3_600_000), "retention.bytes": str(500 * 1024 * 1024),
        "segment.bytes": str(64 * 1024 * 1024), "message.timestamp.type": "LogAppendTime"}
    changed = settings.with_overrides(kafka_retention_hours=2.5, kafka_retention_mb=8)
    stages = run_stages(changed, tmp_path, "changed")
    wait_for(lambda: config(changed, changed.alerts_topic).get("retention.ms") == str(9_000_000)
             and config(changed, changed.trades_topic).get("retention.ms") == str(9_000_000), timeout=60,
             message="the stages to bring their topics to the new retention")
    assert config(changed, changed.trades_topic) == {
        "retention.ms": "9000000", "retention.bytes": str(8 * 1024 * 1024), "segment.bytes": str(2 * 1024 * 1024),
        "message.timestamp.type": "LogAppendTime"}
    stop_stages(stages)


def test_messages_that_expired_before_a_stage_read_them_are_reported(settings, tmp_path):
    """Issue 23: with bounded retention a stage stopped for longer than it finds its position gone;
    it must say how many messages it never saw, not skip them silently."""
    from confluent_kafka import TopicPartition
    single = settings.with_overrides(trades_topic=settings.trades_topic + "-one")
    bus.ensure_topic(single, single.trades_topic, 1)
    now_ms = int(time.time() * 1000)
    publish_trades(single, trades("a", 10, now_ms - 60_000))
    first = start_script(single, "consumer.py", log=tmp_path / "first.log")
    wait_for(lambda: query(single, "SELECT count(*) FROM trades")[0][0] == 10, message="10 stored")
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=30) == 0
    publish_trades(single, trades("b", 10, now_ms - 30_000))
    admin = bus.admin_client(single)
    gone = TopicPartition(single.trades_topic, 0, 15)        # retention took offsets 10 to 14
    admin.delete_records([gone])[gone].result(10)
    log = tmp_path / "second.log"
    second = start_script(single, "consumer.py", log=log)
    wait_for(lambda: query(single, "SELECT count(*) FROM trades")[0][0] == 15, message="the 5 left stored")
    wait_for(lambda: "offsets 10 to 14 expired" in log.read_text(), timeout=10, message="the loss reported")
    second.send_signal(signal.SIGTERM)
    assert second.wait(timeout=30) == 0
