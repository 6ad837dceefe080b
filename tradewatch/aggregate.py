"""The aggregator's loop: Kafka `trades` → event-time windows → `stock_metrics` and `indicators`.

Restart safety: the window rows, the late trades, the indicator rows *and the Kafka position*
(next offset and watermark per partition, table aggregator_offsets) are written in one database
transaction. On (re)assignment of a partition the aggregator reloads that partition's open windows
and position from the database and seeks Kafka there. So a kill -9 at any moment loses at most the
work since the last flush, which is then redone from exactly the same offsets — never counted twice.
(Recomputing from the `trades` table instead would race the consumer, which may lag behind Kafka.)
"""
from __future__ import annotations

import logging
import time
from typing import Callable

from tradewatch import bus, runtime
from tradewatch.config import Settings
from tradewatch.events import InvalidTrade, parse_trade
from tradewatch.indicators import IndicatorState
from tradewatch.store import db
from tradewatch.store import metrics as store
from tradewatch.windows import Window, WindowSet, parse_size, size_label

log = logging.getLogger("tradewatch.aggregator")

RETRY_SECONDS = 2.0


def sizes_from(settings: Settings) -> tuple[int, ...]:
    return tuple(sorted({parse_size(s) for s in settings.window_sizes.split(",") if s.strip()}))


def excluded_conditions(settings: Settings) -> frozenset[str]:
    return frozenset(c.strip() for c in settings.ohlc_exclude_conditions.split(",") if c.strip())


class Aggregator:
    def __init__(self, settings: Settings, stop: Callable[[], bool]):
        self.settings = settings
        self.stop = stop
        self.sizes = sizes_from(settings)
        self.exclude = excluded_conditions(settings)
        self.group = settings.aggregator_group
        self.topic = settings.trades_topic
        self.partitions: dict[int, WindowSet] = {}
        self.next_offsets: dict[int, int] = {}
        self.dirty: dict[tuple[str, int, int], Window] = {}
        self.indicator_states: dict[tuple[str, str], IndicatorState] = {}
        self.trades_folded = 0
        self.invalid_skipped = 0
        self.late_total = 0
        self._conn = None
        self._consumer: bus.BusConsumer | None = None
        self.heartbeat = runtime.Heartbeat(settings, "aggregator")

    # -- database ---------------------------------------------------------------
    def _db(self):
        if self._conn is None:
            self._conn = db.connect_waiting(self.settings, log, RETRY_SECONDS)
        return self._conn

    # -- rebalance --------------------------------------------------------------
    def _on_assign(self, partitions: list[int]) -> None:
        conn = self._db()
        for p in partitions:
            offset, clock, windows = store.load_partition(conn, self.group, self.topic, p, self.sizes)
            conn.rollback()
            clock.last_trade_wall_s = time.monotonic()
            ws = WindowSet(self.sizes, int(self.settings.allowed_lateness_seconds * 1000),
                           self.settings.idle_timeout_seconds, p, self.exclude, clock)
            ws.open_windows = {(w.symbol, w.size_ms, w.start_ms): w for w in windows}
            self.partitions[p] = ws
            assert self._consumer is not None
            self._consumer.seek(self.topic, p, offset)
            log.info("partition %d: resuming at offset %s with %d open windows", p,
                     offset if offset is not None else "0 (first run)", len(windows))

    def _on_revoke(self, partitions: list[int]) -> None:
        self._flush()
        for p in partitions:
            self.partitions.pop(p, None)
            self.next_offsets.pop(p, None)

    # -- main loop --------------------------------------------------------------
    def run(self) -> None:
        waiting = False
        while not self.stop():
            try:
                self._consumer = bus.BusConsumer(self.settings, self.group, [self.topic],
                                                 on_assign=self._on_assign, on_revoke=self._on_revoke)
                break
            except bus.KafkaUnavailable as error:
                if not waiting:
                    log.warning("%s; retrying every %.0fs", error, RETRY_SECONDS)
                    waiting = True
                time.sleep(RETRY_SECONDS)
        if self._consumer is None:
            return
        flush_every = self.settings.aggregator_flush_ms / 1000.0
        last_flush = last_report = time.monotonic()
        try:
            while not self.stop():
                for message in self._consumer.poll(5000, 200):
                    self._fold(message)
                now = time.monotonic()
                if now - last_flush >= flush_every:
                    self._flush()
                    last_flush = now
                if now - last_report >= 10:
                    self._report()
                    last_report = now
                self.heartbeat.beat(self.trades_folded, self._consumer.lag(), sorted(self.partitions))
            self._flush()
        finally:
            self.heartbeat.stopped(self.trades_folded)
            self._consumer.close()
            if self._conn is not None:
                self._conn.close()
        self._report()

    def _fold(self, message: bus.Message) -> None:
        ws = self.partitions.get(message.partition)
        if ws is None:  # not (or no longer) ours
            return
        self.next_offsets[message.partition] = message.offset + 1
        try:
            trade = parse_trade(message.value)
        except InvalidTrade:
            self.invalid_skipped += 1  # the consumer puts it in dead_letters
            return
        for window in ws.add(trade, message.offset, time.monotonic()):
            self.dirty[(window.symbol, window.size_ms, window.start_ms)] = window
        self.trades_folded += 1

    def _flush(self) -> None:
        """One transaction: changed and newly final windows, late trades, indicators, positions."""
        now = time.monotonic()
        final: list[Window] = []
        late = []
        for ws in self.partitions.values():
            ws.advance_when_idle(now)
            final.extend(ws.pop_final())
            late.extend(ws.take_late())
        for w in final:
            self.dirty.pop((w.symbol, w.size_ms, w.start_ms), None)
        if not (final or late or self.dirty or self.next_offsets):
            return
        positions = {p: (offset, self.partitions[p].clock) for p, offset in self.next_offsets.items()
                     if p in self.partitions}
        def write(conn, cur) -> None:
            store.write_windows(cur, list(self.dirty.values()) + final)
            store.write_late(cur, late)
            store.write_indicators(cur, self._indicator_rows(conn, final))
            store.write_offsets(cur, self.group, self.topic, positions)

        def lost() -> None:
            self._conn = None
            self.indicator_states.clear()  # reloaded from committed candles

        db.commit_retrying(self._db, write, log, lost, RETRY_SECONDS)
        self.late_total += len(late)
        self.dirty.clear()
        if self._consumer is not None and positions:
            try:  # for lag monitoring only: the database holds the real position
                self._consumer.commit([bus.Message(self.topic, p, o - 1, None, None) for p, (o, _) in positions.items()])
            except Exception as error:  # noqa: BLE001 - best effort
                log.debug("Kafka offset commit skipped: %s", error)

    def _indicator_rows(self, conn, final: list[Window]):
        rows = []
        for w in final:
            if w.close is None:
                continue
            key = (w.symbol, size_label(w.size_ms))
            state = self.indicator_states.get(key)
            if state is None:
                state = self.indicator_states[key] = store.load_indicator_state(conn, *key)
            rows.append((w.symbol, key[1], w.start_ms, w.close, state.update(w.close)))
        return rows

    def _report(self) -> None:
        open_windows = sum(len(ws.open_windows) for ws in self.partitions.values())
        log.info("folded %d trades; %d open windows; late trades %d; invalid skipped %d",
                 self.trades_folded, open_windows, self.late_total, self.invalid_skipped)
