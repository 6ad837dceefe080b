"""The Kafka layer: the only module that imports a Kafka client library.

Two clients behind one small interface, chosen by KAFKA_CLIENT:
- `confluent` (default): confluent-kafka, i.e. librdkafka — ~50× the consume rate of kafka-python
  on the same broker, an idempotent producer, real *lost* vs *revoked* rebalance events.
- `kafka-python`: the pure-Python client the project card names, kept selectable. It has two
  known faults on a brand-new broker (an empty assignment after a join; a fetcher that holds its
  partitions and never receives), each worked around below by a watchdog that notices and rejoins.

Stages get `Message`s, partition numbers and offsets; no library type or exception leaves here.
Keys are partitioned with murmur2 by both clients (Java's default), so a symbol lands on the same
partition whichever client — or Flink — wrote it.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Callable, Protocol

from tradewatch.config import Settings

log = logging.getLogger(__name__)
# librdkafka logs every failed reconnect (many a second); the stages log one line per outage instead
logging.getLogger("tradewatch.librdkafka").setLevel(logging.CRITICAL)

CLIENTS = ("confluent", "kafka-python")
BEGINNING = -2          # a start offset meaning "the oldest record kept" (librdkafka's OFFSET_BEGINNING)
SESSION_TIMEOUT_MS = 10_000
CLOSE_TIMEOUT_S = 5.0      # leaving the group (not waited for while Kafka is known to be away)

# on_assign(partitions) may return start offsets: {partition: offset}; a partition it leaves out
# (or maps to None) starts at the group's committed offset, or at the beginning without one.
AssignCallback = Callable[[list[int]], "dict[int, int | None] | None"]
PartitionsCallback = Callable[[list[int]], None]


class KafkaUnavailable(RuntimeError):
    pass


class Interrupt(Exception):
    """Raised by a rebalance callback to abandon the poll (e.g. a stop while it waited); passed
    through to the caller of `poll`/`close` without being logged as a failure."""


@dataclass(slots=True)
class Message:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp_ms: int | None = None     # the record's Kafka timestamp (trades topics: broker append time)


def unavailable_message(settings: Settings) -> str:
    return (f"cannot reach Kafka at {settings.kafka_bootstrap_servers} — "
            "start it with `make services` (or check KAFKA_BOOTSTRAP_SERVERS)")


def kafka_reachable(settings: Settings, timeout_s: float = 1.0) -> bool:
    """A cheap TCP probe of the bootstrap servers (no Kafka protocol): does any one answer?"""
    for server in settings.kafka_bootstrap_servers.split(","):
        host, port = server.strip().rsplit(":", 1)
        try:
            with socket.create_connection((host, int(port)), timeout=timeout_s):
                return True
        except OSError:
            continue
    return False


def _require_reachable(settings: Settings) -> None:
    # Both clients wait (kafka-python up to 30 s, librdkafka forever) on an unreachable
    # bootstrap server; fail fast with a message a person can act on instead.
    if not kafka_reachable(settings):
        raise KafkaUnavailable(unavailable_message(settings))


def client_of(settings: Settings) -> str:
    if settings.kafka_client not in CLIENTS:
        raise ValueError(f"KAFKA_CLIENT must be one of {', '.join(CLIENTS)}; got {settings.kafka_client!r}")
    return settings.kafka_client


def _member_id(group_id: str) -> str:
    # unique per member, so a group description tells this member from the others
    return f"tradewatch-{group_id}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def murmur2_partition(key: bytes, partitions: int) -> int:
    """The partition the Java client (and both clients here) choose for `key`."""
    seed, m, r = 0x9747B28C, 0x5BD1E995, 24
    length = len(key)
    h = (seed ^ length) & 0xFFFFFFFF
    for i in range(0, length - length % 4, 4):
        k = int.from_bytes(key[i:i + 4], "little")
        k = (k * m) & 0xFFFFFFFF
        k ^= k >> r
        k = (k * m) & 0xFFFFFFFF
        h = ((h * m) & 0xFFFFFFFF) ^ k
    tail = length % 4
    if tail:
        rest = key[length - tail:]
        if tail >= 3:
            h ^= rest[2] << 16
        if tail >= 2:
            h ^= rest[1] << 8
        h ^= rest[0]
        h = (h * m) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * m) & 0xFFFFFFFF
    h ^= h >> 15
    return (h & 0x7FFFFFFF) % partitions


# ------------------------------------------------------------------------------------- consumer

class BusConsumer(Protocol):
    """A consumer-group member on one topic that polls batches and commits explicit offsets."""

    topic: str
    group_id: str

    def poll(self, max_records: int, timeout_ms: int) -> list[Message]:
        """Up to `max_records` messages; returns as soon as some are there, else after `timeout_ms`."""

    def commit(self, offsets: dict[int, int], wait: bool = True) -> None:
        """Commit {partition: next offset to read}; raises KafkaUnavailable when it cannot.
        wait=False sends the commit in the background (a failure is logged; a later commit
        supersedes it)."""

    def committed(self, partitions: list[int]) -> dict[int, int | None]:
        """The group's committed offsets (None: nothing committed yet)."""

    def partitions(self) -> list[int]:
        """The partition numbers held now, sorted."""

    def partition_lags(self) -> dict[int, int]:
        """Per held partition whose log end is known: records between our position and it."""

    def lag(self) -> int | None:
        """Records between this member's positions and the log ends (None before it knows)."""
        lags = self.partition_lags()
        return sum(lags.values()) if lags else None

    def caught_up(self, partitions: list[int]) -> set[int]:
        """Those of `partitions` whose log end Kafka reports, asked now, equal to our position
        (known from what we read or where we started); none while Kafka or a leader cannot answer."""

    def close(self) -> None: ...


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
    _require_reachable(settings)
    cls = _ConfluentConsumer if client == "confluent" else _KafkaPythonConsumer
    return cls(settings, group_id, topic, on_assign, on_revoke, on_lost, **options)


class _OutageLog:
    """One warning when the broker goes away, one info line when it is back. On a cluster, one
    node going away is no outage: said once a minute at most, while the others carry on."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.down_since: float | None = None
        self._last_probe = 0.0
        self._cluster = "," in settings.kafka_bootstrap_servers
        self._node_warned_at = -60.0

    def librdkafka(self, error) -> bool:
        """Take a librdkafka error callback's error; True when it was about reaching Kafka."""
        from confluent_kafka import KafkaError
        code = error.code()
        if code == KafkaError._ALL_BROKERS_DOWN or (code == KafkaError._TRANSPORT and not self._cluster):
            self.failed(error.str())
        elif code == KafkaError._TRANSPORT:
            if time.monotonic() - self._node_warned_at > 60:
                self._node_warned_at = time.monotonic()
                log.warning("a Kafka node is unreachable (%s); the cluster carries on with the others", error.str())
        else:
            return False
        return True

    def failed(self, reason: str) -> None:
        if self.down_since is None:
            self.down_since = time.monotonic()
            log.warning("%s (%s); retrying until it is back", unavailable_message(self.settings), reason)

    def check(self, got_data: bool) -> None:
        if self.down_since is None:
            return
        now = time.monotonic()
        if got_data or (now - self._last_probe > 2.0 and kafka_reachable(self.settings)):
            log.info("Kafka reachable again after %.0fs", now - self.down_since)
            self.down_since = None
        self._last_probe = now


class _ConfluentConsumer(BusConsumer):
    def __init__(self, settings: Settings, group_id: str, topic: str, on_assign, on_revoke, on_lost,
                 **options: object):
        from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition
        self._TopicPartition, self._KafkaError, self._KafkaException = TopicPartition, KafkaError, KafkaException
        self.topic, self.group_id = topic, group_id
        self._on_assign, self._on_revoke, self._on_lost = on_assign, on_revoke, on_lost
        self._outage = _OutageLog(settings)
        config = {
            "bootstrap.servers": settings.kafka_bootstrap_servers,
            "group.id": group_id,
            "client.id": _member_id(group_id),
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest",
            "session.timeout.ms": SESSION_TIMEOUT_MS,
            "heartbeat.interval.ms": 3_000,
            "max.poll.interval.ms": 300_000,
            "topic.metadata.refresh.interval.ms": 5_000,  # a topic created after the consumer: seen in 5 s
            "fetch.wait.max.ms": 100,
            "error_cb": self._error,
            "on_commit": self._committed,
            "logger": logging.getLogger("tradewatch.librdkafka"),
        }
        config.update(options)
        self._consumer = Consumer(config)
        self._held: list[int] = []
        self._next: dict[int, int] = {}
        self._consumer.subscribe([topic], on_assign=self._assigned, on_revoke=self._revoked, on_lost=self._lost)

    def _error(self, error) -> None:
        if not self._outage.librdkafka(error):
            log.debug("librdkafka: %s", error.str())

    def _committed(self, error, _partitions) -> None:
        if error is not None and error.code() != self._KafkaError._NO_OFFSET:
            log.warning("group %s: offset commit failed (%s); the next one supersedes it", self.group_id, error.str())

    def _assigned(self, _consumer, tps) -> None:
        partitions = sorted(tp.partition for tp in tps)
        starts = _called(self._on_assign, partitions) or {}
        for tp in tps:
            if starts.get(tp.partition) is not None:
                tp.offset = starts[tp.partition]
                if tp.offset >= 0 or tp.offset == BEGINNING:    # BEGINNING: the log start (lags use it)
                    self._next[tp.partition] = max(tp.offset, 0)
        from_group = [tp for tp in tps if starts.get(tp.partition) is None]
        if from_group:          # where the group's committed offsets say (poll reports a jump past them)
            try:
                for tp in self._consumer.committed(from_group, timeout=5):
                    if tp.offset >= 0:
                        self._next[tp.partition] = tp.offset
            except self._KafkaException:
                pass
        self._consumer.assign(tps)
        self._held = partitions

    def _revoked(self, _consumer, tps) -> None:
        partitions = sorted(tp.partition for tp in tps)
        _called(self._on_revoke, partitions)
        self._forget(partitions)
        self._consumer.unassign()

    def _lost(self, _consumer, tps) -> None:
        partitions = sorted(tp.partition for tp in tps)
        log.warning("group %s: partitions %s lost (this member was evicted); their state is dropped",
                    self.group_id, partitions)
        _called(self._on_lost, partitions)
        self._forget(partitions)
        self._consumer.unassign()

    def _forget(self, partitions: list[int]) -> None:
        for p in partitions:
            self._next.pop(p, None)
        self._held = [p for p in self._held if p not in partitions]

    def poll(self, max_records: int, timeout_ms: int) -> list[Message]:
        # consume(n, t) waits for n messages or t; poll(t) returns at the first one. So: take
        # what is already fetched; when nothing is, wait for the first, then take what followed.
        raw = self._consumer.consume(max_records, 0)
        if not raw:
            first = self._consumer.poll(timeout_ms / 1000.0)
            if first is not None:
                raw = [first, *self._consumer.consume(max_records - 1, 0)] if max_records > 1 else [first]
        messages = []
        append, nxt = messages.append, self._next
        for m in raw:
            if m.error() is None:
                partition, offset = m.partition(), m.offset()
                kind, stamp = m.timestamp()
                append(Message(m.topic(), partition, offset, m.key(), m.value(), stamp if kind else None))
                expected = nxt.get(partition, -1)
                if offset > expected > 0:         # 0: from the log start, wherever it is now
                    log.warning("%s[%d]: offsets %d to %d expired in Kafka before they were read (its "
                                "retention, KAFKA_RETENTION_HOURS/_MB, ran out first): those messages are lost "
                                "to this reader", self.topic, partition, expected, offset - 1)
                nxt[partition] = offset + 1
            else:
                error = m.error()
                if not error.retriable() and error.code() != self._KafkaError.UNKNOWN_TOPIC_OR_PART:
                    log.warning("Kafka: %s", error.str())
        if self._outage.down_since is not None:
            self._outage.check(bool(messages))
        return messages

    def commit(self, offsets: dict[int, int], wait: bool = True) -> None:
        if not offsets:
            return
        from confluent_kafka import KafkaException
        if self._outage.down_since is not None or (wait and not kafka_reachable(self._outage.settings, 0.5)):
            # It cannot succeed, and a waited commit blocks (without looking at a stop) until the
            # coordinator answers, a queued one holds up close(); the effects are stored, so a
            # re-delivery is harmless and the next commit supersedes this one.
            raise KafkaUnavailable("offset commit skipped: Kafka is unreachable")
        try:
            self._consumer.commit(offsets=[self._TopicPartition(self.topic, p, o) for p, o in offsets.items()],
                                  asynchronous=not wait)
        except KafkaException as error:
            raise KafkaUnavailable(f"offset commit failed: {error.args[0].str()}") from None

    def committed(self, partitions: list[int]) -> dict[int, int | None]:
        from confluent_kafka import KafkaException
        try:
            tps = self._consumer.committed([self._TopicPartition(self.topic, p) for p in partitions], timeout=10)
        except KafkaException as error:
            raise KafkaUnavailable(f"cannot read committed offsets: {error.args[0].str()}") from None
        return {tp.partition: (tp.offset if tp.offset >= 0 else None) for tp in tps}

    def partitions(self) -> list[int]:
        return list(self._held)

    def partition_lags(self) -> dict[int, int]:
        lags = {}
        for p in self._held:
            try:
                low, high = self._consumer.get_watermark_offsets(self._TopicPartition(self.topic, p), cached=True)
            except Exception:  # noqa: BLE001 - no fetch answer yet
                continue
            if high >= 0:
                lags[p] = max(high - max(self._next.get(p, high), low), 0)
        return lags

    def caught_up(self, partitions: list[int]) -> set[int]:
        from confluent_kafka import KafkaException
        if self._outage.down_since is not None:
            return set()
        found, deadline = set(), time.monotonic() + 1.0
        for p in partitions:
            position, left = self._next.get(p), deadline - time.monotonic()
            if position is None:
                continue
            if left <= 0:
                break
            try:
                low, high = self._consumer.get_watermark_offsets(self._TopicPartition(self.topic, p),
                                                                 timeout=min(left, 0.5), cached=False)
            except KafkaException:
                break               # this leader (or Kafka) cannot answer now: confirm nothing more
            if max(position, low) >= high:
                found.add(p)
        return found

    def close(self) -> None:
        # Leaves the group at once (no session-timeout wait for the others); nothing is committed.
        # librdkafka's close waits for a commit still in flight, up to socket.timeout.ms (60 s) when
        # the broker is gone, so it runs on a thread the stop does not wait for past CLOSE_TIMEOUT_S.
        # While Kafka is away (known, or no node answers a TCP probe) nobody can confirm: no waiting.
        away = self._outage.down_since is not None or not kafka_reachable(self._outage.settings, 0.5)
        closing = threading.Thread(target=self._consumer.close, name="kafka-close", daemon=True)
        closing.start()
        closing.join(0.5 if away else CLOSE_TIMEOUT_S)
        if closing.is_alive():
            log.warning("group %s: Kafka did not confirm leaving the group (%s); stopping anyway,"
                        " the group reassigns the partitions after its session timeout", self.group_id,
                        "unreachable" if away else f"slow: more than {CLOSE_TIMEOUT_S:.0f}s")


class _KafkaPythonConsumer(BusConsumer):
    """kafka-python behind the interface, with its two watchdogs.

    It never sits in a group without work while the topic has partitions nobody else holds: when
    its assignment stays empty for `rejoin_after_s`, it asks the coordinator who holds what and
    rejoins when nobody does (a spare beside members holding everything stays idle and says so).
    And when it holds partitions but fetches nothing for `stall_after_s` while records wait in the
    log, it replaces its client with a fresh one."""

    MAX_REJOIN_INTERVAL_S = 300.0

    def __init__(self, settings: Settings, group_id: str, topic: str, on_assign, on_revoke, on_lost,
                 rejoin_after_s: float = 10.0, stall_after_s: float = 8.0, **options: object):
        import kafka
        self._kafka = kafka
        logging.getLogger("kafka").setLevel(logging.CRITICAL)  # it logs every failed reconnect
        self.topic, self.group_id = topic, group_id
        self._settings = settings
        self._callbacks = (on_assign, on_revoke, on_lost)
        self._options = dict(
            bootstrap_servers=settings.kafka_bootstrap_servers, group_id=group_id, enable_auto_commit=False,
            auto_offset_reset="earliest", max_partition_fetch_bytes=4 * 1024 * 1024,
            session_timeout_ms=SESSION_TIMEOUT_MS, heartbeat_interval_ms=3_000, max_poll_interval_ms=300_000,
            metadata_max_age_ms=5_000, client_id=_member_id(group_id))
        self._options.update(options)
        self._outage = _OutageLog(settings)
        self._gained: list[int] = []
        self._next: dict[int, int] = {}
        self._stall_after_s = stall_after_s
        self._quiet_since: float | None = None
        self._waiting_records: int | None = None
        self._empty_since: float | None = None
        self._rejoin_after_s = self._rejoin_interval = rejoin_after_s
        self.rejoins = self.rebuilds = 0
        self._join()

    def _join(self) -> None:
        from kafka.errors import KafkaError
        try:
            self._consumer = self._kafka.KafkaConsumer(**self._options)
        except KafkaError:
            raise KafkaUnavailable(unavailable_message(self._settings)) from None
        # topic metadata before the join: a join without it can leave kafka-python with nothing
        self._consumer.partitions_for_topic(self.topic)
        self._consumer.subscribe(topics=[self.topic], listener=self._listener())

    def _listener(self):
        member = self

        class Listener(self._kafka.ConsumerRebalanceListener):
            # kafka-python forbids Kafka calls inside the assign callback (the stage's on_assign
            # may read committed offsets): note the gain and hand it over after the poll.
            def on_partitions_assigned(self, assigned):
                member._gained.extend(tp.partition for tp in assigned)

            def on_partitions_revoked(self, revoked):
                partitions = sorted(tp.partition for tp in revoked)
                if partitions:
                    _called(member._callbacks[1], partitions)
                member._forget(partitions)

            def on_partitions_lost(self, lost):
                partitions = sorted(tp.partition for tp in lost)
                if partitions:
                    log.warning("group %s: partitions %s lost; their state is dropped", member.group_id, partitions)
                    _called(member._callbacks[2], partitions)
                member._forget(partitions)

        return Listener()

    def _forget(self, partitions: list[int]) -> None:
        for p in partitions:
            self._next.pop(p, None)
        self._gained = [p for p in self._gained if p not in partitions]

    def _tp(self, partition: int):
        return self._kafka.TopicPartition(self.topic, partition)

    def poll(self, max_records: int, timeout_ms: int) -> list[Message]:
        started = time.monotonic()
        batches = self._consumer.poll(timeout_ms=timeout_ms, max_records=max_records)
        messages = [Message(r.topic, r.partition, r.offset, r.key, r.value,
                            r.timestamp if r.timestamp is not None and r.timestamp >= 0 else None)
                    for records in batches.values() for r in records]
        if self._gained:
            gained, self._gained = sorted(set(self._gained)), []
            # records fetched before the stage chose where to start are read again from there
            messages = [m for m in messages if m.partition not in gained]
            starts = _called(self._callbacks[0], gained) or {}
            committed = self.committed([p for p in gained if starts.get(p) is None])
            for p in gained:
                start = starts.get(p) if starts.get(p) is not None else committed.get(p)
                if start is None or start == BEGINNING:
                    self._consumer.seek_to_beginning(self._tp(p))
                else:
                    self._consumer.seek(self._tp(p), start)
                if start is not None:
                    self._next[p] = max(start, 0)
        for message in messages:
            self._next[message.partition] = message.offset + 1
        if messages:
            self._quiet_since, self._waiting_records = None, None
        else:
            self._watch_empty_assignment()
            self._watch_stall()
            left = timeout_ms / 1000.0 - (time.monotonic() - started)
            if left > 0:  # kafka-python returns at once when nothing is assigned: never spin
                time.sleep(left)
        self._outage.check(bool(messages))
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
                     self.group_id, self.topic)
        self._rejoin_interval = min(self._rejoin_interval * 2, self.MAX_REJOIN_INTERVAL_S)
        self._empty_since = now

    def _watch_stall(self) -> None:
        from kafka.errors import KafkaError
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
            self._outage.failed(str(error))
            return
        waiting = 0
        for tp in assigned:
            position = self._next.get(tp.partition)
            if position is None:
                position = self._consumer.committed(tp)
            waiting += max(ends[tp] - max(position or 0, starts[tp]), 0)
        self._waiting_records = waiting
        if waiting:
            log.warning("group %s: holding partitions %s but nothing fetched for %.0fs while %d records wait; "
                        "replacing the Kafka client", self.group_id, self.partitions(), self._stall_after_s, waiting)
            self._consumer.close(autocommit=False)
            self._next.clear()
            self.rebuilds += 1
            self._join()

    def rejoin(self) -> None:
        """Leave and join the group again: the coordinator hands out the partitions afresh."""
        self._consumer.unsubscribe()
        self._consumer.subscribe(topics=[self.topic], listener=self._listener())
        self.rejoins += 1

    def unowned_partitions(self) -> set[tuple[str, int]] | None:
        """Partitions of the topic that no *other* group member holds; None while rebalancing."""
        from kafka.errors import KafkaError
        try:
            admin = self._kafka.KafkaAdminClient(bootstrap_servers=self._options["bootstrap_servers"],
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
        me = self._options["client_id"]
        held = {(a["topic"], p)
                for member in group.get("members", []) if member.get("client_id") != me
                for a in (member.get("member_assignment") or {}).get("assigned_partitions", [])
                for p in a["partitions"]}
        every = {(self.topic, p) for p in (self._consumer.partitions_for_topic(self.topic) or ())}
        return every - held

    def commit(self, offsets: dict[int, int], wait: bool = True) -> None:
        from kafka.errors import KafkaError
        from kafka.structs import OffsetAndMetadata
        if not offsets:
            return
        try:
            commit = self._consumer.commit if wait else self._consumer.commit_async
            commit({self._tp(p): OffsetAndMetadata(o, "", -1) for p, o in offsets.items()})
        except KafkaError as error:
            raise KafkaUnavailable(f"offset commit failed: {error}") from None

    def committed(self, partitions: list[int]) -> dict[int, int | None]:
        from kafka.errors import KafkaError
        try:
            return {p: self._consumer.committed(self._tp(p)) for p in partitions}
        except KafkaError as error:
            raise KafkaUnavailable(f"cannot read committed offsets: {error}") from None

    def partitions(self) -> list[int]:
        return sorted(tp.partition for tp in self._consumer.assignment())

    def lag(self) -> int | None:
        if self._waiting_records is not None:   # a stall check counted them
            return self._waiting_records
        return super().lag()

    def caught_up(self, partitions: list[int]) -> set[int]:
        from kafka.errors import KafkaError
        known = [p for p in partitions if p in self._next]
        if self._outage.down_since is not None or not known:
            return set()
        try:
            ends = self._consumer.end_offsets([self._tp(p) for p in known])
        except KafkaError:
            return set()
        return {tp.partition for tp, end in ends.items() if self._next[tp.partition] >= end}

    def partition_lags(self) -> dict[int, int]:
        lags = {}
        for tp in self._consumer.assignment():
            end = self._consumer.highwater(tp)
            if end is not None:
                lags[tp.partition] = max(end - self._next.get(tp.partition, end), 0)
        return lags

    def close(self) -> None:
        self._consumer.close(autocommit=False)


def _called(callback, partitions: list[int]):
    """Run a stage's rebalance callback; the clients swallow exceptions raised there, so log them."""
    if callback is None:
        return None
    try:
        return callback(partitions)
    except Interrupt:
        raise
    except Exception:
        log.exception("rebalance callback failed for partitions %s", partitions)
        raise


# ------------------------------------------------------------------------------------- producer

class Publisher:
    """Sends keyed messages. Idempotent (enable.idempotence): a retry never writes a duplicate
    and per-key order holds. While Kafka is unreachable it logs one line and keeps the messages
    queued (no delivery timeout): nothing sent is dropped, and `send` blocks once the queue is
    full until Kafka is back or `stop()` says to give up.

    The partition of a key: a key listed in PARTITION_SYMBOLS goes to its place in that list
    modulo the topic's partitions, so the listed symbols are spread evenly and every consumer up
    to min(partitions, symbols) gets work; any other key where Kafka's default partitioner
    (murmur2, as the Java client) puts it. Either way one key always lands on one partition."""

    def __init__(self, settings: Settings, stop: Callable[[], bool] = lambda: False, client: str | None = None):
        self._settings = settings
        self._stop = stop
        self.client = client or client_of(settings)
        self.failed = 0
        self._queued = 0
        self._outage = _OutageLog(settings)
        listed = [symbol.strip() for symbol in settings.partition_symbols.split(",") if symbol.strip()]
        self._places = {symbol.encode(): n for n, symbol in enumerate(listed)}
        self._partitions: dict[str, int] = {}
        _require_reachable(settings)
        if self.client == "confluent":
            from confluent_kafka import Producer
            self._producer = Producer({
                "bootstrap.servers": settings.kafka_bootstrap_servers,
                "enable.idempotence": True,            # implies acks=all, in-order retries
                "partitioner": "murmur2_random",       # the Java client's, as Flink uses
                "linger.ms": 5,
                "batch.size": 1_000_000,
                "queue.buffering.max.messages": 1_000_000,
                "message.timeout.ms": 0,               # keep retrying while Kafka is down
                # back within a second of Kafka: what it held must arrive before a quiet partition's
                # idle timeout runs out (librdkafka's default backs off up to 10 s)
                "reconnect.backoff.max.ms": 1000,
                "error_cb": self._error,
                "logger": logging.getLogger("tradewatch.librdkafka"),
            })
        else:
            import kafka
            from kafka.errors import KafkaError
            try:
                self._producer = kafka.KafkaProducer(
                    bootstrap_servers=settings.kafka_bootstrap_servers, enable_idempotence=True, acks="all",
                    linger_ms=5, batch_size=256 * 1024, max_block_ms=10_000, retries=2**31 - 1)
            except KafkaError:
                raise KafkaUnavailable(unavailable_message(settings)) from None

    def _error(self, error) -> None:
        if not self._outage.librdkafka(error) and error.fatal():
            log.error("Kafka producer: %s", error.str())

    def _delivered(self, error, _message) -> None:
        if error is not None:
            self.failed += 1
            if self.failed == 1:
                log.error("Kafka did not accept a message: %s", error.str())
        else:
            self._outage.check(True)

    def _reporting_to(self, on_delivery: Callable[[str | None], None]):
        def report(error, message):
            self._delivered(error, message)
            on_delivery(None if error is None else error.str())
        return report

    def _partition_count(self, topic: str) -> int:
        """The topic's partition count, waited for in one-second asks that each look at the stop
        (while Kafka is away nobody can say it); 0 when asked to stop first."""
        count = self._partitions.get(topic)
        warned = False
        while not count:
            if self.client == "confluent":
                from confluent_kafka import KafkaException
                try:
                    described = self._producer.list_topics(topic, timeout=1.0).topics.get(topic)
                    count = len(described.partitions) if described and described.error is None else 0
                except KafkaException:
                    count = 0
            else:
                count = len(self._producer.partitions_for(topic) or ())
            if not count:
                if self._stop():
                    return 0
                if not warned:
                    log.warning("topic %s: its partitions are not known yet; waiting", topic)
                    warned = True
                time.sleep(0.2)
        self._partitions[topic] = count
        return count

    def send(self, topic: str, key: bytes | None, value: bytes,
             on_delivery: Callable[[str | None], None] | None = None) -> bool:
        """Queue one message; False only when asked to stop while Kafka could not take it.
        `on_delivery(None)` once Kafka acknowledged it, `on_delivery(reason)` if Kafka refused it
        (called from flush() or the client's own thread)."""
        place = self._places.get(key)
        if place is not None:
            count = self._partitions.get(topic) or self._partition_count(topic)
            if not count:
                return False
            return self._send(topic, key, value, place % count, on_delivery)
        return self._send(topic, key, value, None, on_delivery)

    def _send(self, topic: str, key: bytes | None, value: bytes, partition: int | None, on_delivery) -> bool:
        if self.client == "confluent":
            extra = {} if partition is None else {"partition": partition}
            report = self._delivered if on_delivery is None else self._reporting_to(on_delivery)
            while True:
                try:
                    self._producer.produce(topic, value, key, on_delivery=report, **extra)
                    self._queued += 1
                    if self._queued % 1000 == 0:
                        self._producer.poll(0)     # serve delivery reports now and then
                    return True
                except BufferError:       # queue full: Kafka slow or away; wait for room
                    self._producer.poll(0.1)
                    if self._stop():
                        return False
        from kafka.errors import KafkaTimeoutError
        while True:
            try:
                future = self._producer.send(topic, key=key, value=value, partition=partition)
                if on_delivery is not None:
                    future.add_callback(lambda _metadata: on_delivery(None))
                    future.add_errback(lambda error: on_delivery(str(error) or type(error).__name__))
                self._outage.check(True)
                return True
            except KafkaTimeoutError:
                self._outage.failed("metadata or buffer timeout")
                if self._stop():
                    return False

    def send_many(self, topic: str, items) -> int:
        """Queue (key, value) pairs; the number queued (fewer only when asked to stop)."""
        sent = 0
        send = self.send
        for key, value in items:
            if not send(topic, key, value):
                break
            sent += 1
        return sent

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until every queued message is acknowledged; False if `timeout_s` or stop came first."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        if self.client != "confluent":
            self._producer.flush(timeout=timeout_s)
            return True
        while True:
            wait_s = 1.0 if deadline is None else max(min(1.0, deadline - time.monotonic()), 0.0)
            if self._producer.flush(wait_s) == 0:
                return True
            if self._stop() or (deadline is not None and time.monotonic() >= deadline):
                return False

    def close(self, timeout_s: float = 3.0) -> None:
        """Wait up to `timeout_s` for queued messages (a stopping stage must not hang on a dead
        broker; the detector's outbox sends whatever was not acknowledged again)."""
        if self.client == "confluent":
            away = self._outage.down_since is not None or not kafka_reachable(self._settings, 0.5)
            self.flush(0 if away else timeout_s)     # Kafka away: nobody to wait for
        else:
            self._producer.close()


# ---------------------------------------------------------------------------------------- admin

def _admin(settings: Settings):
    from confluent_kafka.admin import AdminClient
    _require_reachable(settings)
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
    admin = _admin(settings)
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
        admin = _admin(settings)
        return str(admin.describe_topics(TopicCollection([topic]), request_timeout=5)[topic].result(6).topic_id)
    except (KafkaException, KafkaUnavailable):
        return None


def topic_partitions(settings: Settings) -> dict[str, int]:
    """Every topic on the broker and its number of partitions (raises KafkaUnavailable)."""
    from confluent_kafka import KafkaException
    try:
        metadata = _admin(settings).list_topics(timeout=10)
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
            metadata = _admin(settings).list_topics(timeout=2)
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


def group_lag(settings: Settings, group_id: str, topic: str) -> dict[int, tuple[int, int]]:
    """Per partition of `topic`: (committed offset of `group_id`, end offset). Missing commit = 0.
    Reading committed offsets does not join the group, so this never disturbs its members. Raises
    KafkaUnavailable when the broker cannot answer within ~10 s (e.g. the group coordinator is
    still moving right after a broker start)."""
    from confluent_kafka import Consumer, KafkaException, TopicPartition
    _require_reachable(settings)
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
                if time.monotonic() > deadline or not error.args[0].retriable() and \
                        error.args[0].code() not in (16, 14):    # NOT_COORDINATOR, COORDINATOR_LOAD_IN_PROGRESS
                    raise KafkaUnavailable(f"cannot read the offsets of group {group_id}: {error.args[0].str()}") \
                        from None
                time.sleep(0.2)
    finally:
        reader.close()


class Tail:
    """Every new message of `topic`, on all its partitions, without a group: nothing is committed
    and no rebalance pauses it (for readers that follow a topic live, like the API's alert stream).
    Partitions that exist when it starts are read from their end; partitions, or the topic itself,
    that appear later are read from their beginning, since everything in them is new. librdkafka
    reconnects by itself after a Kafka outage."""

    LIST_EVERY_S = 5.0

    def __init__(self, settings: Settings, topic: str):
        from confluent_kafka import Consumer
        _require_reachable(settings)
        self.topic = topic
        self._outage = _OutageLog(settings)
        self._reader = Consumer({"bootstrap.servers": settings.kafka_bootstrap_servers, "group.id": "tradewatch-tail",
                                 "enable.auto.commit": False, "fetch.wait.max.ms": 50,
                                 "error_cb": self._error, "logger": logging.getLogger("tradewatch.librdkafka")})
        self._known: set[int] | None = None     # None: not listed yet
        self._listed_at = 0.0
        self._list()

    def _error(self, error) -> None:
        self._outage.librdkafka(error)

    def _list(self) -> None:
        from confluent_kafka import OFFSET_END, KafkaException, TopicPartition
        self._listed_at = time.monotonic()
        try:
            described = self._reader.list_topics(self.topic, timeout=2).topics.get(self.topic)
        except KafkaException:
            return
        partitions = set(described.partitions) if described is not None and described.error is None else set()
        new = partitions - (self._known or set())
        if new:
            start = OFFSET_END if self._known is None else BEGINNING
            self._reader.incremental_assign([TopicPartition(self.topic, p, start) for p in sorted(new)])
        self._known = (self._known or set()) | partitions

    def poll(self, max_records: int, timeout_ms: int) -> list[Message]:
        if time.monotonic() - self._listed_at > self.LIST_EVERY_S:
            self._list()
        raw = self._reader.consume(max_records, 0)
        if not raw:      # wait for the first message only, then take what came with it (as in poll above)
            first = self._reader.poll(timeout_ms / 1000.0)
            raw = [first, *self._reader.consume(max_records - 1, 0)] if first is not None else []
        messages = [Message(m.topic(), m.partition(), m.offset(), m.key(), m.value(),
                            m.timestamp()[1] if m.timestamp()[0] else None) for m in raw if m.error() is None]
        if self._outage.down_since is not None:
            self._outage.check(bool(messages))
        return messages

    def close(self) -> None:
        self._reader.close()


def read_topic(settings: Settings, topic: str, until: Callable[[list[Message]], bool],
               timeout_s: float = 30.0) -> list[Message]:
    """Every message of `topic` from the beginning, read without a group, until `until(messages)`
    or `timeout_s` (for tests and tools that check what a topic holds)."""
    from confluent_kafka import Consumer, TopicPartition
    _require_reachable(settings)
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
