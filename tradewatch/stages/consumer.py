"""The consumer stage: Kafka `trades` → PostgreSQL `trades` (+ `dead_letters`), exactly once.

Exactly once = idempotent writes keyed by trade_id + the runtime's commit protocol (offsets after
the database commit, tradewatch/runtime.py). A crash between the two re-delivers the batch, and
the re-delivered rows are skipped.
"""
from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

from tradewatch import bus, prometheus, runtime
from tradewatch.config import Settings
from tradewatch.events import InvalidTrade, decode_trade
from tradewatch.store.partitions import DAY_MS
from tradewatch.store.writer import DeadLetter, copy_row, write_batch, write_dead_letters

log = logging.getLogger("tradewatch.consumer")
LATENCY_SAMPLE = 64          # one trade → row latency observation per this many trades
_ROWS = prometheus.ROWS.labels("consumer", "trades")
_LATENCY = prometheus.LATENCY.labels("consumer", "trade_to_row")


class DeadLetterLog:
    """At most `per_minute` WARNING lines a minute for dead letters; past that, one line a minute
    says how many more there were, by kind (a sender of bad messages cannot flood the log)."""

    def __init__(self, per_minute: int = 20, clock: Callable[[], float] = time.monotonic):
        self.per_minute, self.clock = per_minute, clock
        self.started, self.logged, self.held = clock(), 0, Counter()

    def __call__(self, letter: DeadLetter) -> None:
        self.tick()
        if self.logged < self.per_minute:
            self.logged += 1
            log.warning("dead letter %s[%d]@%d: %s", letter.topic, letter.partition, letter.offset, letter.reason[:300],
                        extra={"topic": letter.topic, "partition": letter.partition, "offset": letter.offset})
        else:
            self.held[prometheus.reason_kind(letter.reason)] += 1

    def tick(self) -> None:
        """A new minute: say what was held back in the last one."""
        now = self.clock()
        if now - self.started >= 60:
            self.flush()
            self.started, self.logged = now, 0

    def flush(self) -> None:
        if self.held:
            log.warning("%d more dead letters in the last minute (%s); each is in the dead_letters table with its"
                        " reason", sum(self.held.values()), ", ".join(f"{k}: {n}" for k, n in self.held.most_common()))
            self.held.clear()


@dataclass
class IngestStats:
    messages: int = 0
    trades_inserted: int = 0
    duplicates_skipped: int = 0
    dead_letters: int = 0
    batches: int = 0
    partitions: set[int] = field(default_factory=set)


class _Batch(runtime.Stage):
    """Trades (as COPY rows) and dead letters awaiting one transaction."""

    def __init__(self, stats: IngestStats, max_skew_ms: int, say: DeadLetterLog):
        super().__init__()
        self.say = say
        self.stats = stats
        self.max_skew_ms = max_skew_ms
        self.rows: list[bytes] = []
        self.sources: list[bus.Message] = []       # the message of each row
        self.dead: list[DeadLetter] = []
        self.days: set[int] = set()                 # event days of the rows (their partitions)
        self.newest: dict[str, tuple[int, str, int]] | None = {}   # symbol -> (ms, trade_id, row) of its newest
        self._result = None

    def add(self, messages: list[bus.Message], now_ms: int) -> list[DeadLetter]:
        """Validate each message: a COPY row for a trade, a dead letter (with the reason) otherwise."""
        rows, sources, dead, skew, days = self.rows, self.sources, [], self.max_skew_ms, self.days
        newest = self.newest if self.newest is not None else {}
        for m in messages:
            try:
                trade = decode_trade(m.value, m.timestamp_ms or now_ms, skew)
                rows.append(copy_row(trade, m.partition, m.offset))
                ms, trade_id = trade.timestamp_ms, trade.trade_id
                days.add(ms // DAY_MS)
                old = newest.get(trade.symbol)
                if old is None or ms > old[0] or (ms == old[0] and trade_id > old[1]):
                    newest[trade.symbol] = (ms, trade_id, len(rows) - 1)
                sources.append(m)
            except InvalidTrade as error:
                dead.append(DeadLetter(m.topic, m.partition, m.offset, m.key, m.value, str(error), m.timestamp_ms))
            except Exception as error:  # noqa: BLE001 - no single message may stop the stage
                dead.append(DeadLetter(m.topic, m.partition, m.offset, m.key, m.value,
                                       f"cannot be stored: {type(error).__name__}: {error}", m.timestamp_ms))
        self.dead.extend(dead)
        return dead

    def pending(self) -> int:
        return len(self.rows) + len(self.dead)

    def write(self, conn, cur) -> None:
        newest = None if self.newest is None else [i for *_, i in self.newest.values()]
        self._result = result = write_batch(cur, self.rows, self.dead, self.days, newest)
        refused = [DeadLetter(m.topic, m.partition, m.offset, m.key, m.value, r.reason, m.timestamp_ms)
                   for r in result.refused for m in (self.sources[r.index],)]
        for letter in refused:
            self.say(letter)
        write_dead_letters(cur, refused)

    def written(self) -> None:
        s, result = self.stats, self._result
        _ROWS.inc(result.trades_inserted)
        for letter in self.dead:
            prometheus.DEAD_LETTERS.labels("consumer", prometheus.reason_kind(letter.reason)).inc()
        if result.refused:
            prometheus.DEAD_LETTERS.labels("consumer", "refused by postgresql").inc(len(result.refused))
        now_ms = time.time() * 1000
        for m in self.sources[::LATENCY_SAMPLE]:      # a sample: an observation per trade costs too much
            if m.timestamp_ms:
                _LATENCY.observe(max(now_ms - m.timestamp_ms, 0) / 1000)
        s.messages += self.pending()
        s.trades_inserted += result.trades_inserted
        s.duplicates_skipped += result.duplicates_skipped
        s.dead_letters += result.dead_letters + len(result.refused)
        s.batches += 1
        s.partitions.update(m.partition for m in self.sources)
        self.rows, self.sources, self.dead, self.days, self.newest = [], [], [], set(), {}

    def drop(self, partitions: list[int]) -> None:
        lost = set(partitions)
        kept = [(row, m) for row, m in zip(self.rows, self.sources) if m.partition not in lost]
        self.rows, self.sources = [row for row, _ in kept], [m for _, m in kept]
        self.dead = [d for d in self.dead if d.partition not in lost]
        self.newest = None      # positions changed: write_batch finds them again


class Ingest(runtime.Stage):
    name = "consumer"
    overlap = True     # decode batch n+1 while PostgreSQL stores batch n

    def __init__(self, settings: Settings):
        super().__init__()
        self.batch_size = settings.consumer_batch_size
        self.stats = IngestStats()
        self.max_skew_ms = int(settings.max_clock_skew_seconds * 1000)
        self.say = DeadLetterLog()
        self.batch = _Batch(self.stats, self.max_skew_ms, self.say)

    def take(self, messages: list[bus.Message]) -> None:
        for letter in self.batch.add(messages, int(time.time() * 1000)):
            self.say(letter)
        self.processed += len(messages)

    def pending(self) -> int:
        return self.batch.pending()

    def seal(self) -> _Batch:
        sealed, self.batch = self.batch, _Batch(self.stats, self.max_skew_ms, self.say)
        return sealed

    def write(self, conn, cur) -> None:
        self.batch.write(conn, cur)

    def written(self) -> None:
        self.batch.written()

    def drop(self, partitions: list[int]) -> None:
        self.batch.drop(partitions)

    def close(self) -> None:
        self.say.flush()

    def report(self) -> str:
        self.say.tick()
        s = self.stats
        return (f"stored {s.trades_inserted} trades ({s.duplicates_skipped} duplicates skipped, "
                f"{s.dead_letters} dead letters) from {s.messages} messages in {s.batches} batches; "
                f"partitions {sorted(s.partitions)}")


def run(settings: Settings, stop: Callable[[], bool], group_id: str | None = None,
        client: str | None = None) -> IngestStats:
    stage = Ingest(settings)
    runtime.Runtime(settings, stage, group_id or settings.consumer_group, settings.trades_topic, stop,
                    client).run()
    return stage.stats
