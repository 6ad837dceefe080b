"""Live order books from the venues' public book streams, for `producer.py --live <venue> --book`.

    binance   stream `<symbol>@depth@100ms` (changed levels, every 100 ms) and the REST snapshot
              GET /api/v3/depth?symbol=<SYMBOL>&limit=100 it must be joined to
    coinbase  channel `level2_batch`: a `snapshot` on subscribing, then `l2update` changes

Each venue's book is rebuilt here as the venue documents it and sent on as our book messages
(tradewatch/book.py): a snapshot, then updates whose prev_seq is the seq of the book they change.

Binance (spot): a symbol's diffs are buffered until its REST snapshot is in (fetched by LiveFeed
once the first diff arrived). Then a diff whose last id u is at or below the book's id is old and
dropped; one whose range [U, u] holds the book's id + 1 is applied (seq = u, prev_seq = the book's
id); one that starts past it is a *gap* — counted (tradewatch_live_book_gaps_total), logged, and the
book fetched again, never papered over. (Right after a snapshot that is older than the stream the
same jump only means "fetch again"; it is not counted.) The snapshot holds the best
SNAPSHOT_LEVELS levels a side (Binance's request weight grows with the limit); levels past them
are known once they change, as Binance says of its own snapshots.

Coinbase: `level2_batch` carries no sequence numbers, so a lost change cannot be seen; our seq
counts the messages of each book. A dropped connection subscribes again and gets a new snapshot,
which replaces the book.

Every SNAPSHOT_EVERY_MS of event time a symbol's book is sent whole again, as the simulator does,
so a reader that joins late rebuilds it.
"""
from __future__ import annotations

import logging
import math
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime

from tradewatch.book import SNAPSHOT_EVERY_MS, BookMessage, OrderBook
from tradewatch.prometheus import LIVE_BOOK_GAPS, LIVE_BOOK_MESSAGES, LIVE_BOOK_SNAPSHOTS

log = logging.getLogger("tradewatch.live")

SNAPSHOT_LEVELS = 100            # a side, of a venue snapshot asked for and of one we send
BUFFER = 1_000                   # diffs held a symbol while its snapshot is fetched (older ones go)


class Malformed(ValueError):
    """A book message this adapter cannot read (live.py logs it once per kind and counts it)."""


def levels(raw: object, name: str) -> list[tuple[float, float]]:
    """A venue's [[price, size, …], …] as floats: price finite and > 0, size finite and >= 0."""
    if not isinstance(raw, list):
        raise Malformed(f"{name} is not a list of levels")
    out = []
    for level in raw:
        try:
            price, size = float(level[0]), float(level[1])
        except (TypeError, ValueError, IndexError, KeyError):
            raise Malformed(f"{name} holds a level without a readable price and size") from None
        if not (math.isfinite(price) and math.isfinite(size)) or price <= 0 or size < 0:
            raise Malformed(f"{name} holds a level with a price <= 0 or a size < 0 (or not finite)")
        out.append((price, size))
    return out


def iso_ms(text: str) -> int:
    """'2014-11-07T08:19:27.028459Z' -> milliseconds since the epoch (microseconds dropped)."""
    when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if when.tzinfo is None:
        raise ValueError("time without a zone")
    return int(when.replace(microsecond=0).timestamp()) * 1000 + when.microsecond // 1000


def _book(symbol: str, exchange: str, seq: int, time_ms: int, bids: list, asks: list) -> OrderBook:
    return OrderBook(symbol, exchange, seq, time_ms, {p: s for p, s in bids if s > 0},
                     {p: s for p, s in asks if s > 0}, stale=False)


class _Books:
    """What both venues share: the books, the message that changes one, the periodic snapshot."""

    def __init__(self, venue: str, exchange: str, subscribed: frozenset[str]):
        self.venue, self.exchange, self.subscribed = venue, exchange, subscribed
        self.next_snapshot_ms: dict[str, int] = {}

    def _check(self, symbol: str) -> None:
        """Books are held for the subscribed symbols only: a venue cannot make this grow without bound."""
        if symbol.upper() not in self.subscribed:
            raise Malformed("book message for a symbol not subscribed to")

    def wanted(self) -> list[str]:
        """Venue symbols whose book must be fetched (over REST) before it goes on."""
        return []

    def _snapshot(self, book: OrderBook) -> BookMessage:
        self.next_snapshot_ms[book.symbol] = (book.timestamp_ms or 0) + SNAPSHOT_EVERY_MS
        LIVE_BOOK_MESSAGES.labels(self.venue).inc()
        return book.snapshot(SNAPSHOT_LEVELS)

    def _update(self, book: OrderBook, seq: int, time_ms: int, bids: list, asks: list) -> list[BookMessage]:
        m = BookMessage(book.symbol, self.exchange, time_ms, "update", seq, bids, asks, prev_seq=book.seq)
        book.apply(m)
        LIVE_BOOK_MESSAGES.labels(self.venue).inc()
        if time_ms >= self.next_snapshot_ms.get(book.symbol, 0):
            top = book.top()
            if top.bid is None or top.ask is None or top.bid < top.ask:
                return [m, self._snapshot(book)]
        return [m]


# --------------------------------------------------------------------------------- Binance

@dataclass(frozen=True, slots=True)
class Diff:
    """One `depthUpdate` event: the levels that changed between update ids `first` (U) and `last` (u)."""
    venue_symbol: str
    first: int
    last: int
    time_ms: int
    bids: list
    asks: list


def binance_diff(message: dict) -> Diff:
    try:
        symbol, first, last, time_ms = message["s"], message["U"], message["u"], message["E"]
    except KeyError as error:
        raise Malformed(f"depthUpdate without {error}") from None
    if not (isinstance(symbol, str) and all(isinstance(v, int) and v >= 0 for v in (first, last, time_ms))
            and first <= last):
        raise Malformed("depthUpdate with a malformed s, U, u or E")
    return Diff(symbol, first, last, time_ms, levels(message.get("b"), "b"), levels(message.get("a"), "a"))


@dataclass
class _Sync:
    book: OrderBook | None = None                  # None: waiting for a snapshot
    fresh: bool = False                            # no diff applied since the snapshot
    buffer: deque = field(default_factory=lambda: deque(maxlen=BUFFER))
    retry_at: float = 0.0                          # monotonic: when a failed fetch may be tried again


class BinanceBooks(_Books):
    def __init__(self, symbol_of, subscribed: frozenset[str] = frozenset()):
        super().__init__("binance", "BINANCE", subscribed)
        self.symbol_of = symbol_of                 # BTCUSDT -> BTC-USDT
        self.syncs: dict[str, _Sync] = {}

    def reset(self) -> None:
        """A new connection: every book is fetched again."""
        self.syncs.clear()

    def wanted(self) -> list[str]:
        """Venue symbols whose snapshot is due: diffs are buffered and no fetch failed just now."""
        now = time.monotonic()
        return [s for s, sync in self.syncs.items() if sync.book is None and sync.buffer and sync.retry_at <= now]

    def take(self, message: dict) -> list[BookMessage] | None:
        """The book messages a venue message makes; None: it is no book message (a trade, …)."""
        if "data" in message and "stream" in message:           # a combined stream's wrapper
            message = message["data"]
        if not isinstance(message, dict) or message.get("e") != "depthUpdate":
            return None
        return self.diff(binance_diff(message))

    def failed(self, venue_symbol: str, delay_s: float) -> None:
        self.syncs[venue_symbol].retry_at = time.monotonic() + delay_s

    def diff(self, d: Diff) -> list[BookMessage]:
        self._check(d.venue_symbol)
        sync = self.syncs.setdefault(d.venue_symbol, _Sync())
        book = sync.book
        if book is None:
            sync.buffer.append(d)
            return []
        if d.last <= book.seq:
            return []                              # already in the book
        if d.first > book.seq + 1:
            if not sync.fresh:
                LIVE_BOOK_GAPS.labels(self.venue, d.venue_symbol).inc()
                log.warning("binance %s: book update ids jump from %d to %d — %d update(s) missed; fetching the "
                            "book again", d.venue_symbol, book.seq, d.first, d.first - book.seq - 1)
            sync.book = None
            sync.buffer.append(d)
            return []
        sync.fresh = False
        return self._update(book, d.last, d.time_ms, d.bids, d.asks)

    def snapshot(self, venue_symbol: str, answer: object) -> list[BookMessage]:
        """The REST answer {"lastUpdateId", "bids", "asks"}: the book, then the buffered diffs after it."""
        if not isinstance(answer, dict) or not isinstance(answer.get("lastUpdateId"), int):
            raise Malformed("depth snapshot without an integer lastUpdateId")
        bids, asks = levels(answer.get("bids"), "bids"), levels(answer.get("asks"), "asks")
        sync = self.syncs.setdefault(venue_symbol, _Sync())
        pending = list(sync.buffer)
        sync.buffer.clear()
        time_ms = pending[-1].time_ms if pending else int(time.time() * 1000)
        sync.book = _book(self.symbol_of(venue_symbol), self.exchange, answer["lastUpdateId"], time_ms, bids, asks)
        sync.fresh = True
        LIVE_BOOK_SNAPSHOTS.labels(self.venue).inc()
        out = [self._snapshot(sync.book)]
        for d in pending:
            out += self.diff(d)
        return out


# -------------------------------------------------------------------------------- Coinbase

class CoinbaseBooks(_Books):
    def __init__(self, subscribed: frozenset[str] = frozenset()):
        super().__init__("coinbase", "COINBASE", subscribed)
        self.books: dict[str, OrderBook] = {}
        self.synced: set[str] = set()              # products whose snapshot came on this connection
        self.last_time_ms: int | None = None       # of the newest venue message on this connection

    def reset(self) -> None:
        """A new connection: its snapshot replaces each book (until then nothing is applied; the
        seq goes on, so a reader sees one sequence per book)."""
        self.synced.clear()
        self.last_time_ms = None

    def take(self, message: dict) -> list[BookMessage] | None:
        """The book messages a venue message makes; None: it is no book message (a match, …)."""
        kind = message.get("type")
        time_ms = None
        if isinstance(message.get("time"), str):
            try:
                time_ms = self.last_time_ms = iso_ms(message["time"])
            except ValueError:
                if kind in ("snapshot", "l2update"):
                    raise Malformed(f"{kind} with an unreadable time") from None
        if kind not in ("snapshot", "l2update"):
            return None
        return self._message(message, time_ms)

    def _message(self, message: dict, time_ms: int | None) -> list[BookMessage]:
        product = message.get("product_id")
        if not isinstance(product, str):
            raise Malformed(f"{message.get('type')} without a product_id")
        self._check(product)
        if message["type"] == "snapshot":
            old = self.books.get(product)
            seq = 1 if old is None else old.seq + 1
            when = time_ms or self.last_time_ms or int(time.time() * 1000)
            book = self.books[product] = _book(product.upper(), self.exchange, seq, when,
                                               levels(message.get("bids"), "bids"), levels(message.get("asks"), "asks"))
            self.synced.add(product)
            LIVE_BOOK_SNAPSHOTS.labels(self.venue).inc()
            return [self._snapshot(book)]
        book = self.books.get(product)
        changes = message.get("changes")
        if not isinstance(changes, list) or not all(isinstance(c, list) and len(c) == 3 for c in changes):
            raise Malformed("l2update without [side, price, size] changes")
        if product not in self.synced:
            return []                              # before this connection's snapshot
        bids = levels([c[1:] for c in changes if c[0] == "buy"], "changes")
        asks = levels([c[1:] for c in changes if c[0] == "sell"], "changes")
        if len(bids) + len(asks) != len(changes):
            raise Malformed("l2update with a side other than buy or sell")
        return self._update(book, book.seq + 1, time_ms or self.last_time_ms or book.timestamp_ms, bids, asks)
