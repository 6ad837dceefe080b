"""All Kafka client code: producer, consumer and admin construction, topic creation.

Keeping the client library (kafka-python) behind this small surface lets it be swapped for a
faster one (e.g. confluent-kafka) without touching the stages.
"""
from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass
from typing import Callable, Iterable

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import NewTopic
from kafka.consumer.subscription_state import ConsumerRebalanceListener
from kafka.errors import KafkaError, KafkaTimeoutError, TopicAlreadyExistsError
from kafka.structs import OffsetAndMetadata

from tradewatch.config import Settings

log = logging.getLogger(__name__)

# kafka-python logs every failed reconnect; our stages log one clear line instead.
logging.getLogger("kafka").setLevel(logging.CRITICAL)


class KafkaUnavailable(RuntimeError):
    pass


def unavailable_message(settings: Settings) -> str:
    return (f"cannot reach Kafka at {settings.kafka_bootstrap_servers} — "
            "start it with `make services` (or check KAFKA_BOOTSTRAP_SERVERS)")


def kafka_reachable(settings: Settings, timeout_s: float = 1.0) -> bool:
    """A cheap TCP probe of the first bootstrap server (no Kafka protocol)."""
    host, port = settings.kafka_bootstrap_servers.split(",")[0].rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            return True
    except OSError:
        return False


def _require_reachable(settings: Settings) -> None:
    # kafka-python blocks for up to 30 s on an unreachable bootstrap server; fail fast instead.
    if not kafka_reachable(settings):
        raise KafkaUnavailable(unavailable_message(settings))


def make_producer(settings: Settings, **config: object) -> KafkaProducer:
    options: dict[str, object] = dict(
        bootstrap_servers=settings.kafka_bootstrap_servers,
        acks="all",
        linger_ms=5,
        batch_size=256 * 1024,
        max_block_ms=10_000,
        retries=2**31 - 1,
        max_in_flight_requests_per_connection=1,  # keeps per-symbol order across retries
    )
    options.update(config)
    _require_reachable(settings)
    try:
        return KafkaProducer(**options)
    except KafkaError:
        raise KafkaUnavailable(unavailable_message(settings)) from None


@dataclass(slots=True)
class Message:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


class BusConsumer:
    """A consumer-group member that polls batches and commits explicit offsets.

    It never sits in a group without work while its topics have partitions that nobody else
    holds: when its assignment stays empty for `rejoin_after_s`, it asks the group coordinator who
    holds what. If other members hold every partition (more members than partitions), being idle is
    right and it says so once; otherwise (a join that went wrong, the group believing this member
    holds partitions it never received) it logs a warning and rejoins, then checks again with a
    doubling interval.
    """

    MAX_REJOIN_INTERVAL_S = 300.0

    def __init__(self, settings: Settings, group_id: str, topics: Iterable[str],
                 on_assign: Callable[[list[int]], None] | None = None,
                 on_revoke: Callable[[list[int]], None] | None = None, rejoin_after_s: float = 10.0,
                 stall_after_s: float = 8.0, **config: object):
        """on_assign/on_revoke get the partition numbers gained/lost in a rebalance."""
        options: dict[str, object] = dict(
            bootstrap_servers=settings.kafka_bootstrap_servers,
            group_id=group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_partition_fetch_bytes=4 * 1024 * 1024,
            session_timeout_ms=10_000,
            heartbeat_interval_ms=3_000,
            max_poll_interval_ms=300_000,
            metadata_max_age_ms=30_000,   # notice new partitions / topics within 30 s, not 5 min
            # unique per member, so the group description tells this member from the others
            client_id=f"tradewatch-{group_id}-{os.getpid()}-{uuid.uuid4().hex[:8]}",
        )
        options.update(config)
        self._settings = settings
        self._options = options
        self.group_id = group_id
        self._topics = list(topics)
        self._listener = _Listener(on_assign, on_revoke)
        self._stall_after_s = stall_after_s
        self._quiet_since: float | None = None
        self._waiting_records: int | None = None   # from the stall check, when fetches tell nothing
        self.rebuilds = 0
        self._join()
        self._next_offsets: dict[int, int] = {}
        self._empty_since: float | None = None
        self._rejoin_after_s = rejoin_after_s
        self._rejoin_interval = rejoin_after_s
        self.rejoins = 0

    def _join(self) -> None:
        """Create the client and subscribe (the group join itself happens in the next polls)."""
        _require_reachable(self._settings)
        try:
            self._consumer = KafkaConsumer(**self._options)
        except KafkaError:
            raise KafkaUnavailable(unavailable_message(self._settings)) from None
        # Load the topics' metadata before joining the group: a group join without it can leave
        # kafka-python with an empty assignment.
        for topic in self._topics:
            self._consumer.partitions_for_topic(topic)
        self._consumer.subscribe(topics=self._topics, listener=self._listener)

    def poll(self, max_records: int, timeout_ms: int) -> list[Message]:
        """Up to `max_records` messages, waiting at most `timeout_ms` — also when nothing is
        assigned (kafka-python then returns at once, which would make a caller's loop spin)."""
        started = time.monotonic()
        batches = self._consumer.poll(timeout_ms=timeout_ms, max_records=max_records)
        messages = [
            Message(record.topic, record.partition, record.offset, record.key, record.value)
            for records in batches.values()
            for record in records
        ]
        for message in messages:
            self._next_offsets[message.partition] = message.offset + 1
        if messages:
            self._quiet_since, self._waiting_records = None, None
        else:
            self._watch_empty_assignment()
            self._watch_stall()
            left = timeout_ms / 1000.0 - (time.monotonic() - started)
            if left > 0:
                time.sleep(left)
        return messages

    def _watch_empty_assignment(self) -> None:
        if self._consumer.assignment():
            self._empty_since, self._rejoin_interval = None, self._rejoin_after_s
            return
        now = time.monotonic()
        if self._empty_since is None:
            self._empty_since = now
            return
        if now - self._empty_since < self._rejoin_interval:
            return
        verdict = self.unowned_partitions()
        if verdict is None:          # the group is rebalancing right now: look again later
            return
        if verdict:
            log.warning("group %s gave this consumer no partitions for %.0fs while nobody holds %s; "
                        "rejoining the group", self.group_id, now - self._empty_since,
                        ", ".join(f"{t}[{p}]" for t, p in sorted(verdict)))
            self.rejoin()
        elif self._rejoin_interval == self._rejoin_after_s:
            log.info("group %s: other members hold every partition of %s; this one stays idle as a spare",
                     self.group_id, ", ".join(self._topics))
        self._rejoin_interval = min(self._rejoin_interval * 2, self.MAX_REJOIN_INTERVAL_S)
        self._empty_since = now

    def _watch_stall(self) -> None:
        """Partitions held, nothing fetched for `stall_after_s`, yet records wait in the log: the
        client is stuck (seen with kafka-python on a brand-new broker: fetching, never receiving).
        Say so and replace the client with a fresh one, which rejoins the group."""
        assigned = self._consumer.assignment()
        now = time.monotonic()
        if not assigned:
            self._quiet_since = None
            return
        if self._quiet_since is None:
            self._quiet_since = now
            return
        if now - self._quiet_since < self._stall_after_s:
            return
        self._quiet_since = now
        try:
            ends = self._consumer.end_offsets(list(assigned))
            starts = self._consumer.beginning_offsets(list(assigned))
        except KafkaError as error:
            log.debug("stall check skipped: %s", error)
            return
        waiting = 0
        for tp in assigned:
            position = self._next_offsets.get(tp.partition)
            if position is None:
                position = self._consumer.committed(tp)
            waiting += max(ends[tp] - max(position or 0, starts[tp]), 0)
        self._waiting_records = waiting
        if waiting:
            log.warning("group %s: holding partitions %s but nothing fetched for %.0fs while %d records wait; "
                        "replacing the Kafka client", self.group_id, self.partitions(), self._stall_after_s, waiting)
            self._consumer.close(autocommit=False)
            self._next_offsets.clear()
            self.rebuilds += 1
            self._join()

    def rejoin(self) -> None:
        """Leave and join the group again: the coordinator hands out the partitions afresh."""
        self._consumer.unsubscribe()
        self._consumer.subscribe(topics=self._topics, listener=self._listener)
        self.rejoins += 1

    def unowned_partitions(self) -> set[tuple[str, int]] | None:
        """Partitions of our topics that no *other* group member holds; None while rebalancing."""
        try:
            admin = KafkaAdminClient(bootstrap_servers=self._consumer.config["bootstrap_servers"],
                                     request_timeout_ms=5_000)
            try:
                group = admin.describe_groups([self.group_id])[self.group_id]
            finally:
                admin.close()
        except KafkaError as error:
            log.debug("cannot describe group %s: %s", self.group_id, error)
            return None
        if group.get("group_state") != "Stable":
            return None
        me = self._consumer.config["client_id"]
        held = {(a["topic"], p)
                for member in group.get("members", []) if member.get("client_id") != me
                for a in (member.get("member_assignment") or {}).get("assigned_partitions", [])
                for p in a["partitions"]}
        every = {(t, p) for t in self._topics for p in (self._consumer.partitions_for_topic(t) or ())}
        return every - held

    def lag(self) -> int | None:
        """Messages between what this consumer has fetched and the end of its partitions' logs
        (from the broker's last fetch answers, no extra request); None before the first answer."""
        if self._waiting_records is not None:   # a stall check counted them
            return self._waiting_records
        total, known = 0, False
        for tp in self._consumer.assignment():
            end = self._consumer.highwater(tp)
            if end is None:
                continue
            known = True
            # a fetch answer with no records for this partition means it is at the end
            total += max(end - self._next_offsets.get(tp.partition, end), 0)
        return total if known else None

    def commit(self, messages: list[Message]) -> None:
        """Commit, per partition, the offset after the last message handled."""
        next_offsets: dict[TopicPartition, int] = {}
        for message in messages:
            partition = TopicPartition(message.topic, message.partition)
            next_offsets[partition] = max(next_offsets.get(partition, 0), message.offset + 1)
        if next_offsets:
            self._consumer.commit({tp: OffsetAndMetadata(offset, "", -1) for tp, offset in next_offsets.items()})

    def seek(self, topic: str, partition: int, offset: int | None) -> None:
        """Continue `partition` at `offset` (None = from the beginning)."""
        tp = TopicPartition(topic, partition)
        self._next_offsets.pop(partition, None)
        if offset is None:
            self._consumer.seek_to_beginning(tp)
        else:
            self._consumer.seek(tp, offset)

    def committed(self, topic: str, partition: int) -> int | None:
        return self._consumer.committed(TopicPartition(topic, partition))

    def assignment(self) -> set[tuple[str, int]]:
        return {(tp.topic, tp.partition) for tp in self._consumer.assignment()}

    def partitions(self) -> list[int]:
        """The partition numbers held now, sorted (for the heartbeat)."""
        return sorted(tp.partition for tp in self._consumer.assignment())

    def close(self) -> None:
        self._consumer.close(autocommit=False)


class _Listener(ConsumerRebalanceListener):
    def __init__(self, on_assign, on_revoke):
        self._on_assign, self._on_revoke = on_assign, on_revoke

    # kafka-python swallows exceptions raised here; log them where they will be seen.
    def on_partitions_revoked(self, revoked):
        if self._on_revoke and revoked:
            _logged(self._on_revoke, sorted(tp.partition for tp in revoked))

    def on_partitions_assigned(self, assigned):
        if self._on_assign and assigned:
            _logged(self._on_assign, sorted(tp.partition for tp in assigned))


def _logged(callback: Callable[[list[int]], None], partitions: list[int]) -> None:
    try:
        callback(partitions)
    except Exception:
        log.exception("rebalance callback failed for partitions %s", partitions)
        raise


def ensure_topic(settings: Settings, topic: str, partitions: int) -> None:
    """Create `topic` with `partitions` partitions when it does not exist yet."""
    _require_reachable(settings)
    try:
        admin = KafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap_servers, request_timeout_ms=10_000)
    except KafkaError:
        raise KafkaUnavailable(unavailable_message(settings)) from None
    try:
        if topic in admin.list_topics():
            return
        admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=1)])
        log.info("created topic %s with %d partitions", topic, partitions)
    except TopicAlreadyExistsError:
        pass
    finally:
        admin.close()


def wait_for_kafka(settings: Settings, timeout_s: float = 60.0) -> None:
    """Block until the broker answers a metadata request, or raise KafkaUnavailable."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            _require_reachable(settings)
            admin = KafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap_servers, request_timeout_ms=5_000)
            try:
                admin.list_topics()
                return
            finally:
                admin.close()
        except (KafkaError, KafkaUnavailable, OSError):
            if time.monotonic() > deadline:
                raise KafkaUnavailable(unavailable_message(settings)) from None
            time.sleep(0.5)


class Publisher:
    """Sends keyed messages; while Kafka is unreachable it logs one line and keeps retrying."""

    def __init__(self, settings: Settings, stop: Callable[[], bool] = lambda: False, **config: object):
        self._settings = settings
        self._stop = stop
        self._producer = make_producer(settings, **config)

    def send(self, topic: str, key: bytes, value: bytes) -> bool:
        """Queue one message; False only when asked to stop while Kafka was unreachable."""
        waiting = False
        while True:
            try:
                self._producer.send(topic, key=key, value=value)
                if waiting:
                    log.info("Kafka reachable again, sending resumed")
                return True
            except KafkaTimeoutError:
                if not waiting:
                    log.warning("%s; retrying until it is back", unavailable_message(self._settings))
                    waiting = True
                if self._stop():
                    return False

    def flush(self, timeout_s: float | None = None) -> None:
        self._producer.flush(timeout=timeout_s)

    def close(self) -> None:
        self._producer.close()


def group_lag(settings: Settings, group_id: str, topic: str) -> dict[int, tuple[int, int]]:
    """Per partition of `topic`: (committed offset of `group_id`, end offset). Missing commit = 0."""
    _require_reachable(settings)
    # Reading committed offsets does not join the group, so this never disturbs its members.
    consumer = KafkaConsumer(bootstrap_servers=settings.kafka_bootstrap_servers, group_id=group_id,
                             enable_auto_commit=False)
    try:
        partitions = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or [])]
        ends = consumer.end_offsets(partitions)
        return {tp.partition: (consumer.committed(tp) or 0, ends[tp]) for tp in partitions}
    finally:
        consumer.close(autocommit=False)
