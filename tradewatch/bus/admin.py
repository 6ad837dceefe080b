"""Kafka administration and reading helpers (confluent-kafka): topics and their settings, the
broker wait, consumer-group lag, tailing and reading a topic."""
from __future__ import annotations

import logging
import time
from typing import Callable

from tradewatch.bus.core import (BEGINNING, KafkaUnavailable, Message, OutageLog, require_reachable,
                                 unavailable_message)
from tradewatch.config import Settings

log = logging.getLogger("tradewatch.bus")


def admin_client(settings: Settings):
    from confluent_kafka.admin import AdminClient
    require_reachable(settings)
    return AdminClient({"bootstrap.servers": settings.kafka_bootstrap_servers,
                        "logger": logging.getLogger("tradewatch.librdkafka")})


def topic_config(settings: Settings) -> dict[str, str]:
    """What every TradeWatch topic is created with, and brought back to at each start: broker
    timestamps (the clock every reader measures a trade's skew against, tradewatch/events.py,
    which no producer's wrong clock can move) and bounded retention (KAFKA_RETENTION_HOURS,
    KAFKA_RETENTION_MB per partition, in segments of at most 64 MB so the bound is close)."""
    retention_bytes = settings.kafka_retention_mb * 1024 * 1024
    return {"message.timestamp.type": "LogAppendTime",
            "retention.ms": str(int(settings.kafka_retention_hours * 3_600_000)),
            "retention.bytes": str(retention_bytes),
            "segment.bytes": str(max(min(64 * 1024 * 1024, retention_bytes // 4), 1024 * 1024))}


def ensure_topic(settings: Settings, topic: str, partitions: int) -> None:
    """Create `topic` with `partitions` partitions and `topic_config` when it does not exist yet;
    an existing topic gets the configuration it lacks (e.g. after KAFKA_RETENTION_* changed)."""
    from confluent_kafka import KafkaError, KafkaException
    from confluent_kafka.admin import NewTopic
    admin = admin_client(settings)
    try:
        metadata = admin.list_topics(timeout=10)
    except KafkaException:
        raise KafkaUnavailable(unavailable_message(settings)) from None
    wanted = topic_config(settings)
    if topic in metadata.topics and metadata.topics[topic].error is None:
        _configure(admin, topic, wanted)
        return
    # replicas and min.insync.replicas: the cluster's defaults (three and two on a three-node
    # cluster, tradewatch/stack.py)
    future = admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=-1,
                                           config=wanted)])[topic]
    try:
        future.result(timeout=10)
        log.info("created topic %s with %d partitions", topic, partitions)
    except KafkaException as error:
        if error.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
            raise KafkaUnavailable(f"cannot create topic {topic}: {error.args[0].str()}") from None
    # the broker answers before every partition has a leader; wait until they do
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        described = admin.list_topics(topic, timeout=5).topics.get(topic)
        if described and described.error is None and len(described.partitions) == partitions \
                and all(p.leader >= 0 for p in described.partitions.values()):
            return
        time.sleep(0.1)


def _configure(admin, topic: str, wanted: dict[str, str]) -> None:
    """Set the retention settings of an existing topic where they differ (its timestamp type is
    left as it is: changing it under running readers would change their decisions)."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AlterConfigOpType, ConfigEntry, ConfigResource
    try:
        resource = ConfigResource("topic", topic)
        current = admin.describe_configs([resource])[resource].result(10)
        changes = [ConfigEntry(k, v, incremental_operation=AlterConfigOpType.SET) for k, v in wanted.items()
                   if k != "message.timestamp.type" and (k not in current or current[k].value != v)]
        if changes:
            resource = ConfigResource("topic", topic, incremental_configs=changes)
            admin.incremental_alter_configs([resource])[resource].result(10)
            log.info("topic %s: set %s", topic, ", ".join(f"{c.name}={c.value}" for c in changes))
    except KafkaException as error:
        log.warning("topic %s: cannot check its retention settings (%s)", topic, error.args[0].str())


def topic_id(settings: Settings, topic: str) -> str | None:
    """Kafka's id of `topic` (a topic deleted and created again under its name has a new one);
    None when Kafka cannot say within a few seconds."""
    from confluent_kafka import KafkaException, TopicCollection
    try:
        admin = admin_client(settings)
        return str(admin.describe_topics(TopicCollection([topic]), request_timeout=5)[topic].result(6).topic_id)
    except (KafkaException, KafkaUnavailable):
        return None


def topic_partitions(settings: Settings) -> dict[str, int]:
    """Every topic on the broker and its number of partitions (raises KafkaUnavailable)."""
    from confluent_kafka import KafkaException
    try:
        metadata = admin_client(settings).list_topics(timeout=10)
    except KafkaException:
        raise KafkaUnavailable(unavailable_message(settings)) from None
    return {name: len(t.partitions) for name, t in metadata.topics.items() if t.error is None}


def wait_for_kafka(settings: Settings, timeout_s: float = 60.0, brokers: int = 1,
                   gone: Callable[[], str | None] = lambda: None) -> None:
    """Block until the cluster answers a metadata request naming at least `brokers` brokers, or
    raise KafkaUnavailable: after `timeout_s`, or at once when `gone()` says why waiting is pointless
    (e.g. the broker process we started has exited)."""
    from confluent_kafka import KafkaException
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            metadata = admin_client(settings).list_topics(timeout=2)
            if len(metadata.brokers) >= brokers:
                return
        except (KafkaException, KafkaUnavailable):
            pass
        reason = gone()
        if reason:
            raise KafkaUnavailable(reason)
        if time.monotonic() > deadline:
            raise KafkaUnavailable(unavailable_message(settings))
        time.sleep(0.5)


def settling(error) -> bool:
    """Whether a KafkaError passes by itself once the cluster settles: librdkafka's own retriable
    errors, and the broker's answers while a partition's leader or a group's coordinator is still
    being elected or loaded (right after a broker start or a topic's creation) — librdkafka does not
    mark those retriable when they come back from a one-off query such as a watermark read."""
    from confluent_kafka import KafkaError
    return error.retriable() or error.code() in (
        KafkaError.NOT_LEADER_FOR_PARTITION, KafkaError.LEADER_NOT_AVAILABLE, KafkaError.NOT_COORDINATOR,
        KafkaError.COORDINATOR_NOT_AVAILABLE, KafkaError.COORDINATOR_LOAD_IN_PROGRESS)


def group_lag(settings: Settings, group_id: str, topic: str) -> dict[int, tuple[int, int]]:
    """Per partition of `topic`: (committed offset of `group_id`, end offset). Missing commit = 0.
    Reading committed offsets does not join the group, so this never disturbs its members. Raises
    KafkaUnavailable when the broker cannot answer within ~10 s (e.g. the group coordinator is
    still moving right after a broker start)."""
    from confluent_kafka import Consumer, KafkaException, TopicPartition
    require_reachable(settings)
    reader = Consumer({"bootstrap.servers": settings.kafka_bootstrap_servers, "group.id": group_id,
                       "enable.auto.commit": False, "logger": logging.getLogger("tradewatch.librdkafka")})
    deadline = time.monotonic() + 10
    try:
        while True:
            try:
                described = reader.list_topics(topic, timeout=10).topics.get(topic)
                partitions = sorted(described.partitions) if described and described.error is None else []
                committed = reader.committed([TopicPartition(topic, p) for p in partitions], timeout=10)
                result = {}
                for tp in committed:
                    _, end = reader.get_watermark_offsets(TopicPartition(topic, tp.partition), timeout=10)
                    result[tp.partition] = (max(tp.offset, 0), end)
                return result
            except KafkaException as error:
                if time.monotonic() > deadline or not settling(error.args[0]):
                    raise KafkaUnavailable(f"cannot read the offsets of group {group_id}: {error.args[0].str()}") \
                        from None
                time.sleep(0.2)
    finally:
        reader.close()


class Tail:
    """Every new message of `topic`, on all its partitions, without a group: nothing is committed
    and no rebalance pauses it (for readers that follow a topic live, like the API's streams).
    Partitions that exist when it starts are read from their end; partitions, or the topic itself,
    that appear later are read from their beginning, since everything in them is new. `positions`
    holds, per partition, the offset the next message read will have at least (where reading
    started, then one after the last message read). librdkafka reconnects by itself after a Kafka
    outage."""

    LIST_EVERY_S = 5.0

    def __init__(self, settings: Settings, topic: str):
        from confluent_kafka import Consumer
        require_reachable(settings)
        self.topic = topic
        self.positions: dict[int, int] = {}
        self._outage = OutageLog(settings)
        self._reader = Consumer({"bootstrap.servers": settings.kafka_bootstrap_servers, "group.id": "tradewatch-tail",
                                 "enable.auto.commit": False, "fetch.wait.max.ms": 50,
                                 "error_cb": self._error, "logger": logging.getLogger("tradewatch.librdkafka")})
        self._known: set[int] | None = None     # None: not listed yet
        self._listed_at = 0.0
        self._list()

    def _error(self, error) -> None:
        self._outage.librdkafka(error)

    def _list(self) -> None:
        from confluent_kafka import KafkaException, TopicPartition
        self._listed_at = time.monotonic()
        try:
            described = self._reader.list_topics(self.topic, timeout=2).topics.get(self.topic)
            partitions = set(described.partitions) if described is not None and described.error is None else set()
            new = sorted(partitions - (self._known or set()))
            starts = {p: self._reader.get_watermark_offsets(TopicPartition(self.topic, p), timeout=2)[
                0 if self._known is not None else 1] for p in new}
        except KafkaException:
            return
        if new:
            self._reader.incremental_assign([TopicPartition(self.topic, p, starts[p]) for p in new])
            self.positions.update(starts)
        self._known = (self._known or set()) | partitions

    @property
    def listed(self) -> bool:
        """Whether it knows the topic's partitions (False until Kafka has answered once)."""
        return self._known is not None

    def stop_reading(self) -> None:
        """Fetch nothing until `read_from_end` (a follower with nobody to follow costs nothing)."""
        from confluent_kafka import TopicPartition
        self._reader.incremental_unassign([TopicPartition(self.topic, p) for p in sorted(self._known or ())])
        self._known, self.positions = None, {}

    def read_from_end(self) -> None:
        """Read on from the end of every partition, as when it started."""
        if self._known is None:
            self._list()

    def read(self, max_records: int, timeout_ms: int) -> list:
        """The next messages as confluent-kafka returns them (errors left out), `positions` moved on."""
        if time.monotonic() - self._listed_at > self.LIST_EVERY_S:
            self._list()
        raw = self._reader.consume(max_records, 0)
        if not raw:      # wait for the first message only, then take what came with it (as in poll above)
            first = self._reader.poll(timeout_ms / 1000.0)
            raw = [first, *self._reader.consume(max_records - 1, 0)] if first is not None else []
        messages = [m for m in raw if m.error() is None]
        positions = self.positions
        for m in messages:
            positions[m.partition()] = m.offset() + 1
        if self._outage.down_since is not None:
            self._outage.check(bool(messages))
        return messages

    def poll(self, max_records: int, timeout_ms: int) -> list[Message]:
        return [Message(m.topic(), m.partition(), m.offset(), m.key(), m.value(),
                        m.timestamp()[1] if m.timestamp()[0] else None) for m in self.read(max_records, timeout_ms)]

    def close(self) -> None:
        self._reader.close()


def end_offsets(settings: Settings, topic: str) -> dict[int, int]:
    """Per partition of `topic`: the offset its next message will get ({} when the topic does not
    exist yet)."""
    from confluent_kafka import Consumer, KafkaException, TopicPartition
    require_reachable(settings)
    reader = Consumer({"bootstrap.servers": settings.kafka_bootstrap_servers, "group.id": "tradewatch-reader",
                       "enable.auto.commit": False, "logger": logging.getLogger("tradewatch.librdkafka")})
    try:
        described = reader.list_topics(topic, timeout=5).topics.get(topic)
        if described is None or described.error is not None:
            return {}
        return {p: reader.get_watermark_offsets(TopicPartition(topic, p), timeout=5)[1]
                for p in sorted(described.partitions)}
    except KafkaException as error:
        raise KafkaUnavailable(f"cannot read the end of {topic}: {error.args[0].str()}") from None
    finally:
        reader.close()


def read_between(settings: Settings, topic: str, starts: dict[int, int], ends: dict[int, int],
                 keys: frozenset[bytes] | None, limit: int, scan_limit: int,
                 timeout_s: float = 10.0) -> tuple[list, bool]:
    """The messages of `topic` at offsets [starts[p], ends[p]) of each partition p whose key is in
    `keys` (None: every key), in the order read (each partition's in offset order), at most `limit`
    of them after reading at most `scan_limit`; and whether that is all of them (False: a limit or
    `timeout_s` came first, or the range starts before the oldest message kept)."""
    from confluent_kafka import Consumer, KafkaException, TopicPartition
    ranges = {p: (start, ends[p]) for p, start in starts.items() if p in ends and start < ends[p]}
    if not ranges:
        return [], True
    require_reachable(settings)
    reader = Consumer({"bootstrap.servers": settings.kafka_bootstrap_servers, "group.id": "tradewatch-reader",
                       "enable.auto.commit": False, "auto.offset.reset": "earliest",
                       "logger": logging.getLogger("tradewatch.librdkafka")})
    found: list = []
    complete, scanned, deadline = True, 0, time.monotonic() + timeout_s
    try:
        for p, (start, _end) in ranges.items():
            if reader.get_watermark_offsets(TopicPartition(topic, p), timeout=5)[0] > start:
                complete = False        # deleted by retention: read from the oldest kept
        reader.incremental_assign([TopicPartition(topic, p, start) for p, (start, _end) in ranges.items()])
        while ranges:
            if time.monotonic() > deadline or scanned >= scan_limit:
                return found, False
            batch = reader.consume(1000, 0.5)
            scanned += len(batch)
            for m in batch:
                if m.error() is not None or m.partition() not in ranges or m.offset() >= ranges[m.partition()][1]:
                    continue
                if keys is None or m.key() in keys:
                    if len(found) == limit:
                        return found, False
                    found.append(m)
            for tp in reader.position([TopicPartition(topic, p) for p in list(ranges)]):
                if tp.offset >= ranges[tp.partition][1]:
                    del ranges[tp.partition]
                    reader.incremental_unassign([TopicPartition(topic, tp.partition)])
        return found, complete
    except KafkaException as error:
        raise KafkaUnavailable(f"cannot read {topic}: {error.args[0].str()}") from None
    finally:
        reader.close()


def read_topic(settings: Settings, topic: str, until: Callable[[list[Message]], bool],
               timeout_s: float = 30.0) -> list[Message]:
    """Every message of `topic` from the beginning, read without a group, until `until(messages)`
    or `timeout_s` (for tests and tools that check what a topic holds)."""
    from confluent_kafka import Consumer, TopicPartition
    require_reachable(settings)
    reader = Consumer({"bootstrap.servers": settings.kafka_bootstrap_servers, "group.id": "tradewatch-reader",
                       "enable.auto.commit": False, "logger": logging.getLogger("tradewatch.librdkafka")})
    messages: list[Message] = []
    try:
        deadline = time.monotonic() + timeout_s
        described = None
        while time.monotonic() < deadline:
            described = reader.list_topics(topic, timeout=5).topics.get(topic)
            if described and described.error is None:
                break
            time.sleep(0.2)
        if described is None or described.error is not None:
            return messages
        reader.assign([TopicPartition(topic, p, BEGINNING) for p in described.partitions])
        while not until(messages) and time.monotonic() < deadline:
            for m in reader.consume(1000, 0.2):
                if m.error() is None:
                    kind, stamp = m.timestamp()
                    messages.append(Message(m.topic(), m.partition(), m.offset(), m.key(), m.value(),
                                            stamp if kind else None))
        return messages
    finally:
        reader.close()
