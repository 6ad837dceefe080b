"""Alerts: one per anomaly type of a flagged trade (the detector's) and one per pattern the book
watch finds (the quotes stage's), deduplicated per (symbol, type) with cooldowns in event time,
each with its evidence (tradewatch/detect/evidence.py) and a message that says why it fired in one
line. Stored in the `alerts` table and delivered from there to the Kafka topic `alerts`, a webhook
and e-mail (tradewatch/outbox.py)."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

from tradewatch.config import Settings
from tradewatch.detect.book_rules import BookDetection
from tradewatch.detect.rules import Detection


@dataclass
class Alert:
    alert_id: str
    timestamp_ms: int
    symbol: str
    alert_type: str
    severity: str
    message: str
    trade_id: str
    details: dict = field(default_factory=dict)
    evidence: dict | None = None    # why it fired (tradewatch/detect/evidence.py); None if stored before

    def to_json_bytes(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":"), default=str).encode()


# A rule's precision is shown once this many of its alerts are marked true or false positive: with
# fewer, one mark moves it by 20 points or more.
PRECISION_MIN_MARKED = 5


def precision(true_positive: int, false_positive: int) -> float | None:
    """Of a rule's alerts analysts marked true or false, the share that were true; None when too
    few are marked to say (`needs_review` counts as not yet judged)."""
    marked = true_positive + false_positive
    return true_positive / marked if marked >= PRECISION_MIN_MARKED else None


def per_rule(frame) -> list[dict]:
    """The rows of queries.rule_precision, each with its precision (None: too few marked)."""
    return [{**row, "precision": precision(row["true_positive"], row["false_positive"])}
            for row in frame.to_dict("records")]


def alerts_for(detection: Detection) -> list[Alert]:
    """One alert per anomaly type of the trade; inside a pump-and-dump event only the event's
    phase alert, and none for a flag held back (Detection.held: a price flag its move has told
    already, a whale small for its day, a print reported again); those flags stay on the trade."""
    t = detection.trade
    when = _utc(t.timestamp_ms)
    alerts = []
    for kind in detection.types:
        if (detection.quiet and kind != "PUMP_AND_DUMP") or kind in detection.held:
            continue
        severity = detection.severity_of(kind)
        details = {"price": t.price, "quantity": t.quantity, "side": t.side, "score": round(detection.score, 3),
                   "types": detection.types, **detection.details}
        evidence = detection.evidence[kind]
        message = f"{severity} {kind} {t.symbol} at {when} UTC: {evidence.sentence}"
        alerts.append(Alert(f"{t.trade_id}:{kind}", t.timestamp_ms, t.symbol, kind, severity,
                            message, t.trade_id, details, evidence.to_dict()))
    return alerts


def book_alert(detection: BookDetection) -> Alert:
    """The alert of a book pattern (tradewatch/detect/book_rules.py), keyed by the book message that
    completed it (symbol@seq), as a trade's alert is keyed by the trade."""
    d = detection
    when = _utc(d.timestamp_ms)
    fired = f"{d.symbol}@{d.seq}"
    message = f"{d.severity} {d.kind} {d.symbol} at {when} UTC: {d.evidence.sentence}"
    details = {"book_seq": d.seq, **{k: v for k, v in d.evidence.extra.items() if k in ("side", "layers", "prices")}}
    return Alert(f"{fired}:{d.kind}", d.timestamp_ms, d.symbol, d.kind, d.severity, message, fired, details,
                 d.evidence.to_dict())


def _utc(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


class Deduplicator:
    """At most one alert per (symbol, type) within the cooldown of its severity (event time)."""

    def __init__(self, cooldowns_s: dict[str, float]):
        self.cooldowns_ms = {severity: int(seconds * 1000) for severity, seconds in cooldowns_s.items()}
        self.last_ms: dict[tuple[str, str], int] = {}
        self.suppressed = 0

    @classmethod
    def from_settings(cls, settings: Settings) -> "Deduplicator":
        return cls({"CRITICAL": settings.alert_cooldown_critical_seconds, "HIGH": settings.alert_cooldown_high_seconds,
                    "MEDIUM": settings.alert_cooldown_medium_seconds, "LOW": settings.alert_cooldown_medium_seconds})

    def forget(self, symbols: set[str]) -> None:
        """Drop the cooldowns of `symbols` (their partition is gone; its next owner restores them)."""
        self.last_ms = {k: v for k, v in self.last_ms.items() if k[0] not in symbols}

    def export(self, symbol: str) -> dict[str, int]:
        return {kind: ms for (s, kind), ms in self.last_ms.items() if s == symbol}

    def restore(self, symbol: str, cooldowns: dict[str, int]) -> None:
        self.last_ms.update(((symbol, kind), int(ms)) for kind, ms in cooldowns.items())

    def allow(self, alert: Alert) -> bool:
        phase = alert.details.get("phase") if alert.alert_type == "PUMP_AND_DUMP" else None
        key = (alert.symbol, f"{alert.alert_type}:{phase}" if phase else alert.alert_type)   # each phase once
        last = self.last_ms.get(key)
        if last is not None and alert.timestamp_ms - last < self.cooldowns_ms.get(alert.severity, 0):
            self.suppressed += 1
            return False
        self.last_ms[key] = alert.timestamp_ms if last is None else max(last, alert.timestamp_ms)
        return True
