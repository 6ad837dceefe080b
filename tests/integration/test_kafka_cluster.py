"""A three-node Kafka cluster (KAFKA_BROKERS=3, tradewatch/stack.py): a replay at full speed while one
node is killed with SIGKILL and later started again. Every trade is stored exactly once, the
consumers and the aggregator keep going on the two nodes left, and the aggregator's windows hold
every trade once. The longest pause in storing is printed."""
from __future__ import annotations

import json
import os
import shutil
import signal
import time

import pytest

from tests.conftest import fresh_settings, query, start_script, wait_for, wait_for_progress
from tradewatch import bus, doctor, stack

N = 200_000


@pytest.fixture(scope="module")
def cluster(services):
    settings = services.with_overrides(tradewatch_home=".tradewatch/test-kafka3", kafka_brokers=3,
                                       kafka_bootstrap_servers="127.0.0.1:29492", kafka_controller_port=29493)
    stack.stop_kafka(settings)
    for node, _, _ in settings.kafka_nodes:
        shutil.rmtree(stack.kafka_paths(settings, node)[0].parent, ignore_errors=True)
    stack.start_kafka(settings)
    bus.wait_for_kafka(settings, 120, brokers=3)
    yield settings
    stack.stop_kafka(settings)


def replicas(settings) -> dict[int, tuple[int, list[int], list[int]]]:
    """partition -> (leader, replicas, in-sync replicas) of the trades topic."""
    from confluent_kafka.admin import AdminClient
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap_servers})
    topic = admin.list_topics(settings.trades_topic, timeout=10).topics[settings.trades_topic]
    return {p.id: (p.leader, sorted(p.replicas), sorted(p.isrs)) for p in topic.partitions.values()}


def topic_config(settings, name: str) -> str:
    from confluent_kafka.admin import AdminClient, ConfigResource
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap_servers})
    resource = ConfigResource("topic", settings.trades_topic)
    return admin.describe_configs([resource])[resource].result(timeout=10)[name].value


def produced(settings) -> int:
    try:
        return sum(end for _, end in bus.group_lag(settings, settings.consumer_group, settings.trades_topic).values())
    except bus.KafkaUnavailable:
        return 0


def per_partition(settings) -> tuple[dict[int, int], dict[int, int]]:
    """Trades stored, and offsets folded by the aggregator, per partition."""
    stored = dict(query(settings, "SELECT kafka_partition, count(*) FROM trades GROUP BY 1"))
    folded = dict(query(settings, "SELECT kafka_partition, next_offset FROM stage_positions"
                                  " WHERE consumer_group = %s", (settings.aggregator_group,)))
    return stored, folded


def resumed(settings, ends: dict[int, int], since: float) -> tuple[float, float]:
    """Seconds after `since` until, on every partition, a trade sent after the partition's end
    offset `ends` is stored (one row per offset) and folded by the aggregator."""
    at: list[float | None] = [None, None]
    deadline = time.monotonic() + 180
    while None in at:
        now = per_partition(settings)
        assert time.monotonic() < deadline, f"not every partition resumed on two nodes: {ends} -> {now}"
        for i in (0, 1):
            if at[i] is None and all(now[i].get(p, 0) > end for p, end in ends.items()):
                at[i] = time.monotonic() - since
        time.sleep(0.1)
    return at[0], at[1]


def test_full_speed_replay_survives_a_killed_and_restarted_broker(cluster, tmp_path):
    settings = fresh_settings(cluster)
    assert len(settings.kafka_bootstrap_servers.split(",")) == 3
    layout = replicas(settings)
    assert all(len(r) == 3 and isr == r for _, r, isr in layout.values()), layout
    assert topic_config(settings, "min.insync.replicas") == "2"

    consumers = [start_script(settings, "consumer.py", log=tmp_path / f"consumer-{i}.log") for i in range(2)]
    aggregator = start_script(settings, "aggregator.py", log=tmp_path / "aggregator.log")
    stages = [*consumers, aggregator]
    wait_for(lambda: query(settings, "SELECT count(*) FROM stage_health WHERE pid = ANY(%s) AND state = 'running'"
                                     " AND cardinality(partitions) > 0", ([p.pid for p in stages],))[0][0] == 3,
             timeout=90, message="both consumers and the aggregator holding partitions")

    producer = start_script(settings, "producer.py", "--count", str(N), "--rate", "max", "--seed", "41",
                            log=tmp_path / "producer.log")
    # the producer's pace is the machine's (a loaded 2-core machine runs three brokers, three stages
    # and the producer): wait while it makes progress, not for a fixed time
    sent_at_kill = wait_for_progress(lambda: produced(settings), N // 4, interval=0.05,
                                     message="a quarter of the replay acknowledged by the cluster",
                                     details=lambda: (tmp_path / "producer.log").read_text()[-2000:])
    victim = layout[0][0]                  # the leader of partition 0 (and maybe the active controller)
    ends = {p: end for p, (_, end) in bus.group_lag(settings, settings.consumer_group, settings.trades_topic).items()
            if end > 0}
    os.kill(stack.kafka_pids(settings)[victim], signal.SIGKILL)
    killed_at = time.monotonic()
    assert producer.poll() is None, "the broker was killed while the producer was still sending"
    # on two nodes every partition goes on: leaders move, writes with acks=all reach the 2 in sync
    stored_after, folded_after = resumed(settings, ends, killed_at)
    assert victim not in stack.kafka_pids(settings), "the killed node stayed down meanwhile"
    # the controller unregisters the node after broker.session.timeout.ms (9 s): then doctor says so
    checks = wait_for(lambda: (c := {check.name: check for check in doctor.check_kafka(settings)})
                      and not c["Kafka nodes"].ok and c, timeout=60, message="doctor to say a node is missing")
    assert checks["Kafka"].ok, checks
    assert "; 1 of 3 nodes down" in stack.status(settings)["kafka"]

    stack.start_kafka(settings)            # starts only the missing node
    down_for = time.monotonic() - killed_at
    producer_log = lambda: (tmp_path / "producer.log").read_text()[-3000:]  # noqa: E731
    wait_for_progress(lambda: produced(settings), N, message="the replay acknowledged", details=producer_log)
    assert producer.wait(timeout=60) == 0, producer_log()
    wait_for_progress(lambda: query(settings, "SELECT count(*) FROM trades")[0][0], N, message="trades stored")
    wait_for_progress(lambda: sum(per_partition(settings)[1].values()), N, message="trades folded by the aggregator")
    wait_for(lambda: all(isr == r for _, r, isr in replicas(settings).values()), timeout=120,
             message="the restarted node back in sync on every partition")
    checks = {check.name: check for check in doctor.check_kafka(settings)}
    assert checks["Kafka nodes"].ok and checks["Kafka nodes"].detail == "all 3 registered"
    for stage in stages:
        assert stage.poll() is None, "a stage died"
        stage.send_signal(signal.SIGTERM)
    for stage in stages:
        assert stage.wait(timeout=30) == 0

    assert query(settings, "SELECT count(DISTINCT trade_id) FROM trades")[0][0] == N, "every trade exactly once"
    assert query(settings, "SELECT count(*) FROM dead_letters")[0][0] == 0
    by_minute = query(settings, "SELECT symbol, date_trunc('minute', ts), count(*) FROM trades GROUP BY 1, 2 ORDER BY 1, 2")
    windows = query(settings, "SELECT symbol, window_start, trade_count FROM stock_metrics WHERE window_size = '1m'"
                              " ORDER BY 1, 2")
    assert windows == by_minute, "the aggregator's 1-minute windows count every stored trade once"
    print(json.dumps({"kafka_cluster_kill": {
        "trades": N, "killed_node": victim, "sent_when_killed": sent_at_kill, "node_down_s": round(down_for, 1),
        "every_partition_storing_again_after_s": round(stored_after, 1),
        "every_partition_folding_again_after_s": round(folded_after, 1)}}))
