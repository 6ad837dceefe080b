"""The consumer's loop: Kafka `trades` → PostgreSQL `trades` (+ `dead_letters`), exactly once.

Exactly once = idempotent writes keyed by trade_id + offsets committed only after the database
commit. A crash between the two re-delivers the batch, and the re-delivered rows are skipped.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable

from kafka.errors import KafkaError

from tradewatch import bus, runtime
from tradewatch.config import Settings
from tradewatch.events import InvalidTrade, parse_trade
from tradewatch.store import db
from tradewatch.store.writer import DeadLetter, StoredTrade, write_batch

log = logging.getLogger("tradewatch.consumer")

RETRY_SECONDS = 2.0


@dataclass
class IngestStats:
    messages: int = 0
    trades_inserted: int = 0
    duplicates_skipped: int = 0
    dead_letters: int = 0
    batches: int = 0
    partitions: set[int] = field(default_factory=set)


def classify(messages: list[bus.Message], now_ms: int) -> tuple[list[StoredTrade], list[DeadLetter]]:
    """Split a batch into valid trades and dead letters (with the reason)."""
    trades: list[StoredTrade] = []
    dead: list[DeadLetter] = []
    for message in messages:
        try:
            trades.append(StoredTrade(parse_trade(message.value, now_ms), message.partition, message.offset))
        except InvalidTrade as error:
            dead.append(DeadLetter(message.topic, message.partition, message.offset,
                                   message.key, message.value, str(error)))
    return trades, dead


class Ingestor:
    def __init__(self, settings: Settings, stop: Callable[[], bool], group_id: str | None = None):
        self.settings = settings
        self.stop = stop
        self.group_id = group_id or settings.consumer_group
        self.stats = IngestStats()
        self._consumer: bus.BusConsumer | None = None
        self._conn = None
        self.heartbeat = runtime.Heartbeat(settings, "consumer")

    def run(self) -> IngestStats:
        self._consumer = self._connect_kafka()
        if self._consumer is None:
            return self.stats
        last_report = time.monotonic()
        quiet_since = time.monotonic()
        try:
            while not self.stop():
                messages = self._collect_batch()
                self._beat()
                if not messages:
                    quiet_since = self._check_kafka_when_quiet(quiet_since)
                    continue
                quiet_since = time.monotonic()
                if not self._store(messages):
                    break  # asked to stop while the database was down: offsets stay uncommitted
                self._commit(messages)
                if time.monotonic() - last_report >= 5.0:
                    self._report()
                    last_report = time.monotonic()
        finally:
            self.heartbeat.stopped(self.stats.messages)
            self._consumer.close()
            if self._conn is not None:
                self._conn.close()
        self._report()
        return self.stats

    def _beat(self) -> None:
        assert self._consumer is not None
        self.heartbeat.beat(self.stats.messages, self._consumer.lag(), self._consumer.partitions())

    def _connect_kafka(self) -> bus.BusConsumer | None:
        waiting = False
        while not self.stop():
            try:
                consumer = bus.BusConsumer(self.settings, self.group_id, [self.settings.trades_topic])
                if waiting:
                    log.info("Kafka reachable again")
                return consumer
            except bus.KafkaUnavailable as error:
                if not waiting:
                    log.warning("%s; retrying every %.0fs", error, RETRY_SECONDS)
                    waiting = True
                time.sleep(RETRY_SECONDS)
        return None

    def _collect_batch(self) -> list[bus.Message]:
        assert self._consumer is not None
        batch: list[bus.Message] = []
        deadline = time.monotonic() + self.settings.consumer_batch_wait_ms / 1000.0
        while len(batch) < self.settings.consumer_batch_size and not self.stop():
            remaining_ms = int((deadline - time.monotonic()) * 1000)
            if remaining_ms <= 0 and batch:
                break
            batch.extend(self._consumer.poll(self.settings.consumer_batch_size - len(batch), max(remaining_ms, 100)))
            if not batch and time.monotonic() > deadline:
                break
        return batch

    def _check_kafka_when_quiet(self, quiet_since: float) -> float:
        """kafka-python reconnects silently; after 5 quiet seconds, say so if the broker is gone."""
        if time.monotonic() - quiet_since < 5.0:
            return quiet_since
        if not bus.kafka_reachable(self.settings):
            log.warning("%s; waiting for it to come back", bus.unavailable_message(self.settings))
            while not self.stop() and not bus.kafka_reachable(self.settings):
                time.sleep(RETRY_SECONDS)
            if not self.stop():
                log.info("Kafka reachable again")
        return time.monotonic()

    def _store(self, messages: list[bus.Message]) -> bool:
        trades, dead = classify(messages, int(time.time() * 1000))
        waiting = False
        while True:
            try:
                if self._conn is None:
                    self._conn = db.connect(self.settings)
                result = write_batch(self._conn, trades, dead)
                break
            except (db.DatabaseUnavailable, *db.CONNECTION_ERRORS) as error:
                if not waiting:
                    log.warning("PostgreSQL unavailable (%s); holding %d messages and retrying every %.0fs",
                                str(error).strip().splitlines()[0], len(messages), RETRY_SECONDS)
                    waiting = True
                self._drop_connection()
                if self.stop():
                    return False
                time.sleep(RETRY_SECONDS)
        if waiting:
            log.info("PostgreSQL reachable again, batch stored")
        for letter in dead:
            log.warning("dead letter %s[%d]@%d: %s", letter.topic, letter.partition, letter.offset, letter.reason)
        self.stats.messages += len(messages)
        self.stats.trades_inserted += result.trades_inserted
        self.stats.duplicates_skipped += result.duplicates_skipped
        self.stats.dead_letters += result.dead_letters
        self.stats.batches += 1
        self.stats.partitions.update(m.partition for m in messages)
        return True

    def _drop_connection(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception:  # noqa: BLE001 - the connection is already broken
                pass
            self._conn = None

    def _commit(self, messages: list[bus.Message]) -> None:
        assert self._consumer is not None
        try:
            self._consumer.commit(messages)
        except KafkaError as error:
            # Rows are already stored; a re-delivery after a rebalance is skipped by trade_id.
            log.warning("offset commit failed (%s); the batch may be re-delivered and will be deduplicated", error)

    def _report(self) -> None:
        s = self.stats
        log.info("stored %d trades (%d duplicates skipped, %d dead letters) from %d messages in %d batches; "
                 "partitions %s", s.trades_inserted, s.duplicates_skipped, s.dead_letters, s.messages, s.batches,
                 sorted(s.partitions))
