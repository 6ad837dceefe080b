"""The producer's loop: pace trades by their event time, send them keyed by symbol, report progress."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

from tradewatch.events import Trade

log = logging.getLogger(__name__)


@dataclass
class PublishStats:
    sent: int = 0                   # trades
    book_messages: int = 0          # and book messages (producer.py --book), counted apart
    injected: dict[str, int] = field(default_factory=dict)
    elapsed_s: float = 0.0

    @property
    def rate(self) -> float:
        return self.sent / self.elapsed_s if self.elapsed_s > 0 else 0.0


def publish(send: Callable[[Trade], bool], trades: Iterable, speed: float | None = 1.0,
            count: int | None = None, duration_s: float | None = None,
            stop: Callable[[], bool] = lambda: False,
            progress: Callable[[PublishStats], None] | None = None, origin_ms: int | None = None) -> PublishStats:
    """Send trades so that wall time follows event time divided by `speed` (None = as fast as possible).

    `trades` may hold other events with a `timestamp_ms` (book messages), sent in the same order and
    pace but not counted as trades. `origin_ms` is the event time that stands for the moment sending
    starts (a live feed: the wall clock, so no trade goes out before its own time); by default the
    first trade's. Stops after `count` trades (right after the last: nothing more is taken from
    `trades`), after `duration_s` seconds, when `trades` ends, or when `stop()`.
    """
    stats = PublishStats()
    started = time.monotonic()
    first_event_ms: int | None = None
    last_report = started
    for trade in trades:
        if stop() or (count is not None and stats.sent >= count):
            break
        now = time.monotonic()
        if duration_s is not None and now - started >= duration_s:
            break
        if speed is not None:
            if first_event_ms is None:
                first_event_ms = trade.timestamp_ms if origin_ms is None else origin_ms
            due = started + (trade.timestamp_ms - first_event_ms) / 1000.0 / speed
            while now < due and not stop():
                time.sleep(min(due - now, 0.2))
                now = time.monotonic()
        if not send(trade):
            break
        if type(trade) is not Trade:
            stats.book_messages += 1
            continue
        stats.sent += 1
        if trade.injected_anomaly:
            stats.injected[trade.injected_anomaly] = stats.injected.get(trade.injected_anomaly, 0) + 1
        if count is not None and stats.sent >= count:
            break
        if progress and now - last_report >= 1.0:
            stats.elapsed_s = now - started
            progress(stats)
            last_report = now
    stats.elapsed_s = time.monotonic() - started
    return stats
