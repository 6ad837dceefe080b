"""Read-side queries: every SELECT the CLIs, the dashboard and reports run lives here, parameterised."""
from __future__ import annotations

from datetime import datetime
from typing import Iterator

import psycopg2.extensions

from tradewatch.events import Trade

Connection = psycopg2.extensions.connection


def iter_trades(conn: Connection, symbols: list[str] | None = None, since: datetime | None = None,
                until: datetime | None = None, chunk: int = 20_000) -> Iterator[Trade]:
    """Trades in event order (per symbol the order the detectors saw them), streamed in chunks."""
    with conn.cursor(name="iter_trades") as cur:
        cur.itersize = chunk
        cur.execute(
            "SELECT trade_id, symbol, (extract(epoch FROM ts) * 1000)::bigint, price, quantity, side, exchange,"
            " bid, ask, condition FROM trades"
            " WHERE (%(symbols)s::text[] IS NULL OR symbol = ANY(%(symbols)s))"
            " AND (%(since)s::timestamptz IS NULL OR ts >= %(since)s)"
            " AND (%(until)s::timestamptz IS NULL OR ts < %(until)s)"
            " ORDER BY ts, kafka_partition, kafka_offset",
            {"symbols": symbols, "since": since, "until": until})
        for row in cur:
            # the injected_anomaly column is deliberately not read: detectors never see it
            yield Trade(row[0], row[1], int(row[2]), row[3], row[4], row[5], row[6], row[7], row[8], row[9])


def trade_counts(conn: Connection, symbols: list[str] | None = None, since: datetime | None = None,
                 until: datetime | None = None) -> dict[str, int]:
    with conn.cursor() as cur:
        cur.execute(
            "SELECT symbol, count(*) FROM trades WHERE (%(symbols)s::text[] IS NULL OR symbol = ANY(%(symbols)s))"
            " AND (%(since)s::timestamptz IS NULL OR ts >= %(since)s)"
            " AND (%(until)s::timestamptz IS NULL OR ts < %(until)s) GROUP BY symbol",
            {"symbols": symbols, "since": since, "until": until})
        return dict(cur.fetchall())
