"""What both Kafka clients share: the message, the errors, the consumer interface, the publisher's
partitioning and outage log, murmur2 (tradewatch/bus/__init__.py says which client is used)."""
from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass
from typing import Callable, Protocol

from tradewatch import services
from tradewatch.config import Settings

log = logging.getLogger("tradewatch.bus")
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


def require_reachable(settings: Settings) -> None:
    # Both clients wait (kafka-python up to 30 s, librdkafka forever) on an unreachable
    # bootstrap server; fail fast with a message a person can act on instead.
    if not kafka_reachable(settings):
        raise KafkaUnavailable(unavailable_message(settings))


def client_of(settings: Settings) -> str:
    if settings.kafka_client not in CLIENTS:
        raise ValueError(f"KAFKA_CLIENT must be one of {', '.join(CLIENTS)}; got {settings.kafka_client!r}")
    return settings.kafka_client


def member_id(group_id: str) -> str:
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


class OutageLog:
    """One warning when the broker goes away, one info line when it is back. On a cluster, one
    node going away is no outage: said once a minute at most, while the others carry on."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.down_since: float | None = None
        self._last_probe = 0.0
        self._cluster = "," in settings.kafka_bootstrap_servers
        self._node_warned_at = -60.0
        self._told = False

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
            self._told = False
            log.warning("%s (%s); retrying until it is back", unavailable_message(self.settings), reason)

    def check(self, got_data: bool) -> None:
        if self.down_since is None:
            return
        now = time.monotonic()
        probe = not got_data and now - self._last_probe > 2.0      # a TCP probe every 2 s, not per poll
        if probe:
            self._last_probe = now
            if not self._told:      # the broker's own words, once this machine can tell them
                cause = services.told(self.settings, "kafka")
                if cause:
                    log.warning("%s", cause)
                    self._told = True
        if got_data or (probe and kafka_reachable(self.settings)):
            log.info("Kafka reachable again after %.0fs", now - self.down_since)
            self.down_since = None


def called(callback, partitions: list[int]):
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
    """Sends keyed messages (one implementation per client: confluent.py, kafka_python.py).
    Idempotent (enable.idempotence): a retry never writes a duplicate and per-key order holds.
    While Kafka is unreachable it logs one line and keeps the messages queued (no delivery
    timeout): nothing sent is dropped, and `send` blocks once the queue is full until Kafka is
    back or `stop()` says to give up.

    The partition of a key: a key listed in PARTITION_SYMBOLS goes to its place in that list
    modulo the topic's partitions, so the listed symbols are spread evenly and every consumer up
    to min(partitions, symbols) gets work; any other key where Kafka's default partitioner
    (murmur2, as the Java client) puts it. Either way one key always lands on one partition."""

    client = ""

    def __init__(self, settings: Settings, stop: Callable[[], bool] = lambda: False):
        self._settings = settings
        self._stop = stop
        self.failed = 0
        self._outage = OutageLog(settings)
        listed = [symbol.strip() for symbol in settings.partition_symbols.split(",") if symbol.strip()]
        self._places = {symbol.encode(): n for n, symbol in enumerate(listed)}
        self._partitions: dict[str, int] = {}
        require_reachable(settings)

    def _known_partitions(self, topic: str) -> int:
        """The topic's partition count as the client knows it now (0: not known)."""
        raise NotImplementedError

    def _send(self, topic: str, key: bytes | None, value: bytes, partition: int | None, on_delivery) -> bool:
        raise NotImplementedError

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until every queued message is acknowledged; False if `timeout_s` or stop came first."""
        raise NotImplementedError

    def close(self, timeout_s: float = 3.0) -> None:
        """Wait up to `timeout_s` for queued messages (a stopping stage must not hang on a dead
        broker; the detector's outbox sends whatever was not acknowledged again)."""
        raise NotImplementedError

    def _partition_count(self, topic: str) -> int:
        """The topic's partition count, waited for in one-second asks that each look at the stop
        (while Kafka is away nobody can say it); 0 when asked to stop first."""
        count = self._partitions.get(topic)
        warned = False
        while not count:
            count = self._known_partitions(topic)
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

    def send_many(self, topic: str, items) -> int:
        """Queue (key, value) pairs; the number queued (fewer only when asked to stop)."""
        sent = 0
        send = self.send
        for key, value in items:
            if not send(topic, key, value):
                break
            sent += 1
        return sent

