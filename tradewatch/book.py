"""The order book: the book message (schema, validation) and a book built from those messages —
the one place that defines them. Pure code, no I/O.

Wire format (Kafka topic `quotes`, key = symbol, value = UTF-8 JSON object), schema_version 1:

    field             type                 rule
    schema_version    int                  must be 1
    symbol            string               as a trade's (1..20 of A-Z 0-9 . - _ / ^ =)
    exchange          string               1..16 printable ASCII characters
    timestamp_ms      int                  event time, as a trade's (the same clock-skew rule)
    type              string               "snapshot": the whole book (up to MAX_LEVELS a side);
                                           "update": only the levels that changed
    seq               int                  the book's sequence number after this message (0..2^63-1)
    prev_seq          int | null           an update's: the seq of the book it applies to (null for
                                           a snapshot). An update whose prev_seq is not the book's
                                           seq is a *gap*: the book is stale until the next snapshot.
    bids, asks        [[price, size], …]   price > 0 and <= 1e12, size >= 0 and <= 1e15; in an
                                           update a size of 0 removes the level. A snapshot's bids
                                           strictly descend, its asks strictly ascend, every size is
                                           > 0, and its best bid is below its best ask.
    injected_anomaly  string | null        ground truth of a simulated episode; never read by a
                                           detector

Venues number their book messages differently (Binance: first and last update id of a diff;
Coinbase: one sequence per message); the live feeds map theirs onto seq/prev_seq, so one check —
prev_seq == the book's seq — finds every gap. Unknown extra fields are ignored.
"""
from __future__ import annotations

import time
from typing import Annotated, Literal, NamedTuple

import msgspec

from tradewatch.events import (_EXCHANGE_PATTERN, _SYMBOL_PATTERN, EARLIEST_TIMESTAMP_MS, LATEST_TIMESTAMP_MS,
                               MAX_CLOCK_SKEW_MS, MAX_PRICE, MAX_QUANTITY)

SCHEMA_VERSION = 1
MAX_LEVELS = 1000                 # a side of a snapshot, and of a book held in memory
MAX_BOOK_BYTES = 64 * 1024
BOOK_LABELS = ("spoofing", "quote_stuffing")
MAX_SEQ = 2 ** 63 - 1
SNAPSHOT_EVERY_MS = 60_000        # a book sent whole again this often (event time), so a late reader rebuilds it

_Price = Annotated[float, msgspec.Meta(gt=0, le=MAX_PRICE)]
_Size = Annotated[float, msgspec.Meta(ge=0, le=MAX_QUANTITY)]
_Seq = Annotated[int, msgspec.Meta(ge=0, le=MAX_SEQ)]
_Levels = Annotated[list[tuple[_Price, _Size]], msgspec.Meta(max_length=MAX_LEVELS)]


class InvalidBook(ValueError):
    """A message that is not a valid book message; str(error) is the reason stored in dead_letters."""


class BookMessage(msgspec.Struct, frozen=True, gc=False):
    """One message of the `quotes` topic (the table above)."""
    symbol: Annotated[str, msgspec.Meta(pattern=_SYMBOL_PATTERN)]
    exchange: Annotated[str, msgspec.Meta(pattern=_EXCHANGE_PATTERN)]
    timestamp_ms: Annotated[int, msgspec.Meta(ge=EARLIEST_TIMESTAMP_MS, le=LATEST_TIMESTAMP_MS)]
    type: Literal["snapshot", "update"]
    seq: _Seq
    bids: _Levels = []
    asks: _Levels = []
    prev_seq: _Seq | None = None
    injected_anomaly: Literal["spoofing", "quote_stuffing"] | None = None
    schema_version: Literal[1] = SCHEMA_VERSION

    def to_json_bytes(self) -> bytes:
        return _encode(self)


_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(BookMessage).decode


def decode_book(raw: bytes | None, sent_ms: int | None = None, max_skew_ms: int = MAX_CLOCK_SKEW_MS) -> BookMessage:
    """Decode and validate one message value; raise InvalidBook with the reason. `sent_ms`: its Kafka
    record timestamp (None = now), which the clock-skew rule measures against, as for trades."""
    if raw is None:
        raise InvalidBook("empty message (null value)")
    if len(raw) > MAX_BOOK_BYTES:
        raise InvalidBook(f"payload of {len(raw)} bytes exceeds the {MAX_BOOK_BYTES}-byte limit")
    try:
        m = _decode(raw)
    except msgspec.ValidationError as error:
        raise InvalidBook(f"not a book message: {error}") from None
    except (msgspec.DecodeError, ValueError) as error:
        raise InvalidBook(f"not JSON: {error}") from None
    # (JSON has no NaN or Infinity, and a number too large for a double is out of range: every price
    # and size is finite once decoded)
    limit = (sent_ms if sent_ms is not None else int(time.time() * 1000)) + max_skew_ms
    if m.timestamp_ms > limit:
        raise InvalidBook(f"timestamp_ms {m.timestamp_ms} is {(m.timestamp_ms - limit + max_skew_ms) / 1000:g} s ahead "
                          f"of the time the message was sent; the clock-skew limit is {max_skew_ms / 1000:g} s "
                          "(MAX_CLOCK_SKEW_SECONDS)")
    if m.type == "update":
        if m.prev_seq is None:
            raise InvalidBook("an update needs prev_seq (the seq of the book it applies to)")
        if m.prev_seq >= m.seq:
            raise InvalidBook(f"an update's seq {m.seq} must be above its prev_seq {m.prev_seq}")
    else:
        _check_snapshot(m)
    return m


def _check_snapshot(m: BookMessage) -> None:
    for name, side, descending in (("bids", m.bids, True), ("asks", m.asks, False)):
        for i, (price, size) in enumerate(side):
            if size <= 0:
                raise InvalidBook(f"snapshot {name}[{i}] has size {size:g}: a snapshot lists only levels with size > 0")
            if i and (price >= side[i - 1][0] if descending else price <= side[i - 1][0]):
                raise InvalidBook(f"snapshot {name} must be strictly {'descending' if descending else 'ascending'}"
                                  f" in price: {side[i - 1][0]:g} then {price:g}")
    if m.bids and m.asks and m.bids[0][0] >= m.asks[0][0]:
        raise InvalidBook(f"snapshot is crossed: best bid {m.bids[0][0]:g} is not below best ask {m.asks[0][0]:g}")


class Top(NamedTuple):
    """The top of a book: the best bid and ask with their sizes (None: that side is empty). A
    tuple: the quotes stage builds and compares one for each message that reaches the touch."""
    bid: float | None
    bid_size: float | None
    ask: float | None
    ask_size: float | None

    @classmethod
    def of(cls, bids: list, asks: list) -> Top:
        """The top of levels listed best first ([price, size] each; an empty side has none)."""
        (bid, bid_size), (ask, ask_size) = (bids[0] if bids else (None, None)), (asks[0] if asks else (None, None))
        return cls(bid, bid_size, ask, ask_size)

    @property
    def spread(self) -> float | None:
        return None if self.bid is None or self.ask is None else self.ask - self.bid

    @property
    def mid(self) -> float | None:
        return None if self.bid is None or self.ask is None else (self.bid + self.ask) / 2


def imbalance(bids: list, asks: list) -> float | None:
    """(bid size − ask size) / (bid size + ask size) over the levels given ([price, size] each): +1 all
    bids, −1 all asks, None for an empty book."""
    b, a = sum(s for _, s in bids), sum(s for _, s in asks)
    return None if b + a == 0 else (b - a) / (b + a)


def median_size(levels: list) -> float | None:
    """The median size of the levels given ([price, size] each): a side's typical resting level,
    what a large order is measured against. None for no levels."""
    sizes = sorted(size for _, size in levels)
    if not sizes:
        return None
    mid = len(sizes) // 2
    return sizes[mid] if len(sizes) % 2 else (sizes[mid - 1] + sizes[mid]) / 2


class OrderBook:
    """One symbol's book, built from snapshots and updates. `apply` returns False for a message it
    could not apply (a gap: the book is then `stale` and applies nothing until the next snapshot,
    so a gap is never papered over). Each side holds at most MAX_LEVELS levels: past that the
    levels farthest from the touch go."""

    __slots__ = ("symbol", "exchange", "seq", "timestamp_ms", "stale", "bids", "asks", "gaps", "_top")

    def __init__(self, symbol: str, exchange: str = "", seq: int | None = None, timestamp_ms: int | None = None,
                 bids: dict[float, float] | None = None, asks: dict[float, float] | None = None,
                 stale: bool = True):
        self.symbol, self.exchange, self.seq, self.timestamp_ms = symbol, exchange, seq, timestamp_ms
        self.bids: dict[float, float] = bids or {}
        self.asks: dict[float, float] = asks or {}
        self.stale = stale        # no snapshot yet, or a gap since the last one
        self.gaps = 0
        self._top: Top | None = None      # cached; found again only after a change at or past the touch

    def apply(self, m: BookMessage) -> bool:
        if m.type == "snapshot":
            self.bids = {p: s for p, s in m.bids}
            self.asks = {p: s for p, s in m.asks}
            self.stale = False
            self._top = None
        elif self.stale:
            return False
        elif m.prev_seq != self.seq:
            self.gaps += 1
            self.stale = True
            return False
        else:
            top = self._top
            for levels, side, better in ((m.bids, self.bids, 1.0), (m.asks, self.asks, -1.0)):
                touch = None if top is None else (top.bid if better > 0 else top.ask)
                for price, size in levels:
                    if size > 0:
                        side[price] = size
                    else:
                        side.pop(price, None)
                    if touch is None or (price - touch) * better >= 0:
                        self._top = None          # at or past the touch: the top may have changed
            if len(self.bids) > MAX_LEVELS or len(self.asks) > MAX_LEVELS:
                self._trim()
        self.seq, self.timestamp_ms, self.exchange = m.seq, m.timestamp_ms, m.exchange
        return True

    def copy(self) -> OrderBook:
        """A copy that later messages to this book do not change."""
        book = OrderBook(self.symbol, self.exchange, self.seq, self.timestamp_ms, dict(self.bids), dict(self.asks),
                         self.stale)
        book.gaps, book._top = self.gaps, self._top
        return book

    def _trim(self) -> None:
        for side, worst in ((self.bids, min), (self.asks, max)):
            while len(side) > MAX_LEVELS:
                del side[worst(side)]

    def top(self) -> Top:
        if self._top is None:
            bid = max(self.bids) if self.bids else None
            ask = min(self.asks) if self.asks else None
            self._top = Top(bid, None if bid is None else self.bids[bid], ask, None if ask is None else self.asks[ask])
        return self._top

    def depth(self, n: int) -> tuple[list[tuple[float, float]], list[tuple[float, float]]]:
        """The best `n` levels of each side, best first: (bids, asks)."""
        bids = sorted(self.bids.items(), reverse=True)[:n]
        asks = sorted(self.asks.items())[:n]
        return bids, asks

    def snapshot(self, n: int = MAX_LEVELS) -> BookMessage:
        """The book as a snapshot message (its best `n` levels a side)."""
        bids, asks = self.depth(n)
        return BookMessage(self.symbol, self.exchange or "-", self.timestamp_ms or EARLIEST_TIMESTAMP_MS, "snapshot",
                           self.seq or 0, bids, asks)

    def imbalance(self, n: int = 10) -> float | None:
        """`imbalance` over the best `n` levels a side."""
        return imbalance(*self.depth(n))
