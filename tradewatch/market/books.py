"""A simulated limit order book per symbol around a trade stream's quotes: `with_books(trades)`
yields book messages (tradewatch/book.py) and the trades, in event-time order, so that trades,
quotes and book agree.

Each symbol's book is a ladder of `depth` levels a side, one `step` apart from its touch: the
trade's own bid and ask (the simulator's quotes around its price path). Before each trade
  1. orders are added and cancelled on random levels (`noise` updates, closer to the touch more
     often, sizes around the symbol's median trade size) — what makes quotes outnumber trades;
  2. the ladder moves to the trade's bid and ask (levels that left it removed, new ones added),
     with enough size at the touch for the trade;
then the trade goes through at the touch (a buy at the ask, a sell at the bid) and an update takes
its size off that level. So every trade is at its moment's best bid or ask, and the book rebuilt
from the messages equals `books[symbol]` at every point. A snapshot opens each symbol's book and
is repeated every `snapshot_every_ms` of event time, as venues do, so a reader that joins late or
lost a message rebuilds it.

With `anomaly_rate`, before a trade a symbol with no episode running starts one with that
probability, its messages labelled in `injected_anomaly` (an `Episode` each in `episodes`):
  - spoofing (two in three): one to three large orders (10–25× the side's median level) on one side,
    2–4 levels from its touch, cancelled together in one update once the price comes within one
    level of them or after 1–6 s of event time;
  - quote stuffing: 500–1,500 updates that add and take back a small order on one level away from
    the touch, within the last 0.3–0.8 s before the trade (the book ends as it began).

Its own random numbers: the trades are the same with or without the book.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Iterable, Iterator

from tradewatch.book import SNAPSHOT_EVERY_MS, BookMessage, OrderBook, median_size
from tradewatch.events import Trade

TICK = 0.01                  # the simulator quotes in cents


def ladder_step(bid: float, ask: float) -> float:
    """Levels one tick apart, or a quarter of the spread on a wide one (BTC at 95,000: a spread of
    9.5 would otherwise put ten levels within 0.1 of the touch and move them all on every trade)."""
    return max(TICK, round((ask - bid) / 4 / TICK) * TICK)


@dataclass
class Episode:
    """An injected book anomaly: its kind (a BOOK_LABELS label), symbol and event-time span."""
    kind: str
    symbol: str
    first_ms: int
    last_ms: int


class _Ladder:
    def __init__(self, book: OrderBook, median: float, decimals: int):
        self.book, self.median, self.decimals = book, median, decimals   # sizes in the trades' units
        self.step = TICK
        self.next_snapshot_ms = 0
        self.spoof: _Spoof | None = None


@dataclass
class _Spoof:
    episode: Episode
    is_bid: bool
    added: dict[float, float]       # price -> the size the spoofer added there
    end_ms: int


def with_books(trades: Iterable[Trade], depth: int = 10, noise: float = 8.0, seed: int | None = None,
               snapshot_every_ms: int = SNAPSHOT_EVERY_MS, books: dict[str, OrderBook] | None = None,
               anomaly_rate: float = 0.0, episodes: list[Episode] | None = None) -> Iterator[Trade | BookMessage]:
    """The trades with their books' messages. Trades without a bid and ask pass through alone.
    `books` (optional): filled with each symbol's book as it stands, to compare with a reader's;
    `episodes` (optional): filled with the injected episodes as they end."""
    rng = random.Random(None if seed is None else seed + 7_919)
    injector = random.Random(None if seed is None else seed + 104_729)     # the book stays the same without
    episodes = [] if episodes is None else episodes
    ladders: dict[str, _Ladder] = {}
    books = {} if books is None else books
    last_ms = None
    for trade in trades:
        if trade.bid is None or trade.ask is None:
            yield trade
            continue
        ladder = ladders.get(trade.symbol)
        if ladder is None:
            book = books[trade.symbol] = OrderBook(trade.symbol, trade.exchange, seq=0, stale=False)
            ladder = ladders[trade.symbol] = _Ladder(book, trade.quantity, 0 if trade.quantity.is_integer() else 4)
        book = ladder.book
        ladder.median = 0.95 * ladder.median + 0.05 * trade.quantity
        start = trade.timestamp_ms if last_ms is None else min(last_ms, trade.timestamp_ms)
        count = _noise_count(rng, noise) if book.bids or book.asks else 0
        if ladder.spoof is not None and ladder.spoof.end_ms <= trade.timestamp_ms:    # its time is up
            start = max(start, ladder.spoof.end_ms)
            yield from _cancel_spoof(ladder, start, episodes)
        episode = None
        if ladder.spoof is None and anomaly_rate and book.bids and book.asks and injector.random() < anomaly_rate:
            episode = "spoofing" if injector.random() < 2 / 3 else "quote_stuffing"
        if episode == "quote_stuffing":         # instead of this trade's ordinary updates
            yield from _stuff(ladder, injector, start, trade.timestamp_ms, depth, episodes)
            count = 0
        for i in range(count):
            ms = start + (trade.timestamp_ms - start) * (i + 1) // (count + 1)
            yield _update(book, ms, *_noise(rng, ladder, depth))
        if ladder.spoof is not None and _spoof_ends(ladder.spoof, trade, depth):
            yield from _cancel_spoof(ladder, trade.timestamp_ms, episodes)
        changes = _align(book, ladder, trade, depth, rng)
        if trade.timestamp_ms >= ladder.next_snapshot_ms:
            _update(book, trade.timestamp_ms, *changes)       # not sent: the snapshot carries it
            ladder.next_snapshot_ms = trade.timestamp_ms + snapshot_every_ms
            yield book.snapshot()
        elif changes[0] or changes[1]:
            yield _update(book, trade.timestamp_ms, *changes)
        if episode == "spoofing":               # on the ladder as it stands for this trade
            yield _place_spoof(ladder, injector, trade.timestamp_ms)
        yield trade
        side, price = (book.asks, trade.ask) if trade.side == "buy" else (book.bids, trade.bid)
        left = side[price] - trade.quantity
        change = [(price, round(left, ladder.decimals) if left > 1e-9 else 0.0)]
        yield _update(book, trade.timestamp_ms, *((change, []) if side is book.bids else ([], change)))
        last_ms = trade.timestamp_ms


def _noise_count(rng: random.Random, mean: float) -> int:
    """A Poisson count with this mean (Knuth's method: means here are small)."""
    limit, k, p = math.exp(-mean), 0, rng.random()
    while p > limit:
        k += 1
        p *= rng.random()
    return k


def _noise(rng: random.Random, ladder: _Ladder, depth: int) -> tuple[list, list]:
    """An order added or (part of one) cancelled on a random level of one side."""
    book = ladder.book
    is_bid = rng.random() < 0.5
    side = book.bids if is_bid else book.asks
    if not side:
        return [], []
    touch = max(side) if is_bid else min(side)
    level = min(int(rng.expovariate(0.4)), depth - 1)
    price = round(touch - level * ladder.step if is_bid else touch + level * ladder.step, 8)
    size = side.get(price, 0.0)
    spoof = ladder.spoof
    mine = spoof.added.get(price, 0.0) if spoof is not None and spoof.is_bid == is_bid else 0.0
    if size > mine and rng.random() < 0.45:  # a cancel: never the whole touch (the ladder keeps its place)
        left = round(mine + (size - mine) * rng.uniform(0.2 if level == 0 else 0.0, 0.9), ladder.decimals)
        size = left if left > 0 or level else size     # (nor the spoofer's orders: theirs to cancel)
    else:
        size = round(size + ladder.median * rng.uniform(0.5, 3.0), ladder.decimals)
    change = [(price, size if size > 1e-9 else 0.0)]
    return (change, []) if is_bid else ([], change)


def _align(book: OrderBook, ladder: _Ladder, trade: Trade, depth: int, rng: random.Random) -> tuple[list, list]:
    """The changes that put the ladder on the trade's bid and ask, with enough size at the touch
    for the trade."""
    step = ladder.step = ladder_step(trade.bid, trade.ask)
    changes = ([], [])
    for k, (side, touch, sign) in enumerate(((book.bids, trade.bid, -1), (book.asks, trade.ask, 1))):
        wanted = [round(touch + sign * i * step, 8) for i in range(depth)]
        keep = set(wanted)
        for price in [p for p in side if p not in keep]:
            changes[k].append((price, 0.0))
        for i, price in enumerate(wanted):
            size = side.get(price, 0.0)
            need = trade.quantity if i == 0 and (trade.side == "buy") == (sign == 1) else 0.0
            if size <= need or size == 0.0:
                size = round(max(size, need) + ladder.median * rng.uniform(1.0, 4.0) * (1 + 0.3 * i) + 1,
                             ladder.decimals)
                changes[k].append((price, size))
    return changes


def _update(book: OrderBook, ms: int, bids: list, asks: list, label: str | None = None) -> BookMessage:
    m = BookMessage(book.symbol, book.exchange, ms, "update", book.seq + 1, bids, asks, prev_seq=book.seq,
                    injected_anomaly=label)
    book.apply(m)
    return m


def _place_spoof(ladder: _Ladder, rng: random.Random, ms: int) -> BookMessage:
    book = ladder.book
    is_bid = rng.random() < 0.5
    side = book.bids if is_bid else book.asks
    touch = max(side) if is_bid else min(side)
    typical = median_size(book.depth(10)[0 if is_bid else 1])
    layers = 1 if rng.random() < 0.5 else rng.randint(2, 3)
    added = {}
    for level in rng.sample((2, 3, 4), layers):
        price = round(touch - level * ladder.step if is_bid else touch + level * ladder.step, 8)
        added[price] = round(typical * rng.uniform(10, 25), ladder.decimals)
    change = [(p, round(side.get(p, 0.0) + size, ladder.decimals)) for p, size in added.items()]
    ladder.spoof = _Spoof(Episode("spoofing", book.symbol, ms, ms), is_bid, added, ms + int(rng.uniform(1000, 6000)))
    return _update(book, ms, *((change, []) if is_bid else ([], change)), label="spoofing")


def _spoof_ends(spoof: _Spoof, trade: Trade, depth: int) -> bool:
    """The spoofer pulls the orders once the price comes within a level of them, or before the
    ladder moves off their prices (its levels would take them away unseen)."""
    step = ladder_step(trade.bid, trade.ask)
    touch, sign = (trade.bid, -1) if spoof.is_bid else (trade.ask, 1)
    ladder = {round(touch + sign * i * step, 8) for i in range(2, depth)}
    return any(p not in ladder for p in spoof.added)


def _cancel_spoof(ladder: _Ladder, ms: int, episodes: list[Episode]) -> Iterator[BookMessage]:
    spoof, book = ladder.spoof, ladder.book
    ladder.spoof = None
    side = book.bids if spoof.is_bid else book.asks
    change = [(p, round(max(side[p] - size, 0.0), ladder.decimals)) for p, size in spoof.added.items() if p in side]
    spoof.episode.last_ms = ms
    episodes.append(spoof.episode)
    if change:          # (a level the ladder dropped took its order with it)
        yield _update(book, ms, *((change, []) if spoof.is_bid else ([], change)), label="spoofing")


def _stuff(ladder: _Ladder, rng: random.Random, start: int, ms: int, depth: int,
           episodes: list[Episode]) -> Iterator[BookMessage]:
    book = ladder.book
    is_bid = rng.random() < 0.5
    side = book.bids if is_bid else book.asks
    touch = max(side) if is_bid else min(side)
    price = round(touch - rng.randint(2, depth - 1) * ladder.step if is_bid
                  else touch + rng.randint(2, depth - 1) * ladder.step, 8)
    count = rng.randint(250, 750) * 2
    first = max(start, ms - int(rng.uniform(300, 800)))
    resting = side.get(price, 0.0)
    for i in range(count):
        size = round(resting + ladder.median, ladder.decimals) if i % 2 == 0 else resting
        change = [(price, size)]
        yield _update(book, first + (ms - first) * i // count, *((change, []) if is_bid else ([], change)),
                      label="quote_stuffing")
    episodes.append(Episode("quote_stuffing", book.symbol, first, first + (ms - first) * (count - 1) // count))
