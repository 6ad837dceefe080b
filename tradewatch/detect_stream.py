"""`anomaly_detector.py run`: flag trades live from Kafka, store flags and alerts, publish alerts.

Per batch: detect → one database transaction (trade_flags, alerts, breaker states) →
alerts to the Kafka topic `alerts` → webhook (background) → Kafka offsets committed.
Restart-safe: on assignment each partition is re-read from `WARMUP_TRADES` before its committed
offset to rebuild the rolling state silently. The state of the symbols on that partition is
dropped first, so a re-read after a rebalance starts from scratch and time never runs backwards
inside a symbol's state. Warm-up trades raise no flag, alert or breaker transition; everything
written is keyed (trade_id, alert_id), so work redone after a crash is never doubled. Breaker
states and alert cooldowns are reloaded from the database.
"""
from __future__ import annotations

import logging
import time
from typing import Callable

from tradewatch import bus, runtime
from tradewatch.alerts import Alert, Deduplicator, WebhookSink, alerts_for
from tradewatch.config import Settings
from tradewatch.detect import forest
from tradewatch.detect.pipeline import DetectionPipeline
from tradewatch.detect.rules import CircuitBreaker, DetectorConfig, RuleDetector
from tradewatch.events import InvalidTrade, parse_trade
from tradewatch.store import db
from tradewatch.store import detections as store

log = logging.getLogger("tradewatch.detector")
WARMUP_TRADES = 500
RETRY_SECONDS = 2.0


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


class DetectorService:
    def __init__(self, settings: Settings, stop: Callable[[], bool]):
        self.settings = settings
        self.stop = stop
        self.topic = settings.trades_topic
        self.pipeline = DetectionPipeline(RuleDetector(detector_config(settings)), load_model(settings))
        self.dedup = Deduplicator.from_settings(settings)
        self.live_from: dict[int, int] = {}   # partition -> first offset not seen before (earlier = warm-up)
        self.rewind: set[int] = set()          # newly assigned partitions, to rewind for warm-up
        self.symbol_partition: dict[str, int] = {}   # where each symbol's trades come from (key = symbol)
        self.heartbeat = runtime.Heartbeat(settings, "detector")
        self.webhook = WebhookSink(settings.alert_webhook_url) if settings.alert_webhook_url else None
        self.flagged = self.alerts_sent = self.processed = 0
        self._consumer: bus.BusConsumer | None = None
        self._publisher: bus.Publisher | None = None
        self._conn = None

    def _db(self):
        if self._conn is None:
            self._conn = db.connect_waiting(self.settings, log, RETRY_SECONDS)
        return self._conn

    def _restore(self) -> None:
        conn = self._db()
        for symbol, state, since_ms in store.load_breakers(conn):
            self.pipeline.rules.breakers[symbol] = CircuitBreaker(symbol, self.settings.breaker_cool_off_seconds,
                                                                  state, since_ms)
        self.dedup.last_ms.update(store.load_last_alerts(conn))
        conn.rollback()

    def _on_assign(self, partitions: list[int]) -> None:
        # Kafka calls may not be made inside the rebalance callback; rewind after the poll.
        self.rewind.update(partitions)

    def _rewind(self) -> None:
        assert self._consumer is not None
        stale = {s for s, p in self.symbol_partition.items() if p in self.rewind}
        self.pipeline.rules.forget(stale)   # rebuilt from the warm-up re-read, never extended backwards
        for p in sorted(self.rewind):
            committed = self._consumer.committed(self.topic, p) or 0
            self.live_from[p] = committed
            start = max(committed - WARMUP_TRADES, 0)
            self._consumer.seek(self.topic, p, start)
            log.info("partition %d: warming up from offset %d, live from %d", p, start, committed)

    def run(self) -> None:
        self._restore()
        while not self.stop():
            try:
                self._publisher = bus.Publisher(self.settings, stop=self.stop)
                self._consumer = bus.BusConsumer(self.settings, self.settings.detector_group, [self.topic],
                                                 on_assign=self._on_assign)
                break
            except bus.KafkaUnavailable as error:
                log.warning("%s; retrying every %.0fs", error, RETRY_SECONDS)
                time.sleep(RETRY_SECONDS)
        if self._consumer is None:
            return
        last_report = time.monotonic()
        try:
            while not self.stop():
                messages = self._consumer.poll(2000, 100)
                if self.rewind:
                    # records fetched before the rewind are read again after it
                    messages = [m for m in messages if m.partition not in self.rewind]
                    self._rewind()
                    self.rewind.clear()
                if messages:
                    self._handle(messages)
                self.heartbeat.beat(self.processed, self._consumer.lag(), self._consumer.partitions())
                if time.monotonic() - last_report >= 10:
                    self._report()
                    last_report = time.monotonic()
        finally:
            self.heartbeat.stopped(self.processed)
            self._consumer.close()
            self._publisher.flush()
            self._publisher.close()
            if self.webhook:
                self.webhook.close()
            if self._conn is not None:
                self._conn.close()
        self._report()

    def _handle(self, messages: list[bus.Message]) -> None:
        trades, origins = [], []
        for m in messages:
            try:
                trades.append(parse_trade(m.value))
                origins.append(m)
            except InvalidTrade:
                continue  # dead-lettered by the consumer
        warmup = [m.offset < self.live_from.get(m.partition, 0) for m in origins]
        for t, m in zip(trades, origins):
            self.symbol_partition[t.symbol] = m.partition
        detections = self.pipeline.process(trades, warmup)
        flagged, alerts = [], []
        for d, is_warmup in zip(detections, warmup):
            if d.is_anomaly and not is_warmup:
                flagged.append(d)
                alerts.extend(a for a in alerts_for(d) if self.dedup.allow(a))
        transitions = self.pipeline.rules.take_transitions()
        def write(_conn, cur) -> None:
            store.write_flags(cur, flagged, self.pipeline.version)
            store.write_alerts(cur, alerts)
            store.write_breakers(cur, transitions)

        db.commit_retrying(self._db, write, log, lambda: setattr(self, "_conn", None), RETRY_SECONDS)
        self._deliver(alerts)
        try:
            self._consumer.commit(messages)
        except Exception as error:  # noqa: BLE001 - redone idempotently after a rebalance
            log.warning("offset commit failed (%s); the batch may be re-examined", error)
        self.processed += len(trades)
        self.flagged += len(flagged)

    def _deliver(self, alerts: list[Alert]) -> None:
        assert self._publisher is not None
        for alert in alerts:
            log.warning("ALERT %s", alert.message)
            self._publisher.send(self.settings.alerts_topic, alert.symbol.encode(), alert.to_json_bytes())
            if self.webhook:
                self.webhook.send(alert)
        if alerts:
            self._publisher.flush()
        self.alerts_sent += len(alerts)

    def _report(self) -> None:
        log.info("examined %d trades, flagged %d, alerts %d (%d suppressed by cooldown)",
                 self.processed, self.flagged, self.alerts_sent, self.dedup.suppressed)
