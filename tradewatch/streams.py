"""The API's live streams: alerts (`GET /alerts/stream` as Server-Sent Events, `/alerts/ws` as a
WebSocket), final candles (`/candles/stream`, `/candles/ws`), each a `Hub` over a `Feed`; trades
(`/trades/stream`, `/trades/ws`, a `TradeHub`) and order books (`/orderbook/stream`,
`/orderbook/ws`, a `BookHub`), which resume from their topic (`TopicHub`: see there how); and the
top of book (`/quotes/stream`, `/quotes/ws`, a `QuoteView` of the book stream).

One thread per hub follows its Kafka topic (bus.Tail: every partition, no group) and hands each
batch to the event loop, which copies every item into the bounded queue of each client whose
filters it matches (a symbol, and a kind: an alert's severity, a candle's size). A client whose
queue is full is dropped there and then: fan-out never waits for a client, so one slow or stalled
reader cannot hold up the others. A client that resumes with the id of the last item it saw (SSE
`Last-Event-ID`) first gets the items stored after that one, read once from the table the topic
is published from (`alerts`, `candle_outbox`), then the live ones, without duplicates: it is
subscribed before that read, so what is published meanwhile waits in its queue.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Callable

import msgspec
import orjson
from prometheus_client import Counter, Gauge
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from tradewatch import bus
from tradewatch.book import BookMessage, OrderBook, decode_book
from tradewatch.config import Settings
from tradewatch.events import decode_trade
from tradewatch.store import queries

log = logging.getLogger("tradewatch.api")

# A resuming trade client is read at most this many messages of the trades topic (every symbol's:
# its own are picked by key): about a second of reading here, so a client back after a long
# absence at a high rate gets what the limit reached and a note instead of holding a thread.
CATCH_UP_SCAN = 1_000_000
READY_WAIT_S = 2.0      # a new trade client's symbols are read with the next batch: a poll (0.2 s) away

CLIENTS = Gauge("tradewatch_api_stream_clients", "Clients following a live stream", ["stream"])
STREAMED = Counter("tradewatch_api_stream_items", "Items read from a stream's topic", ["stream"])
DROPPED = Counter("tradewatch_api_stream_dropped_clients", "Stream clients dropped for not keeping up", ["stream"])
REFUSED = Counter("tradewatch_api_stream_refused_clients", "Stream clients refused (API_STREAM_CLIENTS reached)",
                  ["stream"])


@dataclass(frozen=True, slots=True)
class Streamed:
    id: str
    symbol: str
    kind: str          # what the second filter picks: an alert's severity, a candle's size
    data: str          # the item as JSON (the topic's message)
    partition: int = -1     # where in the topic it was read (the trade and book streams resume from there)
    offset: int = -1
    value: object = None    # the decoded message, where a stream needs it (the book stream's)


@dataclass(frozen=True)
class Feed:
    """What one stream serves: its name (the SSE event's, e.g. `alert`), its topic, the fields of a
    message that hold the id and the kind, and how the items stored after an id are read
    (`stored_after(engine, id, symbols, kinds, limit)`: the topic's messages, oldest first, or
    None for an unknown id)."""
    name: str
    topic: str
    id_field: str
    kind_field: str
    stored_after: Callable[[Engine, str, list[str] | None, list[str] | None, int], list[bytes] | None]

    def parse(self, raw: bytes) -> Streamed:
        fields = orjson.loads(raw)
        return Streamed(str(fields[self.id_field]), str(fields["symbol"]), str(fields[self.kind_field]),
                        raw.decode())


def alert_feed(settings: Settings) -> Feed:
    def stored_after(engine, alert_id, symbols, severities, limit):
        missed = queries.alerts_after(engine, alert_id, symbols, severities, limit)
        return None if missed is None else [orjson.dumps(row) for row in missed.to_dict("records")]
    return Feed("alert", settings.alerts_topic, "alert_id", "severity", stored_after)


def candle_feed(settings: Settings) -> Feed:
    return Feed("candle", settings.candles_topic, "candle_id", "window_size", queries.candles_after)


class Subscriber:
    """One client: its filters and its bounded queue."""

    def __init__(self, symbols: list[str] | None, kinds: list[str] | None, size: int):
        self.symbols = frozenset(symbols) if symbols else None
        self.kinds = frozenset(kinds) if kinds else None
        self.queue: asyncio.Queue[Streamed] = asyncio.Queue(size)
        self.dropped: str | None = None    # why the stream dropped this client
        self.started = asyncio.Event()      # live items go into the queue from now on
        self.generation: int | None = 0     # TopicHub: the subscription's number (None: paused)
        self.start: dict[int, int] = {}     # TopicHub: where in the topic its live items begin
        self.floor: dict[int, int] | None = None    # TopicHub: live items below this were sent already

    def wants(self, item: Streamed) -> bool:
        return ((self.symbols is None or item.symbol in self.symbols)
                and (self.kinds is None or item.kind in self.kinds))


class Hub:
    starts_later = False    # True: a client's live items start when the reading thread says so

    def __init__(self, settings: Settings, engine: Engine, feed: Feed):
        self.settings, self.engine, self.feed = settings, engine, feed
        self.subscribers: set[Subscriber] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._follow, name=f"{feed.name}-stream", daemon=True)

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(5)

    def too_many(self) -> str:
        return (f"{self.settings.api_stream_clients} clients follow the {self.feed.name} stream already "
                "(API_STREAM_CLIENTS); try again later")

    def subscribe(self, symbols: list[str] | None, kinds: list[str] | None) -> Subscriber | None:
        """A new client's subscription, or None when API_STREAM_CLIENTS follow the stream already."""
        if len(self.subscribers) >= self.settings.api_stream_clients:
            REFUSED.labels(self.feed.name).inc()
            return None
        subscriber = Subscriber(symbols, kinds, self.settings.api_stream_queue)
        if not self.starts_later:
            subscriber.started.set()
        self.subscribers.add(subscriber)
        CLIENTS.labels(self.feed.name).set(len(self.subscribers))
        return subscriber

    async def ready(self, subscriber: Subscriber) -> None:
        """Wait (a moment at most) until the client's live items go into its queue, so that an item
        published once the client has its answer reaches it."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(subscriber.started.wait(), READY_WAIT_S)

    def unsubscribe(self, subscriber: Subscriber) -> None:
        self.subscribers.discard(subscriber)
        CLIENTS.labels(self.feed.name).set(len(self.subscribers))

    async def items(self, subscriber: Subscriber, last_event_id: str | None) -> AsyncIterator[Streamed | str]:
        """The subscriber's items: first those stored after `last_event_id`, then the live ones.
        A str item is a note for the client (an unknown id). Ends when the client is dropped."""
        seen: set[str] = set()
        name = self.feed.name
        if last_event_id:
            try:
                missed = await asyncio.to_thread(
                    self.feed.stored_after, self.engine, last_event_id, sorted(subscriber.symbols or ()) or None,
                    sorted(subscriber.kinds or ()) or None, self.settings.api_stream_catch_up)
            except SQLAlchemyError as error:
                log.warning("%s stream: cannot read what was stored after %r (%s)", name, last_event_id[:80],
                            str(error).splitlines()[0])
                yield f"the database cannot be read now: live {name}s only (the missed ones are in the API's reads)"
                missed = []
            if missed is None:
                yield f"unknown Last-Event-ID {last_event_id[:80]!r}: live {name}s only"
            for raw in missed or ():
                item = self.feed.parse(raw)
                seen.add(item.id)
                yield item
        while subscriber.dropped is None:
            item = await subscriber.queue.get()
            if subscriber.dropped is None and item.id not in seen:
                yield item

    def _fan_out(self, items: list[Streamed]) -> None:
        """On the event loop: into every interested client's queue, never waiting for one."""
        for subscriber in list(self.subscribers):
            if not subscriber.started.is_set():
                continue
            for item in items:
                if not subscriber.wants(item):
                    continue
                try:
                    subscriber.queue.put_nowait(item)
                except asyncio.QueueFull:
                    self.drop(subscriber, f"more than {self.settings.api_stream_queue} {self.feed.name}s waiting")
                    break

    def drop(self, subscriber: Subscriber, why: str) -> None:
        """Let go of a client that does not keep up (its connection is closed by its endpoint)."""
        if subscriber.dropped is None:
            subscriber.dropped = f"{why}: this client does not keep up"
            DROPPED.labels(self.feed.name).inc()
            log.warning("%s stream: a client was dropped (%s)", self.feed.name, subscriber.dropped)
        self.unsubscribe(subscriber)

    def _follow(self) -> None:
        """The thread that reads the topic."""
        tail, warned, name = None, False, self.feed.name
        while not self._stopping.is_set():
            try:
                tail = tail or bus.Tail(self.settings, self.feed.topic)
            except bus.KafkaUnavailable as error:
                if not warned:
                    log.warning("%s stream: %s; retrying", name, error)
                    warned = True
                time.sleep(1)
                continue
            batch = []
            for message in tail.poll(1000, 200):
                try:
                    batch.append(self.feed.parse(message.value or b""))
                except (ValueError, KeyError, TypeError) as error:
                    log.warning("%s stream: skipped an unreadable message at %s/%d:%d (%s)", name,
                                message.topic, message.partition, message.offset, error)
            if batch:
                STREAMED.labels(name).inc(len(batch))
                self._loop.call_soon_threadsafe(self._fan_out, batch)
        if tail is not None:
            tail.close()


class TopicHub(Hub):
    """A stream that resumes from its topic (the trade and book streams): each item carries
    `position`, where the hub had read each partition when it read that message (offsets joined by
    dots, partition 0 first), which is also its event id. A resuming client is read its partitions
    from that position up to where its live items start (`_catch_up`), then gets its queue: without
    gaps or duplicates, and across restarts of the API as long as Kafka keeps the messages.

    Only the messages some client asked for are decoded: those whose key (the symbol) no client
    follows are passed over, and while no client follows the stream nothing is read at all (the
    first client starts it at the end of the topic), so an API nobody streams from costs nothing at
    the pipeline's full rate. A client's symbols join that set between two batches; the first batch
    read with them sets its `start`. Subclasses give the topic's decoder (its stage's validation:
    what the stage dead-letters is left out) and what a client that does not resume gets first
    (`_opening`)."""

    starts_later = True
    missed_elsewhere = ""       # where a client finds what it missed when the stream cannot send it
    opens_again = False         # True: a client that missed more than is sent starts again as a new one

    def __init__(self, settings: Settings, engine: Engine, name: str, topic: str, decode: Callable):
        super().__init__(settings, engine, Feed(name, topic, "position", "", lambda *_: None))
        self._decode, self._encode = decode, msgspec.json.Encoder().encode     # decode(value, sent_ms, skew_ms)
        self._skew_ms = int(settings.max_clock_skew_seconds * 1000)
        self._wanted: tuple[int, frozenset[bytes] | None] = (0, frozenset())   # (generation, keys; None: all)
        self._wake = threading.Event()      # the clients changed

    def subscribe(self, symbols: list[str] | None, kinds: list[str] | None) -> Subscriber | None:
        subscriber = super().subscribe(symbols, None)
        if subscriber is not None:
            subscriber.generation = self._wanted[0] + 1
            self._want(subscriber.generation)
        return subscriber

    def unsubscribe(self, subscriber: Subscriber) -> None:
        super().unsubscribe(subscriber)
        self._want(self._wanted[0])

    def _want(self, generation: int) -> None:
        everyone = [s.symbols for s in self.subscribers]
        keys = None if None in everyone else frozenset(symbol.encode() for s in everyone for symbol in s)
        self._wanted = (generation, keys)
        self._wake.set()

    async def _opening(self, subscriber: Subscriber) -> tuple[list[Streamed | str], dict[int, int] | None]:
        """What a client that does not resume gets before its live items, and the position those
        end at (None: live items only)."""
        return [], None

    async def items(self, subscriber: Subscriber, last_event_id: str | None) -> AsyncIterator[Streamed | str]:
        floor = None
        if last_event_id:
            floor = parse_position(last_event_id)
            if floor is None:
                yield f"unknown Last-Event-ID {last_event_id[:80]!r}: as a new client"
        for attempt in range(2):
            if floor is None:
                first, floor = await self._opening(subscriber)
                for item in first:
                    yield item
            if floor is None:
                break
            async for item in self._catch_up(subscriber, floor, again=self.opens_again and attempt == 0):
                yield item
            if subscriber.floor is not None or not self.opens_again:
                break
            floor = None        # more was missed than is sent: the book stream sends its books anew
        await subscriber.started.wait()
        floor = subscriber.floor or {}
        while subscriber.dropped is None:
            item = await subscriber.queue.get()
            if subscriber.dropped is None and item.offset >= floor.get(item.partition, 0):
                yield item

    def _join(self, subscriber: Subscriber) -> None:
        """The client's live items go into its queue from the next batch read (its `start`)."""
        subscriber.generation = self._wanted[0] + 1
        self._want(subscriber.generation)

    def _pause(self, subscriber: Subscriber) -> None:
        """No live items for the client until it joins again."""
        subscriber.generation = None
        subscriber.started.clear()
        while not subscriber.queue.empty():
            subscriber.queue.get_nowait()

    async def _catch_up(self, subscriber: Subscriber, floor: dict[int, int],
                        again: bool = False) -> AsyncIterator[Streamed | str]:
        """The messages after `floor` (the client's position), read again from Kafka in rounds, each
        up to where the topic ended when it began, while no live item waits for the client; once a
        round finds few (under half of API_STREAM_QUEUE), the client joins the live stream and a last
        round reads up to where its live items start. So a client that reads faster than the feed
        flows catches up however far behind it was, and its queue never fills meanwhile. At most
        API_STREAM_CATCH_UP messages in all: past that, `subscriber.floor` is None and the client is
        live from where it joined (`again`: it is about to be sent everything anew)."""
        self._pause(subscriber)
        keys = frozenset(symbol.encode() for symbol in subscriber.symbols) if subscriber.symbols else None
        position, sent, name, complete = dict(floor), 0, self.feed.name, True
        while complete:
            joined = subscriber.started.is_set()
            try:
                ends = subscriber.start if joined else await asyncio.to_thread(bus.end_offsets, self.settings,
                                                                               self.feed.topic)
                since = {p: position.get(p, 0) for p in ends}      # a partition newer than the id: all of it
                found, complete = await asyncio.to_thread(
                    bus.read_between, self.settings, self.feed.topic, since, ends, keys,
                    self.settings.api_stream_catch_up - sent, CATCH_UP_SCAN)
            except bus.KafkaUnavailable as error:
                log.warning("%s stream: cannot read the missed messages (%s)", name, error)
                yield f"Kafka cannot be read now: {self.missed_elsewhere}; live {name}s from here"
                sent, complete = -1, False
                break
            sent += len(found)
            position.update(since)
            for item in self._items(found, position, subscriber.symbols):
                yield item
            if not complete or joined:
                break
            position.update(ends)
            if len(found) < self.settings.api_stream_queue // 2:
                self._join(subscriber)
                await subscriber.started.wait()
        if not complete and sent >= 0:
            yield (f"more {name}s were missed than the {sent} sent (API_STREAM_CATCH_UP, or older than "
                   f"Kafka keeps): " + (f"{name}s sent anew" if again else
                                        f"{self.missed_elsewhere}; live {name}s from here"))
        if not complete and not subscriber.started.is_set():
            self._join(subscriber)
        subscriber.floor = position if complete else None

    def _item(self, m, at: str) -> Streamed | None:
        """Message `m` read at position `at` as an item; None for one the stage dead-letters."""
        try:
            message = self._decode(m.value(), m.timestamp()[1] if m.timestamp()[0] else None, self._skew_ms)
        except ValueError:      # InvalidTrade, InvalidBook
            return None
        return self._as_item(message, at, m.partition(), m.offset())

    def _as_item(self, message, at: str, partition: int = -1, offset: int = -1) -> Streamed:
        """The item of a decoded message: its wire-format JSON plus `position`."""
        data = self._encode(message)[:-1] + b',"position":"' + at.encode() + b'"}'
        return Streamed(at, message.symbol, "", data.decode(), partition, offset, message)

    def _items(self, messages: list, position: dict[int, int], symbols: frozenset[str] | None) -> list[Streamed]:
        """The items of `messages` (of `symbols`, None: all), `position` moved on in place."""
        items = []
        for m in messages:
            position[m.partition()] = m.offset() + 1
            item = self._item(m, ".".join(str(position.get(p, 0)) for p in range(max(position) + 1)))
            if item is not None and (symbols is None or item.symbol in symbols):
                items.append(item)
        return items

    def _fan_out_read(self, items: list[Streamed], before: dict[int, int], generation: int) -> None:
        """On the event loop: clients whose symbols this batch was read with start here."""
        for subscriber in self.subscribers:
            if not subscriber.started.is_set() and subscriber.generation is not None \
                    and subscriber.generation <= generation:
                subscriber.start = before
                subscriber.started.set()
        self._fan_out(items)

    def _follow(self) -> None:
        tail, warned, name = None, False, self.feed.name
        while not self._stopping.is_set():
            try:
                tail = tail or bus.Tail(self.settings, self.feed.topic)
            except bus.KafkaUnavailable as error:
                if not warned:
                    log.warning("%s stream: %s; retrying", name, error)
                    warned = True
                time.sleep(1)
                continue
            generation, keys = self._wanted
            if keys == frozenset():         # nobody follows: read nothing, then on from the end
                if tail.listed:
                    tail.stop_reading()
                self._wake.wait(0.2)
                self._wake.clear()
                continue
            tail.read_from_end()
            if not tail.listed:             # where its clients start is not known yet
                time.sleep(0.2)
                continue
            before = dict(tail.positions)
            read = tail.read(1000, 200)
            wanted = read if keys is None else [m for m in read if m.key() in keys]
            items = self._items(wanted, dict(before), None)
            STREAMED.labels(name).inc(len(items))
            self._loop.call_soon_threadsafe(self._fan_out_read, items, before, generation)
        if tail is not None:
            tail.close()


class TradeHub(TopicHub):
    """The trade stream: the trades topic's messages that pass the consumer's validation
    (events.decode_trade; the others are left out, the consumer dead-letters them), each sent as
    its wire-format JSON plus `position`. Trades reach the topic before the table (the consumer
    stores them after), so a client resumes from the topic."""

    missed_elsewhere = "the rest are in GET /trades"

    def __init__(self, settings: Settings, engine: Engine):
        super().__init__(settings, engine, "trade", settings.trades_topic, decode_trade)


class BookHub(TopicHub):
    """The book stream: the quotes topic's valid book messages (tradewatch/book.py: snapshots and
    updates), each sent as its wire-format JSON plus `position`.

    A client that does not resume first gets a snapshot of each of its symbols' books as the quotes
    stage checkpointed them (`order_books`, read with the stage's position in the topic in one
    database snapshot), then the messages after that position: the missed ones read again from
    Kafka, then the live ones — so every update it gets applies to the book it holds (its prev_seq
    is the book's seq). A book the stage holds stale (a gap) is not sent: the feed's next snapshot
    rebuilds it, as it does the stage's. A resuming client (Last-Event-ID) already holds its books,
    and gets the messages after its position, as on the trade stream."""

    missed_elsewhere = "each book is whole again at its next snapshot in the feed"
    opens_again = True

    def __init__(self, settings: Settings, engine: Engine):
        super().__init__(settings, engine, "book", settings.quotes_topic, decode_book)

    async def _opening(self, subscriber: Subscriber) -> tuple[list[Streamed | str], dict[int, int] | None]:
        symbols = sorted(subscriber.symbols) if subscriber.symbols else None
        try:
            books, stored = await asyncio.to_thread(queries.book_checkpoint, self.engine, self.settings.quotes_group,
                                                    self.feed.topic, symbols)
            ends = await asyncio.to_thread(bus.end_offsets, self.settings, self.feed.topic)
        except (SQLAlchemyError, bus.KafkaUnavailable) as error:
            log.warning("book stream: cannot read the stored books (%s)", str(error).splitlines()[0])
            return ["the stored books cannot be read now: each book from its next snapshot in the feed"], None
        # a partition the stage never stored a position for: its books come with the feed's snapshots
        floor = {p: stored.get(p, end) for p, end in ends.items()}
        at = ".".join(str(floor.get(p, 0)) for p in range(max(floor, default=0) + 1))
        return [self._as_item(BookMessage(b["symbol"], b["exchange"], b["ms"], "snapshot", b["seq"],
                                          [tuple(level) for level in b["bids"]],
                                          [tuple(level) for level in b["asks"]]), at)
                for b in books], floor


class QuoteView:
    """The quote stream: clients of the book stream, each sent the top of book of its symbols (best
    bid and ask with sizes) when it changes, built from the book stream's messages for that client
    alone. A quote is state: every client — a reconnecting one too — first gets the current top of
    each of its symbols (from the stage's checkpoint), then each change; the changes it missed while
    away are in the `quotes` table. Nothing is sent for a book while it is stale (a gap)."""

    def __init__(self, books: BookHub):
        self.books = books
        self.feed = Feed("quote", books.feed.topic, "position", "", lambda *_: None)
        self._encode = msgspec.json.Encoder().encode

    def __getattr__(self, name: str):
        return getattr(self.books, name)        # subscribe, ready, unsubscribe, drop, too_many

    async def items(self, subscriber: Subscriber, last_event_id: str | None) -> AsyncIterator[Streamed | str]:
        held: dict[str, OrderBook] = {}
        async for item in self.books.items(subscriber, None):
            if not isinstance(item, Streamed):
                yield item
                continue
            book = held.get(item.symbol) or held.setdefault(item.symbol, OrderBook(item.symbol))
            before = None if book.stale else book.top()
            if book.apply(item.value) and (top := book.top()) != before:
                m = item.value
                data = self._encode({"symbol": m.symbol, "exchange": m.exchange, "timestamp_ms": m.timestamp_ms,
                                     "seq": m.seq, "bid": top.bid, "bid_size": top.bid_size, "ask": top.ask,
                                     "ask_size": top.ask_size, "position": item.id})
                yield Streamed(item.id, item.symbol, "", data.decode(), item.partition, item.offset)


def parse_position(text: str) -> dict[int, int] | None:
    """An item's `position` (`12.0.7…`: one offset per partition), or None when `text` is not one."""
    parts = text.split(".")
    if len(parts) > 10_000 or not all(part.isdigit() and len(part) <= 18 for part in parts):
        return None
    return {p: int(offset) for p, offset in enumerate(parts)}
