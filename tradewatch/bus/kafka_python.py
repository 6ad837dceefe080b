"""kafka-python behind the bus interface: the pure-Python client the project card names, kept
selectable (KAFKA_CLIENT=kafka-python), with the watchdogs its two faults on a new broker need."""
from __future__ import annotations

import logging
import time
from typing import Callable

from tradewatch.bus.core import (BEGINNING, SESSION_TIMEOUT_MS, BusConsumer, KafkaUnavailable, Message,
                                 OutageLog, Publisher, called, member_id, unavailable_message)
from tradewatch.config import Settings

log = logging.getLogger("tradewatch.bus")


class KafkaPythonConsumer(BusConsumer):
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
            metadata_max_age_ms=5_000, client_id=member_id(group_id))
        self._options.update(options)
        self._outage = OutageLog(settings)
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
                    called(member._callbacks[1], partitions)
                member._forget(partitions)

            def on_partitions_lost(self, lost):
                partitions = sorted(tp.partition for tp in lost)
                if partitions:
                    log.warning("group %s: partitions %s lost; their state is dropped", member.group_id, partitions)
                    called(member._callbacks[2], partitions)
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
        self._keep_joining()
        batches = self._consumer.poll(timeout_ms=timeout_ms, max_records=max_records)
        messages = [Message(r.topic, r.partition, r.offset, r.key, r.value,
                            r.timestamp if r.timestamp is not None and r.timestamp >= 0 else None)
                    for records in batches.values() for r in records]
        if self._gained:
            gained, self._gained = sorted(set(self._gained)), []
            # records fetched before the stage chose where to start are read again from there
            messages = [m for m in messages if m.partition not in gained]
            starts = called(self._callbacks[0], gained) or {}
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

    def _keep_joining(self) -> None:
        """Finish a group join kafka-python 3.0.12 would drop. Its poll() drives the join (JoinGroup,
        then SyncGroup) as a task and waits for it up to the poll's timeout; a task that ends while
        no poll waits is lost. If the group flag still asks for a rejoin, the next poll throws
        the finished join away and starts another: a leader whose join completes when a follower
        joins, between its own polls, rejoins for ever. If the rejoin came from topic metadata (a
        partition added, the topic seen at last), the leader's assignment clears the condition and
        no poll looks at the task again: the member stays "rebalancing" with its heartbeat off, is
        dropped by the broker after the session timeout, and believes it still holds its partitions.
        So, before each poll: a join still under way is waited for again, and a finished one is
        completed as the library's own poll would have (state, heartbeat, the new assignment)."""
        coordinator = self._consumer._coordinator
        if coordinator.state is not self._kafka.structs.MemberState.REBALANCING:
            return
        task = coordinator._join_task
        if task is None or not task.is_done or task.exception is not None:
            if not coordinator.need_rejoin():     # in flight: wait for it; failed: join again
                coordinator.request_rejoin()
            return
        generation = coordinator._generation
        with coordinator._lock:
            coordinator._join_task = None
            coordinator.rejoining = coordinator.rejoin_needed = False
            coordinator.state = self._kafka.structs.MemberState.STABLE
            coordinator._enable_heartbeat()
        coordinator._net.run(coordinator._on_join_complete_async, generation.generation_id, generation.member_id,
                             generation.protocol, task.value)

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


class KafkaPythonPublisher(Publisher):
    client = "kafka-python"

    def __init__(self, settings: Settings, stop: Callable[[], bool] = lambda: False):
        super().__init__(settings, stop)
        import kafka
        from kafka.errors import KafkaError
        try:
            self._producer = kafka.KafkaProducer(
                bootstrap_servers=settings.kafka_bootstrap_servers, enable_idempotence=True, acks="all",
                linger_ms=5, batch_size=256 * 1024, max_block_ms=10_000, retries=2**31 - 1)
        except KafkaError:
            raise KafkaUnavailable(unavailable_message(settings)) from None

    def _known_partitions(self, topic: str) -> int:
        return len(self._producer.partitions_for(topic) or ())

    def _send(self, topic: str, key: bytes | None, value: bytes, partition: int | None, on_delivery) -> bool:
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

    def flush(self, timeout_s: float | None = None) -> bool:
        self._producer.flush(timeout=timeout_s)
        return True

    def close(self, timeout_s: float = 3.0) -> None:
        self._producer.close()
