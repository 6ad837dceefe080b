"""`anomaly_detector.py run`: the detector stage — flag trades live from Kafka, store flags and
alerts, publish alerts.

On the stage runtime's commit protocol (tradewatch/runtime.py): per checkpoint one fenced
transaction writes trade_flags, alerts (unpublished), breaker states, the rolling state of each
symbol that changed (detector_symbols; a symbol idle for SYMBOL_IDLE_EVICT_SECONDS of event time is
evicted from memory and from that table, and its next trade warms up afresh) *and the position*
(the runtime's stage_positions); then the runtime delivers the alert outboxes, the Kafka topic
`alerts` and the webhook (tradewatch/outbox.py); then Kafka offsets. On assignment each partition's state is loaded in the transaction that claims it,
and reading starts at its stored offset, so a restart or rebalance goes on exactly where the last
checkpoint stopped: the same features, flags and alerts as a run that was never interrupted, and
time never runs backwards inside a symbol's state. A symbol's breaker state and alert cooldowns
are part of that state, so they follow its partition to the next owner.
"""
from __future__ import annotations

import logging
import time
from typing import Callable

from tradewatch import bus, prometheus, runtime, volatility
from tradewatch.alerts import Deduplicator, alerts_for
from tradewatch.candles import BASE_SIZE
from tradewatch.config import Settings
from tradewatch.detect import forest
from tradewatch.detect.pipeline import DetectionPipeline
from tradewatch.detect.rules import DetectorConfig, RuleDetector
from tradewatch.events import InvalidTrade, parse_trade
from tradewatch.outbox import AlertOutbox, delivery_outboxes
from tradewatch.store import detections as store

log = logging.getLogger("tradewatch.detector")
_LATENCY = prometheus.LATENCY.labels("detector", "trade_to_alert")


def detector_config(settings: Settings) -> DetectorConfig:
    return DetectorConfig(price_window=settings.zscore_window, zscore_threshold=settings.zscore_threshold,
                          cool_off_s=settings.breaker_cool_off_seconds, range_widths=settings.out_of_range_widths)


def rule_detector(settings: Settings, config: DetectorConfig | None = None) -> RuleDetector:
    """The rules as the live detector runs them: OUT_OF_RANGE's band made by the forecaster the
    aggregator uses for its 1-minute candles, judging no trade whose sale condition sets no price, and
    auction prints' sizes against earlier auctions."""
    return RuleDetector(config or detector_config(settings), volatility.load(settings.model_path)[BASE_SIZE],
                        settings.ohlc_excluded, settings.auctions)


def load_model(settings: Settings) -> forest.ForestModel | None:
    path = forest.latest(settings.model_path)
    if path is None:
        log.info("no Isolation Forest model in %s (run `python anomaly_detector.py train`); rules only",
                 settings.model_path)
        return None
    model = forest.load(path)
    log.info("using Isolation Forest %s", path.name)
    return model


class Detect(runtime.Stage):
    name = "detector"
    keeps_position = True
    # A checkpoint stores the whole rolling state of each symbol that traded since the last beside
    # the position (~23 KB a busy symbol, most of it the pump watch's burst window; ~7 ms for ten,
    # uncompressed). At every dry poll that took most of the stage at 1,000 trades/s and held each
    # new alert up behind it. So flags, events and state go once a second (a restart reads at most
    # that again), and alerts at once in a transaction of their own (`write_urgent`), ahead of it.
    flush_interval_s = 1.0
    # and at this many trades read, so that behind a backlog a batch has a bound: until a
    # checkpoint evicts the idle ones, every new symbol of the batch holds its state (a backlog of
    # new symbols grew the detector by 60 MB a part in test_bounded_state). Catching up at ~25,000
    # trades/s that is a checkpoint every 0.4 s instead of every second.
    max_pending = 10_000
    # and at this many new symbols: each one's state (~15 KB in memory, most of it empty windows)
    # stays until then, so 10,000 trades of new symbols held ~145 MB, and how much of it a part of
    # test_bounded_state caught depended on how far behind the detector was (276 -> 343 MB once)
    max_new_symbols = 1_000

    def __init__(self, settings: Settings):
        super().__init__()
        self.settings = settings
        self.group, self.topic = settings.detector_group, settings.trades_topic
        self.max_skew_ms = int(settings.max_clock_skew_seconds * 1000)
        self.pipeline = DetectionPipeline(rule_detector(settings), load_model(settings))
        self.dedup = Deduplicator.from_settings(settings)
        self.outbox = AlertOutbox(settings)
        self.routes = settings.routes                     # ALERT_ROUTES: severity -> channels
        self.deliveries = delivery_outboxes(settings)     # webhook, e-mail: threads of their own
        self.outboxes = [self.outbox, *self.deliveries]
        self.symbols = runtime.Symbols(settings.symbol_idle_evict_seconds)   # each one's partition
        self.changed: set[str] = set()       # symbols whose state the next checkpoint writes
        self.evicted: set[str] = set()       # symbols whose stored state the next checkpoint deletes
        self.flagged_pending = self.pending_effects()
        self.alerts_pending = self.pending_effects()
        self.transitions = self.pending_effects()
        self.events = self.pending_effects()     # pump-and-dump events, the newest snapshot of each
        self.appended_ms: dict[str, int | None] = {}   # alert_id -> Kafka append time of its trade
        self.read = 0
        self.new_symbols = 0                 # since the last checkpoint
        self.flagged = 0

    def output_topics(self) -> dict[str, int]:
        return {self.settings.alerts_topic: 1}

    def assigned(self, cur, partitions: list[int], stored: dict[int, tuple[int, dict]]) -> dict[int, int | None]:
        # Rolling state, breakers and cooldowns belong to a partition's symbols: each assignment
        # loads them as the last checkpoint stored them (a former owner may have moved them on).
        self._forget(self.symbols.drop(partitions))
        for p in partitions:
            if p not in stored:
                log.info("partition %d: no stored state, starting at the group's offset with fresh state", p)
                continue
            states = store.load_symbols(cur, self.group, self.topic, p)
            self.pipeline.rules.restore(states)
            for symbol, data in states.items():
                self.dedup.restore(symbol, data.get("cooldowns", {}))
                self.symbols.touch(p, symbol, data.get("last_ts"))
            log.info("partition %d: resuming at offset %d with the state of %d symbols", p, stored[p][0], len(states))
        return {}

    def take(self, messages: list[bus.Message]) -> None:
        trades, origins = [], []
        for m in messages:
            try:
                trades.append(parse_trade(m.value, m.timestamp_ms, self.max_skew_ms))
                origins.append(m)
            except InvalidTrade:
                continue  # dead-lettered by the consumer
            except Exception as error:  # noqa: BLE001 - no single message may stop the stage
                log.error("%s[%d]@%d skipped: %s: %s", m.topic, m.partition, m.offset, type(error).__name__, error)
        self.read += len(messages)
        for t, m in zip(trades, origins):
            self.new_symbols += self.symbols.partition_of(t.symbol) < 0
            self.symbols.touch(m.partition, t.symbol, t.timestamp_ms)
            self.changed.add(t.symbol)
        for d, m in zip(self.pipeline.process(trades), origins):
            if d.event is not None:
                self.events.add(m.partition, d.event, key=(d.event["event_id"],))
            if d.is_anomaly:
                self.flagged_pending.add(m.partition, d)
                for a in alerts_for(d):
                    if self.dedup.allow(a):
                        self.alerts_pending.add(m.partition, a)
                        self.appended_ms[a.alert_id] = m.timestamp_ms
        for t in self.pipeline.rules.take_transitions():
            self.transitions.add(self.symbols.partition_of(t.symbol), t)
        self.processed += len(trades)

    def pending(self) -> int:
        return self.read

    def room(self) -> int:          # each record read may be a new symbol
        return max(min(super().room(), self.max_new_symbols - self.new_symbols), 1)

    def full(self) -> bool:
        return super().full() or self.new_symbols >= self.max_new_symbols

    def urgent(self) -> bool:
        return bool(self.alerts_pending)

    def write_urgent(self, cur) -> None:
        store.write_alerts(cur, self.alerts_pending.tagged(), self.routes)     # keyed by alert_id

    def urgent_written(self) -> None:
        self._alerts_stored()
        self.alerts_pending.clear()

    def write(self, conn, cur) -> None:
        store.write_flags(cur, self.flagged_pending.items(), self.pipeline.version)
        store.write_alerts(cur, self.alerts_pending.tagged(), self.routes)
        store.write_breakers(cur, self.transitions.items())
        store.write_events(cur, self.events.items())
        idle = self.symbols.idle()
        if idle:                                  # their state leaves memory and the table
            self._forget(idle)
            self.evicted |= idle
            self.changed -= idle
        states = self.pipeline.rules.export(self.changed)
        store.write_symbols(cur, self.group, self.topic, [
            (symbol, self.symbols.partition_of(symbol), {**data, "cooldowns": self.dedup.export(symbol)})
            for symbol, data in states.items()], self.evicted)

    def _forget(self, symbols: set[str]) -> None:
        self.pipeline.rules.forget(symbols)
        self.dedup.forget(symbols)

    def _alerts_stored(self) -> None:
        """The pending alerts are durable: log and count them, wake the outboxes."""
        now_ms = time.time() * 1000
        prometheus.ROWS.labels("detector", "alerts").inc(len(self.alerts_pending))
        for a in self.alerts_pending.items():
            log.warning("ALERT %s", a.message)
            prometheus.ALERTS.labels("detector", a.alert_type, a.severity).inc()
            appended = self.appended_ms.pop(a.alert_id, None)
            if appended:
                _LATENCY.observe(max(now_ms - appended, 0) / 1000)
        if self.alerts_pending:
            for outbox in self.outboxes:
                outbox.wake()

    def written(self) -> None:
        prometheus.ROWS.labels("detector", "trade_flags").inc(len(self.flagged_pending))
        self._alerts_stored()
        self.appended_ms.clear()
        self.flagged += len(self.flagged_pending)
        self.changed, self.evicted = set(), set()
        prometheus.SYMBOLS.labels("detector").set(len(self.symbols))
        self.read = self.new_symbols = 0

    def drop(self, partitions: list[int]) -> None:
        symbols = self.symbols.drop(partitions)
        self._forget(symbols)
        self.changed -= symbols
        self.evicted -= symbols

    def report(self) -> str:
        return (f"examined {self.processed} trades, flagged {self.flagged}, alerts published {self.outbox.sent} "
                f"({self.dedup.suppressed} suppressed by cooldown)")


def run(settings: Settings, stop: Callable[[], bool]) -> Detect:
    stage = Detect(settings)
    runtime.Runtime(settings, stage, settings.detector_group, settings.trades_topic, stop).run()
    return stage
