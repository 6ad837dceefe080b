"""The largest of a stream's recent values, kept as a monotonic queue (the suffix maxima, oldest
first): O(1) amortised per value, memory the number of suffix maxima (about ln n for values in
random order).

    RecentMax   the largest of the last n values
    SpanMax     the largest of the values of the last `span_ms` of event time, at most
                `MAX_ENTRIES` kept: only a long run of ever smaller values holds more, and past that
                the oldest goes, so the maximum can only understate

The whale rule measures a trade against both (tradewatch/detect/features.py), the pump watch a
burst against the busiest of the day (tradewatch/detect/pump.py); the simulator sizes its whales by
them (tradewatch/market/simulator.py).
"""
from __future__ import annotations

from collections import deque


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

    def to_list(self) -> list:
        return [self.latest_ms, *[list(entry) for entry in self.queue]]

    @classmethod
    def from_list(cls, span_ms: int, data: list) -> "SpanMax":
        recent = cls(span_ms)
        recent.latest_ms = data[0] if data else None
        recent.queue.extend((int(ms), value, trade_id) for ms, value, trade_id in data[1:])
        return recent
