"""Surveillance on the order book: spoofing (and layering) and quote stuffing, from book messages
alone (tradewatch/book.py). Pure code, no I/O; detectors never read `injected_anomaly`.

    SPOOFING        an order at least SPOOF_SIZE_MULTIPLE × the side's typical resting level (the
                    median size of its best TYPICAL_LEVELS levels, without what the same message
                    added) placed within SPOOF_NEAR_LEVELS levels of its touch — together with the
                    side's other large orders, at least SPOOF_DEPTH_SHARE of the size on those
                    levels — then cancelled without trading within SPOOF_MAX_LIFE_S of event time.
                    "Without trading": it left while it was not the best level (a trade takes size
                    at the touch only; a sweep through it would also empty the levels in front of
                    it in the same message, which does not count as a cancel). Several such orders
                    on one side at once is layering: one alert names every layer. HIGH.
    QUOTE_STUFFING  a burst of book updates: at least STUFFING_MULTIPLE × what the symbol's own
                    decayed update rate (time constant STUFFING_TAU_S) expects in STUFFING_WINDOW_S,
                    and at least STUFFING_MIN_UPDATES; one alert a burst. MEDIUM.

Every threshold is in the book's own units: sizes against the symbol's resting levels, distances in
levels from its touch, rates against its own rate. Why each number:
  - 8× the typical level, and a third of the side's visible size: what a spoofer places is meant
    to change what the book looks like (its imbalance); one large order among many large levels
    does not. Refills of a simulated ladder after a move can pass 8× alone, not with the third.
  - within 5 levels: what a depth panel shows near the touch and what a trader reads as pressure;
    farther out an order is rarely seen and rarely meant to be.
  - 10 s: spoofing orders live seconds (cancelled as the price nears them, the order on the other
    side once filled); liquidity that rests longer is liquidity.
  - 20× the own rate in 1 s, at least 100 updates: 50 and 10× alerted on ordinary bursts of the
    simulator's busy seconds (many trades at once, each with its updates); 100 keeps a near-silent
    book, whose rate is tiny, from alerting on a handful. A venue stream that batches its changes
    (Binance's diff stream: at most 10 messages a second) cannot show stuffing at all.
The scores (tradewatch/detect/evaluate.py `score_book`) are in README.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import asdict, dataclass, field

from tradewatch.book import BookMessage, OrderBook, median_size
from tradewatch.detect.evidence import Evidence, num

SPOOF_SIZE_MULTIPLE = 8.0
SPOOF_DEPTH_SHARE = 1 / 3
SPOOF_NEAR_LEVELS = 5
SPOOF_MAX_LIFE_S = 10.0
TYPICAL_LEVELS = 10
TYPICAL_EVERY = 50               # book messages between two refreshes of the typical level size (and
                                 # before a large addition is judged)
MAX_WATCHED = 20                 # large orders followed per symbol (the oldest go first)
STUFFING_WINDOW_S = 1.0
STUFFING_TAU_S = 60.0
STUFFING_WARMUP_S = 10.0         # of a symbol's updates before its rate is a baseline
STUFFING_MULTIPLE = 20.0
STUFFING_MIN_UPDATES = 100
BUCKET_MS = 100                  # updates are counted in buckets: the window is ten of them
BOOK_TYPE_SEVERITY = {"SPOOFING": "HIGH", "QUOTE_STUFFING": "MEDIUM"}
PARAMS = {"spoof_size_multiple": SPOOF_SIZE_MULTIPLE, "spoof_depth_share": round(SPOOF_DEPTH_SHARE, 4),
          "spoof_near_levels": SPOOF_NEAR_LEVELS, "spoof_max_life_s": SPOOF_MAX_LIFE_S,
          "typical_levels": TYPICAL_LEVELS}
STUFFING_PARAMS = {"stuffing_window_s": STUFFING_WINDOW_S, "stuffing_tau_s": STUFFING_TAU_S,
                   "stuffing_warmup_s": STUFFING_WARMUP_S, "stuffing_multiple": STUFFING_MULTIPLE,
                   "stuffing_min_updates": STUFFING_MIN_UPDATES}


@dataclass(frozen=True)
class BookDetection:
    """One alert's worth: the message that completed the pattern and why."""
    kind: str                    # SPOOFING | QUOTE_STUFFING
    symbol: str
    timestamp_ms: int
    seq: int                     # the book message that fired
    evidence: Evidence

    @property
    def severity(self) -> str:
        return BOOK_TYPE_SEVERITY[self.kind]


@dataclass
class _Order:
    """A large addition to one level, followed until it leaves or grows old."""
    side: str                    # "bid" | "ask"
    price: float
    added: float                 # the size added
    before: float                # the level's size before it
    placed_ms: int
    placed_seq: int
    level: int                   # levels from the touch when placed (0 = the touch)
    typical: float


@dataclass
class _Symbol:
    typical: dict = field(default_factory=lambda: {"bid": None, "ask": None})
    since_typical: int = TYPICAL_EVERY
    orders: deque = field(default_factory=lambda: deque(maxlen=MAX_WATCHED))
    first_ms: int | None = None                     # its first update
    bucket_ms: int = 0                              # the newest BUCKET_MS of updates: its start, its count
    bucket_n: int = 0
    window: deque = field(default_factory=deque)    # the buckets before it in the window: (start, count)
    in_window: int = 0                              # updates in the window (those buckets and the newest)
    decayed: float = 0.0                            # the count of updates before the window, decayed
    decayed_ms: int | None = None
    in_burst: bool = False                          # one stuffing alert per burst
    floor_of: int | None = None                     # the bucket `floor` is for (a cache, not exported):
    floor: float = 0.0                              # the lowest line of any message in that bucket


_SCALARS = ("since_typical", "first_ms", "bucket_ms", "bucket_n", "in_window", "decayed", "decayed_ms", "in_burst")


def level_changes(book: OrderBook, m: BookMessage) -> list[tuple[str, float, float, float]]:
    """(side, price, size before, size after) of each level an update changes, read from the book
    before the update is applied; [] for a snapshot (it replaces the book: nothing was placed)."""
    if m.type != "update":
        return []
    changes = []
    get = book.bids.get
    for price, size in m.bids:
        before = get(price, 0.0)
        if before != size:
            changes.append(("bid", price, before, size))
    get = book.asks.get
    for price, size in m.asks:
        before = get(price, 0.0)
        if before != size:
            changes.append(("ask", price, before, size))
    return changes


def _depth_size(book: OrderBook, side: str) -> float:
    """The size resting on the best TYPICAL_LEVELS levels of one side."""
    return sum(size for _, size in book.depth(TYPICAL_LEVELS)[0 if side == "bid" else 1])


def _level_of(book: OrderBook, side: str, price: float) -> int:
    """How many levels of the side are better than `price` (0: it is the touch or better)."""
    return sum(1 for p in book.bids if p > price) if side == "bid" else sum(1 for p in book.asks if p < price)


class BookWatch:
    """Every symbol's watch: `apply` each message to its book through it (or call `observe` after
    applying one, with the changes `level_changes` read before)."""

    def __init__(self):
        self.symbols: dict[str, _Symbol] = {}

    def forget(self, symbols) -> None:
        for symbol in symbols:
            self.symbols.pop(symbol, None)

    def export(self, symbol: str) -> dict | None:
        """A symbol's watch as plain JSON data, for the quotes stage's checkpoint (None: not watched)."""
        s = self.symbols.get(symbol)
        if s is None:
            return None
        return {**{k: getattr(s, k) for k in _SCALARS}, "typical": dict(s.typical),
                "orders": [asdict(o) for o in s.orders], "window": [list(b) for b in s.window]}

    def restore(self, symbol: str, data: dict | None) -> None:
        """A symbol's watch as `export` gave it: what follows is watched as if it had never stopped."""
        if data is None:
            self.symbols.pop(symbol, None)
            return
        s = self.symbols[symbol] = _Symbol(**{k: data[k] for k in _SCALARS})
        s.typical = dict(data["typical"])
        s.orders.extend(_Order(**o) for o in data["orders"])
        s.window.extend(tuple(b) for b in data["window"])

    def apply(self, book: OrderBook, m: BookMessage) -> tuple[bool, list[BookDetection]]:
        """Apply a message to its book and watch it: (applied, what it completed). A message the
        book could not apply (a gap, or the book is stale) is not watched."""
        changes = level_changes(book, m)
        if not book.apply(m):
            return False, []
        return True, self.observe(book, m, changes)

    def observe(self, book: OrderBook, m: BookMessage,
                changes: list[tuple[str, float, float, float]]) -> list[BookDetection]:
        s = self.symbols.get(m.symbol)
        if s is None:
            s = self.symbols[m.symbol] = _Symbol()
        s.since_typical += 1
        if m.type == "snapshot" or s.since_typical >= TYPICAL_EVERY:
            self._refresh(s, book)
        if m.type == "snapshot":
            s.orders.clear()          # a new book: what was followed may be gone unseen
            return []
        # the usual message, inline (a few microseconds a message are the stage's budget): in the
        # newest bucket under every stuffing line, nothing followed and nothing large added
        if s.first_ms is not None and m.timestamp_ms < s.bucket_ms + BUCKET_MS \
                and s.in_window + 1 < STUFFING_MIN_UPDATES:
            s.bucket_n += 1
            s.in_window += 1
            s.in_burst = False
            stuffing = None
        else:
            stuffing = self._count(s, m)
        if not s.orders and not self._large(s, changes):
            return [] if stuffing is None else [stuffing]
        spoof = self._orders(s, book, m, changes)
        return [d for d in (stuffing, spoof) if d is not None]

    @staticmethod
    def _large(s: _Symbol, changes) -> bool:
        """Whether a change adds at least SPOOF_SIZE_MULTIPLE × its side's typical level."""
        if not changes:
            return False
        bid = SPOOF_SIZE_MULTIPLE * (s.typical["bid"] or math.inf)
        ask = SPOOF_SIZE_MULTIPLE * (s.typical["ask"] or math.inf)
        for side, _, before, after in changes:      # (a loop: a generator costs more than the test)
            if after - before >= (bid if side == "bid" else ask):
                return True
        return False

    @staticmethod
    def _refresh(s: _Symbol, book: OrderBook, changed: set = frozenset(), side: str | None = None) -> None:
        bids, asks = book.depth(TYPICAL_LEVELS + len(changed))
        for name, levels in (("bid", bids), ("ask", asks)):
            if side in (None, name):
                s.typical[name] = median_size([lv for lv in levels if lv[0] not in changed][:TYPICAL_LEVELS])
        if side is None:
            s.since_typical = 0

    # -- spoofing ---------------------------------------------------------------------------------
    def _orders(self, s: _Symbol, book: OrderBook, m: BookMessage, changes) -> BookDetection | None:
        ms = m.timestamp_ms
        while s.orders and ms - s.orders[0].placed_ms > SPOOF_MAX_LIFE_S * 1000:
            s.orders.popleft()
        if not s.orders and not self._large(s, changes):        # nothing followed, nothing large added
            return None
        cancelled, placed = [], []
        emptied = {side for side, price, before, after in changes if after == 0.0}
        orders = s.orders
        for side, price, before, after in changes:
            order = next((o for o in orders if o.side == side and o.price == price), None) if orders else None
            if order is not None and after < before:
                if after <= order.before + 0.2 * order.added:     # most of it left
                    s.orders.remove(order)
                    level = _level_of(book, side, price)
                    # not at the touch when it left, and nothing in front of it swept in the same message
                    if level > 0 and not (side in emptied and self._front_emptied(changes, side, price)):
                        cancelled.append((order, level))
                continue
            if s.typical[side] and after - before >= SPOOF_SIZE_MULTIPLE * s.typical[side]:
                # a candidate: measured against the book as it is now, without what this message added
                self._refresh(s, book, {p for d, p, _, _ in changes if d == side}, side)
            typical = s.typical[side]
            if typical and after - before >= SPOOF_SIZE_MULTIPLE * typical:
                level = _level_of(book, side, price)
                if level < SPOOF_NEAR_LEVELS:
                    placed.append(_Order(side, price, after - before, before, ms, m.seq, level, typical))
        for side in {o.side for o in placed}:
            # large enough together (with those already resting) to change what the side looks like
            new = [o for o in placed if o.side == side]
            together = sum(o.added for o in new) + sum(o.added for o in s.orders if o.side == side)
            if together >= SPOOF_DEPTH_SHARE * _depth_size(book, side):
                s.orders.extend(new)
        if not cancelled:
            return None
        side = cancelled[0][0].side
        layers = [o for o, _ in cancelled if o.side == side]
        resting = [o for o in s.orders if o.side == side]     # layers not cancelled yet
        return BookDetection("SPOOFING", m.symbol, ms, m.seq, _spoof_evidence(m, layers, cancelled[0][1], resting))

    @staticmethod
    def _front_emptied(changes, side: str, price: float) -> bool:
        better = (lambda p: p > price) if side == "bid" else (lambda p: p < price)
        return any(s == side and after == 0.0 and better(p) for s, p, _, after in changes)

    # -- quote stuffing ---------------------------------------------------------------------------
    def _count(self, s: _Symbol, m: BookMessage) -> BookDetection | None:
        ms = m.timestamp_ms
        bucket = ms // BUCKET_MS * BUCKET_MS
        if s.first_ms is None:
            s.first_ms, s.bucket_ms = ms, bucket
        elif bucket > s.bucket_ms:              # (a message a little back in time counts in the newest)
            s.window.append((s.bucket_ms, s.bucket_n))
            s.bucket_ms, s.bucket_n = bucket, 0
            while s.window and s.window[0][0] <= bucket - STUFFING_WINDOW_S * 1000:
                start, n = s.window.popleft()   # the baseline is what came before the window
                s.in_window -= n
                _count_out(s, start, n)
        s.bucket_n += 1
        s.in_window += 1
        count = s.in_window
        if count < STUFFING_MIN_UPDATES:        # under every line (the usual case: nothing to work out)
            s.in_burst = False
            return None
        if not s.in_burst:
            # a busy symbol is over STUFFING_MIN_UPDATES all the time: below the line the latest
            # moment of the bucket has (the lowest: the expected count only decays), it is below
            # its own, worked out once a bucket
            if s.floor_of != s.bucket_ms:
                s.floor_of = s.bucket_ms
                s.floor = max(STUFFING_MULTIPLE * _expected(s, s.bucket_ms + BUCKET_MS - 1, s.bucket_ms),
                              STUFFING_MIN_UPDATES)
            if count < s.floor:
                return None
        expected = _expected(s, ms, bucket)
        line = max(STUFFING_MULTIPLE * expected, STUFFING_MIN_UPDATES)
        if s.in_burst and count < line / 2:     # the burst is over
            s.in_burst = False
        if ms - s.first_ms < STUFFING_WARMUP_S * 1000 or s.in_burst or count < line:
            return None
        s.in_burst = True
        sentence = (f"{count} book updates in {STUFFING_WINDOW_S:g} s, {count / max(expected, 1e-9):.0f}× the "
                    f"{expected:.1f} the symbol's own rate expects (threshold {STUFFING_MULTIPLE:g}× and at least "
                    f"{STUFFING_MIN_UPDATES})")
        evidence = Evidence("QUOTE_STUFFING", dict(STUFFING_PARAMS), "updates", count, expected,
                            f"the updates the symbol's decayed rate (time constant {STUFFING_TAU_S:g} s) expects in "
                            f"{STUFFING_WINDOW_S:g} s", count / max(expected, 1e-9), STUFFING_MULTIPLE,
                            f"{STUFFING_MULTIPLE:g} × the expected count, at least {STUFFING_MIN_UPDATES} updates",
                            "x", sentence, _messages(m, s.window[0][0] if s.window else s.bucket_ms, count))
        return BookDetection("QUOTE_STUFFING", m.symbol, ms, m.seq, evidence)


def _expected(s: _Symbol, ms: int, bucket: int) -> float:
    """The updates a symbol's own rate expects in STUFFING_WINDOW_S, at `ms` (in `bucket`)."""
    seen_s = (bucket - s.first_ms) / 1000 - STUFFING_WINDOW_S      # the time the decayed count covers
    if s.decayed_ms is None or seen_s <= 0:
        return 0.0
    # a decayed count started at zero, divided by the time it has seen (at most one time
    # constant's worth): the symbol's own rate from its first seconds on
    covered = STUFFING_TAU_S * (1 - math.exp(-seen_s / STUFFING_TAU_S))
    return s.decayed * math.exp(-max(ms - s.decayed_ms, 0) / 1000 / STUFFING_TAU_S) / covered * STUFFING_WINDOW_S


def _count_out(s: _Symbol, ms: int, n: int) -> None:
    if s.decayed_ms is not None:
        s.decayed *= math.exp(-max(ms - s.decayed_ms, 0) / 1000 / STUFFING_TAU_S)
    s.decayed += n
    s.decayed_ms = ms if s.decayed_ms is None else max(ms, s.decayed_ms)


def _messages(m: BookMessage, first_ms: int, count: int) -> dict:
    """The book messages that made an alert, by time range and count (`trade_id`: the one that fired)."""
    return {"trade_id": f"{m.symbol}@{m.seq}", "ids": [], "count": count, "first_ms": first_ms,
            "last_ms": m.timestamp_ms}


def _spoof_evidence(m: BookMessage, layers: list[_Order], level_now: int, resting: list[_Order]) -> Evidence:
    first = layers[0]
    size = sum(o.added for o in layers)
    life_s = (m.timestamp_ms - min(o.placed_ms for o in layers)) / 1000
    where = ", ".join(f"{num(o.added)} at {num(o.price)} ({o.level} levels from the touch)" for o in layers)
    layering = f"layering: {len(layers)} levels at once; " if len(layers) > 1 else ""
    still = f"; {len(resting)} more large {first.side} orders still resting" if resting else ""
    sentence = (f"{layering}{first.side} {where} cancelled without trading after {life_s:.1f} s; "
                f"{first.added / first.typical:.0f}× the side's typical level of {num(first.typical)} "
                f"(median of its best {TYPICAL_LEVELS}; threshold {SPOOF_SIZE_MULTIPLE:g}×), "
                f"{level_now} levels from the touch when cancelled{still}")
    return Evidence("SPOOFING", dict(PARAMS), "size", first.added, first.typical,
                    f"the median size of the {first.side} side's best {TYPICAL_LEVELS} levels",
                    first.added / first.typical, SPOOF_SIZE_MULTIPLE,
                    f"{SPOOF_SIZE_MULTIPLE:g} × the typical level, within {SPOOF_NEAR_LEVELS} levels of the touch, "
                    f"with the side's other large orders at least {SPOOF_DEPTH_SHARE:.0%} of its best "
                    f"{TYPICAL_LEVELS} levels, cancelled within {SPOOF_MAX_LIFE_S:g} s", "x", sentence,
                    _messages(m, min(o.placed_ms for o in layers), len({o.placed_seq for o in layers}) + 1),
                    level=first.price, extra={"side": first.side, "layers": len(layers), "total_size": size,
                                              "life_s": life_s, "placed_seq": first.placed_seq,
                                              "levels_from_touch_placed": [o.level for o in layers],
                                              "levels_from_touch_cancelled": level_now,
                                              "prices": [o.price for o in layers]})
