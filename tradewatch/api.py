"""The read API (FastAPI): TradeWatch's data for other programs — a notebook, a bot, Grafana.

Every read goes through tradewatch/store/queries.py (shared with the dashboard); every parameter is
validated by FastAPI with a clear 422 body, and no SQL is built from input. `POST
/alerts/{alert_id}/acknowledge` needs the header `X-API-Key` when API_KEY is set. Request counts
and durations are Prometheus metrics on /metrics. The OpenAPI schema is at /openapi.json, the
interactive page at /docs.
"""
from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone
from enum import Enum
from typing import Annotated

import pandas as pd
from fastapi import FastAPI, Header, HTTPException, Path, Query, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest

from tradewatch import runtime
from tradewatch.config import Settings
from tradewatch.store import queries

REQUESTS = Counter("tradewatch_api_requests", "API requests", ["route", "status"])
REQUEST_SECONDS = Histogram("tradewatch_api_request_seconds", "API request duration", ["route"],
                            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))

# pydantic's regex engine (Rust) anchors with ^ and $, and its $ allows no trailing newline
SYMBOL_PATTERN = r"^[A-Z0-9._/^=-]{1,20}$"      # the trade event's symbol rule (tradewatch/events.py)
Symbol = Annotated[str, Query(pattern=SYMBOL_PATTERN, description="e.g. AAPL, BTC-USD")]
MAX_PAGE = 1000


class Size(str, Enum):
    one = "1m"
    five = "5m"
    fifteen = "15m"


class Severity(str, Enum):
    low = "LOW"
    medium = "MEDIUM"
    high = "HIGH"
    critical = "CRITICAL"


class Source(str, Enum):
    aggregator = "aggregator"
    flink = "flink"


SOURCES = {Source.aggregator: "stock_metrics", Source.flink: "flink_metrics"}


def records(frame: pd.DataFrame) -> list[dict]:
    """JSON-ready rows: times as ISO-8601 UTC, NaN as null."""
    out = frame.astype(object).where(frame.notna(), None)
    for column in out.columns:
        if pd.api.types.is_datetime64_any_dtype(frame[column]):
            out[column] = [None if v is None else pd.Timestamp(v).isoformat() for v in out[column]]
    return out.to_dict("records")


def create_app(settings: Settings) -> FastAPI:
    app = FastAPI(title="TradeWatch API", version="1",
                  description="Trades, candles, indicators, alerts and the health of a TradeWatch pipeline.")
    engine = queries.engine_for(settings.sqlalchemy_url)

    @app.middleware("http")
    async def measure(request: Request, call_next):
        started = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        path = getattr(route, "path", "unmatched")
        REQUESTS.labels(path, str(response.status_code)).inc()
        REQUEST_SECONDS.labels(path).observe(time.perf_counter() - started)
        return response

    @app.get("/health", summary="Services and stages, from the stages' heartbeats")
    def health() -> dict:
        statuses = runtime.stage_statuses(records(queries.stage_health(engine)), runtime.gone_from_this_host)
        return {"database": "up", "stages": [{"stage": s.stage, "status": s.status, "detail": s.detail}
                                             for s in statuses]}

    @app.get("/symbols", summary="Symbols with 1-minute candles")
    def symbols(source: Source = Source.aggregator) -> list[str]:
        return queries.symbols(engine, SOURCES[source])

    @app.get("/latest", summary="The newest trade of each symbol")
    def latest() -> list[dict]:
        return records(queries.latest_trades(engine))

    @app.get("/trades", summary="Trades of a symbol in a time range, oldest first, a page at a time")
    def trades(symbol: Symbol, since: datetime | None = None, until: datetime | None = None,
               after: Annotated[str | None, Query(max_length=100, description="`next` of the previous page")] = None,
               limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100) -> dict:
        cursor = None
        if after is not None:
            try:
                stamp, trade_id = after.split("|", 1)
                cursor = (datetime.fromisoformat(stamp), trade_id)
            except ValueError:
                raise HTTPException(422, "`after` must be the `next` value of a previous page") from None
        rows = records(queries.trades_page(engine, symbol, since, until, cursor, limit))
        following = f"{rows[-1]['ts']}|{rows[-1]['trade_id']}" if len(rows) == limit else None
        return {"trades": rows, "next": following}

    @app.get("/candles", summary="Candles with indicators (from the aggregator's or Flink's table)")
    def candles(symbol: Symbol, size: Size = Size.one, since: datetime | None = None,
                until: datetime | None = None, source: Source = Source.aggregator) -> list[dict]:
        if source is Source.flink and size is not Size.one:
            raise HTTPException(422, "Flink computes 1-minute candles only")
        until = until or datetime.now(timezone.utc)
        since = since or until - timedelta(days=1)
        return records(queries.candles(engine, SOURCES[source], symbol, size.value, since, until))

    @app.get("/alerts", summary="Alerts, newest first")
    def alerts(symbol: Annotated[str | None, Query(pattern=SYMBOL_PATTERN)] = None,
               type: Annotated[str | None, Query(pattern=r"^[A-Z_]{1,32}$")] = None,
               severity: Annotated[list[Severity] | None, Query()] = None,
               since: datetime | None = None, until: datetime | None = None, acknowledged: bool | None = None,
               limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100) -> list[dict]:
        return records(queries.alerts_page(engine, symbol, type, [s.value for s in severity] if severity else None,
                                           since, until, acknowledged, limit))

    @app.post("/alerts/{alert_id}/acknowledge", summary="Acknowledge an alert (X-API-Key when API_KEY is set)",
              responses={401: {"description": "missing or wrong API key"}, 404: {"description": "no such alert"}})
    def acknowledge(alert_id: Annotated[str, Path(max_length=200)],
                    x_api_key: Annotated[str | None, Header()] = None) -> dict:
        if settings.api_key and x_api_key != settings.api_key:
            raise HTTPException(401, "this API needs the header X-API-Key (API_KEY is set)")
        if not queries.alert_exists(engine, alert_id):
            raise HTTPException(404, f"no alert {alert_id!r}")
        return {"alert_id": alert_id, "acknowledged": True, "changed": queries.acknowledge_alert(engine, alert_id)}

    @app.get("/dead-letters/summary", summary="Rejected messages by reason")
    def dead_letters() -> list[dict]:
        return records(queries.dead_letter_summary(engine))

    @app.get("/scanner", summary="Market scanner: per symbol change, volume, VWAP and signal over a range")
    def scanner(since: datetime | None = None, until: datetime | None = None,
                source: Source = Source.aggregator) -> list[dict]:
        until = until or datetime.now(timezone.utc)
        since = since or until - timedelta(hours=1)
        return records(queries.scanner(engine, SOURCES[source], None, since, until))

    @app.get("/metrics", include_in_schema=False)
    def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return app
