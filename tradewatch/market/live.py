"""Live trades from exchanges' public WebSocket trade streams (no API key), for `producer.py --live`.

    coinbase  Coinbase Exchange, channel `matches`   wss://ws-feed.exchange.coinbase.com
    binance   Binance Spot, streams `<symbol>@trade` wss://stream.binance.com:9443/ws

Each venue is a subscription message and a mapping from its trade message to our Trade event:
the venue's trade id (with a venue and symbol prefix) as trade_id, the venue's trade time as event
time, the taker's side as side, the symbol in our form (BTC-USD, BTC-USDT). `LiveFeed` runs the
WebSocket client (the `websockets` library) on its own thread and yields trades: it reconnects with
exponential backoff and jitter and subscribes again; pings are answered by the library; per symbol
it drops trade ids it has seen (a venue repeats recent trades after a reconnect) and reports gaps in
the id sequence (logged, counted); a message of an unexpected shape is logged once per kind with a
sample, counted and skipped. Its metrics (tradewatch_live_*, tradewatch/prometheus.py) are served by
producer.py on PRODUCER_METRICS_PORT. With `book=True` it also subscribes to the venue's book stream
and yields its book messages (tradewatch/market/live_books.py).
"""
from __future__ import annotations

import asyncio
import logging
import math
import queue
import random
import threading
from dataclasses import dataclass
from typing import Callable, Iterator
from urllib.parse import urlsplit
from urllib.request import urlopen

import orjson
from tradewatch.book import BookMessage
from tradewatch.events import Trade
from tradewatch.market.live_books import SNAPSHOT_LEVELS, BinanceBooks, CoinbaseBooks, Malformed, iso_ms
from tradewatch.prometheus import (LIVE_DUPLICATES as DUPLICATES, LIVE_GAPS as GAPS, LIVE_MISSING as MISSING,
                                LIVE_RECONNECTS as RECONNECTS, LIVE_TRADES as TRADES, LIVE_UNEXPECTED as UNEXPECTED)

log = logging.getLogger("tradewatch.live")



class FeedFailed(RuntimeError):
    """The feed cannot go on (an endpoint that is no WebSocket URL, or a fault in the client)."""


class Unexpected(ValueError):
    """A message this adapter does not understand; `kind` names it for a log-once rule."""

    def __init__(self, kind: str):
        super().__init__(kind)
        self.kind = kind


@dataclass(frozen=True)
class VenueTrade:
    """A trade as the venue numbers it: the venue's symbol and its integer trade id."""
    venue_symbol: str
    sequence: int
    trade: Trade


# --------------------------------------------------------------------------------- Coinbase

def coinbase_subscribe(symbols: list[str], book: bool = False) -> list[str]:
    channels = ["matches", "heartbeat"] + (["level2_batch"] if book else [])
    return [orjson.dumps({"type": "subscribe", "product_ids": symbols, "channels": channels}).decode()]


def coinbase_trade(message: dict) -> VenueTrade | None:
    """A `match` (or `last_match`, sent once after subscribing) message; None for the channel's
    other messages (subscriptions, heartbeat). Coinbase's `side` is the maker order's side: the
    taker bought when the maker sold."""
    kind = message.get("type")
    if kind in ("subscriptions", "heartbeat"):
        return None
    if kind == "error":
        raise Unexpected(f"error from the venue: {message.get('message')} {message.get('reason', '')}".strip())
    if kind not in ("match", "last_match"):
        raise Unexpected(f"type {kind!r}")
    try:
        product, trade_id, maker_side = message["product_id"], message["trade_id"], message["side"]
        if not isinstance(trade_id, int) or maker_side not in ("buy", "sell") or not isinstance(product, str):
            raise Unexpected("match with a malformed trade_id, side or product_id")
        time_ms = iso_ms(message["time"])
        price, size = _positive(message["price"]), _positive(message["size"])
    except Unexpected:
        raise
    except (KeyError, TypeError, ValueError) as error:
        raise Unexpected(f"match without a readable {error}") from None
    return VenueTrade(product, trade_id, Trade(
        trade_id=f"coinbase:{product}:{trade_id}", symbol=product.upper(), timestamp_ms=time_ms, price=price,
        quantity=size, side="sell" if maker_side == "buy" else "buy", exchange="COINBASE"))


def _positive(text: object) -> float:
    """A venue's price or size: a finite number above 0 ("NaN", "inf" or "0" is a malformed trade)."""
    value = float(text)
    if not math.isfinite(value) or value <= 0:
        raise Unexpected("trade with a price or size that is not a finite number above 0")
    return value


# ---------------------------------------------------------------------------------- Binance

# quote assets, longest first, that split a Binance symbol into base and quote: BTCUSDT -> BTC-USDT
BINANCE_QUOTES = ("FDUSD", "USDT", "USDC", "TUSD", "BUSD", "USD", "EUR", "GBP", "TRY", "BRL", "JPY", "BTC",
                  "ETH", "BNB")


def binance_symbol(symbol: str) -> str:
    symbol = symbol.upper()
    for quote in BINANCE_QUOTES:
        if symbol.endswith(quote) and len(symbol) > len(quote):
            return f"{symbol[:-len(quote)]}-{quote}"
    return symbol


def binance_subscribe(symbols: list[str], book: bool = False) -> list[str]:
    streams = [f"{s.lower()}@trade" for s in symbols] + ([f"{s.lower()}@depth@100ms" for s in symbols] if book else [])
    return [orjson.dumps({"method": "SUBSCRIBE", "params": streams, "id": 1}).decode()]


def binance_trade(message: dict) -> VenueTrade | None:
    """A `trade` event (raw, or wrapped by a combined stream as {"stream", "data"}); None for the
    answer to SUBSCRIBE. `m` true: the buyer was the maker, so the taker sold."""
    if "data" in message and "stream" in message:
        message = message["data"]
    if "result" in message and "id" in message:
        if message["result"] is not None:
            raise Unexpected("SUBSCRIBE answered with a result")
        return None
    if "code" in message and "msg" in message:
        raise Unexpected(f"error from the venue: {message['code']} {message['msg']}")
    if message.get("e") != "trade":
        raise Unexpected(f"event {message.get('e')!r}")
    try:
        symbol, trade_id, buyer_is_maker, time_ms = message["s"], message["t"], message["m"], message["T"]
        if not (isinstance(trade_id, int) and isinstance(time_ms, int) and isinstance(buyer_is_maker, bool)
                and isinstance(symbol, str)):
            raise Unexpected("trade with a malformed t, T, m or s")
        price, quantity = _positive(message["p"]), _positive(message["q"])
    except Unexpected:
        raise
    except (KeyError, TypeError, ValueError) as error:
        raise Unexpected(f"trade without a readable {error}") from None
    return VenueTrade(symbol, trade_id, Trade(
        trade_id=f"binance:{symbol}:{trade_id}", symbol=binance_symbol(symbol), timestamp_ms=time_ms, price=price,
        quantity=quantity, side="sell" if buyer_is_maker else "buy", exchange="BINANCE"))


@dataclass(frozen=True)
class Venue:
    name: str
    url: str
    default_symbols: tuple[str, ...]
    subscribe: Callable[[list[str], bool], list[str]]
    parse: Callable[[dict], VenueTrade | None]
    books: Callable[[frozenset[str]], BinanceBooks | CoinbaseBooks]
    rest_url: str | None = None          # where book snapshots are fetched (Binance)


VENUES = {
    "coinbase": Venue("coinbase", "wss://ws-feed.exchange.coinbase.com", ("BTC-USD", "ETH-USD"),
                      coinbase_subscribe, coinbase_trade, CoinbaseBooks),
    "binance": Venue("binance", "wss://stream.binance.com:9443/ws", ("BTCUSDT", "ETHUSDT"),
                     binance_subscribe, binance_trade, lambda labelled: BinanceBooks(binance_symbol, labelled),
                     "https://api.binance.com"),
}


def rest_url_for(venue: Venue, url: str | None) -> str | None:
    """The REST base beside a WebSocket endpoint given instead of the venue's (the replay server
    answers both on one port): ws://host:port/… -> http://host:port."""
    if url is None or venue.rest_url is None:
        return venue.rest_url
    parts = urlsplit(url)
    return f"{'https' if parts.scheme == 'wss' else 'http'}://{parts.netloc}"


# ------------------------------------------------------------------------------ the client

class Sequencer:
    """Per venue symbol: drop ids already seen, report jumps in the sequence. Remembers at most
    `capacity` symbols (the least recently traded go first: a venue sending symbols nobody
    subscribed to cannot grow it without bound)."""

    def __init__(self, venue: str, capacity: int = 10_000, labelled: frozenset[str] = frozenset()):
        self.venue = venue
        self.capacity = capacity
        self.labelled = labelled          # symbols with their own gap metric labels; the rest: "other"
        self.last: dict[str, int] = {}

    def admit(self, item: VenueTrade) -> bool:
        last = self.last.get(item.venue_symbol)
        if last is not None and item.sequence <= last:
            DUPLICATES.labels(self.venue).inc()
            return False
        if last is not None and item.sequence > last + 1:
            missing = item.sequence - last - 1
            label = item.venue_symbol if item.venue_symbol in self.labelled else "other"
            GAPS.labels(self.venue, label).inc()
            MISSING.labels(self.venue, label).inc(missing)
            log.warning("%s %s: trade ids jump from %d to %d — %d trade(s) missed (a venue outage or a lost "
                        "message)", self.venue, item.venue_symbol, last, item.sequence, missing)
        self.last.pop(item.venue_symbol, None)        # most recent last
        self.last[item.venue_symbol] = item.sequence
        if len(self.last) > self.capacity:
            del self.last[next(iter(self.last))]
        return True


class LiveFeed:
    """Trades of `symbols` from `venue` (and with `book`, the book messages of their order books), as an
    iterator that ends when `stop()` is true."""

    def __init__(self, venue: Venue, symbols: list[str], url: str | None = None,
                 stop: Callable[[], bool] = lambda: False, backoff_s: float = 1.0, max_backoff_s: float = 60.0,
                 book: bool = False):
        self.venue, self.symbols, self.url = venue, symbols, url or venue.url
        self.stop, self.backoff_s, self.max_backoff_s = stop, backoff_s, max_backoff_s
        self.sequencer = Sequencer(venue.name, labelled=frozenset(symbols))
        self.books = venue.books(frozenset(s.upper() for s in symbols)) if book else None
        self.rest_url = rest_url_for(venue, url)
        self._queue: queue.Queue[Trade | BookMessage] = queue.Queue(maxsize=100_000)
        self._logged: set[str] = set()
        self._thread = threading.Thread(target=self._run, name=f"live-{venue.name}", daemon=True)
        self._started = False
        self._failed: str | None = None

    def __iter__(self) -> Iterator[Trade | BookMessage]:
        if not self._started:
            self._started = True
            self._thread.start()
        while not self.stop():
            try:
                yield self._queue.get(timeout=0.2)
            except queue.Empty:
                if self._failed:
                    raise FeedFailed(self._failed)

    def _run(self) -> None:
        """The client's thread. A fault that reconnecting cannot cure ends the feed loudly: the
        iterator raises, so producer.py exits with the reason (and `make demo` restarts it)."""
        from websockets.exceptions import InvalidURI
        try:
            asyncio.run(self._connect_forever())
        except InvalidURI as error:
            self._failed = f"{self.url} is not a WebSocket URL (ws:// or wss://): {error}"
        except Exception as error:       # noqa: BLE001 - reported through the iterator
            log.exception("%s: the live feed failed", self.venue.name)
            self._failed = f"the {self.venue.name} feed failed: {type(error).__name__}: {error}"

    async def _connect_forever(self) -> None:
        import websockets
        attempt = 0
        while not self.stop():
            received = False
            try:
                async with websockets.connect(self.url, open_timeout=10, ping_interval=20, ping_timeout=20,
                                              max_size=2**20) as connection:
                    for message in self.venue.subscribe(self.symbols, self.books is not None):
                        await connection.send(message)
                    if self.books is not None:
                        self.books.reset()          # a new connection: every book taken in again
                    log.info("%s: connected to %s, subscribed to %s%s", self.venue.name, self.url,
                             ", ".join(self.symbols), " with their books" if self.books else "")
                    while not self.stop():
                        try:
                            text = await asyncio.wait_for(connection.recv(), timeout=0.5)
                            received = True
                            self._take(text)
                        except asyncio.TimeoutError:
                            pass
                        if self.books is not None and self.books.wanted():
                            await self._fetch_snapshots()
                    return
            except websockets.exceptions.InvalidURI:
                raise
            except (OSError, asyncio.TimeoutError, websockets.WebSocketException) as error:
                reason = f"{type(error).__name__}: {error}"
            if self.stop():
                return
            attempt = 0 if received else attempt + 1
            delay = min(self.max_backoff_s, self.backoff_s * 2 ** attempt) * random.uniform(0.5, 1.0)
            RECONNECTS.labels(self.venue.name).inc()
            log.warning("%s: connection lost (%s); reconnecting in %.1f s", self.venue.name, reason, delay)
            deadline = asyncio.get_running_loop().time() + delay
            while not self.stop() and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.1)

    async def _fetch_snapshots(self) -> None:
        """The REST snapshot of each book waiting for one (Binance); a failed fetch is tried again
        5 s later, the diffs still buffered."""
        for symbol in self.books.wanted():
            url = f"{self.rest_url}/api/v3/depth?symbol={symbol}&limit={SNAPSHOT_LEVELS}"
            try:
                answer = await asyncio.to_thread(_get_json, url)
                messages = self.books.snapshot(symbol, answer)
            except (OSError, ValueError, Malformed) as error:        # HTTPError and URLError are OSErrors
                self.books.failed(symbol, 5.0)
                log.warning("%s %s: the book snapshot %s failed (%s: %s); trying again in 5 s", self.venue.name,
                            symbol, url, type(error).__name__, error)
                continue
            for m in messages:
                self._put(m)

    def _take(self, text: str | bytes) -> None:
        try:
            message = orjson.loads(text)
            if not isinstance(message, dict):
                raise Unexpected(f"a JSON {type(message).__name__}, not an object")
            book = None if self.books is None else self.books.take(message)
            item = None if book is not None else self.venue.parse(message)
        except orjson.JSONDecodeError:
            self._unexpected("not JSON", text)
            return
        except Unexpected as error:
            self._unexpected(error.kind, text)
            return
        except Malformed as error:
            self._unexpected(str(error), text)
            return
        for m in book or ():
            self._put(m)
        if item is None or not self.sequencer.admit(item):
            return
        TRADES.labels(self.venue.name).inc()
        self._put(item.trade)

    def _put(self, item: Trade | BookMessage) -> None:
        while not self.stop():
            try:
                self._queue.put(item, timeout=0.5)
                return
            except queue.Full:      # Kafka slower than the venue: hold the socket back
                continue

    def _unexpected(self, kind: str, text: str | bytes) -> None:
        UNEXPECTED.labels(self.venue.name).inc()
        kind = kind[:100]
        if kind not in self._logged and len(self._logged) < 100:     # once per kind, of a bounded few
            self._logged.add(kind)
            sample = text[:300] if isinstance(text, str) else text[:300].decode("utf-8", "replace")
            log.warning("%s: skipped a message of an unexpected shape (%s; logged once per kind, all counted): %.300s",
                        self.venue.name, kind, sample)


def _get_json(url: str) -> object:
    with urlopen(url, timeout=10) as response:
        return orjson.loads(response.read())
