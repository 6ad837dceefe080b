"""The aggregator stage: Kafka `trades` → event-time windows → `stock_metrics` and `indicators` (and the
final candles → Kafka `candles`).

It keeps its Kafka position in the database: the window rows, the late trades, the indicator rows
*and the position* (next offset and watermark per partition, which the runtime stores in
stage_positions) are written in one fenced transaction by the stage runtime's commit protocol
(tradewatch/runtime.py). On
assignment of a partition the aggregator loads that partition's open windows and position in the
transaction that claims the partition, and Kafka starts reading there. So a kill -9 at any moment
loses at most the work since the last checkpoint, which is then redone from exactly the same
offsets — never counted twice — and a stalled former owner cannot write over the new owner.
(Recomputing from the `trades` table instead would race the consumer, which may lag behind Kafka.)

The same transaction queues each newly final candle in `candle_outbox`; after the commit the
runtime delivers that outbox to the Kafka topic `candles` (tradewatch/outbox.py `CandleOutbox`):
every final candle with its indicators, at least once, in the order the aggregator closed them.
"""
from __future__ import annotations

import logging
from typing import Callable

from tradewatch import bus, prometheus, runtime, volatility
from tradewatch.config import Settings
from tradewatch.events import InvalidTrade, parse_trade
from tradewatch.outbox import CandleOutbox
from tradewatch.store import candles as store
from tradewatch.windows import PartitionClock, Window, WindowSet, size_label

log = logging.getLogger("tradewatch.aggregator")


class Aggregate(runtime.Stage):
    name = "aggregator"
    watches_quiet = True      # quiet partitions close their windows (runtime.quiet_for)
    keeps_position = True

    def __init__(self, settings: Settings):
        super().__init__()
        self.settings = settings
        self.flush_interval_s = settings.aggregator_flush_ms / 1000.0
        self.batch_size = self.max_pending = 5000
        self.sizes = settings.window_sizes_ms
        self.exclude = settings.ohlc_excluded
        self.group, self.topic = settings.aggregator_group, settings.trades_topic
        self.partitions: dict[int, WindowSet] = {}
        self.stored: dict[int, tuple[int, int | None]] = {}   # partition -> (offset, watermark) last stored
        self._positions: dict[int, tuple[int, int | None]] = {}
        self.released: dict[int, int] = {}    # partition -> the offset after a held trade that time let go
        self.symbols = runtime.Symbols(settings.symbol_idle_evict_seconds)
        # each series' indicator and forecast state, replayed from its final candles when a window of it
        # first closes; evicted with the idle symbols
        self.series: dict[tuple[str, str], store.Series] = {}
        self.forecasters = volatility.load(settings.model_path)
        # effects awaiting the next checkpoint; kept until it commits, so a retried transaction
        # writes exactly what the first attempt would have
        self.dirty = self.pending_effects()          # open windows that changed, by window
        self.final = self.pending_effects()
        self.late = self.pending_effects()
        self.indicator_rows = self.pending_effects()
        self.folded_since = 0
        self.invalid_skipped = self.late_total = 0
        self.outbox = CandleOutbox(settings)         # each final candle to the `candles` topic
        self.outboxes = [self.outbox]

    def output_topics(self) -> dict[str, int]:
        return {self.settings.candles_topic: 1}

    def assigned(self, cur, partitions: list[int], stored: dict[int, tuple[int, dict]]) -> dict[int, int | None]:
        starts = {}
        for p in partitions:
            offset, kept = stored.get(p, (None, {}))
            clock = PartitionClock(kept.get("max_event_ms"), kept.get("watermark_ms"))
            windows = store.open_windows(cur, p, self.sizes) if p in stored else []
            ws = WindowSet(self.sizes, int(self.settings.allowed_lateness_seconds * 1000),
                           self.settings.idle_timeout_seconds, p, self.exclude,
                           int(self.settings.max_clock_skew_seconds * 1000), clock)
            ws.open_windows = {(w.symbol, w.size_ms, w.start_ms): w for w in windows}
            self.partitions[p] = ws
            if offset is not None:
                self.stored[p] = (offset, clock.watermark_ms)
            else:
                starts[p] = bus.BEGINNING           # never started: the whole topic
            log.info("partition %d: resuming at offset %s with %d open windows", p,
                     offset if offset is not None else "0 (first run)", len(windows))
        return starts

    def take(self, messages: list[bus.Message]) -> None:
        skew = int(self.settings.max_clock_skew_seconds * 1000)
        for message in messages:
            ws = self.partitions.get(message.partition)
            if ws is None:  # not (or no longer) ours
                continue
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
            self.symbols.touch(message.partition, trade.symbol, trade.timestamp_ms)
            for window in folded:
                self.dirty.add(message.partition, window, (window.symbol, window.size_ms, window.start_ms))
            self.processed += 1

    def pending(self) -> int:
        return self.folded_since

    def work_due(self) -> bool:
        return bool(self.partitions)     # open windows may turn final with time alone (idle partitions)

    def write(self, conn, cur) -> None:
        for p, ws in self.partitions.items():
            held = ws.held
            for window in ws.advance_when_idle(self.runtime.quiet_for(p)):
                self.dirty.add(p, window, (window.symbol, window.size_ms, window.start_ms))
            if held is not None and ws.held is None:
                self.released[p] = held[1] + 1
            newly_final = ws.pop_final()
            for w in newly_final:
                self.dirty.pop((w.symbol, w.size_ms, w.start_ms))
                self.final.add(p, w)
            for row in self._indicator_rows(cur, newly_final):
                self.indicator_rows.add(p, row)
            for late in ws.take_late():
                self.late.add(p, late)
        idle = self.symbols.idle()
        if idle:        # open windows close by time alone; what else a symbol holds goes now
            self.series = {k: v for k, v in self.series.items() if k[0] not in idle}
        store.write_windows(cur, self.dirty.items() + self.final.items())
        store.queue_final(cur, self.final.items())
        store.write_late(cur, self.late.items())
        store.write_indicators(cur, self.indicator_rows.items())

    def positions(self, read: dict[int, int]) -> dict[int, tuple[int, dict]]:
        # a held trade is not in any window yet: the position stays on it, so a restart reads it again.
        # A quiet partition's watermark moves with no message read: it is stored too, or a restart
        # would take windows that are final (and not loaded again) for open ones.
        found = {}
        for p, ws in self.partitions.items():
            offset, watermark = self.stored.get(p, (None, None))
            offset = self.released.get(p, read.get(p, offset))
            if offset is not None and (p in read or p in self.released or ws.clock.watermark_ms != watermark):
                found[p] = (ws.held[1] if ws.held else offset, ws.clock)
        self._positions = {p: (offset, clock.watermark_ms) for p, (offset, clock) in found.items()}
        return {p: (offset, {"max_event_ms": clock.max_event_ms, "watermark_ms": clock.watermark_ms})
                for p, (offset, clock) in found.items()}

    def written(self) -> None:
        prometheus.ROWS.labels("aggregator", "stock_metrics").inc(len(self.dirty) + len(self.final))
        prometheus.ROWS.labels("aggregator", "indicators").inc(len(self.indicator_rows))
        smallest = self.sizes[0]
        for late in self.late.items():
            if late.size_ms == smallest:           # one per trade (there is a row per window size)
                prometheus.LATE.labels("aggregator", late.reason).inc()
        self.late_total += len(self.late)
        if self.final:
            self.outbox.wake()
        self.released.clear()
        self.stored.update(self._positions)
        self.folded_since = 0
        prometheus.SYMBOLS.labels("aggregator").set(len(self.symbols))

    def drop(self, partitions: list[int]) -> None:
        for p in partitions:
            self.partitions.pop(p, None)
            self.stored.pop(p, None)
            self.released.pop(p, None)
        symbols = self.symbols.drop(partitions)
        self.series = {k: v for k, v in self.series.items() if k[0] not in symbols}

    def _indicator_rows(self, cur, final: list[Window]) -> list[list]:
        keys = [(w.symbol, size_label(w.size_ms)) for w in final]
        states = store.load_series(cur, sorted(set(keys) - self.series.keys()))
        states.update((key, self.series[key]) for key in set(keys) & self.series.keys())
        rows = store.indicator_rows(states, self.forecasters, [
            (w.symbol, key[1], w.start_ms, w.open, w.high, w.low, w.close, w.sum_quantity, w.trade_count)
            for w, key in zip(final, keys)])
        # kept for the next candle unless evicted
        self.series.update((key, state) for key, state in states.items() if key[0] in self.symbols)
        return rows

    def report(self) -> str:
        open_windows = sum(len(ws.open_windows) for ws in self.partitions.values())
        return (f"folded {self.processed} trades; {open_windows} open windows; late trades {self.late_total}; "
                f"invalid skipped {self.invalid_skipped}; final candles published {self.outbox.sent}")


def run(settings: Settings, stop: Callable[[], bool]) -> Aggregate:
    stage = Aggregate(settings)
    runtime.Runtime(settings, stage, settings.aggregator_group, settings.trades_topic, stop).run()
    return stage
