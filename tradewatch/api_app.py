"""The read API (FastAPI): TradeWatch's data for other programs — a notebook, a bot, Grafana.

Every read goes through tradewatch/store/queries.py (shared with the dashboard); every parameter is
validated by FastAPI with a clear 422 body, and no SQL is built from input. `POST
/alerts/{alert_id}/acknowledge` needs the header `X-API-Key` when API_KEY is set. Request counts
and durations are Prometheus metrics on /metrics. The OpenAPI schema is at /openapi.json, the
interactive page at /docs. The live streams of alerts (`/alerts/stream`, `/alerts/ws`), final
candles (`/candles/stream`, `/candles/ws`), trades (`/trades/stream`, `/trades/ws`), order books
(`/orderbook/stream`, `/orderbook/ws`) and quotes (`/quotes/stream`, `/quotes/ws`) are fed from the
Kafka topics `alerts`, `candles`, `trades` and `quotes` (tradewatch/streams.py).
"""
from __future__ import annotations

import asyncio
import contextlib
import re
import time
from datetime import datetime, timedelta, timezone
from enum import Enum
from typing import Annotated
from urllib.parse import urlsplit

import numpy as np
import orjson
import pandas as pd
from fastapi import FastAPI, Header, HTTPException, Path, Query, Request, Response, WebSocket
from fastapi.responses import JSONResponse
from starlette.middleware.trustedhost import TrustedHostMiddleware
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest
from sqlalchemy.exc import DBAPIError
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints
from sse_starlette import EventSourceResponse, ServerSentEvent
from sse_starlette.sse import SendTimeoutError

from tradewatch import services
from tradewatch.access import key_matches
from tradewatch.book import MAX_LEVELS, Top, imbalance
from tradewatch.candles import BASE_SIZE
from tradewatch.config import Settings
from tradewatch.store import detections, queries
from tradewatch.store.detections import DISPOSITIONS
from tradewatch.store.health import gone_from_this_host, stage_statuses
from tradewatch.streams import BookHub, Hub, QuoteView, Streamed, Subscriber, TradeHub, alert_feed, candle_feed

REQUESTS = Counter("tradewatch_api_requests", "API requests", ["route", "status"])
REQUEST_SECONDS = Histogram("tradewatch_api_request_seconds", "API request duration", ["route"],
                            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))

# pydantic's regex engine (Rust) anchors with ^ and $, and its $ allows no trailing newline
SYMBOL_PATTERN = r"^[A-Z0-9._/^=-]{1,20}$"      # the trade event's symbol rule (tradewatch/events.py)
Symbol = Annotated[str, Query(pattern=SYMBOL_PATTERN, description="e.g. AAPL, BTC-USD")]
SymbolText = Annotated[str, StringConstraints(pattern=SYMBOL_PATTERN)]
SymbolPath = Annotated[str, Path(pattern=SYMBOL_PATTERN, description="e.g. AAPL, BTC-USD")]
BookDepth = Annotated[int, Query(ge=1, le=MAX_LEVELS, description="levels a side (default BOOK_DEPTH)")]
MAX_PAGE = 1000
ISO_8601 = re.compile(r"\d{4}-\d{2}-\d{2}([Tt ]\d{2}:\d{2}(:\d{2}(\.\d+)?)?)?([Zz]|[+-]\d{2}(:?\d{2})?)?")
EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def _iso_8601(value: object) -> object:
    if isinstance(value, str) and not ISO_8601.fullmatch(value):
        raise ValueError("expected an ISO-8601 time such as 2026-01-02T15:04:05Z")
    return value


def _in_utc(value: datetime) -> datetime:
    """Any offset RFC 3339 allows (up to ±23:59), as UTC; no offset means UTC."""
    if value.tzinfo is None:
        return value.replace(tzinfo=timezone.utc)
    try:
        return value.astimezone(timezone.utc)
    except OverflowError:       # year 1 or 9999 pushed out of range by its offset
        return (datetime.min if value.year == 1 else datetime.max).replace(tzinfo=timezone.utc)


def _earlier(moment: datetime, by: timedelta) -> datetime:
    return moment - by if moment - datetime.min.replace(tzinfo=timezone.utc) > by else moment


Instant = Annotated[datetime, BeforeValidator(_iso_8601), AfterValidator(_in_utc)]
# a page cursor: microseconds since 1970 of the last trade, and its trade id
CURSOR_PATTERN = r"^[0-9]{1,16}\|[A-Za-z0-9._\-:/+=@#~]{1,100}$"


class Severity(str, Enum):
    low = "LOW"
    medium = "MEDIUM"
    high = "HIGH"
    critical = "CRITICAL"


class Source(str, Enum):
    aggregator = "aggregator"
    flink = "flink"


Disposition = Enum("Disposition", {d: d for d in DISPOSITIONS}, type=str)
DispositionFilter = Enum("DispositionFilter", {d: d for d in (*DISPOSITIONS, "unmarked")}, type=str)


class Verdict(BaseModel):
    """An analyst's verdict on an alert."""
    model_config = ConfigDict(extra="forbid")
    disposition: Disposition
    note: Annotated[str | None, StringConstraints(max_length=2000, pattern=r"^[^\x00]*$")] = None   # PostgreSQL text
    by: Annotated[str, StringConstraints(min_length=1, max_length=100, pattern=r"^[^\x00-\x1f]+$")] = Field(
        "api", description="who decided (a name; the history keeps it)")


StreamSymbols = Annotated[list[SymbolText] | None, Query(alias="symbol", max_length=100,
                                                       description="only these symbols (repeat the parameter)")]
StreamSeverities = Annotated[list[Severity] | None, Query(alias="severity", description="only these severities")]
LastEventIdHeader = Annotated[str | None, Header(alias="Last-Event-ID", max_length=1000)]
LastEventId = Annotated[str | None, Query(max_length=1000, description="resume after this id (as Last-Event-ID)")]

SOURCES = {Source.aggregator: "stock_metrics", Source.flink: "flink_metrics"}


def json_rows(frame: pd.DataFrame) -> bytes:
    """The rows as a JSON array: times ISO-8601 UTC to the microsecond, NaN and NaT as null, every
    float exact (orjson; about 1 ms less per request than dicts through FastAPI's encoder)."""
    columns = []
    for name in frame.columns:
        column = frame[name]
        if pd.api.types.is_datetime64_any_dtype(column):
            if column.dt.tz is not None:
                column = column.dt.tz_convert("UTC").dt.tz_localize(None)
            stamps = column.to_numpy(dtype="datetime64[us]")
            text = np.datetime_as_string(stamps, unit="us", timezone="UTC").astype(object)
            text[np.isnat(stamps)] = None
            columns.append(text.tolist())
        else:
            columns.append(column.tolist())
    names = list(frame.columns)
    return orjson.dumps([dict(zip(names, row)) for row in zip(*columns)])


def rows_response(frame: pd.DataFrame) -> Response:
    return Response(json_rows(frame), media_type="application/json")


def records(frame: pd.DataFrame) -> list[dict]:
    return orjson.loads(json_rows(frame))


class StreamEvents(EventSourceResponse):
    """The SSE response of one stream client: a write that blocks longer than the send timeout
    (a client that stopped reading) drops the client, and the connection is closed."""

    def __init__(self, hub: Hub, subscriber: Subscriber, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.hub, self.subscriber = hub, subscriber

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        except SendTimeoutError:
            self.hub.drop(self.subscriber, f"one write blocked {self.send_timeout:g} s")


def allowed(settings: Settings) -> list[str]:
    """The Host names the API answers to: API_ALLOWED_HOSTS (a page from a rebinding DNS name that
    points at this machine is refused)."""
    return [h.strip() for h in settings.api_allowed_hosts.split(",") if h.strip()]


async def event_stream(settings: Settings, hub: Hub, symbols: list[str] | None, kinds: list[str] | None,
                       last_event_id: str | None) -> EventSourceResponse:
    """A live stream as Server-Sent Events: one event per item (named after the feed, its id the
    item's), notes as comments, a `dropped` event before a client that does not keep up is closed."""
    subscriber = hub.subscribe(symbols, kinds)
    if subscriber is None:
        raise HTTPException(503, hub.too_many(), headers={"Retry-After": "30"})
    try:
        await hub.ready(subscriber)
    except BaseException:       # the client went away meanwhile
        hub.unsubscribe(subscriber)
        raise

    async def events():
        try:
            async for item in hub.items(subscriber, last_event_id):
                if isinstance(item, Streamed):
                    yield ServerSentEvent(data=item.data, id=item.id, event=hub.feed.name)
                else:
                    yield ServerSentEvent(comment=item)
            yield ServerSentEvent(data=subscriber.dropped, event="dropped")
        finally:
            hub.unsubscribe(subscriber)

    return StreamEvents(hub, subscriber, events(), ping=settings.api_stream_heartbeat_seconds,
                        ping_message_factory=lambda: ServerSentEvent(comment="heartbeat"),
                        send_timeout=settings.api_stream_send_timeout_seconds)


async def socket_stream(settings: Settings, hub: Hub, socket: WebSocket, symbols: list[str] | None,
                        kinds: list[str] | None, last_event_id: str | None) -> None:
    """The same stream over a WebSocket: one JSON text message per item; closed with 1013 (try
    again later) when the stream is full or the client does not keep up."""
    subscriber = hub.subscribe(symbols, kinds)
    if subscriber is None:
        await socket.accept()
        await socket.close(code=1013, reason=hub.too_many()[:120])
        return
    try:
        await hub.ready(subscriber)
        await socket.accept()
    except BaseException:
        hub.unsubscribe(subscriber)
        raise

    async def send_items() -> None:
        async for item in hub.items(subscriber, last_event_id):
            if isinstance(item, Streamed):
                try:
                    await asyncio.wait_for(socket.send_text(item.data), settings.api_stream_send_timeout_seconds)
                except TimeoutError:
                    hub.drop(subscriber, f"one send blocked {settings.api_stream_send_timeout_seconds:g} s")
                    return

    async def until_closed() -> None:
        while (await socket.receive())["type"] != "websocket.disconnect":
            pass

    sending, listening = asyncio.create_task(send_items()), asyncio.create_task(until_closed())
    try:
        await asyncio.wait((sending, listening), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (sending, listening):
            task.cancel()
        hub.unsubscribe(subscriber)
    if subscriber.dropped and not listening.done():
        with contextlib.suppress(Exception):
            await asyncio.wait_for(socket.close(code=1013, reason=subscriber.dropped[:120]), 2)


def create_app(settings: Settings) -> FastAPI:
    # the candle sizes WINDOW_SIZES configures, listed in the OpenAPI schema; any other is a 422
    Size = Enum("Size", {label: label for label in settings.window_labels}, type=str)
    engine = queries.engine_for(settings.sqlalchemy_url)
    alert_hub, candle_hub = Hub(settings, engine, alert_feed(settings)), Hub(settings, engine, candle_feed(settings))
    trade_hub, book_hub = TradeHub(settings, engine), BookHub(settings, engine)
    quote_view = QuoteView(book_hub)
    hubs = (alert_hub, candle_hub, trade_hub, book_hub)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        for hub in hubs:
            hub.start()
        yield
        for hub in hubs:
            hub.stop()

    app = FastAPI(title="TradeWatch API", version="1", lifespan=lifespan,
                  description="Trades, candles, indicators, alerts and the health of a TradeWatch pipeline.")

    allowed_hosts = allowed(settings)
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts)

    @app.middleware("http")
    async def same_site_writes(request: Request, call_next):
        """A write from a page of another site (its browser sends Origin) is refused: a cross-site
        POST needs no CORS preflight, so the browser would deliver it."""
        origin = request.headers.get("origin")
        if request.method not in ("GET", "HEAD", "OPTIONS") and origin and \
                (urlsplit(origin).hostname or "") not in allowed_hosts:
            return JSONResponse({"detail": f"a write from another site ({origin[:100]}) is refused"}, 403)
        return await call_next(request)

    @app.middleware("http")
    async def measure(request: Request, call_next):
        started = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        path = getattr(route, "path", "unmatched")
        REQUESTS.labels(path, str(response.status_code)).inc()
        REQUEST_SECONDS.labels(path).observe(time.perf_counter() - started)
        return response

    @app.get("/health", summary="Services and stages: Kafka and PostgreSQL as `make demo` watches them (their "
                                "status and the cause of an outage), the stages from their heartbeats; 503 while "
                                "PostgreSQL is down",
             responses={503: {"description": "PostgreSQL is down: `cause` says why, `services` what the demo sees"}})
    def health():
        watched = {name: {"status": s.status, "words": s.words(), "cause": s.cause, "evidence": s.evidence,
                          "fix": s.fix, "restarts": s.restarts}
                   for name, s in (services.read_states(settings) or {}).items()}
        try:
            statuses = stage_statuses(records(queries.stage_health(engine)), gone_from_this_host)
            storage = queries.storage(engine, settings.home)
        except DBAPIError as error:
            cause = watched.get("postgres", {}).get("cause") or str(error.orig).strip().split("\n")[0]
            return JSONResponse({"database": "down", "cause": cause, "services": watched}, 503,
                                headers={"Retry-After": "5"})
        return {"database": "up", "services": watched,
                "stages": [{"stage": s.stage, "status": s.status, "detail": s.detail} for s in statuses],
                "storage": storage}

    @app.get("/pipeline", summary="The pipeline over the last minutes, a point per stage and step: records/s"
                                  " handled and arriving, lag, latency p50/p99 (ms)")
    def pipeline(minutes: Annotated[int, Query(ge=1, le=1440)] = 60,
                 step: Annotated[int, Query(ge=10, le=3600, description="seconds")] = 10) -> list[dict]:
        return rows_response(queries.pipeline(engine, datetime.now(timezone.utc) - timedelta(minutes=minutes), step))

    @app.get("/symbols", summary="Symbols with 1-minute candles")
    def symbols(source: Source = Source.aggregator) -> list[str]:
        return queries.symbols(engine, SOURCES[source])

    @app.get("/latest", summary="The newest trade of each symbol")
    def latest() -> list[dict]:
        return rows_response(queries.latest_trades(engine))

    @app.get("/orderbook/stream", response_class=EventSourceResponse,
             summary="Live order books as Server-Sent Events (from the Kafka quotes topic)",
             description="One `book` event per book message (the quotes topic's wire format, a `snapshot` or an "
                         "`update` of the levels that changed, plus `position`, its place in the topic, which is "
                         "also the event id). A new client first gets a snapshot of each of its symbols' books as "
                         "the quotes stage last stored them, then every message after: each update applies to the "
                         "book the client holds (its `prev_seq` is that book's `seq`). Reconnecting with "
                         "`Last-Event-ID` (or `last_event_id`) sends the messages missed since, read again from "
                         f"Kafka (up to {settings.api_stream_catch_up}), then the live ones: no gap, no duplicate. "
                         "Heartbeats as /alerts/stream; a client that does not keep up is dropped.")
    async def book_stream(symbols: StreamSymbols = None, last_event_id_header: LastEventIdHeader = None,
                          last_event_id: LastEventId = None) -> EventSourceResponse:
        return await event_stream(settings, book_hub, symbols, None, last_event_id_header or last_event_id)

    @app.websocket("/orderbook/ws")
    async def book_socket(socket: WebSocket, symbols: StreamSymbols = None, last_event_id: LastEventId = None) -> None:
        """The book stream over a WebSocket: one JSON text message per book message; `last_event_id` (a
        message's `position`) resumes."""
        await socket_stream(settings, book_hub, socket, symbols, None, last_event_id)

    @app.get("/quotes/stream", response_class=EventSourceResponse,
             summary="Live best bid and ask as Server-Sent Events (from the Kafka quotes topic)",
             description="One `quote` event (symbol, exchange, timestamp_ms, seq, bid, bid_size, ask, ask_size, "
                         "position) each time a symbol's top of book changes; first the current one of each symbol "
                         "(as the quotes stage last stored its book). A quote is state: a reconnecting client gets "
                         "the current ones again, then each change (those it missed are in the `quotes` table). "
                         "Nothing while a book is stale (a sequence gap). Heartbeats and dropping as /alerts/stream.")
    async def quote_stream(symbols: StreamSymbols = None) -> EventSourceResponse:
        return await event_stream(settings, quote_view, symbols, None, None)

    @app.websocket("/quotes/ws")
    async def quote_socket(socket: WebSocket, symbols: StreamSymbols = None) -> None:
        """The quote stream over a WebSocket: one JSON text message per change of a top of book."""
        await socket_stream(settings, quote_view, socket, symbols, None, None)

    def book_or_404(symbol: str, depth: int) -> dict:
        book = queries.order_book(engine, symbol, depth)
        if book is None:
            raise HTTPException(404, f"no order book for {symbol!r}: no quote of it was read (`producer.py --book`, "
                                     "`consumer.py --quotes`), or none for SYMBOL_IDLE_EVICT_SECONDS")
        return book

    @app.get("/quotes/{symbol}", summary="The latest best bid and ask of a symbol, with sizes, spread and mid",
             description="From the quotes stage's book as of its last checkpoint (a quarter of a second). `stale`: "
                         "a sequence gap since its last snapshot, so the values are the last known, not trusted.",
             responses={404: {"description": "no book for this symbol"}})
    def quote(symbol: SymbolPath) -> dict:
        book = book_or_404(symbol, 1)
        top = Top.of(book["bids"], book["asks"])
        return {"symbol": symbol, "exchange": book["exchange"], "ts": book["ts"], "seq": book["seq"],
                "bid": top.bid, "bid_size": top.bid_size, "ask": top.ask, "ask_size": top.ask_size,
                "spread": top.spread, "mid": top.mid, "stale": book["stale"]}

    @app.get("/orderbook/{symbol}", summary="The current order book of a symbol: its best `depth` levels a side",
             description="Bids and asks as [price, size], best first, from the quotes stage's book as of its last "
                         "checkpoint; `imbalance`: (bid size − ask size) / (both) over those levels; `gaps`: "
                         "sequence gaps seen; `stale`: one since the last snapshot.",
             responses={404: {"description": "no book for this symbol"}})
    def orderbook(symbol: SymbolPath, depth: BookDepth = settings.book_depth) -> dict:
        book = book_or_404(symbol, depth)
        return {**book, "imbalance": imbalance(book["bids"], book["asks"])}

    @app.get("/trades", summary="Trades of a symbol in a time range, oldest first, a page at a time")
    def trades(symbol: Symbol, since: Instant | None = None, until: Instant | None = None,
               after: Annotated[str | None, Query(pattern=CURSOR_PATTERN, description="`next` of the previous page")]
               = None, limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100) -> dict:
        cursor = None
        if after is not None:
            micros, trade_id = after.split("|", 1)
            cursor = (EPOCH + timedelta(microseconds=int(micros)), trade_id)
        rows = queries.trades_page(engine, symbol, since, until, cursor, limit)
        following = None
        if len(rows) == limit:
            last = rows.iloc[-1]
            following = f"{(last['ts'] - pd.Timestamp(EPOCH)) // pd.Timedelta(microseconds=1)}|{last['trade_id']}"
        return Response(orjson.dumps({"trades": orjson.Fragment(json_rows(rows)), "next": following}),
                        media_type="application/json")

    def candles(symbol: Symbol, size=Size(BASE_SIZE), since: Instant | None = None,
                until: Instant | None = None, source: Source = Source.aggregator) -> list[dict]:
        until = until or datetime.now(timezone.utc)
        since = since or _earlier(until, timedelta(days=1))
        return rows_response(queries.candles(engine, SOURCES[source], symbol, size.value, since, until))

    # the module's annotations are text (PEP 563), read in its globals: this one's enum exists only here
    candles.__annotations__["size"] = Size
    app.get("/candles", summary="Candles with indicators (from the aggregator's or Flink's table)")(candles)

    @app.get("/alerts", summary="Alerts, newest first")
    def alerts(symbol: Annotated[str | None, Query(pattern=SYMBOL_PATTERN)] = None,
               type: Annotated[str | None, Query(pattern=r"^[A-Z_]{1,32}$")] = None,
               severity: Annotated[list[Severity] | None, Query()] = None,
               since: Instant | None = None, until: Instant | None = None, acknowledged: bool | None = None,
               disposition: Annotated[DispositionFilter | None, Query(
                   description="an analyst's verdict, or `unmarked` for the alerts nobody judged yet")] = None,
               limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100) -> list[dict]:
        severities = [s.value for s in severity] if severity else None
        return rows_response(queries.alerts_page(engine, symbol, type, severities, since, until, acknowledged, limit,
                                                 disposition.value if disposition else None))

    @app.get("/events", summary="Pump-and-dump events, newest first: start, peak, gain, burst, dump, state")
    def events(symbol: Annotated[str | None, Query(pattern=SYMBOL_PATTERN)] = None, since: Instant | None = None,
               limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100) -> list[dict]:
        return rows_response(queries.manipulation_events(engine, symbol, since, limit))

    @app.get("/alerts/stream", response_class=EventSourceResponse,
             summary="Live alerts as Server-Sent Events (from the Kafka alerts topic)",
             description="One `alert` event per alert, its id the alert id; a `: heartbeat` comment every "
                         f"{settings.api_stream_heartbeat_seconds:g} s. Reconnecting with `Last-Event-ID` (or "
                         "`last_event_id`) first sends the alerts stored after that one. A client that falls "
                         f"{settings.api_stream_queue} alerts behind gets a `dropped` event and is disconnected.")
    async def alert_stream(symbols: StreamSymbols = None, severities: StreamSeverities = None,
                           last_event_id_header: LastEventIdHeader = None,
                           last_event_id: LastEventId = None) -> EventSourceResponse:
        return await event_stream(settings, alert_hub, symbols, [s.value for s in severities] if severities else None,
                            last_event_id_header or last_event_id)

    @app.websocket("/alerts/ws")
    async def alert_socket(socket: WebSocket, symbols: StreamSymbols = None, severities: StreamSeverities = None,
                           last_event_id: LastEventId = None) -> None:
        """The alert stream over a WebSocket: one JSON text message per alert; `last_event_id` resumes."""
        await socket_stream(settings, alert_hub, socket, symbols, [s.value for s in severities] if severities else None,
                            last_event_id)

    async def candle_stream(symbols: StreamSymbols = None, sizes=None, last_event_id_header: LastEventIdHeader = None,
                            last_event_id: LastEventId = None) -> EventSourceResponse:
        return await event_stream(settings, candle_hub, symbols, [s.value for s in sizes] if sizes else None,
                            last_event_id_header or last_event_id)

    async def candle_socket(socket: WebSocket, symbols: StreamSymbols = None, sizes=None,
                            last_event_id: LastEventId = None) -> None:
        """The candle stream over a WebSocket: one JSON text message per final candle; `last_event_id` resumes."""
        await socket_stream(settings, candle_hub, socket, symbols, [s.value for s in sizes] if sizes else None,
                            last_event_id)

    for endpoint in (candle_stream, candle_socket):
        endpoint.__annotations__["sizes"] = Annotated[list[Size] | None, Query(
            alias="size", description="only these candle sizes (repeat the parameter; WINDOW_SIZES)")]
    app.get("/candles/stream", response_class=EventSourceResponse,
            summary="Live final candles with their indicators as Server-Sent Events (from the Kafka candles topic)",
            description="One `candle` event per final candle (the aggregator's, with every indicator), its id the "
                        "candle id `<symbol>:<size>:<window start, ms since 1970>`; otherwise as /alerts/stream: "
                        "heartbeats, `Last-Event-ID` resume from the stored candles (up to a day back), a client "
                        "that does not keep up is dropped.")(candle_stream)
    app.websocket("/candles/ws")(candle_socket)

    @app.get("/trades/stream", response_class=EventSourceResponse,
             summary="Live trades as Server-Sent Events (from the Kafka trades topic)",
             description="One `trade` event per valid trade (the wire format of the trades topic plus `position`, "
                         "its place in the topic, which is also the event id), in the order each symbol's trades "
                         "were sent; heartbeats as /alerts/stream. Reconnecting with `Last-Event-ID` (or "
                         f"`last_event_id`) first sends the trades missed since, read again from Kafka (up to "
                         f"{settings.api_stream_catch_up}), then the live ones: no gap, no duplicate. A client "
                         "that does not keep up is dropped.")
    async def trade_stream(symbols: StreamSymbols = None, last_event_id_header: LastEventIdHeader = None,
                           last_event_id: LastEventId = None) -> EventSourceResponse:
        return await event_stream(settings, trade_hub, symbols, None, last_event_id_header or last_event_id)

    @app.websocket("/trades/ws")
    async def trade_socket(socket: WebSocket, symbols: StreamSymbols = None, last_event_id: LastEventId = None) -> None:
        """The trade stream over a WebSocket: one JSON text message per trade; `last_event_id` (a trade's
        `position`) resumes."""
        await socket_stream(settings, trade_hub, socket, symbols, None, last_event_id)

    @app.get("/alerts/{alert_id}", summary="One alert with its evidence: why it fired",
             description="`evidence` (null for an alert stored before evidence was kept): the rule and its "
                         "parameters, the measured value, the baseline it was compared with and how, the threshold "
                         "crossed and how it was set, the tick, the trades that made it, and one `sentence`.",
             responses={404: {"description": "no such alert"}})
    def alert(alert_id: Annotated[str, Path(max_length=200)]) -> dict:
        rows = queries.alert(engine, alert_id)
        if rows.empty:
            raise HTTPException(404, f"no alert {alert_id!r}")
        return {**records(rows)[0], "history": records(queries.disposition_history(engine, alert_id))}

    @app.post("/alerts/{alert_id}/disposition",
              summary="Record an analyst's verdict on an alert (X-API-Key when API_KEY is set)",
              description="`true_positive`, `false_positive` or `needs_review`, an optional note and who decided; "
                          "the change is added to the alert's history (`GET /alerts/{alert_id}`), never overwritten.",
              responses={400: {"description": "the body is not JSON text (e.g. not UTF-8)"},
                         401: {"description": "missing or wrong API key"}, 404: {"description": "no such alert"}})
    def disposition(alert_id: Annotated[str, Path(max_length=200)], verdict: Verdict,
                    x_api_key: Annotated[str | None, Header()] = None) -> dict:
        if settings.api_key and not key_matches(x_api_key, settings.api_key):
            raise HTTPException(401, "this API needs the header X-API-Key (API_KEY is set)")
        changed = detections.set_disposition(engine, alert_id, verdict.disposition.value, verdict.note, verdict.by,
                                             "api")
        if changed is None:
            raise HTTPException(404, f"no alert {alert_id!r}")
        return changed

    @app.post("/alerts/{alert_id}/acknowledge", summary="Acknowledge an alert (X-API-Key when API_KEY is set)",
              responses={401: {"description": "missing or wrong API key"}, 404: {"description": "no such alert"}})
    def acknowledge(alert_id: Annotated[str, Path(max_length=200)],
                    x_api_key: Annotated[str | None, Header()] = None) -> dict:
        if settings.api_key and not key_matches(x_api_key, settings.api_key):
            raise HTTPException(401, "this API needs the header X-API-Key (API_KEY is set)")
        if not queries.alert_exists(engine, alert_id):
            raise HTTPException(404, f"no alert {alert_id!r}")
        return {"alert_id": alert_id, "acknowledged": True, "changed": detections.acknowledge_alert(engine, alert_id)}

    @app.get("/dead-letters/summary", summary="Rejected messages by reason")
    def dead_letters() -> list[dict]:
        return rows_response(queries.dead_letter_summary(engine))

    @app.get("/scanner", summary="Market scanner: per symbol change, volume, VWAP and signal over a range")
    def scanner(since: Instant | None = None, until: Instant | None = None,
                source: Source = Source.aggregator) -> list[dict]:
        until = until or datetime.now(timezone.utc)
        since = since or _earlier(until, timedelta(hours=1))
        return rows_response(queries.scanner(engine, SOURCES[source], None, since, until))

    @app.get("/metrics", include_in_schema=False)
    def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return app
