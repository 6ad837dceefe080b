"""The live alert stream behind the API's `GET /alerts/stream` (Server-Sent Events) and `/alerts/ws`
(WebSocket).

One thread follows the Kafka `alerts` topic (bus.Tail: every partition, no group) and hands each
batch to the event loop, which copies every alert into the bounded queue of each client whose
filters it matches. A client whose queue is full is dropped there and then: fan-out never waits for
a client, so one slow or stalled reader cannot hold up the others. A client that resumes with the
id of the last alert it saw (SSE `Last-Event-ID`) first gets the alerts stored after that one, read
once from the `alerts` table, then the live ones, without duplicates.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import orjson
from prometheus_client import Counter, Gauge
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from tradewatch import bus
from tradewatch.config import Settings
from tradewatch.store import queries

log = logging.getLogger("tradewatch.api")

CLIENTS = Gauge("tradewatch_api_stream_clients", "Clients following the live alert stream")
STREAMED = Counter("tradewatch_api_stream_alerts", "Alerts read from the alerts topic")
DROPPED = Counter("tradewatch_api_stream_dropped_clients", "Stream clients dropped for not keeping up")
REFUSED = Counter("tradewatch_api_stream_refused_clients", "Stream clients refused (API_STREAM_CLIENTS reached)")


@dataclass(frozen=True, slots=True)
class StreamedAlert:
    alert_id: str
    symbol: str
    severity: str
    data: str          # the alert as JSON (the `alerts` topic's fields)

    @classmethod
    def parse(cls, raw: bytes) -> "StreamedAlert":
        fields = orjson.loads(raw)
        return cls(str(fields["alert_id"]), str(fields["symbol"]), str(fields["severity"]), raw.decode())


class Subscriber:
    """One client: its filters and its bounded queue."""

    def __init__(self, symbols: list[str] | None, severities: list[str] | None, size: int):
        self.symbols = frozenset(symbols) if symbols else None
        self.severities = frozenset(severities) if severities else None
        self.queue: asyncio.Queue[StreamedAlert] = asyncio.Queue(size)
        self.dropped: str | None = None    # why the stream dropped this client

    def wants(self, alert: StreamedAlert) -> bool:
        return ((self.symbols is None or alert.symbol in self.symbols)
                and (self.severities is None or alert.severity in self.severities))


class AlertHub:
    def __init__(self, settings: Settings, engine: Engine):
        self.settings, self.engine = settings, engine
        self.subscribers: set[Subscriber] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._follow, name="alert-stream", daemon=True)

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(5)

    def subscribe(self, symbols: list[str] | None, severities: list[str] | None) -> Subscriber | None:
        """A new client's subscription, or None when API_STREAM_CLIENTS follow the stream already."""
        if len(self.subscribers) >= self.settings.api_stream_clients:
            REFUSED.inc()
            return None
        subscriber = Subscriber(symbols, severities, self.settings.api_stream_queue)
        self.subscribers.add(subscriber)
        CLIENTS.set(len(self.subscribers))
        return subscriber

    def unsubscribe(self, subscriber: Subscriber) -> None:
        self.subscribers.discard(subscriber)
        CLIENTS.set(len(self.subscribers))

    async def alerts(self, subscriber: Subscriber, last_event_id: str | None) -> AsyncIterator[StreamedAlert | str]:
        """The subscriber's alerts: first those stored after `last_event_id`, then the live ones.
        A str item is a note for the client (an unknown id). Ends when the client is dropped."""
        seen: set[str] = set()
        if last_event_id:
            try:
                missed = await asyncio.to_thread(
                    queries.alerts_after, self.engine, last_event_id, sorted(subscriber.symbols or ()) or None,
                    sorted(subscriber.severities or ()) or None, self.settings.api_stream_catch_up)
                rows = None if missed is None else missed.to_dict("records")
            except SQLAlchemyError as error:
                log.warning("alert stream: cannot read the alerts after %r (%s)", last_event_id[:80],
                            str(error).splitlines()[0])
                yield "the database cannot be read now: live alerts only (the missed ones are in GET /alerts)"
                rows = []
            if rows is None:
                yield f"unknown Last-Event-ID {last_event_id[:80]!r}: live alerts only"
            for row in rows or ():
                seen.add(row["alert_id"])
                yield StreamedAlert(row["alert_id"], row["symbol"], row["severity"], orjson.dumps(row).decode())
        while subscriber.dropped is None:
            alert = await subscriber.queue.get()
            if subscriber.dropped is None and alert.alert_id not in seen:
                yield alert

    def _fan_out(self, alerts: list[StreamedAlert]) -> None:
        """On the event loop: into every interested client's queue, never waiting for one."""
        for subscriber in list(self.subscribers):
            for alert in alerts:
                if not subscriber.wants(alert):
                    continue
                try:
                    subscriber.queue.put_nowait(alert)
                except asyncio.QueueFull:
                    self.drop(subscriber, f"more than {self.settings.api_stream_queue} alerts waiting")
                    break

    def drop(self, subscriber: Subscriber, why: str) -> None:
        """Let go of a client that does not keep up (its connection is closed by its endpoint)."""
        if subscriber.dropped is None:
            subscriber.dropped = f"{why}: this client does not keep up"
            DROPPED.inc()
            log.warning("alert stream: a client was dropped (%s)", subscriber.dropped)
        self.unsubscribe(subscriber)

    def _follow(self) -> None:
        """The thread that reads the `alerts` topic."""
        tail, warned = None, False
        while not self._stopping.is_set():
            try:
                tail = tail or bus.Tail(self.settings, self.settings.alerts_topic)
            except bus.KafkaUnavailable as error:
                if not warned:
                    log.warning("alert stream: %s; retrying", error)
                    warned = True
                time.sleep(1)
                continue
            batch = []
            for message in tail.poll(1000, 200):
                try:
                    batch.append(StreamedAlert.parse(message.value or b""))
                except (ValueError, KeyError, TypeError) as error:
                    log.warning("alert stream: skipped an unreadable message at %s/%d:%d (%s)",
                                message.topic, message.partition, message.offset, error)
            if batch:
                STREAMED.inc(len(batch))
                self._loop.call_soon_threadsafe(self._fan_out, batch)
        if tail is not None:
            tail.close()
