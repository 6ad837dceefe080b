"""`anomaly_detector.py run`: the detector stage — flag trades live from Kafka, store flags and
alerts, publish alerts.

On the stage runtime's commit protocol (tradewatch/runtime.py): per checkpoint one fenced
transaction writes trade_flags, alerts (unpublished), breaker states *and the position*: the next
offset of each partition (detector_state) and the rolling state of each symbol that changed
(detector_symbols; a symbol idle for SYMBOL_IDLE_EVICT_SECONDS of event time is evicted from memory
and from that table, and its next trade warms up afresh); then the
alert outbox is sent to the Kafka topic `alerts` and the webhook (tradewatch/outbox.py); then
Kafka offsets. On assignment each partition's state is loaded in the transaction that claims it,
and reading starts at its stored offset, so a restart or rebalance goes on exactly where the last
checkpoint stopped: the same features, flags and alerts as a run that was never interrupted, and
time never runs backwards inside a symbol's state. A symbol's breaker state and alert cooldowns
are part of that state, so they follow its partition to the next owner.
"""
from __future__ import annotations

import logging
import time
from typing import Callable

from tradewatch import bus, prometheus, runtime
from tradewatch.alerts import Alert, Deduplicator, alerts_for
from tradewatch.config import Settings
from tradewatch.detect import forest
from tradewatch.detect.pipeline import DetectionPipeline
from tradewatch.detect.rules import DetectorConfig, RuleDetector
from tradewatch.events import InvalidTrade, parse_trade
from tradewatch.outbox import AlertOutbox, WebhookOutbox
from tradewatch.store import detections as store

log = logging.getLogger("tradewatch.detector")
_LATENCY = prometheus.LATENCY.labels("detector", "trade_to_alert")


def detector_config(settings: Settings) -> DetectorConfig:
    return DetectorConfig(price_window=settings.zscore_window, zscore_threshold=settings.zscore_threshold,
                          cool_off_s=settings.breaker_cool_off_seconds)


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

    def __init__(self, settings: Settings):
        super().__init__()
        self.settings = settings
        self.group, self.topic = settings.detector_group, settings.trades_topic
        self.max_skew_ms = int(settings.max_clock_skew_seconds * 1000)
        self.pipeline = DetectionPipeline(RuleDetector(detector_config(settings)), load_model(settings))
        self.dedup = Deduplicator.from_settings(settings)
        self.outbox = AlertOutbox(settings)
        self.webhook = WebhookOutbox(settings, settings.alert_webhook_url) if settings.alert_webhook_url else None
        self.next_offsets: dict[int, int] = {}   # partitions read since the last checkpoint
        self.symbol_partition: dict[str, int] = {}   # where each symbol's trades come from (key = symbol)
        self.idle = runtime.IdleSymbols(settings.symbol_idle_evict_seconds)
        self.changed: set[str] = set()       # symbols whose state the next checkpoint writes
        self.evicted: set[str] = set()       # symbols whose stored state the next checkpoint deletes
        self.flagged_pending: list[tuple[int, object]] = []
        self.alerts_pending: list[tuple[int, Alert]] = []
        self.transitions: list[tuple[int, object]] = []
        self.appended_ms: dict[str, int | None] = {}   # alert_id -> Kafka append time of its trade
        self.read = 0
        self.flagged = 0

    def output_topics(self) -> dict[str, int]:
        return {self.settings.alerts_topic: 1}

    def rewind(self, cur, partitions: list[int]) -> None:
        store.rewind(cur, self.group, self.topic, partitions)

    def assigned(self, cur, partitions: list[int], rt: runtime.Runtime) -> dict[int, int | None]:
        # Rolling state, breakers and cooldowns belong to a partition's symbols: each assignment
        # loads them as the last checkpoint stored them (a former owner may have moved them on).
        gained = set(partitions)
        self._forget({s for s, p in self.symbol_partition.items() if p in gained})
        self.idle.drop(partitions)
        starts = {}
        for p in partitions:
            stored = store.load_position(cur, self.group, self.topic, p)
            if stored is None:
                log.info("partition %d: no stored state, starting at the group's offset with fresh state", p)
                continue
            starts[p], states, legacy = stored
            self.pipeline.rules.restore(states)
            for symbol, data in states.items():
                self.dedup.restore(symbol, data.get("cooldowns", {}))
                self.symbol_partition[symbol] = p
                if data.get("last_ts") is not None:
                    self.idle.touch(p, symbol, data["last_ts"])
            self.changed |= legacy
            log.info("partition %d: resuming at offset %d with the state of %d symbols", p, starts[p], len(states))
        self.outbox.waiting = True          # a former owner may have left alerts of these unpublished
        return starts

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
        for m in messages:
            self.next_offsets[m.partition] = m.offset + 1
        for t, m in zip(trades, origins):
            self.symbol_partition[t.symbol] = m.partition
            self.idle.touch(m.partition, t.symbol, t.timestamp_ms)
            self.changed.add(t.symbol)
        for d, m in zip(self.pipeline.process(trades), origins):
            if d.is_anomaly:
                self.flagged_pending.append((m.partition, d))
                for a in alerts_for(d):
                    if self.dedup.allow(a):
                        self.alerts_pending.append((m.partition, a))
                        self.appended_ms[a.alert_id] = m.timestamp_ms
        self.transitions.extend((self.symbol_partition.get(t.symbol, -1), t)
                                for t in self.pipeline.rules.take_transitions())
        self.processed += len(trades)

    def pending(self) -> int:
        return self.read

    def write(self, conn, cur) -> None:
        store.write_flags(cur, [d for _, d in self.flagged_pending], self.pipeline.version)
        store.write_alerts(cur, self.alerts_pending, webhook=self.webhook is not None)
        store.write_breakers(cur, [t for _, t in self.transitions])
        idle = self.idle.idle()
        if idle:                                  # their state leaves memory and the table
            self._forget(idle)
            self.evicted |= idle
            self.changed -= idle
        states = self.pipeline.rules.export(self.changed)
        store.write_symbols(cur, self.group, self.topic, [
            (symbol, self.symbol_partition[symbol], {**data, "cooldowns": self.dedup.export(symbol)})
            for symbol, data in states.items()], self.evicted)
        store.write_positions(cur, self.group, self.topic, self.next_offsets)

    def _forget(self, symbols: set[str]) -> None:
        self.pipeline.rules.forget(symbols)
        self.dedup.forget(symbols)
        for symbol in symbols:
            self.symbol_partition.pop(symbol, None)

    def written(self) -> None:
        now_ms = time.time() * 1000
        prometheus.ROWS.labels("detector", "trade_flags").inc(len(self.flagged_pending))
        prometheus.ROWS.labels("detector", "alerts").inc(len(self.alerts_pending))
        for _, a in self.alerts_pending:
            log.warning("ALERT %s", a.message)
            prometheus.ALERTS.labels("detector", a.alert_type, a.severity).inc()
            appended = self.appended_ms.get(a.alert_id)
            if appended:
                _LATENCY.observe(max(now_ms - appended, 0) / 1000)
        self.appended_ms.clear()
        self.flagged += len(self.flagged_pending)
        if self.alerts_pending:
            self.outbox.waiting = True
            if self.webhook:
                self.webhook.wake()
        self.flagged_pending, self.alerts_pending, self.transitions = [], [], []
        self.next_offsets.clear()
        self.changed, self.evicted = set(), set()
        prometheus.SYMBOLS.labels("detector").set(len(self.idle))
        self.read = 0

    def publish(self, rt: runtime.Runtime) -> None:
        if self.webhook:
            self.webhook.partitions = tuple(sorted(rt.epochs))
        self.outbox.publish(rt)

    def drop(self, partitions: list[int]) -> None:
        gone = set(partitions)
        self.flagged_pending = [(p, d) for p, d in self.flagged_pending if p not in gone]
        self.alerts_pending = [(p, a) for p, a in self.alerts_pending if p not in gone]
        self.transitions = [(p, t) for p, t in self.transitions if p not in gone]
        for p in gone:
            self.next_offsets.pop(p, None)
        symbols = {s for s, p in self.symbol_partition.items() if p in gone}
        self._forget(symbols)
        self.changed -= symbols
        self.evicted -= symbols
        self.idle.drop(partitions)

    def close(self) -> None:
        if self.webhook:
            self.webhook.close()

    def report(self) -> str:
        return (f"examined {self.processed} trades, flagged {self.flagged}, alerts published {self.outbox.sent} "
                f"({self.dedup.suppressed} suppressed by cooldown)")


def run(settings: Settings, stop: Callable[[], bool]) -> Detect:
    stage = Detect(settings)
    runtime.Runtime(settings, stage, settings.detector_group, settings.trades_topic, stop).run()
    return stage
