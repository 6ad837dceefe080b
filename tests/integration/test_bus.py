"""The Kafka layer against the real broker: a group member left without partitions tells a
spare (others hold everything) from a broken assignment (nobody holds them), rejoins only in the
second case, and never spins while idle."""
from __future__ import annotations

import time
import uuid

from tests.conftest import wait_for
from tradewatch import bus


def publish(settings, topic: str, count: int) -> None:
    publisher = bus.Publisher(settings)
    for i in range(count):
        publisher.send(topic, str(i % 10).encode(), str(i).encode())
    publisher.flush()
    publisher.close()


def read_all(consumer: bus.BusConsumer, count: int) -> list[int]:
    got: list[bus.Message] = []
    wait_for(lambda: got.extend(consumer.poll(500, 200)) or len(got) >= count, timeout=60, message="messages read")
    return sorted(int(m.value) for m in got)


def test_spare_member_stays_idle_without_spinning_then_takes_over(settings):
    topic = f"one-{uuid.uuid4().hex[:6]}"
    bus.ensure_topic(settings, topic, 1)
    group = f"g-{uuid.uuid4().hex[:6]}"
    first = bus.BusConsumer(settings, group, [topic], rejoin_after_s=1.0)
    wait_for(lambda: first.poll(10, 100) is not None and first.assignment(), timeout=30, message="first assigned")
    second = bus.BusConsumer(settings, group, [topic], rejoin_after_s=1.0)
    started, cpu_started = time.monotonic(), time.process_time()
    while time.monotonic() - started < 8:
        first.poll(10, 50)
        second.poll(10, 100)
    cpu_share = (time.process_time() - cpu_started) / (time.monotonic() - started)
    # the assignor gives the one partition to one of them; the other is a spare
    owners = [c for c in (first, second) if c.assignment()]
    assert len(owners) == 1
    owner, spare = owners[0], (second if owners[0] is first else first)
    assert first.rejoins == second.rejoins == 0, "a spare must not churn a group that has every partition held"
    assert spare.unowned_partitions() == set()
    assert cpu_share < 0.25, f"idle polling used {cpu_share:.0%} of a core"

    owner.close()          # the spare takes the partition and reads what is there
    publish(settings, topic, 20)
    assert read_all(spare, 20) == list(range(20))
    spare.close()


def test_member_that_lost_its_assignment_sees_it_and_rejoins(settings):
    consumer = bus.BusConsumer(settings, f"g-{uuid.uuid4().hex[:6]}", [settings.trades_topic])
    wait_for(lambda: consumer.poll(10, 100) is not None and len(consumer.assignment()) == 6, timeout=30,
             message="all six partitions assigned")
    # Emulate kafka-python's lost assignment: the group still believes this member holds the six
    # partitions, but the client has none, so it would sit idle.
    consumer._consumer._subscription.assign_from_subscribed([])
    assert not consumer.assignment()
    assert consumer.unowned_partitions() == {(settings.trades_topic, p) for p in range(6)}
    consumer.rejoin()
    wait_for(lambda: consumer.poll(10, 100) is not None and len(consumer.assignment()) == 6, timeout=30,
             message="the partitions back after the rejoin")
    publish(settings, settings.trades_topic, 50)
    assert read_all(consumer, 50) == list(range(50))
    consumer.close()


def test_consumer_started_before_its_topic_exists_gets_every_partition(settings):
    topic = f"later-{uuid.uuid4().hex[:6]}"      # not created: the consumer comes first
    consumer = bus.BusConsumer(settings, f"g-{uuid.uuid4().hex[:6]}", [topic])
    consumer.poll(10, 500)
    bus.ensure_topic(settings, topic, settings.trades_partitions)
    publish(settings, topic, 100)
    assert read_all(consumer, 100) == list(range(100))
    assert len(consumer.assignment()) == settings.trades_partitions
    consumer.close()


def test_member_that_stops_fetching_notices_records_waiting_and_replaces_its_client(settings):
    consumer = bus.BusConsumer(settings, f"g-{uuid.uuid4().hex[:6]}", [settings.trades_topic], stall_after_s=2.0)
    wait_for(lambda: consumer.poll(10, 100) is not None and len(consumer.assignment()) == 6, timeout=30,
             message="all six partitions assigned")
    # Emulate the stuck client seen on fresh brokers: partitions held, fetches that bring nothing.
    consumer._consumer.pause(*consumer._consumer.assignment())
    publish(settings, settings.trades_topic, 50)
    wait_for(lambda: consumer.poll(10, 100) is not None and consumer.rebuilds == 1, timeout=30,
             message="the stall to be noticed")
    assert read_all(consumer, 50) == list(range(50))
    consumer.close()
