"""The stage runtime: the one loop every Kafka-reading stage (consumer, aggregator, detector) runs on.

A stage supplies its logic (a `Stage`: what to do with messages, what to write, what to load on
assignment); the runtime does everything else the same way for all of them: connecting to Kafka
and PostgreSQL and retrying with one log line per outage, a stop on SIGINT/SIGTERM honoured within
seconds even while a service is down, rebalances, the heartbeat for the health strip, counters.

The commit protocol (one for every stage). A *checkpoint* makes everything the stage has read
durable, in this order:

1. **One PostgreSQL transaction** holds the stage's effects for the partitions it owns (rows it
   derived, dead letters, and — for a stage that `keeps_position` — its position per partition,
   written by the runtime into `stage_positions`, tradewatch/store/positions.py).
   It begins by checking the stage's *fencing epoch* for each of those partitions in
   `partition_owners` (row lock, FOR SHARE): on every assignment the new owner increments the epoch
   of the partitions it gets (and loads its state in that same transaction). A stalled instance
   that was evicted from the group and wakes up finds a newer epoch: its transaction is rolled back
   and it drops those partitions as *lost*. So a stale owner can never overwrite a newer owner's rows.
2. **Side effects outside the database** are published from an outbox after that commit (and
   while the stage is idle, so a refused delivery is tried again with no new message): the rows
   written in (1) are marked unpublished with the partition they came from (e.g.
   `alerts.published_at IS NULL`, a `candle_outbox` row); the owner of that partition sends them
   (Kafka topics `alerts` and `candles`, webhook, e-mail) and marks each one done only once its
   receiver acknowledged it. A crash in between sends them again: delivered at least once (readers
   dedupe by id). A stage lists its sinks in `outboxes` (the detector: Kafka and the alert routes;
   the aggregator: Kafka; tradewatch/outbox.py); the runtime delivers them.
   Effects someone is waiting for (the detector's alerts: `Stage.urgent`) do not wait for the
   checkpoint: right after the batch that raised them they are stored in a small fenced
   transaction of their own and delivered (`_write_urgent`). The checkpoint, with the position
   and state, follows at its own pace; a crash in between reads those messages again from the
   last checkpoint, and the alerts, keyed by alert_id, are stored and sent once.
3. **Kafka offsets are committed last.** A crash before this re-delivers messages whose effects
   are already stored; every write is keyed (trade_id, window, alert_id), so redoing it changes
   nothing. A checkpoint that cannot finish (database down while asked to stop) commits nothing.

Rebalances: partitions *revoked* in an orderly rebalance are checkpointed, then their state is
dropped; partitions *lost* (session timeout, fenced) are dropped without writing anything. Each
claim records Kafka's id of the topic: when it changed (the topic was deleted and created again
under its name), stored positions of those partitions are rewound to the new topic's start.

Errors: an outage (Kafka, or PostgreSQL's connection classes, db.is_outage) is waited out with one
log line; an error no retry can fix stops the stage (StageFailed, exit status 1, shown on the
health strip); one bad message never stops a stage (it is dead-lettered or skipped).

The heartbeat is tradewatch/heartbeat.py; how the heartbeats are read, tradewatch/store/health.py.
"""
from __future__ import annotations

import logging
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from tradewatch import bus, prometheus, services
from tradewatch.config import Settings
from tradewatch.heartbeat import Heartbeat
from tradewatch.store import db, positions

log = logging.getLogger("tradewatch.runtime")

# ---------------------------------------------------------------- the stage loop

RETRY_S = 2.0
# A stage that checkpoints by batch writes a batch once a poll runs dry, once it is full, or once
# its first message has waited this long while no write is in flight (a steady trickle never lets
# a poll run dry; under load, batches grow while the previous one is being written).
MAX_BATCH_AGE_S = 0.02
COMMIT_EVERY_S = 1.0
# An `overlap` stage's writer thread waits for the GIL after each statement PostgreSQL answers,
# while the stage's thread decodes the next batch. At Python's default switch interval (5 ms) that
# was about 7 ms a statement (over a batch's statements, longer than its COPY); at 1 ms it is about
# 1.2 (tests/integration/test_writer_busy.py). The consumer alone (issue 39, an A/B on one
# topic): 112-119k rows/s before, 129-135k at 1 ms; 0.5 and 0.2 ms were no faster.
WRITER_SWITCH_S = 0.001


class Stopping(bus.Interrupt):
    """Raised inside the runtime when a stop was requested while it waited for a service."""


class StageFailed(RuntimeError):
    """The stage stopped on an error no retry can fix (the message says which); exit status 1."""


class Pending:
    """Effects of one kind awaiting the next checkpoint, each with the Kafka partition it came
    from. A stage makes its buffers with `Stage.pending_effects()`; the runtime empties them once
    the checkpoint committed and drops a partition's share when the partition is revoked, lost or
    fenced, so a stage never filters them itself. An item added with a key replaces the one of
    that key (a window changed twice before its checkpoint is written once)."""

    __slots__ = ("_items", "_count")

    def __init__(self) -> None:
        self._items: dict[object, tuple[int, object]] = {}
        self._count = 0          # keys of the items added without one (ints; given keys are tuples)

    def add(self, partition: int, item, key: tuple | None = None) -> None:
        if key is None:
            key, self._count = self._count, self._count + 1
        self._items[key] = (partition, item)

    def pop(self, key: tuple) -> None:
        self._items.pop(key, None)

    def items(self) -> list:
        return [item for _, item in self._items.values()]

    def tagged(self) -> list[tuple[int, object]]:
        """(partition, item) of each, in the order added."""
        return list(self._items.values())

    def drop(self, partitions) -> None:
        gone = set(partitions)
        self._items = {k: v for k, v in self._items.items() if v[0] not in gone}

    def clear(self) -> None:
        self._items.clear()

    def __len__(self) -> int:
        return len(self._items)


class Stage:
    """What a stage supplies to the runtime: decode and fold what it reads (`take`), and what to
    write (`write`). Override what the stage needs; defaults do nothing. The runtime keeps the rest:
    the offsets read, pending effects by partition (`pending_effects`), the stored position of a
    stage that `keeps_position`, and the delivery of its `outboxes`."""

    name = "stage"            # heartbeat name: consumer | aggregator | detector
    watches_quiet = False     # True: the runtime tracks which partitions are quiet (quiet_for)
    keeps_position = False    # True: its position is stored in the database (store/positions.py), not Kafka's
    runtime: "Runtime"        # set by the Runtime that runs it
    flush_interval_s: float | None = None   # None: checkpoint when a poll runs dry or the batch is full
    batch_size = 2000
    # A stage with a flush interval whose pending effects grow with what it reads (the aggregator's
    # changed windows): a checkpoint also falls due at this many pending records, so a backlog's
    # batch, and the memory it holds, has a bound. None: `batch_size` is the bound (past it the
    # stage reads a message a poll until its interval is due). A poll reads at most `batch_size`.
    max_pending: int | None = None
    overlap = False   # True: seal() hands pending effects to the writer thread (see Runtime)

    def __init__(self) -> None:
        self.processed = 0
        self.outboxes: list = []          # step 2 sinks: wake(), deliver(runtime), close()
        self._pending: list[Pending] = []

    def pending_effects(self) -> Pending:
        """A buffer of effects for the next checkpoint, emptied and trimmed by the runtime."""
        buffer = Pending()
        self._pending.append(buffer)
        return buffer

    def output_topics(self) -> dict[str, int]:
        """Topics the stage writes to, with their partition count (created at start if missing)."""
        return {}

    def assigned(self, cur, partitions: list[int], stored: dict[int, tuple[int, dict]]) -> dict[int, int | None]:
        """Gained `partitions` (inside the transaction that claims them): load their state. `stored`:
        the stored positions (offset, kept values) of those that have one (keeps_position stages).
        Reading starts at the stored offset, else at the group's committed offset; return a start
        for a partition to override that (bus.BEGINNING)."""
        return {}

    def take(self, messages: list) -> None:
        """Fold a polled batch into pending effects (no I/O)."""

    def pending(self) -> int:
        """How many records await the next checkpoint."""
        return 0

    def room(self) -> int:
        """How many records the next poll may read (at least one)."""
        return max(min(self.batch_size, (self.max_pending or self.batch_size) - self.pending()), 1)

    def full(self) -> bool:
        """Whether what the batch holds has reached its bound: a checkpoint falls due before the
        flush interval (a stage with a flush interval only)."""
        return self.max_pending is not None and self.pending() >= self.max_pending

    def urgent(self) -> bool:
        """Whether effects someone is waiting for (alerts) are pending: the runtime stores them
        at once with `write_urgent`, ahead of the next checkpoint."""
        return False

    def write_urgent(self, cur) -> None:
        """Write the urgent effects alone (inside a fenced transaction). They must be keyed, so
        that the messages read again after a crash before the next checkpoint store them once."""

    def urgent_written(self) -> None:
        """The urgent effects are durable: forget them (the next checkpoint does not write them)."""

    def work_due(self) -> bool:
        """Whether a checkpoint has work although no record arrived since the last (windows that
        time alone can close)."""
        return False

    def write(self, conn, cur) -> None:
        """Write the pending effects (step 1 of the protocol, inside the fenced transaction)."""

    def positions(self, read: dict[int, int]) -> dict[int, tuple[int, dict]]:
        """(keeps_position stages, after `write` in the same transaction) What to store per
        partition: (next offset, kept values). `read`: the next offset of each partition read since
        the last checkpoint."""
        return {p: (offset, {}) for p, offset in read.items()}

    def written(self) -> None:
        """The transaction committed: pending effects are durable."""

    def drop(self, partitions: list[int]) -> None:
        """Forget the stage's own state of `partitions` (revoked after a checkpoint, or lost);
        its `pending_effects` are trimmed by the runtime."""

    def seal(self) -> "Stage":
        """(overlap stages) Return the pending effects as an object with pending/write/written/
        drop of its own, and start empty."""
        raise NotImplementedError

    def report(self) -> str:
        return f"handled {self.processed} records"

    def close(self) -> None:
        """The stage is stopping, after its last checkpoint."""


class Symbols:
    """The symbols a stage holds state for: the partition each one's trades come from and when it
    last traded, in that partition's event time (its newest trade). `idle()` removes and returns
    those with no trade for `after_s` (SYMBOL_IDLE_EVICT_SECONDS), so memory and checkpoints
    follow the active symbols, not every symbol ever seen; `drop()` those of partitions the stage
    no longer holds. Touching is O(1); finding the idle ones costs only what it evicts (symbols
    are kept oldest touch first)."""

    def __init__(self, after_s: float):
        self.after_ms = int(after_s * 1000)
        self._last: dict[int, dict[str, int]] = {}     # partition -> symbol -> its last event ms
        self._newest: dict[int, int] = {}
        self._where: dict[str, int] = {}               # symbol -> its partition

    def touch(self, partition: int, symbol: str, event_ms: int | None) -> None:
        """A trade of `symbol` at `event_ms` (None: a restored state with no time; it counts from
        the partition's newest)."""
        where = self._where.get(symbol)
        if where is not None and where != partition:
            self._last[where].pop(symbol, None)
        self._where[symbol] = partition
        last = self._last.get(partition)
        if last is None:
            last = self._last[partition] = {}
        if event_ms is None:
            event_ms = self._newest.get(partition, 0)
        last.pop(symbol, None)
        last[symbol] = event_ms
        if event_ms > self._newest.get(partition, event_ms - 1):
            self._newest[partition] = event_ms

    def partition_of(self, symbol: str, default: int = -1) -> int:
        return self._where.get(symbol, default)

    def idle(self) -> set[str]:
        """Remove and return the symbols idle for longer than `after_s`."""
        gone = set()
        for p, last in self._last.items():
            cutoff = self._newest.get(p, 0) - self.after_ms
            while last:
                symbol, event_ms = next(iter(last.items()))
                if event_ms >= cutoff:
                    break
                del last[symbol]
                del self._where[symbol]
                gone.add(symbol)
        return gone

    def drop(self, partitions: list[int]) -> set[str]:
        """Remove and return the symbols of `partitions`."""
        gone = set()
        for p in partitions:
            gone.update(self._last.pop(p, ()))
            self._newest.pop(p, None)
        for symbol in gone:
            del self._where[symbol]
        return gone

    def __contains__(self, symbol: str) -> bool:
        return symbol in self._where

    def __len__(self) -> int:
        return len(self._where)


class Runtime:
    """Runs one `Stage` in consumer group `group` on `topic` until `stop()`."""

    def __init__(self, settings: Settings, stage: Stage, group: str, topic: str, stop: Callable[[], bool],
                 client: str | None = None):
        self.settings, self.stage, self.group, self.topic = settings, stage, group, topic
        stage.runtime = self
        self._quiet_since: dict[int, float] = {}   # partition -> since when it is confirmed quiet
        self._quiet_checked = 0.0
        self.stop = stop
        self.client = client
        self.log = logging.getLogger(f"tradewatch.{stage.name}")
        self.heartbeat = Heartbeat(settings, stage.name)
        self.conn = None
        self.consumer = None
        self.epochs: dict[int, int] = {}       # partition -> our fencing epoch
        self.offsets: dict[int, int] = {}      # partition -> next offset, read but not yet committed
        self.publisher = None                  # created by stages that publish (bus.Publisher)
        self.checkpoints = self.fenced = 0
        self._writer: ThreadPoolExecutor | None = None    # overlap stages only
        if stage.overlap:
            sys.setswitchinterval(WRITER_SWITCH_S)
        self._inflight = None                  # (future, sealed effects, their offsets)
        self._abandoned = False                # stopped mid-wait: the last checkpoint is given up
        self._to_commit: dict[int, int] = {}   # offsets of stored checkpoints, not yet committed
        self._last_commit = 0.0

    # -- services, each waited for without ignoring a stop -------------------------------
    def wait_for(self, what: str, attempt: Callable[[], object]):
        """`attempt()` until it stops failing for want of `what`: one warning per outage, one line
        when it is back; raises Stopping when a stop is requested meanwhile."""
        waiting, cause = False, ""
        while True:
            try:
                value = attempt()
                if waiting:
                    self.log.info("%s reachable again", what)
                    self.heartbeat.last_error = None
                return value
            except (bus.KafkaUnavailable, db.DatabaseUnavailable, *db.CONNECTION_ERRORS) as error:
                self._drop_db()
                if isinstance(error, db.CONNECTION_ERRORS) and not db.is_outage(error):
                    raise db.DatabaseRefused(db.refused_message(error)) from None
                if not waiting:
                    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
                    self.log.warning("%s unavailable (%s); retrying every %.0fs", what, reason, RETRY_S)
                    self.heartbeat.error(f"{what} unavailable: {reason}")
                    waiting = True
                deadline = time.monotonic() + RETRY_S
                while time.monotonic() < deadline:
                    if self.stop():
                        raise Stopping() from None
                    if not cause:   # the server's own words, once this machine can tell them (services.told)
                        cause = services.told(self.settings, "postgres" if what == "PostgreSQL" else "kafka")
                        if cause:
                            self.log.warning("%s", cause)
                            self.heartbeat.error(cause)
                    time.sleep(0.25)

    def _drop_db(self) -> None:
        if self.conn is not None:
            try:
                self.conn.close()
            except Exception:  # noqa: BLE001 - already broken
                pass
            self.conn = None

    def transaction(self, work: Callable[[object, object], object]):
        """Run `work(conn, cur)` and commit; retried on a new connection while the server is away.
        A kept connection found dead (it sat idle through a server restart) is replaced at once;
        only a new one that fails is an outage."""
        def attempt():
            while True:
                kept = self.conn is not None
                if not kept:
                    self.conn = db.connect(self.settings)
                conn = self.conn
                try:
                    with conn.cursor() as cur:
                        result = work(conn, cur)
                    conn.commit()
                    return result
                except db.CONNECTION_ERRORS as error:
                    if kept and conn.closed and db.is_outage(error):
                        self._drop_db()
                        continue
                    raise
                except Exception:
                    if not conn.closed:
                        conn.rollback()
                    raise
        return self.wait_for("PostgreSQL", attempt)

    # -- rebalances ----------------------------------------------------------------------
    def _assigned(self, partitions: list[int]) -> dict[int, int | None]:
        self._finish_inflight()
        topic_id = bus.topic_id(self.settings, self.topic)     # None if Kafka cannot say: no check

        def claim(_conn, cur):
            cur.execute(
                "WITH before AS (SELECT kafka_partition, topic_id FROM partition_owners"
                "  WHERE consumer_group = %s AND topic = %s AND kafka_partition = ANY(%s))"
                " INSERT INTO partition_owners (consumer_group, topic, kafka_partition, epoch, owner, topic_id)"
                " SELECT %s, %s, p, 1, %s, %s FROM unnest(%s::int[]) AS p ORDER BY p"
                " ON CONFLICT (consumer_group, topic, kafka_partition) DO UPDATE"
                " SET epoch = partition_owners.epoch + 1, owner = EXCLUDED.owner, claimed_at = now(),"
                " topic_id = coalesce(EXCLUDED.topic_id, partition_owners.topic_id)"
                " RETURNING kafka_partition, epoch,"
                " (SELECT topic_id FROM before b WHERE b.kafka_partition = partition_owners.kafka_partition)",
                (self.group, self.topic, partitions, self.group, self.topic,
                 f"{self.heartbeat.host}:{self.heartbeat.pid}", topic_id, partitions))
            rows = cur.fetchall()
            recreated = sorted(p for p, _, was in rows if topic_id and was and was != topic_id)
            if recreated:
                self.log.warning("topic %s was created again since partitions %s were last read (id %s, now %s):"
                                 " reading them from the start of the new topic", self.topic, recreated,
                                 next(was for p, _, was in rows if p == recreated[0]), topic_id)
                if self.stage.keeps_position:
                    positions.rewind(cur, self.group, self.topic, recreated)
            stored = positions.load(cur, self.group, self.topic, partitions) if self.stage.keeps_position else {}
            starts = {p: offset for p, (offset, _) in stored.items()}
            starts.update(self.stage.assigned(cur, partitions, stored))
            starts.update({p: bus.BEGINNING for p in recreated})
            return {p: epoch for p, epoch, _ in rows}, starts
        epochs, starts = self.transaction(claim)
        self.epochs.update(epochs)
        self.log.info("assigned partitions %s (epochs %s)", partitions, [epochs[p] for p in partitions])
        for outbox in self.stage.outboxes:     # a former owner may have left some of theirs undelivered
            outbox.wake()
        return starts

    def _revoked(self, partitions: list[int]) -> None:
        if self._abandoned:         # stopping while a service is away: nothing more can be stored
            self._forget(partitions)
            return
        self.checkpoint()
        self._forget(partitions)
        self.log.info("partitions %s revoked after a checkpoint", partitions)

    def _lost(self, partitions: list[int]) -> None:
        self._finish_inflight()     # fenced if a newer owner claimed them meanwhile
        self._forget(partitions)

    def _forget(self, partitions: list[int]) -> None:
        self.stage.drop(partitions)
        for buffer in self.stage._pending:
            buffer.drop(partitions)
        for p in partitions:
            self._quiet_since.pop(p, None)
            self.epochs.pop(p, None)
            self.offsets.pop(p, None)
            self._to_commit.pop(p, None)

    # -- the commit protocol (see the module docstring) ----------------------------------
    def checkpoint(self, wait: bool = True) -> None:
        """Make everything read so far durable (the protocol in the module docstring). wait=False
        (steady state) lets the offset commit go in the background; rebalances and the stop wait."""
        self._finish_inflight()
        offsets, self.offsets = self.offsets, {}
        self._commit(self.stage, offsets, wait)
        if wait:
            self._commit_offsets(wait=True)

    def _checkpoint_overlapped(self) -> None:
        """For `overlap` stages: the transaction of the sealed batch runs on the writer thread
        while this thread polls and decodes the next one (PostgreSQL works on the other core).
        Steps 2 and 3 happen here once it has committed, so offsets still go last and in order."""
        self._finish_inflight()
        if not self.stage.pending() and not self.offsets and not self.stage.work_due():
            return
        effects = self.stage.seal()
        offsets, self.offsets = self.offsets, {}
        if self._writer is None:
            self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{self.stage.name}-writer")
        self._inflight = (self._writer.submit(self._write, effects, offsets), effects, offsets)

    def _finish_inflight(self) -> None:
        if self._inflight is None:
            return
        future, effects, offsets = self._inflight
        self._inflight = None
        self._after_write(effects, offsets, future.result(), wait=False)

    def _commit(self, effects: Stage, offsets: dict[int, int], wait: bool = True) -> None:
        if not effects.pending() and not offsets and not effects.work_due():
            return
        self._after_write(effects, offsets, self._write(effects, offsets), wait)

    def _write(self, effects: Stage, offsets: dict[int, int]) -> list[int]:
        """Step 1: the fenced transaction — the stage's effects and, for a stage that keeps its
        position, its positions. Returns the partitions found stale (nothing written then)."""
        def work(conn, cur):
            stale = self._fence(cur)
            if not stale:
                effects.write(conn, cur)
                if effects.keeps_position:
                    positions.write(cur, effects.name, self.group, self.topic, effects.positions(offsets))
            return stale
        records, started = effects.pending(), time.perf_counter()
        stale = self.transaction(work)
        prometheus.CHECKPOINT_SECONDS.labels(self.stage.name).observe(time.perf_counter() - started)
        prometheus.CHECKPOINT_RECORDS.labels(self.stage.name).observe(records)
        return stale

    def _after_write(self, effects: Stage, offsets: dict[int, int], stale: list[int], wait: bool) -> None:
        if stale:   # the transaction wrote nothing; drop those partitions and write the rest
            self.fenced += len(stale)
            self.log.warning("partitions %s now belong to a newer owner (fenced); dropping their state", stale)
            self._forget(stale)
            effects.drop(stale)
            for p in stale:
                offsets.pop(p, None)
            return self._commit(effects, offsets, wait)
        effects.written()
        for buffer in effects._pending:
            buffer.clear()
        self._deliver()                                           # step 2: the outboxes
        self._to_commit.update(offsets)                           # step 3: offsets last
        self._commit_offsets(wait)
        self.checkpoints += 1

    def _deliver(self) -> None:
        for outbox in self.stage.outboxes:
            outbox.deliver(self)

    def _commit_offsets(self, wait: bool) -> None:
        """Commit the stored checkpoints' offsets: at once when `wait` (rebalance, stop), else at
        most every COMMIT_EVERY_S (a commit per small batch would outrun the group coordinator;
        a later commit covers the earlier ones, and a wider re-delivery window is harmless)."""
        now = time.monotonic()
        if not self._to_commit or (not wait and now - self._last_commit < COMMIT_EVERY_S):
            return
        offsets, self._to_commit = self._to_commit, {}
        self._last_commit = now
        try:
            self.consumer.commit(offsets, wait)
        except bus.KafkaUnavailable as error:
            # Effects are stored; a re-delivery is redone idempotently.
            self.log.warning("%s; those messages may be read again (their writes are idempotent)", error)

    def _write_urgent(self) -> None:
        """Effects someone is waiting for (the detector's alerts), stored ahead of the checkpoint
        in a small fenced transaction of their own, then delivered (step 2). Positions, state and
        offsets wait for the checkpoint; a crash in between reads those messages again from the
        last one, and the effects are keyed, so they are stored once."""
        self._finish_inflight()

        def work(_conn, cur):
            stale = self._fence(cur)
            if not stale:
                self.stage.write_urgent(cur)
            return stale
        if self.transaction(work):
            self.checkpoint(wait=False)      # a partition has a newer owner: the checkpoint drops it
            return
        self.stage.urgent_written()
        self._deliver()

    def _fence(self, cur) -> list[int]:
        """Partitions whose epoch moved on (a newer owner claimed them); locks the rest until commit."""
        held = sorted(self.epochs)
        if not held:
            return []
        cur.execute("SELECT kafka_partition, epoch FROM partition_owners WHERE consumer_group = %s AND topic = %s"
                    " AND kafka_partition = ANY(%s) ORDER BY kafka_partition FOR SHARE",
                    (self.group, self.topic, held))
        now = dict(cur.fetchall())
        return [p for p in held if now.get(p) != self.epochs[p]]

    # -- quiet partitions ----------------------------------------------------------------
    def _check_quiet(self, now: float) -> None:
        """Once a second: a held partition is quiet from the moment Kafka confirms (a fresh ask, not
        a cached answer) that our position is at its log end, until a message arrives or Kafka
        cannot confirm it any more (broker or partition leader away: records may be waiting in a
        producer meanwhile, and must not turn late because the clock moved on)."""
        confirmed = self.consumer.caught_up(sorted(self.epochs))
        self._quiet_checked = now
        for p in self.epochs:
            if p in confirmed:
                self._quiet_since.setdefault(p, now)
            else:
                self._quiet_since.pop(p, None)

    def quiet_for(self, partition: int) -> float:
        """Seconds `partition` has been confirmed quiet (0 while it is not); the idle rule of every
        stage that closes windows when nothing more comes (stages set `watches_quiet`)."""
        since, now = self._quiet_since.get(partition), time.monotonic()
        if since is None or now - self._quiet_checked > 2.5:   # not confirmed lately (the loop waited)
            return 0.0
        return now - since

    # -- the loop ------------------------------------------------------------------------
    def run(self) -> None:
        stage = self.stage
        prometheus.serve(self.settings, stage.name)
        messages_in = prometheus.MESSAGES_IN.labels(stage.name)
        failed = None
        last_lags = 0.0
        lag_partitions: set[str] = set()
        try:
            self.wait_for("PostgreSQL", lambda: db.apply_schema(self.settings))
            # topics are created here, never by the broker on first use (tradewatch/stack.py turns
            # that off): an auto-created topic would carry producer timestamps
            topics = {self.topic: self.settings.trades_partitions, **stage.output_topics()}
            self.wait_for("Kafka", lambda: [bus.ensure_topic(self.settings, t, n) for t, n in topics.items()])
            self.consumer = self.wait_for("Kafka", lambda: bus.consumer(
                self.settings, self.group, self.topic, on_assign=self._assigned, on_revoke=self._revoked,
                on_lost=self._lost, client=self.client))
            last_checkpoint = last_report = time.monotonic()
            batch_since = 0.0          # when the first message of the pending batch arrived
            while not self.stop():
                room = stage.room()
                if stage.flush_interval_s is None:   # write as soon as a poll runs dry
                    wait_s = 0.0 if stage.pending() else 0.2
                else:                                # never past the next checkpoint, never spinning
                    wait_s = min(max(last_checkpoint + stage.flush_interval_s - time.monotonic(), 0.01), 0.2)
                messages = self.consumer.poll(room, int(wait_s * 1000))
                messages = [m for m in messages if m.partition in self.epochs]
                if messages:
                    stage.take(messages)
                    messages_in.inc(len(messages))
                    for m in messages:
                        self.offsets[m.partition] = m.offset + 1
                        self._quiet_since.pop(m.partition, None)
                now = time.monotonic()
                if stage.flush_interval_s is None:
                    # dry poll or a batch as old as MAX_BATCH_AGE_S: latency at low rates; full: throughput
                    if messages and not batch_since:
                        batch_since = now
                    writer_idle = self._inflight is None or self._inflight[0].done()
                    due = bool(self.offsets) and (not messages or stage.pending() >= stage.batch_size
                                                  or (now - batch_since >= MAX_BATCH_AGE_S and writer_idle))
                else:
                    due = now - last_checkpoint >= stage.flush_interval_s or stage.full()
                if messages and stage.urgent():
                    self._write_urgent()             # ahead of a due checkpoint too: it takes longer
                if due:
                    self._checkpoint_overlapped() if stage.overlap else self.checkpoint(wait=False)
                    last_checkpoint, batch_since = now, 0.0
                elif not messages:
                    self._finish_inflight()          # idle: let the last offsets out too
                    self._deliver()                  # and what an outbox could not deliver before
                    self._commit_offsets(wait=False)
                self.heartbeat.beat(stage.processed, self.consumer.lag(), self.consumer.partitions())
                if now - last_lags >= 1.0:
                    last_lags = now
                    if stage.watches_quiet:
                        self._check_quiet(now)
                    # set, then remove the partitions no longer held: a scrape never sees none
                    lags = {str(p): lag for p, lag in self.consumer.partition_lags().items()}
                    for p, lag in lags.items():
                        prometheus.LAG.labels(stage.name, p).set(lag)
                    for p in lag_partitions - lags.keys():
                        prometheus.LAG.remove(stage.name, p)
                    lag_partitions = set(lags)
                if now - last_report >= 10:
                    self.log.info("%s", stage.report())
                    last_report = now
            self.checkpoint()
        except Stopping:
            self._abandoned = True
            self.log.info("stopped while waiting for a service; nothing uncommitted was acknowledged")
        except db.DatabaseRefused as error:
            failed = str(error)
            self._abandoned = True      # nothing more can be stored: no last checkpoint
            self.log.error("%s", failed)
            self.heartbeat.error(failed)
        finally:
            if self._writer is not None:
                self._writer.shutdown(wait=True)
            self.heartbeat.stopped(stage.processed, "failed" if failed else "stopped")
            if self.consumer is not None:
                self.consumer.close()
            stage.close()
            for outbox in stage.outboxes:
                outbox.close()
            if self.publisher is not None:
                self.publisher.close()
            if self.conn is not None:
                self.conn.close()
        self.log.info("%s", stage.report())
        if failed:
            raise StageFailed(failed)
