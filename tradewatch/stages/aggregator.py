"""The aggregator stage: Kafka `trades` → event-time windows → `stock_metrics` and `indicators`.

It keeps its Kafka position in the database: the window rows, the late trades, the indicator rows
*and the position* (next offset and watermark per partition, table aggregator_offsets) are written
in one fenced transaction by the stage runtime's commit protocol (tradewatch/runtime.py). On
assignment of a partition the aggregator loads that partition's open windows and position in the
transaction that claims the partition, and Kafka starts reading there. So a kill -9 at any moment
loses at most the work since the last checkpoint, which is then redone from exactly the same
offsets — never counted twice — and a stalled former owner cannot write over the new owner.
(Recomputing from the `trades` table instead would race the consumer, which may lag behind Kafka.)
"""
from __future__ import annotations

import logging
from typing import Callable

from tradewatch import bus, prometheus, runtime
from tradewatch.config import Settings
from tradewatch.events import InvalidTrade, parse_trade
from tradewatch.indicators import IndicatorState
from tradewatch.store import candles as store
from tradewatch.windows import LateTrade, Window, WindowSet, size_label

log = logging.getLogger("tradewatch.aggregator")


def excluded_conditions(settings: Settings) -> frozenset[str]:
    return frozenset(c.strip() for c in settings.ohlc_exclude_conditions.split(",") if c.strip())


class Aggregate(runtime.Stage):
    name = "aggregator"
    watches_quiet = True      # quiet partitions close their windows (runtime.quiet_for)

    def __init__(self, settings: Settings):
        super().__init__()
        self.settings = settings
        self.flush_interval_s = settings.aggregator_flush_ms / 1000.0
        self.batch_size = 5000
        self.sizes = settings.window_sizes_ms
        self.exclude = excluded_conditions(settings)
        self.group, self.topic = settings.aggregator_group, settings.trades_topic
        self.partitions: dict[int, WindowSet] = {}
        self.next_offsets: dict[int, int] = {}
        self.stored: dict[int, tuple[int, int | None]] = {}   # partition -> (offset, watermark) last stored
        self._positions: dict[int, tuple[int, int | None]] = {}
        self.symbol_partition: dict[str, int] = {}
        self.idle = runtime.IdleSymbols(settings.symbol_idle_evict_seconds)
        # loaded from `indicators` when a symbol's window closes; evicted with the idle symbols
        self.indicator_states: dict[tuple[str, str], IndicatorState] = {}
        # effects awaiting the next checkpoint; kept until it commits, so a retried transaction
        # writes exactly what the first attempt would have
        self.dirty: dict[tuple[str, int, int], Window] = {}
        self.final: list[Window] = []
        self.late: list[tuple[int, LateTrade]] = []
        self.indicator_rows: list[tuple[int, tuple]] = []
        self.folded_since = 0
        self.invalid_skipped = self.late_total = 0

    def rewind(self, cur, partitions: list[int]) -> None:
        store.rewind(cur, self.group, self.topic, partitions)

    def assigned(self, cur, partitions: list[int], _runtime) -> dict[int, int | None]:
        starts = {}
        for p in partitions:
            offset, clock, windows = store.load_partition(cur, self.group, self.topic, p, self.sizes)
            ws = WindowSet(self.sizes, int(self.settings.allowed_lateness_seconds * 1000),
                           self.settings.idle_timeout_seconds, p, self.exclude,
                           int(self.settings.max_clock_skew_seconds * 1000), clock)
            ws.open_windows = {(w.symbol, w.size_ms, w.start_ms): w for w in windows}
            self.partitions[p] = ws
            if offset is not None:
                self.stored[p] = (offset, clock.watermark_ms)
            starts[p] = offset if offset is not None else bus.BEGINNING
            log.info("partition %d: resuming at offset %s with %d open windows", p,
                     offset if offset is not None else "0 (first run)", len(windows))
        return starts

    def take(self, messages: list[bus.Message]) -> None:
        skew = int(self.settings.max_clock_skew_seconds * 1000)
        for message in messages:
            ws = self.partitions.get(message.partition)
            if ws is None:  # not (or no longer) ours
                continue
            self.next_offsets[message.partition] = message.offset + 1
            self.folded_since += 1
            try:
                trade = parse_trade(message.value, message.timestamp_ms, skew)
                folded = ws.add(trade, message.offset)
            except InvalidTrade:
                self.invalid_skipped += 1  # the consumer puts it in dead_letters
                continue
            except Exception as error:  # noqa: BLE001 - no single message may stop the stage
                self.invalid_skipped += 1
                log.error("%s[%d]@%d skipped: %s: %s", message.topic, message.partition, message.offset,
                          type(error).__name__, error)
                continue
            self.symbol_partition[trade.symbol] = message.partition
            self.idle.touch(message.partition, trade.symbol, trade.timestamp_ms)
            for window in folded:
                self.dirty[(window.symbol, window.size_ms, window.start_ms)] = window
            self.processed += 1

    def pending(self) -> int:
        # open windows may turn final with time alone (idle partitions), so any held partition counts
        return self.folded_since + (1 if self.partitions else 0)

    def write(self, conn, cur) -> None:
        for p, ws in self.partitions.items():
            held = ws.held
            for window in ws.advance_when_idle(self.runtime.quiet_for(p)):
                self.dirty[(window.symbol, window.size_ms, window.start_ms)] = window
            if held is not None and ws.held is None:
                self.next_offsets[p] = held[1] + 1
            newly_final = ws.pop_final()
            for w in newly_final:
                self.dirty.pop((w.symbol, w.size_ms, w.start_ms), None)
            self.final.extend(newly_final)
            self.indicator_rows.extend((p, row) for row in self._indicator_rows(cur, newly_final))
            self.late.extend((p, late) for late in ws.take_late())
        # a held trade is not in any window yet: the position stays on it, so a restart reads it again.
        # A quiet partition's watermark moves with no message read: it is stored too, or a restart
        # would take windows that are final (and not loaded again) for open ones.
        positions = {}
        for p, ws in self.partitions.items():
            offset, watermark = self.stored.get(p, (None, None))
            offset = self.next_offsets.get(p, offset)
            if offset is not None and (p in self.next_offsets or ws.clock.watermark_ms != watermark):
                positions[p] = (ws.held[1] if ws.held else offset, ws.clock)
        self._positions = {p: (offset, clock.watermark_ms) for p, (offset, clock) in positions.items()}
        idle = self.idle.idle()
        if idle:        # open windows close by time alone; what else a symbol holds goes now
            for symbol in idle:
                self.symbol_partition.pop(symbol, None)
            self.indicator_states = {k: v for k, v in self.indicator_states.items() if k[0] not in idle}
        store.write_windows(cur, list(self.dirty.values()) + self.final)
        store.write_late(cur, [late for _, late in self.late])
        store.write_indicators(cur, [row for _, row in self.indicator_rows])
        store.write_offsets(cur, self.group, self.topic, positions)

    def written(self) -> None:
        prometheus.ROWS.labels("aggregator", "stock_metrics").inc(len(self.dirty) + len(self.final))
        prometheus.ROWS.labels("aggregator", "indicators").inc(len(self.indicator_rows))
        smallest = self.sizes[0]
        for _, late in self.late:
            if late.size_ms == smallest:           # one per trade (there is a row per window size)
                prometheus.LATE.labels("aggregator", late.reason).inc()
        self.late_total += len(self.late)
        self.dirty.clear()
        self.final, self.late, self.indicator_rows = [], [], []
        self.next_offsets.clear()
        self.stored.update(self._positions)
        self.folded_since = 0
        prometheus.SYMBOLS.labels("aggregator").set(len(self.idle))

    def drop(self, partitions: list[int]) -> None:
        gone = set(partitions)
        for p in gone:
            self.partitions.pop(p, None)
            self.next_offsets.pop(p, None)
            self.stored.pop(p, None)
        self.dirty = {k: w for k, w in self.dirty.items() if w.partition not in gone}
        self.final = [w for w in self.final if w.partition not in gone]
        self.late = [(p, late) for p, late in self.late if p not in gone]
        self.indicator_rows = [(p, row) for p, row in self.indicator_rows if p not in gone]
        symbols = {s for s, p in self.symbol_partition.items() if p in gone}
        self.indicator_states = {k: v for k, v in self.indicator_states.items() if k[0] not in symbols}
        for symbol in symbols:
            self.symbol_partition.pop(symbol, None)
        self.idle.drop(partitions)

    def _indicator_rows(self, cur, final: list[Window]) -> list[tuple]:
        rows = []
        for w in final:
            if w.close is None:
                continue
            key = (w.symbol, size_label(w.size_ms))
            state = self.indicator_states.get(key)
            if state is None:
                state = store.load_indicator_state(cur, *key)
                if w.symbol in self.symbol_partition:    # not evicted: keep it for the next candle
                    self.indicator_states[key] = state
            rows.append((w.symbol, key[1], w.start_ms, w.close, state.update(w.close)))
        return rows

    def report(self) -> str:
        open_windows = sum(len(ws.open_windows) for ws in self.partitions.values())
        return (f"folded {self.processed} trades; {open_windows} open windows; late trades {self.late_total}; "
                f"invalid skipped {self.invalid_skipped}")


def run(settings: Settings, stop: Callable[[], bool]) -> Aggregate:
    stage = Aggregate(settings)
    runtime.Runtime(settings, stage, settings.aggregator_group, settings.trades_topic, stop).run()
    return stage
