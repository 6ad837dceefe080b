"""The Kafka layer: the only package that imports a Kafka client library.

Two clients behind one small interface, chosen by KAFKA_CLIENT:
- `confluent` (default): confluent-kafka, i.e. librdkafka — ~50× the consume rate of kafka-python
  on the same broker, an idempotent producer, real *lost* vs *revoked* rebalance events.
- `kafka-python`: the pure-Python client the project card names, kept selectable. It has two
  known faults on a brand-new broker (an empty assignment after a join; a fetcher that holds its
  partitions and never receives), each worked around below by a watchdog that notices and rejoins.

Stages get `Message`s, partition numbers and offsets; no library type or exception leaves here.
Keys are partitioned with murmur2 by both clients (Java's default), so a symbol lands on the same
partition whichever client — or Flink — wrote it.

- core.py: the interface (Message, BusConsumer, Publisher's partitioning), errors, outage log
- confluent.py / kafka_python.py: one consumer and one publisher per client
- admin.py: topics and their settings, the broker wait, group lag, tail and read helpers
Callers use this package's names only (`bus.consumer`, `bus.publisher`, `bus.ensure_topic`, …).
"""
from __future__ import annotations

from typing import Callable

from tradewatch.bus.admin import (Tail, admin_client, end_offsets, ensure_topic, group_lag, read_between, read_topic,
                                  topic_config, topic_id, topic_partitions, wait_for_kafka)
from tradewatch.bus.confluent import ConfluentConsumer, ConfluentPublisher
from tradewatch.bus.core import (BEGINNING, CLIENTS, AssignCallback, BusConsumer, Interrupt, KafkaUnavailable,
                                 Message, PartitionsCallback, Publisher, client_of, kafka_reachable,
                                 murmur2_partition, require_reachable, unavailable_message)
from tradewatch.bus.kafka_python import KafkaPythonConsumer, KafkaPythonPublisher
from tradewatch.config import Settings

__all__ = ["BEGINNING", "CLIENTS", "BusConsumer", "Interrupt", "KafkaUnavailable", "Message", "Publisher", "Tail",
           "admin_client", "client_of", "consumer", "end_offsets", "ensure_topic", "group_lag", "kafka_reachable",
           "murmur2_partition", "publisher", "read_between", "read_topic", "topic_config", "topic_id",
           "topic_partitions", "unavailable_message", "wait_for_kafka"]


def consumer(settings: Settings, group_id: str, topic: str, on_assign: AssignCallback | None = None,
             on_revoke: PartitionsCallback | None = None, on_lost: PartitionsCallback | None = None,
             client: str | None = None, **options: object) -> BusConsumer:
    """A group member of `group_id` on `topic`, with the client KAFKA_CLIENT names.

    Rebalance callbacks run inside `poll`: on_assign with the partitions gained (it may return
    start offsets), on_revoke with those taken away in an orderly rebalance (finish and commit
    them), on_lost with those lost without one, e.g. after a session timeout (drop their state;
    another member may own them already, so nothing of them may be committed).
    Raises KafkaUnavailable when the broker cannot be reached."""
    client = client or client_of(settings)
    require_reachable(settings)
    cls = ConfluentConsumer if client == "confluent" else KafkaPythonConsumer
    return cls(settings, group_id, topic, on_assign, on_revoke, on_lost, **options)


def publisher(settings: Settings, stop: Callable[[], bool] = lambda: False, client: str | None = None) -> Publisher:
    """A publisher with the client KAFKA_CLIENT names (see Publisher); raises KafkaUnavailable
    when the broker cannot be reached."""
    cls = ConfluentPublisher if (client or client_of(settings)) == "confluent" else KafkaPythonPublisher
    return cls(settings, stop)
