"""The largest of a stream's recent values, kept as a monotonic queue (the suffix maxima, oldest
first): O(1) amortised per value, memory the number of suffix maxima (about ln n for values in
random order).

    RecentMax   the largest of the last n values
    SpanMax     the largest of the values of the last `span_ms` of event time, at most
                `MAX_ENTRIES` kept: only a long run of ever smaller values holds more, and past that
                the oldest goes, so the maximum can only understate; until a whole span has been
                seen, `understatement` says by how much the largest so far likely understates a
                whole span's

The whale rule measures a trade against both (tradewatch/detect/features.py), the pump watch a
burst against the busiest of the day (tradewatch/detect/pump.py); the simulator sizes its whales by
them (tradewatch/market/simulator.py).
"""
from __future__ import annotations

from collections import deque

TAIL_EXPONENT = 2.0     # of trade sizes: P(size > x) falls as x^-2 on the recorded SPY and IBM days (the
                        # simulator's SIZE_SHAPE, fitted to them: 99th percentile 10x, 99.9th 32x the median)


class RecentMax:
    """The largest of the last n values."""

    def __init__(self, n: int):
        self.n, self.seen = n, 0
        self.queue: deque[tuple[int, float, str]] = deque()    # (position, value, trade id), values decreasing

    def push(self, value: float, trade_id: str = "") -> None:
        queue = self.queue
        while queue and queue[-1][1] <= value:
            queue.pop()
        queue.append((self.seen, value, trade_id))
        self.seen += 1
        if queue[0][0] <= self.seen - 1 - self.n:
            queue.popleft()

    @property
    def count(self) -> int:
        return min(self.seen, self.n)

    @property
    def max(self) -> float:
        return self.queue[0][1] if self.queue else 0.0

    @property
    def max_id(self) -> str:
        """The trade of the largest value ("" in state restored from before ids were kept)."""
        return self.queue[0][2] if self.queue else ""

    def to_list(self) -> list:
        return [self.seen, *[x for entry in self.queue for x in entry[:2]]]

    def ids(self) -> list[str]:
        return [entry[2] for entry in self.queue]

    @classmethod
    def from_list(cls, n: int, data: list, ids: list[str] | None = None) -> "RecentMax":
        recent = cls(n)
        recent.seen = data[0]
        pairs = [(int(data[k]), data[k + 1]) for k in range(1, len(data), 2)]
        ids = ids if ids is not None and len(ids) == len(pairs) else [""] * len(pairs)
        recent.queue.extend((position, value, trade_id) for (position, value), trade_id in zip(pairs, ids))
        return recent


class SpanMax:
    """The largest of the values of the last `span_ms` of event time. A value out of order by less
    than the span counts from the latest time seen (as it arrived), so times in the queue never
    go back; one out of order by more is out of the span already."""

    MAX_ENTRIES = 4096

    def __init__(self, span_ms: int):
        self.span_ms, self.latest_ms = span_ms, None
        self.since_ms: int | None = None        # the first value's event time
        self.queue: deque[tuple[int, float, str]] = deque()    # (event ms, value, trade id), values decreasing

    def push(self, ms: int, value: float, trade_id: str = "") -> None:
        latest, queue = self.latest_ms, self.queue
        if latest is not None and ms < latest:
            if ms < latest - self.span_ms:
                return                      # out of order by more than the span: already out of it
            ms = latest                     # out of order within it: counted from its arrival
        while queue and queue[-1][1] <= value:
            queue.pop()
        queue.append((ms, value, trade_id))
        self.latest_ms = ms
        if self.since_ms is None:
            self.since_ms = ms
        since = ms - self.span_ms
        while queue[0][0] < since or len(queue) > self.MAX_ENTRIES:
            queue.popleft()

    def first_at(self, ms: int) -> tuple[int, float, str] | None:
        """The entry of the largest of the span up to `ms` (or the latest time seen, if later):
        (event ms, value, trade id). Those it passes over leave at the next push."""
        since = max(ms, self.latest_ms or ms) - self.span_ms
        return next((entry for entry in self.queue if entry[0] >= since), None)

    def max_at(self, ms: int) -> float:
        entry = self.first_at(ms)
        return entry[1] if entry else 0.0

    def seen_ms(self, ms: int) -> int | None:
        """The event time seen up to `ms`, since the first value (None: no value yet)."""
        return None if self.since_ms is None else ms - self.since_ms

    def understatement(self, ms: int, tail: float = TAIL_EXPONENT) -> float:
        """How many times larger than the largest so far the largest of a whole span would likely be,
        at `ms`: values whose tail falls as x^-α, arriving at a steady rate, have a largest of n
        that grows as n^(1/α), so (span / time seen)^(1/α). A trade is 2.8x the largest of the hour
        before it 24 times as often as 2.8x the largest of the day before it; 2.8 × 24^(1/2) = 13.7x
        the hour's is as rare as 2.8x the day's. 1 once a whole span has been seen, or before any value."""
        seen = self.seen_ms(ms)
        if seen is None or seen >= self.span_ms:
            return 1.0
        return (self.span_ms / max(seen, 1)) ** (1 / tail)

    def to_list(self) -> list:
        return [self.latest_ms, self.since_ms, *[list(entry) for entry in self.queue]]

    @classmethod
    def from_list(cls, span_ms: int, data: list) -> "SpanMax":
        recent = cls(span_ms)
        recent.latest_ms = data[0] if data else None
        entries = data[1:]
        if entries and not isinstance(entries[0], list):
            recent.since_ms, entries = entries[0], entries[1:]
        elif recent.latest_ms is not None:       # kept before the first value's time was: a whole span seen
            recent.since_ms = recent.latest_ms - span_ms
        recent.queue.extend((int(ms), value, trade_id) for ms, value, trade_id in entries)
        return recent
