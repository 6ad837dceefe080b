"""The API's live streams: alerts (`GET /alerts/stream` as Server-Sent Events, `/alerts/ws` as a
WebSocket) and final candles (`/candles/stream`, `/candles/ws`), each a `Hub` over a `Feed`.

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
import logging
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Callable

import orjson
from prometheus_client import Counter, Gauge
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from tradewatch import bus
from tradewatch.config import Settings
from tradewatch.store import queries

log = logging.getLogger("tradewatch.api")

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

    def wants(self, item: Streamed) -> bool:
        return ((self.symbols is None or item.symbol in self.symbols)
                and (self.kinds is None or item.kind in self.kinds))


class Hub:
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
        self.subscribers.add(subscriber)
        CLIENTS.labels(self.feed.name).set(len(self.subscribers))
        return subscriber

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
