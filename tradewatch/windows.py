"""Event-time tumbling windows: the aggregator's pure core (no I/O).

Windows are [start, end) on the trade's own timestamp, aligned to the Unix epoch (UTC). Each
Kafka partition has its own watermark = highest event time seen on it minus the allowed lateness
(symbols never span partitions, so a partition's windows depend only on its own stream). A window
is final once the watermark reaches its end; a trade whose window is already final is *late*: it
is reported (never silently dropped) and does not change the window. When a partition goes quiet,
its watermark also advances with the wall clock after `idle_timeout`, so the last windows close.
*Quiet* is the stage runtime's word (Runtime.quiet_for): Kafka confirmed the partition holds
nothing more for us, continuously, for that long. A partition whose leader is away, or whose
records wait in a producer during an outage, is not quiet: its trades must not become late.

One bad clock must not move event time: a trade more than `max_skew_ms` ahead of its partition's
event time is held back until the partition's next trade. If that one is far ahead too, event time
really jumped (a gap in the feed, the next day of a replay) and both are folded in order; if it is
back near the old time, the held trade was an outlier: it is reported with the reason `clock_skew`
(beside the late trades) and never reaches a window. A held trade with nothing after it is folded
once the partition has been idle for `idle_timeout`.

open/close are the prices of the first/last trade by (event time, arrival sequence), so the
result does not depend on arrival order within the lateness. Trades whose sale condition is in
`ohlc_exclude_conditions` count in volume and every other figure, but never set open/high/low/close
(the consolidated tape's "does not update last sale" rule).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable

from tradewatch.events import Trade

_SIZE = re.compile(r"^\s*(\d+)\s*([smhd])\s*$")
_UNIT_MS = {"s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}


def parse_size(text: str) -> int:
    """'1m' -> 60000 (milliseconds); units s, m, h, d."""
    match = _SIZE.match(text.lower())
    if not match or int(match.group(1)) == 0:
        raise ValueError(f"window size {text!r} is not like 30s, 1m, 5m, 1h or 1d")
    return int(match.group(1)) * _UNIT_MS[match.group(2)]


def size_label(size_ms: int) -> str:
    for unit in ("d", "h", "m", "s"):
        if size_ms % _UNIT_MS[unit] == 0:
            return f"{size_ms // _UNIT_MS[unit]}{unit}"
    raise ValueError(f"window size {size_ms} ms is not a whole number of seconds")


@dataclass(slots=True)
class Window:
    """Mergeable aggregate state of one symbol's window."""
    symbol: str
    size_ms: int
    start_ms: int
    partition: int = -1
    open: float | None = None
    open_key: tuple[int, int] | None = None   # (event ms, sequence) of the trade that set open
    close: float | None = None
    close_key: tuple[int, int] | None = None
    high: float | None = None
    low: float | None = None
    trade_count: int = 0
    sum_price: float = 0.0
    min_price: float = float("inf")
    max_price: float = float("-inf")
    sum_quantity: float = 0.0
    min_quantity: float = float("inf")
    max_quantity: float = float("-inf")
    traded_value: float = 0.0
    buy_volume: float = 0.0
    sell_volume: float = 0.0
    is_final: bool = False

    @property
    def end_ms(self) -> int:
        return self.start_ms + self.size_ms

    @property
    def vwap(self) -> float | None:
        return self.traded_value / self.sum_quantity if self.sum_quantity else None

    def add(self, trade: Trade, sequence: int, sets_price: bool = True) -> None:
        price, quantity = trade.price, trade.quantity
        self.trade_count += 1
        self.sum_price += price
        self.sum_quantity += quantity
        self.traded_value += price * quantity
        if price < self.min_price:
            self.min_price = price
        if price > self.max_price:
            self.max_price = price
        if quantity < self.min_quantity:
            self.min_quantity = quantity
        if quantity > self.max_quantity:
            self.max_quantity = quantity
        if trade.side == "buy":
            self.buy_volume += quantity
        elif trade.side == "sell":
            self.sell_volume += quantity
        if not sets_price:
            return
        key = (trade.timestamp_ms, sequence)
        if self.open_key is None or key < self.open_key:
            self.open, self.open_key = price, key
        if self.close_key is None or key > self.close_key:
            self.close, self.close_key = price, key
        if self.high is None or price > self.high:
            self.high = price
        if self.low is None or price < self.low:
            self.low = price


@dataclass(slots=True)
class LateTrade:
    trade_id: str
    symbol: str
    timestamp_ms: int
    size_ms: int
    window_start_ms: int
    watermark_ms: int
    reason: str = "late"       # late | clock_skew


@dataclass
class PartitionClock:
    """Watermark bookkeeping of one partition."""
    max_event_ms: int | None = None
    watermark_ms: int | None = None


@dataclass
class WindowSet:
    """All open windows of the symbols of one partition, for every configured size."""
    sizes_ms: tuple[int, ...]
    allowed_lateness_ms: int
    idle_timeout_s: float
    partition: int = -1
    ohlc_exclude_conditions: frozenset[str] = frozenset()
    max_skew_ms: int | None = None
    clock: PartitionClock = field(default_factory=PartitionClock)
    held: tuple[Trade, int] | None = None      # (trade, sequence) far ahead of event time, unconfirmed
    open_windows: dict[tuple[str, int, int], Window] = field(default_factory=dict)
    late: list[LateTrade] = field(default_factory=list)
    late_trades_total: int = 0

    def add(self, trade: Trade, sequence: int) -> list[Window]:
        """Take one trade; return the windows it changed (see the module's note on held trades)."""
        changed = []
        if self.held is not None:
            held, self.held = self.held, None
            if self._far_ahead(trade.timestamp_ms):
                changed = self._fold(*held)             # confirmed: event time really moved on
            else:
                self._report(held[0], "clock_skew")     # one bad clock: no window ever sees it
        if self._far_ahead(trade.timestamp_ms):
            self.held = (trade, sequence)
            return changed
        return changed + self._fold(trade, sequence)

    def _far_ahead(self, ts: int) -> bool:
        return (self.max_skew_ms is not None and self.clock.max_event_ms is not None
                and ts > self.clock.max_event_ms + self.max_skew_ms)

    def _report(self, trade: Trade, reason: str) -> None:
        watermark = self.clock.watermark_ms
        ts = trade.timestamp_ms
        for size in self.sizes_ms:
            self.late.append(LateTrade(trade.trade_id, trade.symbol, ts, size, ts - ts % size, watermark, reason))
            self.late_trades_total += 1

    def _fold(self, trade: Trade, sequence: int) -> list[Window]:
        ts = trade.timestamp_ms
        clock = self.clock
        watermark = clock.watermark_ms
        changed: list[Window] = []
        sets_price = trade.condition not in self.ohlc_exclude_conditions
        for size in self.sizes_ms:
            start = ts - ts % size
            if watermark is not None and start + size <= watermark:
                self.late.append(LateTrade(trade.trade_id, trade.symbol, ts, size, start, watermark))
                self.late_trades_total += 1
                continue
            key = (trade.symbol, size, start)
            window = self.open_windows.get(key)
            if window is None:
                window = self.open_windows[key] = Window(trade.symbol, size, start, self.partition)
            window.add(trade, sequence, sets_price)
            changed.append(window)
        if clock.max_event_ms is None or ts > clock.max_event_ms:
            clock.max_event_ms = ts
            candidate = ts - self.allowed_lateness_ms
            if clock.watermark_ms is None or candidate > clock.watermark_ms:
                clock.watermark_ms = candidate
        return changed

    def advance_when_idle(self, quiet_s: float) -> list[Window]:
        """After `idle_timeout` of quiet (`quiet_s`: seconds the partition has been confirmed to
        hold nothing more), fold a held trade in and let the watermark follow the wall clock.
        Returns the windows the held trade changed."""
        clock = self.clock
        if clock.max_event_ms is None or quiet_s < self.idle_timeout_s:
            return []
        changed = []
        if self.held is not None:
            held, self.held = self.held, None
            changed = self._fold(*held)
        candidate = clock.max_event_ms + int(quiet_s * 1000)
        if clock.watermark_ms is None or candidate > clock.watermark_ms:
            clock.watermark_ms = candidate
        return changed

    def pop_final(self) -> list[Window]:
        """Remove and return the windows the watermark has passed, in end order, marked final."""
        watermark = self.clock.watermark_ms
        if watermark is None:
            return []
        done = [w for w in self.open_windows.values() if w.end_ms <= watermark]
        done.sort(key=lambda w: (w.end_ms, w.symbol, w.size_ms))
        for window in done:
            window.is_final = True
            del self.open_windows[(window.symbol, window.size_ms, window.start_ms)]
        return done

    def take_late(self) -> list[LateTrade]:
        late, self.late = self.late, []
        return late


def aggregate(trades: Iterable[Trade], sizes_ms: tuple[int, ...], allowed_lateness_ms: int = 0,
              ohlc_exclude_conditions: frozenset[str] = frozenset(),
              max_skew_ms: int | None = None) -> tuple[list[Window], list[LateTrade]]:
    """Run a whole stream through one WindowSet (no idle closing); all windows, final or not."""
    windows = WindowSet(sizes_ms, allowed_lateness_ms, float("inf"), ohlc_exclude_conditions=ohlc_exclude_conditions,
                        max_skew_ms=max_skew_ms)
    result: dict[tuple[str, int, int], Window] = {}
    late: list[LateTrade] = []
    for sequence, trade in enumerate(trades):
        for window in windows.add(trade, sequence):
            result[(window.symbol, window.size_ms, window.start_ms)] = window
        windows.pop_final()
        late.extend(windows.take_late())
    return sorted(result.values(), key=lambda w: (w.symbol, w.size_ms, w.start_ms)), late
