"""The quotes stage: Kafka `quotes` (book snapshots and changes, tradewatch/book.py) → the book of
every symbol in memory → PostgreSQL `quotes` (each change of the top of book), `book_snapshots`
(depth every BOOK_SNAPSHOT_SECONDS of event time) and `order_books` (each book as of the last
checkpoint), bad messages → `dead_letters`.

It keeps its position in the database, as the aggregator does: the rows, the changed books and the
next offset of each partition are written in one fenced transaction (tradewatch/runtime.py), and a
partition it is given starts from its stored books at the stored offset. So after a kill -9 it
reads again from exactly the state it had stored: the same rows come out, keyed, written once.

A sequence gap (an update that does not follow the book's seq) is counted and logged, and the
book is `stale` — no quote rows, shown as such — until the next snapshot rebuilds it.

Each message goes through the book watch (tradewatch/detect/book_rules.py): SPOOFING and
QUOTE_STUFFING alerts, cooled down per (symbol, type) like the detector's, go into `alerts`
(`source` 'quotes') in the same transaction, and the stage's own outboxes deliver them (the
`alerts` topic, ALERT_ROUTES). Each symbol's watch and cooldowns are stored with its book
(`order_books.watch`), so a restart raises exactly the alerts of a run that never stopped.

A checkpoint's effects are sealed (`_Effects`: its rows, and copies of the books it changed) and
written on the runtime's writer thread while the stage reads the next batch (`overlap`):
PostgreSQL stores one batch on the other core while this one is decoded and applied.
"""
from __future__ import annotations

import logging
import time
from typing import Callable

from tradewatch import bus, prometheus, runtime
from tradewatch.alerts import Deduplicator, book_alert
from tradewatch.book import InvalidBook, OrderBook, decode_book
from tradewatch.config import Settings
from tradewatch.detect.book_rules import BookWatch
from tradewatch.outbox import AlertOutbox, delivery_outboxes
from tradewatch.stages.consumer import DeadLetterLog
from tradewatch.store import books as store
from tradewatch.store import detections
from tradewatch.store.writer import DeadLetter, write_dead_letters

log = logging.getLogger("tradewatch.quotes")


class _Effects(runtime.Stage):
    """What one checkpoint of the quotes stage writes: top-of-book rows, depth snapshots, the books
    it changed (copies from `freeze`, so the stage may go on changing its own), the symbols gone
    idle, alerts and dead letters."""
    name = "quotes"
    keeps_position = True

    def __init__(self, stage: Quotes):
        super().__init__()
        self.stage = stage
        self.quotes = self.pending_effects()        # top-of-book rows
        self.snapshots = self.pending_effects()
        self.changed = self.pending_effects()       # books to store, by symbol
        self.dead = self.pending_effects()
        self.alerts = self.pending_effects()
        self.books: list[tuple[int, OrderBook, dict | None]] = []
        self.gone: set[str] = set()
        self.read = 0

    def freeze(self, gone: set[str]) -> None:
        """The changed books copied with their watches, as of now; `gone`: symbols evicted."""
        for symbol in gone:
            self.changed.pop((symbol,))
        self.gone |= gone
        watch_of = self.stage.watch_of
        self.books = [(p, book.copy(), watch_of(book.symbol)) for p, book in self.changed.tagged()]

    def pending(self) -> int:
        return self.read

    def write(self, conn, cur) -> None:
        store.write_quotes(cur, self.quotes.items())
        store.write_snapshots(cur, self.snapshots.items())
        store.write_books(cur, self.books, self.gone)
        detections.write_alerts(cur, self.alerts.tagged(), self.stage.routes, source="quotes")
        write_dead_letters(cur, self.dead.items())

    def written(self) -> None:
        stage = self.stage
        prometheus.ROWS.labels("quotes", "quotes").inc(len(self.quotes))
        prometheus.ROWS.labels("quotes", "book_snapshots").inc(len(self.snapshots))
        for letter in self.dead.items():
            prometheus.DEAD_LETTERS.labels("quotes", prometheus.reason_kind(letter.reason)).inc()
        stage.dead_total += len(self.dead)
        for a in self.alerts.items():
            log.warning("ALERT %s", a.message)
            prometheus.ALERTS.labels("quotes", a.alert_type, a.severity).inc()
        if self.alerts:
            stage.alerted += len(self.alerts)
            for outbox in stage.outboxes:
                outbox.wake()
        prometheus.SYMBOLS.labels("quotes").set(len(stage.books))

    def drop(self, partitions: list[int]) -> None:
        for buffer in self._pending:
            buffer.drop(partitions)
        lost = set(partitions)
        self.books = [b for b in self.books if b[0] not in lost]


class Quotes(runtime.Stage):
    name = "quotes"
    keeps_position = True
    overlap = True

    def __init__(self, settings: Settings):
        super().__init__()
        self.settings = settings
        self.batch_size = settings.consumer_batch_size
        self.depth = settings.book_depth
        self.snapshot_ms = max(int(settings.book_snapshot_seconds * 1000), 1)
        self.max_skew_ms = int(settings.max_clock_skew_seconds * 1000)
        self.books: dict[str, OrderBook] = {}
        self.watch = BookWatch()
        self.dedup = Deduplicator.from_settings(settings)
        self.routes = settings.routes
        self.outbox = AlertOutbox(settings, source="quotes")
        self.outboxes = [self.outbox, *delivery_outboxes(settings, source="quotes")]
        self.symbols = runtime.Symbols(settings.symbol_idle_evict_seconds)
        self.effects = _Effects(self)
        self.alerted = 0
        self.gaps = self.dead_total = 0
        self.before_snapshot = 0                    # updates of a symbol with no snapshot yet (skipped)
        self.say = DeadLetterLog()

    def output_topics(self) -> dict[str, int]:
        return {self.settings.alerts_topic: 1}

    def assigned(self, cur, partitions: list[int], stored: dict[int, tuple[int, dict]]) -> dict[int, int | None]:
        for p, book, watch in store.load_books(cur, partitions):
            self.books[book.symbol] = book
            self.watch.restore(book.symbol, None if watch is None else watch["watch"])
            self.dedup.restore(book.symbol, {} if watch is None else watch["cooldowns"])
            self.symbols.touch(p, book.symbol, book.timestamp_ms)
        log.info("partitions %s: %d books loaded", partitions, sum(1 for s in self.books
                                                                      if self.symbols.partition_of(s) in partitions))
        return {p: bus.BEGINNING for p in partitions if p not in stored}

    def take(self, messages: list[bus.Message]) -> None:
        now_ms = int(time.time() * 1000)
        self._touched: dict[str, tuple[int, int]] = {}      # symbol -> (partition, newest event ms)
        self.effects.read += len(messages)
        for m in messages:
            try:
                book_message = decode_book(m.value, m.timestamp_ms or now_ms, self.max_skew_ms)
                self._apply(m.partition, book_message)
            except InvalidBook as error:
                self._dead(m, str(error))
            except Exception as error:  # noqa: BLE001 - no single message may stop the stage
                self._dead(m, f"cannot be applied: {type(error).__name__}: {error}")
            self.processed += 1
        for symbol, (partition, ms) in self._touched.items():      # once a batch: idle symbols leave
            self.symbols.touch(partition, symbol, ms)

    def _dead(self, m: bus.Message, reason: str) -> None:
        letter = DeadLetter(m.topic, m.partition, m.offset, m.key, m.value, reason, m.timestamp_ms)
        self.effects.dead.add(m.partition, letter)
        self.say(letter)

    def _apply(self, partition: int, m) -> None:
        book = self.books.get(m.symbol)
        if book is None:
            if m.type != "snapshot":        # a book starts at its first snapshot: nothing to apply this to
                self.before_snapshot += 1   # (and no memory for symbols that never send one)
                return
            book = self.books[m.symbol] = OrderBook(m.symbol, m.exchange)
        self._touched[m.symbol] = (partition, m.timestamp_ms)
        before = None if book.stale else book.top()
        slot = None if book.timestamp_ms is None or book.stale else book.timestamp_ms // self.snapshot_ms
        was_stale = book.stale
        applied, found = self.watch.apply(book, m)
        effects = self.effects
        for detection in found:
            alert = book_alert(detection)
            if self.dedup.allow(alert):
                effects.alerts.add(partition, alert)
        if not applied:
            if book.stale and not was_stale:
                self.gaps += 1
                prometheus.BOOK_GAPS.inc()
                log.warning("%s: sequence gap (update %d follows %d, not %d): the book is stale until the next"
                            " snapshot", m.symbol, m.seq, m.prev_seq, book.seq)
                effects.changed.add(partition, book, (m.symbol,))
            return
        effects.changed.add(partition, book, (m.symbol,))
        top = book.top()
        if top is not before and top != before:        # the same object: the top was not touched
            effects.quotes.add(partition, (m.symbol, m.timestamp_ms, m.seq, *top))
        if slot is None or m.timestamp_ms // self.snapshot_ms > slot:
            bids, asks = book.depth(self.depth)
            effects.snapshots.add(partition, (m.symbol, m.timestamp_ms, m.seq, bids, asks))

    def pending(self) -> int:
        return self.effects.pending()

    def seal(self) -> _Effects:
        """This checkpoint's effects, frozen, for the writer thread; the stage starts new ones."""
        sealed, self.effects = self.effects, _Effects(self)
        sealed.freeze(self._evict())
        return sealed

    def write(self, conn, cur) -> None:
        """(a checkpoint the runtime waits for: a rebalance, the stop) as the writer thread would."""
        self.effects.freeze(self._evict())
        self.effects.write(conn, cur)

    def written(self) -> None:
        self.effects.written()
        self.effects = _Effects(self)

    def _evict(self) -> set[str]:
        """Symbols idle for SYMBOL_IDLE_EVICT_SECONDS leave memory (and, written, order_books)."""
        idle = self.symbols.idle()
        for symbol in idle:
            self.books.pop(symbol, None)
        if idle:
            self._forget(idle)
        return idle

    def watch_of(self, symbol: str) -> dict | None:
        watch = self.watch.export(symbol)
        return None if watch is None else {"watch": watch, "cooldowns": self.dedup.export(symbol)}

    def _forget(self, symbols) -> None:
        self.watch.forget(symbols)
        self.dedup.forget(set(symbols))

    def drop(self, partitions: list[int]) -> None:
        symbols = self.symbols.drop(partitions)
        for symbol in symbols:
            self.books.pop(symbol, None)
        self._forget(symbols)
        self.effects.drop(partitions)

    def close(self) -> None:
        self.say.flush()

    def report(self) -> str:
        self.say.tick()
        stale = sum(1 for b in self.books.values() if b.stale)
        return (f"read {self.processed} book messages; {len(self.books)} books ({stale} stale); "
                f"sequence gaps {self.gaps}; updates before a symbol's first snapshot skipped {self.before_snapshot};"
                f" dead letters {self.dead_total}; book alerts {self.alerted} (published {self.outbox.sent},"
                f" {self.dedup.suppressed} suppressed by cooldown)")


def run(settings: Settings, stop: Callable[[], bool], group_id: str | None = None,
        client: str | None = None) -> Quotes:
    stage = Quotes(settings)
    runtime.Runtime(settings, stage, group_id or settings.quotes_group, settings.quotes_topic, stop, client).run()
    return stage
