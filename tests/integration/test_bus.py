"""The Kafka layer against the real broker, with both clients: a spare group member stays idle
without spinning and takes over; a consumer started before its topic gets every partition; and
kafka-python's watchdogs (lost assignment, stalled fetcher, a join its poll stopped waiting for)
notice and recover."""
from __future__ import annotations

import threading
import time
import uuid

import pytest

from tests.conftest import wait_for
from tradewatch import bus

CLIENTS = pytest.mark.parametrize("client", bus.CLIENTS)


def publish(settings, topic: str, count: int, client: str = "confluent") -> None:
    publisher = bus.publisher(settings, client=client)
    for i in range(count):
        publisher.send(topic, str(i % 10).encode(), str(i).encode())
    assert publisher.flush(30)
    publisher.close()


def read_all(consumer, count: int) -> list[int]:
    got: list[bus.Message] = []
    wait_for(lambda: got.extend(consumer.poll(500, 200)) or len(got) >= count, timeout=60, message="messages read")
    return sorted(int(m.value) for m in got)


@CLIENTS
def test_spare_member_stays_idle_without_spinning_then_takes_over(settings, client):
    topic = f"one-{uuid.uuid4().hex[:6]}"
    bus.ensure_topic(settings, topic, 1)
    group = f"g-{uuid.uuid4().hex[:6]}"
    options = {"rejoin_after_s": 1.0} if client == "kafka-python" else {}
    first = bus.consumer(settings, group, topic, client=client, **options)
    wait_for(lambda: first.poll(10, 100) is not None and first.partitions(), timeout=30, message="first assigned")
    second = bus.consumer(settings, group, topic, client=client, **options)

    def one_owner_for(seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            first.poll(10, 100)
            second.poll(10, 100)
            if len(first.partitions()) + len(second.partitions()) != 1:
                return False
        return True
    wait_for(lambda: one_owner_for(3.0), timeout=60, interval=0, message="exactly one owner of the one partition")
    # the polling thread's own CPU time: a spin is in poll(); the process's would also count what
    # other threads of this test worker do (clients' background threads, earlier tests' servers)
    started, cpu_started = time.monotonic(), time.thread_time()
    while time.monotonic() - started < 6:      # idle, polling as the stage runtime does
        first.poll(10, 200)
        second.poll(10, 200)
    cpu_share = (time.thread_time() - cpu_started) / (time.monotonic() - started)
    owners = [c for c in (first, second) if c.partitions()]
    assert len(owners) == 1, "the one partition has exactly one owner"
    owner, spare = owners[0], (second if owners[0] is first else first)
    if client == "kafka-python":
        assert first.rejoins == second.rejoins == 0, "a spare must not churn a group that has every partition held"
        assert spare.unowned_partitions() == set()
    assert cpu_share < 0.25, f"idle polling used {cpu_share:.0%} of a core"

    owner.close()          # the spare takes the partition and reads what is there
    publish(settings, topic, 20, client)
    assert read_all(spare, 20) == list(range(20))
    spare.close()


@CLIENTS
def test_consumer_started_before_its_topic_exists_gets_every_partition(settings, client):
    topic = f"later-{uuid.uuid4().hex[:6]}"      # not created: the consumer comes first
    consumer = bus.consumer(settings, f"g-{uuid.uuid4().hex[:6]}", topic, client=client)
    consumer.poll(10, 500)
    bus.ensure_topic(settings, topic, settings.trades_partitions)
    publish(settings, topic, 100, client)
    assert read_all(consumer, 100) == list(range(100))
    assert len(consumer.partitions()) == settings.trades_partitions
    consumer.close()


def test_kafka_python_member_that_lost_its_assignment_sees_it_and_rejoins(settings):
    consumer = bus.consumer(settings, f"g-{uuid.uuid4().hex[:6]}", settings.trades_topic, client="kafka-python")
    wait_for(lambda: consumer.poll(10, 100) is not None and len(consumer.partitions()) == 6, timeout=30,
             message="all six partitions assigned")
    # Emulate kafka-python's lost assignment: the group still believes this member holds the six
    # partitions, but the client has none, so it would sit idle.
    consumer._consumer._subscription.assign_from_subscribed([])
    assert not consumer.partitions()
    assert consumer.unowned_partitions() == {(settings.trades_topic, p) for p in range(6)}
    consumer.rejoin()
    wait_for(lambda: consumer.poll(10, 100) is not None and len(consumer.partitions()) == 6, timeout=30,
             message="the partitions back after the rejoin")
    publish(settings, settings.trades_topic, 50)
    assert read_all(consumer, 50) == list(range(50))
    consumer.close()


def test_kafka_python_member_whose_join_outlasts_its_poll_stays_in_the_group(settings):
    """kafka-python 3.0.12 loses a join that finishes after poll() stopped waiting for it when the
    rejoin came from the topic's metadata (here a partition added): the member stays "rebalancing"
    with its heartbeat off, the broker drops it after the session timeout, and it believes it still
    holds the partitions it had. Polls of 1 ms make every join outlast its poll; a loaded machine
    did the same to 100 ms polls (test_spare_member_… failed in CI so)."""
    import kafka
    from confluent_kafka.admin import NewPartitions
    topic, group = f"grow-{uuid.uuid4().hex[:6]}", f"g-{uuid.uuid4().hex[:6]}"
    bus.ensure_topic(settings, topic, 2)
    consumer = bus.consumer(settings, group, topic, client="kafka-python",
                            session_timeout_ms=6_000, heartbeat_interval_ms=1_000)
    wait_for(lambda: consumer.poll(10, 100) is not None and consumer.partitions() == [0, 1], timeout=30,
             message="both partitions assigned")
    grower = bus.admin_client(settings)
    grower.create_partitions([NewPartitions(topic, 3)])[topic].result(timeout=10)
    started = time.monotonic()
    while time.monotonic() - started < 9:          # past the session timeout
        consumer.poll(10, 1)
    admin = kafka.KafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap_servers)
    described = admin.describe_groups([group])[group]
    admin.close()
    held = [p for m in described["members"] for a in m["member_assignment"]["assigned_partitions"]
            for p in a["partitions"]]
    assert described["group_state"] == "Stable" and sorted(held) == consumer.partitions() == [0, 1, 2], \
        f"the group is {described['group_state']} and gives {held}; the consumer believes it holds " \
        f"{consumer.partitions()}"
    consumer.close()


def test_kafka_python_member_that_stops_fetching_replaces_its_client(settings):
    consumer = bus.consumer(settings, f"g-{uuid.uuid4().hex[:6]}", settings.trades_topic, client="kafka-python",
                            stall_after_s=2.0)
    wait_for(lambda: consumer.poll(10, 100) is not None and len(consumer.partitions()) == 6, timeout=30,
             message="all six partitions assigned")
    # Emulate the stuck client seen on fresh brokers: partitions held, fetches that bring nothing.
    consumer._consumer.pause(*consumer._consumer.assignment())
    publish(settings, settings.trades_topic, 50)
    wait_for(lambda: consumer.poll(10, 100) is not None and consumer.rebuilds == 1, timeout=30,
             message="the stall to be noticed")
    assert read_all(consumer, 50) == list(range(50))
    consumer.close()


def keyed_by_both_clients(settings, partitions: int, keys: list[bytes]) -> list:
    """Each key sent once by each Kafka client to a new topic; what the topic then holds."""
    topic = f"keys-{uuid.uuid4().hex[:6]}"
    bus.ensure_topic(settings, topic, partitions)
    for client in bus.CLIENTS:
        publisher = bus.publisher(settings, client=client)
        for key in keys:
            publisher.send(topic, key, client.encode())
        assert publisher.flush(30)
        publisher.close()
    return bus.read_topic(settings, topic, lambda got: len(got) >= 2 * len(keys))


def test_both_clients_put_a_key_on_the_partition_java_would(settings):
    messages = keyed_by_both_clients(settings, 6, [f"SYM{i}".encode() for i in range(30)])
    assert len(messages) == 60
    assert all(m.partition == bus.murmur2_partition(m.key, 6) for m in messages)


def test_listed_symbols_are_spread_over_the_partitions_by_both_clients(settings):
    """PARTITION_SYMBOLS: the n-th listed symbol on partition n mod partitions (every consumer gets
    work); other keys where Kafka's murmur2 puts them."""
    listed = settings.with_overrides(partition_symbols="AAPL, MSFT,JPM,TSLA,NVDA")
    keys = [b"AAPL", b"MSFT", b"JPM", b"TSLA", b"NVDA", b"SPY", b"IBM"]
    messages = keyed_by_both_clients(listed, 4, keys)
    placed = {(m.key, m.partition) for m in messages}
    assert len(messages) == 14 and len(placed) == len(keys), "one partition per key, for both clients"
    assert placed == {(b"AAPL", 0), (b"MSFT", 1), (b"JPM", 2), (b"TSLA", 3), (b"NVDA", 0),
                      (b"SPY", bus.murmur2_partition(b"SPY", 4)), (b"IBM", bus.murmur2_partition(b"IBM", 4))}


def log_batches(settings, topic: str) -> list[dict[str, int]]:
    """The record batches of partition 0 as the broker stored them (Kafka's own DumpLogSegments)."""
    import re
    import subprocess

    from tradewatch.stack import JARS_DIR
    segment = next((settings.home / "kafka" / "data" / f"{topic}-0").glob("*.log"))
    dump = subprocess.run(["java", "-cp", str(JARS_DIR / "kafka" / "*"), "kafka.tools.DumpLogSegments",
                           "--files", str(segment)], capture_output=True, text=True, timeout=60, check=True).stdout
    fields = ("baseSequence", "lastSequence", "producerId", "count")
    return [{f: int(re.search(rf"\b{f}: (-?\d+)", line).group(1)) for f in fields}
            for line in dump.splitlines() if line.startswith("baseOffset:")]


@CLIENTS
def test_a_retried_batch_can_never_become_a_duplicate_record(settings, client):
    """Issue 11: a producer retry could put a trade in the topic twice, and the aggregator folded it
    twice. Our producers are idempotent, so the broker keeps every batch's producer id and sequence
    and drops a retried batch it already has: the topic itself carries no retry duplicates. (A
    plain producer's batches carry neither; that is what this test tells apart.)"""
    from confluent_kafka import Producer
    topic = f"idempotent-{uuid.uuid4().hex[:6]}"
    bus.ensure_topic(settings, topic, 1)
    publish(settings, topic, 3000, client)
    ours = log_batches(settings, topic)
    assert sum(b["count"] for b in ours) == 3000
    assert all(b["producerId"] >= 0 for b in ours), "every batch carries the producer id"
    sequences = [(b["baseSequence"], b["lastSequence"]) for b in ours]
    assert sequences[0][0] == 0 and all(nxt[0] == prev[1] + 1 for prev, nxt in zip(sequences, sequences[1:])), \
        "gap-free sequence numbers: the broker's duplicate check"
    plain_topic = f"plain-{uuid.uuid4().hex[:6]}"
    bus.ensure_topic(settings, plain_topic, 1)
    plain = Producer({"bootstrap.servers": settings.kafka_bootstrap_servers, "enable.idempotence": False})
    plain.produce(plain_topic, b"x")
    plain.flush(10)
    assert [b["producerId"] for b in log_batches(settings, plain_topic)] == [-1]


def test_confluent_member_gives_its_partitions_back_in_poll_before_librdkafkas_close(settings):
    """librdkafka can hang for ever in close() when the revocation it runs there calls assign()
    (#4884), holding the GIL (CI: a stopped aggregator froze 60 s): close() unsubscribes first, so
    the revocation and its unassign run in a poll on the closing thread, and the group is left."""
    topic = f"give-{uuid.uuid4().hex[:6]}"
    bus.ensure_topic(settings, topic, 3)
    group = f"g-{uuid.uuid4().hex[:6]}"
    revoked: list[tuple[list[int], str]] = []
    member = bus.consumer(settings, group, topic, client="confluent",
                          on_revoke=lambda parts: revoked.append((parts, threading.current_thread().name)))
    wait_for(lambda: member.poll(10, 100) is not None and member.partitions() == [0, 1, 2], timeout=30,
             message="the member assigned")
    member.close()
    assert revoked == [([0, 1, 2], threading.current_thread().name)], "revoked by a poll of the closing thread"
    other = bus.consumer(settings, group, topic, client="confluent")
    started = time.monotonic()
    wait_for(lambda: other.poll(10, 100) is not None and other.partitions() == [0, 1, 2], timeout=30,
             message="the next member assigned")
    assert time.monotonic() - started < 5, "the first member left the group (no session timeout to wait for)"
    other.close()


@CLIENTS
def test_caught_up_asks_kafka_once_for_every_partition_and_never_confirms_one_with_unread_records(settings, client):
    """The runtime asks once a second which held partitions are at their log end (tradewatch/runtime.py,
    quiet partitions close their windows by time). One fresh ask answers for all of them, however
    many, within a fetch wait (librdkafka queues a ListOffsets behind the connection's pending Fetch:
    one request per partition took 100 ms each, so 10 partitions ran past the ask's 1 s and the last
    were never confirmed); a partition whose records are not all read is never confirmed."""
    topic = f"quiet-{uuid.uuid4().hex[:6]}"
    bus.ensure_topic(settings, topic, 10)
    publish(settings, topic, 100, client)
    consumer = bus.consumer(settings, f"g-{uuid.uuid4().hex[:6]}", topic, client=client)
    got: list[bus.Message] = []
    wait_for(lambda: got.extend(consumer.poll(500, 200)) or len(got) >= 100, timeout=60, message="messages read")
    read = {m.partition for m in got}       # a partition never read from has no position to confirm
    assert len(read) >= 5
    for _ in range(3):                      # idle: every fetch now waits its full time on the broker
        consumer.poll(10, 200)
    started = time.monotonic()
    assert consumer.caught_up(list(range(10))) == read
    assert time.monotonic() - started < 0.5, "one ask, not one per partition"
    publisher = bus.publisher(settings, client=client)
    publisher.send(topic, b"3", b"100")         # one record on one partition
    assert publisher.flush(30)
    publisher.close()
    unread = read - consumer.caught_up(list(range(10)))
    assert len(unread) == 1, f"exactly the partition with the unread record is not caught up: {unread}"
    got = consumer.poll(10, 1000)
    assert [int(m.value) for m in got] == [100] and {m.partition for m in got} == unread
    assert consumer.caught_up(list(range(10))) == read
    consumer.close()
