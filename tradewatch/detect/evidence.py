"""Why an alert fired: the one definition of an alert's evidence.

Every rule, the Isolation Forest, the pump-and-dump watch and the book's watch describe a firing in this shape; it
is stored with the alert (`alerts.evidence`, JSON), sent in the Kafka alert message, the webhook
and the e-mail, returned by `GET /alerts/{alert_id}`, written into reports and drawn on the
dashboard. Alerts stored before it have none (`evidence` is null) and are shown without.

    rule       the alert type
    params     the rule's settings that set its threshold (names as in .env, values as used)
    measured   what was measured: "price", "quantity", "run", "features", "burst", or on the book
               "size" (an order's, SPOOFING) and "updates" (QUOTE_STUFFING)
    value      the measured value (a price, a quantity, a forest score, a trade count)
    baseline   what it was compared with, in the units of `value` (null where there is none)
    baseline_how   how that baseline was computed, in words
    change     the value against the baseline, in `unit` ("%", "x", "sigma", "score")
    threshold  the line `change` crossed, in `unit`
    threshold_how  how the threshold was set (which of its parts was the largest)
    level      the threshold as a price (a quantity for a whale) where one exists: the line a chart
               draws (a pump's: the price its run-up had to pass)
    tick       the symbol's tick (its smallest price step, learned from its prices) where it matters
    trades     {"trade_id": the trade that fired, "ids": the baseline's trades, oldest first, or []
               when named by time only, "count", "first_ms", "last_ms"}; for a book alert
               (tradewatch/detect/book_rules.py) the book message that fired ("SYMBOL@seq") and
               the time range of the messages that made it
    extra      what only this rule has (the forest's drivers, the pump's event id, sigma ...)
    sentence   all of it in one line for a person
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

EVIDENCE_VERSION = 1


def num(value: float) -> str:
    """A price or a quantity as a person reads it: 8.93e-06, 101.25, 1,250."""
    if value == 0:
        return "0"
    if abs(value) >= 1000:
        return f"{value:,.{0 if value == int(value) else 2}f}"
    return f"{value:.6g}"


@dataclass(frozen=True)
class Evidence:
    rule: str
    params: dict
    measured: str
    value: float
    baseline: float | None
    baseline_how: str
    change: float
    threshold: float
    threshold_how: str
    unit: str
    sentence: str
    trades: dict
    level: float | None = None
    tick: float | None = None
    extra: dict = field(default_factory=dict)
    version: int = EVIDENCE_VERSION

    def to_dict(self) -> dict:
        return asdict(self)


def trades_named(trade_id: str, ids: list[str], first_ms: int | None, last_ms: int, count: int | None = None) -> dict:
    """The trades that made an alert: the baseline's (by id where the detector keeps them, else by
    time range and count) and the one that fired."""
    return {"trade_id": trade_id, "ids": ids, "count": len(ids) if count is None else count,
            "first_ms": first_ms, "last_ms": last_ms}


def percent(fraction: float) -> str:
    return f"{fraction * 100:.2f} %"
