"""confluent-kafka (librdkafka) behind the bus interface: the default client."""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from tradewatch.bus.core import (BEGINNING, CLOSE_TIMEOUT_S, SESSION_TIMEOUT_MS, BusConsumer,
                                 KafkaUnavailable, Message, OutageLog, Publisher, called, kafka_reachable,
                                 member_id)
from tradewatch.config import Settings

log = logging.getLogger("tradewatch.bus")


FETCH_AHEAD_KB = 16_384          # README "Bounds"
FETCH_QUEUE_BACKOFF_MS = 50


class ConfluentConsumer(BusConsumer):
    def __init__(self, settings: Settings, group_id: str, topic: str, on_assign, on_revoke, on_lost,
                 **options: object):
        from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition
        self._TopicPartition, self._KafkaError, self._KafkaException = TopicPartition, KafkaError, KafkaException
        self.topic, self.group_id = topic, group_id
        self._on_assign, self._on_revoke, self._on_lost = on_assign, on_revoke, on_lost
        self._outage = OutageLog(settings)
        config = {
            "bootstrap.servers": settings.kafka_bootstrap_servers,
            "group.id": group_id,
            "client.id": member_id(group_id),
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest",
            "session.timeout.ms": SESSION_TIMEOUT_MS,
            "heartbeat.interval.ms": 3_000,
            "max.poll.interval.ms": 300_000,
            "topic.metadata.refresh.interval.ms": 5_000,  # a topic created after the consumer: seen in 5 s
            "fetch.wait.max.ms": 100,
            # the fetch-ahead a member holds while its stage is busy or stalled (a database lock, an
            # outage): librdkafka's default is 64 MB; 16 MB is still several full batches ahead
            # (bench/ingest.py: no slower; 4 MB was 30 % slower)
            "queued.max.messages.kbytes": FETCH_AHEAD_KB,
            # once that fetch-ahead is full, librdkafka fetches again this long after it was (its
            # default, 1 s, held a raw read of the bench's quotes topic to ~95k messages/s; with
            # 50 ms: ~225k/s, the same 16 MB bound)
            "fetch.queue.backoff.ms": FETCH_QUEUE_BACKOFF_MS,
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
        starts = called(self._on_assign, partitions) or {}
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
        called(self._on_revoke, partitions)
        self._forget(partitions)
        self._consumer.unassign()

    def _lost(self, _consumer, tps) -> None:
        partitions = sorted(tp.partition for tp in tps)
        log.warning("group %s: partitions %s lost (this member was evicted); their state is dropped",
                    self.group_id, partitions)
        called(self._on_lost, partitions)
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
        from confluent_kafka import OFFSET_END, KafkaException
        if self._outage.down_since is not None:
            return set()
        asked, positions = [], {}
        for p in partitions:
            position = self._next.get(p)
            if position is None:
                continue
            try:
                low, high = self._consumer.get_watermark_offsets(self._TopicPartition(self.topic, p), cached=True)
            except Exception:  # noqa: BLE001 - no fetch answer yet
                low, high = -1, -1
            positions[p] = max(position, low)       # records below the log start are gone: not unread
            if high < 0 or positions[p] >= high:     # the last fetch did not show it behind: ask
                asked.append(self._TopicPartition(self.topic, p, OFFSET_END))
        if not asked:
            return set()
        # one ListOffsets for them all: librdkafka queues each behind the connection's pending Fetch
        # (up to fetch.wait.max.ms), so one request per partition took ~100 ms each when quiet
        try:
            ends = self._consumer.offsets_for_times(asked, timeout=1.0)
        except KafkaException:
            return set()            # a leader (or Kafka) cannot answer now: confirm nothing
        return {tp.partition for tp in ends if tp.error is None and tp.offset >= 0
                and positions[tp.partition] >= tp.offset}

    def _give_back(self) -> None:
        """The partitions go back before close(): librdkafka can wait for ever in close() when the
        revocation it runs there calls assign() (librdkafka #4884: a group rebalancing as its member
        stops), and it waits holding the GIL, so no timeout of ours runs (CI: an aggregator stopped
        while the group took back a stalled member hung 60 s in unassign). Unsubscribing raises the
        same revocation in poll, where (un)assign is the everyday path; what that poll returns is
        dropped unread, as close() drops the fetch-ahead."""
        try:
            self._consumer.unsubscribe()
            deadline = time.monotonic() + CLOSE_TIMEOUT_S
            while self._held and time.monotonic() < deadline:
                self._consumer.consume(1000, 0.1)
        except self._KafkaException as error:
            log.warning("group %s: could not give the partitions back before closing (%s)", self.group_id, error)

    def close(self) -> None:
        # Leaves the group at once (no session-timeout wait for the others); nothing is committed.
        # librdkafka's close waits for a commit still in flight, up to socket.timeout.ms (60 s) when
        # the broker is gone, so it runs on a thread the stop does not wait for past CLOSE_TIMEOUT_S.
        # While Kafka is away (known, or no node answers a TCP probe) nobody can confirm: no waiting.
        away = self._outage.down_since is not None or not kafka_reachable(self._outage.settings, 0.5)
        if not away:
            self._give_back()
        closing = threading.Thread(target=self._consumer.close, name="kafka-close", daemon=True)
        closing.start()
        closing.join(0.5 if away else CLOSE_TIMEOUT_S)
        if closing.is_alive():
            log.warning("group %s: Kafka did not confirm leaving the group (%s); stopping anyway,"
                        " the group reassigns the partitions after its session timeout", self.group_id,
                        "unreachable" if away else f"slow: more than {CLOSE_TIMEOUT_S:.0f}s")


class ConfluentPublisher(Publisher):
    client = "confluent"

    def __init__(self, settings: Settings, stop: Callable[[], bool] = lambda: False):
        super().__init__(settings, stop)
        from confluent_kafka import Producer
        self._queued = 0
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

    def _known_partitions(self, topic: str) -> int:
        from confluent_kafka import KafkaException
        try:
            described = self._producer.list_topics(topic, timeout=1.0).topics.get(topic)
            return len(described.partitions) if described and described.error is None else 0
        except KafkaException:
            return 0

    def _send(self, topic: str, key: bytes | None, value: bytes, partition: int | None, on_delivery) -> bool:
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

    def flush(self, timeout_s: float | None = None) -> bool:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            wait_s = 1.0 if deadline is None else max(min(1.0, deadline - time.monotonic()), 0.0)
            if self._producer.flush(wait_s) == 0:
                return True
            if self._stop() or (deadline is not None and time.monotonic() >= deadline):
                return False

    def close(self, timeout_s: float = 3.0) -> None:
        away = self._outage.down_since is not None or not kafka_reachable(self._settings, 0.5)
        self.flush(0 if away else timeout_s)     # Kafka away: nobody to wait for
