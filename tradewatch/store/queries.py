"""Read-side queries: every SELECT the CLIs, the dashboard and reports run lives here, parameterised."""
from __future__ import annotations

from datetime import datetime
from typing import Iterator

import pandas as pd
import psycopg2.extensions
from sqlalchemy import Engine, create_engine, text

from tradewatch.candles import BASE_SIZE, message as candle_message
from tradewatch.events import Trade
from tradewatch.indicators import INDICATOR_COLUMNS
from tradewatch.volatility import FORECAST_COLUMNS
from tradewatch.store import health
from tradewatch.store.candles import final_candles
from tradewatch.windows import parse_size

Connection = psycopg2.extensions.connection


def iter_trades(conn: Connection, symbols: list[str] | None = None, since: datetime | None = None,
                until: datetime | None = None, chunk: int = 20_000) -> Iterator[Trade]:
    """Trades in event order (per symbol the order the detectors saw them), streamed in chunks."""
    for row in trade_rows(conn, symbols, since, until, chunk):
        # the injected_anomaly column is deliberately not read: detectors never see it
        yield Trade(*row[:10])


def trade_rows(conn: Connection, symbols: list[str] | None = None, since: datetime | None = None,
               until: datetime | None = None, chunk: int = 20_000) -> Iterator[tuple]:
    """As iter_trades, each a tuple of Trade's first ten fields and the injected label (the
    simulator's ground truth, for scoring only: a detector never sees it)."""
    with conn.cursor(name="trade_rows") as cur:
        cur.itersize = chunk
        cur.execute(
            "SELECT trade_id, symbol, (extract(epoch FROM ts) * 1000)::bigint, price, quantity, side, exchange,"
            " bid, ask, condition, injected_anomaly FROM trades"
            " WHERE (%(symbols)s::text[] IS NULL OR symbol = ANY(%(symbols)s))"
            " AND (%(since)s::timestamptz IS NULL OR ts >= %(since)s)"
            " AND (%(until)s::timestamptz IS NULL OR ts < %(until)s)"
            " ORDER BY ts, kafka_partition, kafka_offset",
            {"symbols": symbols, "since": since, "until": until})
        yield from cur


def trade_counts(conn: Connection, symbols: list[str] | None = None, since: datetime | None = None,
                 until: datetime | None = None) -> dict[str, int]:
    with conn.cursor() as cur:
        cur.execute(
            "SELECT symbol, count(*) FROM trades WHERE (%(symbols)s::text[] IS NULL OR symbol = ANY(%(symbols)s))"
            " AND (%(since)s::timestamptz IS NULL OR ts >= %(since)s)"
            " AND (%(until)s::timestamptz IS NULL OR ts < %(until)s) GROUP BY symbol",
            {"symbols": symbols, "since": since, "until": until})
        return dict(cur.fetchall())


def final_candles_frame(conn: Connection, symbols: list[str] | None = None, since: datetime | None = None,
                        until: datetime | None = None) -> pd.DataFrame:
    """The aggregator's final candles of every size whose window starts in [since, until), as
    tradewatch/detect/forecast.py's `candle_frame` shapes them (what the forecasters train on)."""
    with conn.cursor() as cur:
        cur.execute(
            "SELECT symbol, window_size, (extract(epoch FROM window_start) * 1000)::bigint, open, high, low, close,"
            " volume, trade_count FROM stock_metrics WHERE is_final"
            " AND (%(symbols)s::text[] IS NULL OR symbol = ANY(%(symbols)s))"
            " AND (%(since)s::timestamptz IS NULL OR window_start >= %(since)s)"
            " AND (%(until)s::timestamptz IS NULL OR window_start < %(until)s)",
            {"symbols": symbols, "since": since, "until": until})
        frame = pd.DataFrame(cur.fetchall(), columns=["symbol", "size", "start_ms", "open", "high", "low", "close",
                                                      "volume", "trade_count"])
    sizes = frame.pop("size")
    frame.insert(1, "size_ms", sizes.map({s: parse_size(s) for s in sizes.unique()}).astype("int64"))
    return frame


# ---------------------------------------------------------------- dashboard (SQLAlchemy + pandas)
# Every query is parameterised; the only identifier spliced in is the metrics table, and only
# from METRICS_TABLES. Range aggregates read the 1-minute windows, trade-level panels read the
# (partially) indexed trades table with a LIMIT, so a refresh stays fast as `trades` grows.

METRICS_TABLES = {"Python aggregator": "stock_metrics", "Flink job": "flink_metrics"}
_SYMBOLS = "(CAST(:symbols AS text[]) IS NULL OR symbol = ANY(CAST(:symbols AS text[])))"


def engine_for(dsn_url: str) -> Engine:
    return create_engine(dsn_url, pool_pre_ping=True, pool_size=5, connect_args={"connect_timeout": 3})


def _table(source: str) -> str:
    if source not in METRICS_TABLES.values():
        raise ValueError(f"unknown metrics table {source!r}")
    return source


def _frame(engine: Engine, sql: str, exact: bool = False, **params: object) -> pd.DataFrame:
    """The rows as a frame; `exact` keeps numeric columns as Decimal (pandas makes them floats)."""
    with engine.connect() as conn:
        return pd.read_sql(text(sql), conn, params=params, coerce_float=not exact)


def data_anchor(engine: Engine) -> pd.Timestamp | None:
    """Time of the newest trade: ranges are 'the last N minutes of data', so replays of old days show too."""
    frame = _frame(engine, "SELECT max(ts) AS newest FROM trades")
    value = frame["newest"].iloc[0]
    return None if pd.isna(value) else pd.Timestamp(value)


def table_exists(engine: Engine, table: str) -> bool:
    return bool(_frame(engine, "SELECT to_regclass(:name) IS NOT NULL AS present", name=table)["present"].iloc[0])


def symbols(engine: Engine, source: str = "stock_metrics") -> list[str]:
    return _frame(engine, f"SELECT DISTINCT symbol FROM {_table(source)} WHERE window_size = '{BASE_SIZE}' ORDER BY 1")[
        "symbol"].tolist()


def kpis(engine: Engine, source: str, symbols: list[str] | None, since, until) -> dict:
    frame = _frame(engine, f"""
        SELECT coalesce(sum(trade_count), 0) AS trades, coalesce(sum(volume), 0) AS volume,
               coalesce(sum(traded_value), 0) AS traded_value, count(DISTINCT symbol) AS active_symbols,
               (SELECT count(*) FROM trade_flags WHERE ts >= :since AND ts < :until AND {_SYMBOLS})
                   AS anomalies
        FROM {_table(source)}
        WHERE window_size = '{BASE_SIZE}' AND window_start >= :since AND window_start < :until AND {_SYMBOLS}""",
                   symbols=symbols, since=since, until=until)
    return {k: float(v) for k, v in frame.iloc[0].items()}


def candles(engine: Engine, source: str, symbol: str, size: str, since, until) -> pd.DataFrame:
    """Candles of one size with every indicator the aggregator stores (INDICATOR_COLUMNS), the forecast
    made at their close (FORECAST_COLUMNS) and the band forecast for them (band_*). Flink writes
    1-minute candles only: its 5- and 15-minute ones are rolled up from them here (epoch-aligned, as
    every window)."""
    table = _table(source)
    if table == "flink_metrics" and size != BASE_SIZE:
        table = f"""(SELECT symbol, CAST(:size AS text) AS window_size, bucket AS window_start,
                            (array_agg(open ORDER BY window_start))[1] AS open, max(high) AS high, min(low) AS low,
                            (array_agg(close ORDER BY window_start DESC))[1] AS close, sum(volume) AS volume,
                            sum(traded_value) / nullif(sum(volume), 0) AS vwap, sum(trade_count) AS trade_count,
                            bool_and(is_final) AS is_final
                     FROM (SELECT *, date_bin(CAST(:size AS interval), window_start, TIMESTAMPTZ '1970-01-01')
                                       AS bucket FROM flink_metrics
                           WHERE symbol = :symbol AND window_size = '{BASE_SIZE}' AND window_start < :until
                             AND window_start >= date_bin(CAST(:size AS interval), CAST(:since AS timestamptz),
                                                          TIMESTAMPTZ '1970-01-01')) one_minute
                     GROUP BY symbol, bucket)"""
    # band_*: the forecast for this window, made at the close of the last final window before it
    return _frame(engine, f"""
        SELECT m.window_start, m.open, m.high, m.low, m.close, m.volume, m.vwap, m.trade_count, m.is_final,
               {', '.join(f'i.{c}' for c in (*INDICATOR_COLUMNS, *FORECAST_COLUMNS))},
               f.next_band_low AS band_low, f.next_band_high AS band_high, f.next_sigma AS band_sigma,
               f.forecaster AS band_forecaster
        FROM {table} m
        LEFT JOIN indicators i ON i.symbol = m.symbol AND i.window_size = m.window_size
                              AND i.window_start = m.window_start
        LEFT JOIN LATERAL (SELECT next_band_low, next_band_high, next_sigma, forecaster FROM indicators p
                           WHERE p.symbol = m.symbol AND p.window_size = m.window_size
                             AND p.window_start < m.window_start
                           ORDER BY p.window_start DESC LIMIT 1) f ON true
        WHERE m.symbol = :symbol AND m.window_size = :size AND m.window_start >= :since AND m.window_start < :until
        ORDER BY m.window_start""", symbol=symbol, size=size, since=since, until=until)


def price_series(engine: Engine, source: str, symbols: list[str] | None, since, until) -> pd.DataFrame:
    return _frame(engine, f"""
        SELECT symbol, window_start AS ts, close AS price FROM {_table(source)}
        WHERE window_size = '{BASE_SIZE}' AND window_start >= :since AND window_start < :until AND {_SYMBOLS}
          AND close IS NOT NULL
        ORDER BY symbol, window_start""", symbols=symbols, since=since, until=until)


def anomaly_points(engine: Engine, symbols: list[str] | None, since, until, limit: int = 2000) -> pd.DataFrame:
    """One marker per minute and symbol that had anomalies (its highest-scoring flagged trade), so
    markers cover the whole range however many flags there are; `in_minute` says how many it stands
    for. At most `limit` markers, the strongest first."""
    return _frame(engine, f"""
        WITH best AS (
            SELECT DISTINCT ON (symbol, date_trunc('minute', ts))
                   trade_id, ts, symbol, anomaly_severity, anomaly_types, anomaly_score,
                   count(*) OVER (PARTITION BY symbol, date_trunc('minute', ts)) AS in_minute
            FROM trade_flags WHERE ts >= :since AND ts < :until AND {_SYMBOLS}
            ORDER BY symbol, date_trunc('minute', ts), anomaly_score DESC)
        SELECT b.ts, b.symbol, t.price, t.quantity, b.anomaly_severity AS severity,
               array_to_string(b.anomaly_types, ', ') AS types, b.anomaly_score AS score, b.in_minute
        FROM best b JOIN trades t USING (trade_id, ts)
        WHERE t.ts >= :since AND t.ts < :until
        ORDER BY b.anomaly_score DESC LIMIT :limit""", symbols=symbols, since=since, until=until, limit=limit)


def per_symbol(engine: Engine, source: str, symbols: list[str] | None, since, until) -> pd.DataFrame:
    return _frame(engine, f"""
        SELECT symbol, sum(volume) AS volume, sum(traded_value) AS traded_value, sum(trade_count) AS trades
        FROM {_table(source)}
        WHERE window_size = '{BASE_SIZE}' AND window_start >= :since AND window_start < :until AND {_SYMBOLS}
        GROUP BY symbol ORDER BY volume DESC""", symbols=symbols, since=since, until=until)


def scanner(engine: Engine, source: str, symbols: list[str] | None, since, until) -> pd.DataFrame:
    """Per symbol: last price, % change over the range, VWAP, volume, buy share, and a signal:
    BUY when buyers dominate (> 55 % of signed volume) and price is above VWAP, SELL for the
    mirror image, NEUTRAL otherwise."""
    return _frame(engine, f"""
        WITH w AS (
            SELECT symbol, window_start, open, close, volume, traded_value, buy_volume, sell_volume
            FROM {_table(source)}
            WHERE window_size = '{BASE_SIZE}' AND window_start >= :since AND window_start < :until AND {_SYMBOLS}),
        s AS (
            SELECT symbol,
                   (array_agg(close ORDER BY window_start DESC) FILTER (WHERE close IS NOT NULL))[1] AS last,
                   (array_agg(open ORDER BY window_start) FILTER (WHERE open IS NOT NULL))[1] AS first_open,
                   sum(traded_value) / nullif(sum(volume), 0) AS vwap, sum(volume) AS volume,
                   sum(buy_volume) / nullif(sum(buy_volume) + sum(sell_volume), 0) AS buy_share
            FROM w GROUP BY symbol)
        SELECT symbol, last, round(((last / first_open - 1) * 100)::numeric, 3)::float8 AS change_pct,
               vwap, volume, buy_share,
               CASE WHEN buy_share > 0.55 AND last > vwap THEN 'BUY'
                    WHEN buy_share < 0.45 AND last < vwap THEN 'SELL' ELSE 'NEUTRAL' END AS signal
        FROM s ORDER BY symbol""", symbols=symbols, since=since, until=until)


def whale_trades(engine: Engine, symbols: list[str] | None, since, until, limit: int = 6) -> pd.DataFrame:
    return _frame(engine, """
        SELECT t.ts, t.symbol, t.price, t.quantity, t.price * t.quantity AS value, t.side, f.anomaly_score AS score
        FROM trade_flags f JOIN trades t USING (trade_id)
        WHERE 'VOLUME_SPIKE' = ANY(f.anomaly_types) AND f.ts >= :since AND f.ts < :until
          AND (CAST(:symbols AS text[]) IS NULL OR f.symbol = ANY(CAST(:symbols AS text[])))
        ORDER BY f.ts DESC LIMIT :limit""", symbols=symbols, since=since, until=until, limit=limit)


def trade_tape(engine: Engine, symbols: list[str] | None, anomalies_only: bool, limit: int = 25) -> pd.DataFrame:
    """The newest trades (or the newest flagged ones), each with its flag's severity if any."""
    symbol_filter = "(CAST(:symbols AS text[]) IS NULL OR t.symbol = ANY(CAST(:symbols AS text[])))"
    if anomalies_only:   # walk the flags' index, not every trade
        source, newest_first = "trade_flags f JOIN trades t USING (trade_id)", "f.ts DESC"
    else:
        source, newest_first = "trades t LEFT JOIN trade_flags f USING (trade_id)", "t.ts DESC"
    return _frame(engine, f"""
        SELECT t.ts, t.symbol, t.side, t.price, t.quantity, t.exchange, f.anomaly_severity AS severity
        FROM {source} WHERE {symbol_filter}
        ORDER BY {newest_first} LIMIT :limit""", symbols=symbols, limit=limit)


def symbol_flags(engine: Engine, symbol: str, since, until, limit: int = 50) -> pd.DataFrame:
    """The newest flagged trades of one symbol with what the detector said about each."""
    return _frame(engine, """
        SELECT f.ts, t.side, t.price, t.quantity, f.anomaly_severity AS severity,
               array_to_string(f.anomaly_types, ', ') AS types, f.anomaly_score AS score
        FROM trade_flags f JOIN trades t USING (trade_id, ts)
        WHERE f.symbol = :symbol AND f.ts >= :since AND f.ts < :until AND t.ts >= :since AND t.ts < :until
        ORDER BY f.ts DESC LIMIT :limit""", symbol=symbol, since=since, until=until, limit=limit)


def stage_health(engine: Engine) -> pd.DataFrame:
    """Per stage process: seconds since its last heartbeat, what it handled, its lag and partitions.
    Rows of processes that are gone stay until the stage's next start, so a crash stays visible."""
    return _frame(engine, health.STAGE_HEALTH_SQL)


def pipeline(engine: Engine, since, step_s: int = 10) -> pd.DataFrame:
    """The pipeline over time from `stage_samples` (tradewatch/heartbeat.py), a row per stage and
    `step_s` seconds (on whole steps of the clock): records handled and arriving per second, lag,
    latency p50/p99 and how many measurements they rest on. A stage's processes are summed at
    each sample time (latencies: the slowest); within a step, the rates are averaged and the lag
    and latencies are the highest sample's, so a step never hides a stall."""
    return _frame(engine, """
        WITH at_once AS (
            SELECT at, stage, sum(per_s) AS per_s, sum(arriving_per_s) AS arriving_per_s, sum(lag) AS lag,
                   max(latency_p50_ms) AS p50_ms, max(latency_p99_ms) AS p99_ms, sum(latency_count) AS measured
            FROM stage_samples WHERE at >= :since GROUP BY at, stage)
        SELECT date_bin(make_interval(secs => :step), at, TIMESTAMPTZ 'epoch') AS at, stage,
               avg(per_s)::float8 AS per_s, avg(arriving_per_s)::float8 AS arriving_per_s, max(lag)::float8 AS lag,
               max(p50_ms) AS p50_ms, max(p99_ms) AS p99_ms, sum(measured)::bigint AS measured
        FROM at_once GROUP BY 1, stage ORDER BY 1, stage""", since=since, step=step_s)


def alerts_feed(engine: Engine, severities: list[str], symbols: list[str] | None, limit: int = 50) -> pd.DataFrame:
    return _frame(engine, f"""
        SELECT alert_id, ts, symbol, alert_type, severity, message, acknowledged, disposition
        FROM alerts WHERE severity = ANY(CAST(:severities AS text[])) AND {_SYMBOLS}
        ORDER BY ts DESC, alert_id LIMIT :limit""", severities=severities, symbols=symbols, limit=limit)


# ---------------------------------------------------------------- the read API (tradewatch/api_app.py)

def latest_trades(engine: Engine) -> pd.DataFrame:
    """The newest trade of each symbol, from `latest_trades` (one row per symbol, kept by
    writer.write_batch: schema.sql): the same cost however many day partitions `trades` has."""
    return _frame(engine, "SELECT symbol, ts, price, quantity, side, exchange, trade_id FROM latest_trades"
                          " ORDER BY symbol")


def order_books(engine: Engine, symbols: list[str] | None, depth: int) -> list[dict]:
    """The books the quotes stage holds (`order_books`, as of its last checkpoint), of `symbols` (None:
    all), each with its best `depth` levels a side, by symbol."""
    with engine.connect() as conn:
        rows = conn.execute(text(
            "SELECT symbol, exchange, ts, seq, stale, gaps, updated_at,"
            " (SELECT coalesce(jsonb_agg(l ORDER BY n), '[]')"
            "  FROM jsonb_array_elements(bids) WITH ORDINALITY AS b(l, n) WHERE n <= :depth) AS bids,"
            " (SELECT coalesce(jsonb_agg(l ORDER BY n), '[]')"
            "  FROM jsonb_array_elements(asks) WITH ORDINALITY AS a(l, n) WHERE n <= :depth) AS asks"
            " FROM order_books WHERE CAST(:symbols AS text[]) IS NULL OR symbol = ANY(:symbols) ORDER BY symbol"),
            {"symbols": symbols, "depth": depth}).mappings().all()
    return [dict(row) for row in rows]


def order_book(engine: Engine, symbol: str, depth: int) -> dict | None:
    """One symbol's book as `order_books` gives it; None when the quotes stage holds none."""
    found = order_books(engine, [symbol], depth)
    return found[0] if found else None


def book_checkpoint(engine: Engine, group: str, topic: str, symbols: list[str] | None) -> tuple[list[dict], dict]:
    """The quotes stage's last checkpoint: its books of `symbols` (None: all) that are not stale,
    every level (symbol, exchange, ms, seq, bids, asks), and the next offset of each partition of
    `topic` it had read them to. Read in one snapshot of the database, so the two agree (the stage
    writes them in one transaction)."""
    with engine.connect().execution_options(isolation_level="REPEATABLE READ") as conn, conn.begin():
        books = conn.execute(text(
            "SELECT symbol, exchange, (extract(epoch FROM ts) * 1000)::bigint AS ms, seq, bids, asks FROM order_books"
            " WHERE NOT stale AND (CAST(:symbols AS text[]) IS NULL OR symbol = ANY(:symbols)) ORDER BY symbol"),
            {"symbols": symbols}).mappings().all()
        positions = conn.execute(text("SELECT kafka_partition, next_offset FROM stage_positions"
                                      " WHERE consumer_group = :group AND topic = :topic"),
                                 {"group": group, "topic": topic}).all()
    return [dict(book) for book in books], dict(positions)


def trades_page(engine: Engine, symbol: str, since, until, after: tuple | None, limit: int) -> pd.DataFrame:
    """Keyset pagination on (ts, trade_id): a page never skips or repeats a trade."""
    return _frame(engine, """
        SELECT trade_id, symbol, ts, price, quantity, side, exchange, bid, ask, condition
        FROM trades
        WHERE symbol = :symbol AND (CAST(:since AS timestamptz) IS NULL OR ts >= :since)
          AND (CAST(:until AS timestamptz) IS NULL OR ts < :until)
          AND (CAST(:after_ts AS timestamptz) IS NULL OR (ts, trade_id) > (CAST(:after_ts AS timestamptz), :after_id))
        ORDER BY ts, trade_id LIMIT :limit""", symbol=symbol, since=since, until=until,
                  after_ts=after[0] if after else None, after_id=after[1] if after else None, limit=limit)


def manipulation_events(engine: Engine, symbol: str | None, since, limit: int) -> pd.DataFrame:
    """Pump-and-dump events, newest first (tradewatch/detect/pump.py)."""
    return _frame(engine, """
        SELECT event_id, symbol, state, started_at, start_price, peak_at, peak_price, gain_pct, volume_multiple,
               burst_trades, buy_share, dump_depth_pct, dump_seconds, ended_at, updated_at
        FROM manipulation_events
        WHERE (CAST(:symbol AS text) IS NULL OR symbol = :symbol)
          AND (CAST(:since AS timestamptz) IS NULL OR started_at >= :since)
        ORDER BY started_at DESC, event_id LIMIT :limit""", symbol=symbol, since=since, limit=limit)


def alerts_page(engine: Engine, symbol: str | None, alert_type: str | None, severities: list[str] | None,
                since, until, acknowledged: bool | None, limit: int, disposition: str | None = None) -> pd.DataFrame:
    """`disposition`: one of store.detections.DISPOSITIONS, or 'unmarked' for the alerts nobody judged."""
    return _frame(engine, """
        SELECT alert_id, ts, symbol, alert_type, severity, message, trade_id, acknowledged, acknowledged_at,
               disposition, evidence
        FROM alerts
        WHERE (CAST(:symbol AS text) IS NULL OR symbol = :symbol)
          AND (CAST(:alert_type AS text) IS NULL OR alert_type = :alert_type)
          AND (CAST(:severities AS text[]) IS NULL OR severity = ANY(CAST(:severities AS text[])))
          AND (CAST(:since AS timestamptz) IS NULL OR ts >= :since)
          AND (CAST(:until AS timestamptz) IS NULL OR ts < :until)
          AND (CAST(:acknowledged AS boolean) IS NULL OR acknowledged = :acknowledged)
          AND (CAST(:disposition AS text) IS NULL OR disposition = :disposition
               OR (:disposition = 'unmarked' AND disposition IS NULL))
        ORDER BY ts DESC, alert_id LIMIT :limit""", symbol=symbol, alert_type=alert_type, severities=severities,
                  since=since, until=until, acknowledged=acknowledged, limit=limit, disposition=disposition)


def alerts_after(engine: Engine, alert_id: str, symbols: list[str] | None, severities: list[str] | None,
                 limit: int) -> pd.DataFrame | None:
    """The alerts stored after `alert_id` (oldest first, as they were published), in the `alerts`
    topic's JSON fields; None when there is no such alert."""
    if not alert_exists(engine, alert_id):
        return None
    return _frame(engine, """
        SELECT a.alert_id, (extract(epoch FROM a.ts) * 1000)::bigint AS timestamp_ms, a.symbol, a.alert_type,
               a.severity, a.message, a.trade_id, a.details, a.evidence
        FROM alerts a, (SELECT created_at, alert_id FROM alerts WHERE alert_id = :alert_id) AS anchor
        WHERE (a.created_at, a.alert_id) > (anchor.created_at, anchor.alert_id)
          AND (CAST(:symbols AS text[]) IS NULL OR a.symbol = ANY(CAST(:symbols AS text[])))
          AND (CAST(:severities AS text[]) IS NULL OR a.severity = ANY(CAST(:severities AS text[])))
        ORDER BY a.created_at, a.alert_id LIMIT :limit""", alert_id=alert_id, symbols=symbols,
                  severities=severities, limit=limit)


def candles_after(engine: Engine, candle_id: str, symbols: list[str] | None, sizes: list[str] | None,
                  limit: int) -> list[bytes] | None:
    """The final candles the aggregator queued after `candle_id` (`AAPL:1m:<start ms>`; oldest first,
    as the `candles` topic has them), as that topic's messages; None when it is not in the outbox
    (never final, or published more than a day ago)."""
    symbol, size, start_ms = ([*candle_id.rsplit(":", 2)] + ["", ""])[:3]
    if not start_ms.isdigit() or len(start_ms) > 15:
        return None
    anchor = _frame(engine, "SELECT seq FROM candle_outbox WHERE symbol = :symbol AND window_size = :size"
                            " AND window_start = timestamptz 'epoch' + CAST(:ms AS bigint) * interval '1 millisecond'",
                    symbol=symbol, size=size, ms=int(start_ms))
    if anchor.empty:
        return None
    rows = _frame(engine, final_candles("""seq > :seq
          AND (CAST(:symbols AS text[]) IS NULL OR symbol = ANY(CAST(:symbols AS text[])))
          AND (CAST(:sizes AS text[]) IS NULL OR window_size = ANY(CAST(:sizes AS text[])))""", ":limit"),
                  seq=int(anchor["seq"].iloc[0]), symbols=symbols, sizes=sizes, limit=limit)
    return [candle_message(row) for row in rows.to_dict("records")]


def alert(engine: Engine, alert_id: str) -> pd.DataFrame:
    """One alert with its evidence (null for an alert stored before evidence was kept); no row if none."""
    return _frame(engine, """
        SELECT alert_id, ts, symbol, alert_type, severity, message, trade_id, details, evidence, acknowledged,
               acknowledged_at, disposition, created_at
        FROM alerts WHERE alert_id = :alert_id ORDER BY ts LIMIT 1""", alert_id=alert_id)


def disposition_history(engine: Engine, alert_id: str) -> pd.DataFrame:
    """Every change of an alert's disposition, oldest first."""
    return _frame(engine, """
        SELECT at, previous, disposition, note, by_whom, via FROM alert_dispositions
        WHERE alert_id = :alert_id ORDER BY change_id""", alert_id=alert_id)


def rule_precision(engine: Engine, symbols: list[str] | None, since, until) -> pd.DataFrame:
    """Per alert type over [since, until): alerts, how many analysts marked true, false and for
    review (tradewatch/alerts.py `precision` reads it)."""
    return _frame(engine, f"""
        SELECT alert_type AS rule, count(*) AS alerts,
               count(*) FILTER (WHERE disposition = 'true_positive') AS true_positive,
               count(*) FILTER (WHERE disposition = 'false_positive') AS false_positive,
               count(*) FILTER (WHERE disposition = 'needs_review') AS needs_review
        FROM alerts WHERE (CAST(:since AS timestamptz) IS NULL OR ts >= :since)
          AND (CAST(:until AS timestamptz) IS NULL OR ts < :until) AND {_SYMBOLS}
        GROUP BY alert_type ORDER BY count(*) DESC, alert_type""", symbols=symbols, since=since, until=until)


def alert_exists(engine: Engine, alert_id: str) -> bool:
    return not _frame(engine, "SELECT 1 AS found FROM alerts WHERE alert_id = :alert_id", alert_id=alert_id).empty


def dead_letter_summary(engine: Engine) -> pd.DataFrame:
    return _frame(engine, """
        SELECT reason, count(*) AS messages, min(received_at) AS first_received, max(received_at) AS last_received
        FROM dead_letters GROUP BY reason ORDER BY count(*) DESC, reason LIMIT 100""")


# --- the period report (tradewatch/report) -------------------------------------------------------
# Every figure straight from the stored trades and detections; sums of money and volume in exact
# decimals (numeric), so a report never shows a digit that floating-point sums made up.

def report_symbols(engine: Engine, symbols: list[str] | None, since, until, excluded: list[str]) -> pd.DataFrame:
    """Per symbol over [since, until): open/high/low/close (trades whose condition is in `excluded`
    never set a price, as in the aggregator), trades, volume, traded value, first and last trade,
    largest trade, and realised volatility = sqrt(sum of squared log returns between the
    aggregator's consecutive 1-minute closes). One pass over the trades; open, close and the
    largest trade's price are index lookups."""
    sets_price = "(condition IS NULL OR NOT condition = ANY(CAST(:excluded AS text[])))"
    in_period = "symbol = totals.symbol AND ts >= :since AND ts < :until"
    return _frame(engine, f"""
        WITH totals AS (
            SELECT symbol, count(*) AS trades, sum(CAST(quantity AS numeric)) AS volume,
                   sum(CAST(price AS numeric) * CAST(quantity AS numeric)) AS traded_value,
                   min(ts) AS first_trade, max(ts) AS last_trade,
                   max(ARRAY[quantity, -date_part('epoch', ts)]) AS largest,     -- the largest, earliest first
                   max(price) FILTER (WHERE {sets_price}) AS high, min(price) FILTER (WHERE {sets_price}) AS low,
                   count(*) FILTER (WHERE NOT {sets_price}) AS excluded_from_ohlc
            FROM trades WHERE ts >= :since AND ts < :until AND {_SYMBOLS} GROUP BY symbol),
        returns AS (
            SELECT symbol, ln(close / lag(close) OVER (PARTITION BY symbol ORDER BY window_start)) AS r
            FROM stock_metrics
            WHERE window_size = '{BASE_SIZE}' AND window_start >= :since AND window_start < :until AND close IS NOT NULL
              AND {_SYMBOLS}),
        volatility AS (SELECT symbol, sqrt(sum(r * r)) AS realised_volatility FROM returns GROUP BY symbol)
        SELECT totals.symbol, first_price.price AS open, high, low, last_price.price AS close, trades, volume,
               traded_value, traded_value / nullif(volume, 0) AS vwap, first_trade, last_trade, excluded_from_ohlc,
               largest[1] AS largest_quantity, largest_trade.price AS largest_price, largest_trade.ts AS largest_at,
               realised_volatility
        FROM totals
        LEFT JOIN LATERAL (SELECT price FROM trades WHERE {in_period} AND {sets_price}
                           ORDER BY ts, trade_id LIMIT 1) first_price ON true
        LEFT JOIN LATERAL (SELECT price FROM trades WHERE {in_period} AND {sets_price}
                           ORDER BY ts DESC, trade_id DESC LIMIT 1) last_price ON true
        LEFT JOIN LATERAL (SELECT price, ts FROM trades WHERE {in_period} AND quantity = totals.largest[1]
                             AND ts BETWEEN to_timestamp(-totals.largest[2]) - interval '1 millisecond'
                                        AND to_timestamp(-totals.largest[2]) + interval '1 millisecond'
                           ORDER BY ts, trade_id LIMIT 1) largest_trade ON true
        LEFT JOIN volatility ON volatility.symbol = totals.symbol
        ORDER BY totals.symbol""", exact=True, symbols=symbols, since=since, until=until, excluded=excluded)


def report_closing_indicators(engine: Engine, symbols: list[str] | None, since, until) -> pd.DataFrame:
    """Per symbol, the indicators of its last 1-minute window in [since, until), with the MACD
    histogram of the window before (a change of sign there is a crossing)."""
    return _frame(engine, f"""
        SELECT DISTINCT ON (symbol) symbol, window_start, close, rsi_14, macd, macd_signal, macd_histogram,
               previous_histogram
        FROM (SELECT *, lag(macd_histogram) OVER (PARTITION BY symbol ORDER BY window_start) AS previous_histogram
              FROM indicators
              WHERE window_size = '{BASE_SIZE}' AND window_start >= :since AND window_start < :until
                AND {_SYMBOLS}) windows
        ORDER BY symbol, window_start DESC""", symbols=symbols, since=since, until=until)


def report_gaps(engine: Engine, symbols: list[str] | None, since, until, at_least_s: float) -> pd.DataFrame:
    """Stretches of at least `at_least_s` seconds without any trade (of the chosen symbols)."""
    return _frame(engine, f"""
        SELECT gap_start, gap_end, extract(epoch FROM gap_end - gap_start) AS seconds FROM (
            SELECT ts AS gap_start, lead(ts) OVER (ORDER BY ts) AS gap_end
            FROM trades WHERE ts >= :since AND ts < :until AND {_SYMBOLS}) g
        WHERE gap_end - gap_start >= make_interval(secs => :at_least) ORDER BY gap_start""",
                  symbols=symbols, since=since, until=until, at_least=at_least_s)


def report_anomalies(engine: Engine, symbols: list[str] | None, since, until) -> pd.DataFrame:
    """Flagged trades by anomaly type and severity (a trade with two types counts once for each)."""
    return _frame(engine, f"""
        SELECT anomaly_type, anomaly_severity AS severity, count(*) AS trades
        FROM trade_flags, unnest(anomaly_types) AS anomaly_type
        WHERE ts >= :since AND ts < :until AND {_SYMBOLS}
        GROUP BY 1, 2 ORDER BY 3 DESC, 1, 2""", symbols=symbols, since=since, until=until)


def report_top_flags(engine: Engine, symbols: list[str] | None, since, until, limit: int = 20) -> pd.DataFrame:
    return _frame(engine, """
        SELECT f.ts, f.symbol, t.price, t.quantity, array_to_string(f.anomaly_types, ', ') AS types,
               f.anomaly_severity AS severity, f.anomaly_score AS score, f.trade_id
        FROM trade_flags f JOIN trades t USING (trade_id, ts)
        WHERE f.ts >= :since AND f.ts < :until AND t.ts >= :since AND t.ts < :until
          AND (CAST(:symbols AS text[]) IS NULL OR f.symbol = ANY(CAST(:symbols AS text[])))
        ORDER BY f.anomaly_score DESC, f.ts, f.trade_id LIMIT :limit""",
                  symbols=symbols, since=since, until=until, limit=limit)


def report_alert_reasons(engine: Engine, symbols: list[str] | None, since, until, limit: int) -> pd.DataFrame:
    """The most severe alerts of the period, earliest first within a severity, and why each fired
    (its evidence's sentence; the message of an alert stored before evidence was kept)."""
    return _frame(engine, f"""
        SELECT ts, symbol, alert_type, severity, coalesce(evidence->>'sentence', message) AS why
        FROM alerts WHERE ts >= :since AND ts < :until AND {_SYMBOLS}
        ORDER BY array_position(ARRAY['CRITICAL', 'HIGH', 'MEDIUM', 'LOW'], severity), ts, alert_id
        LIMIT :limit""", symbols=symbols, since=since, until=until, limit=limit)


def report_alerts(engine: Engine, symbols: list[str] | None, since, until) -> pd.DataFrame:
    return _frame(engine, f"""
        SELECT severity, count(*) AS alerts, count(*) FILTER (WHERE acknowledged) AS acknowledged
        FROM alerts WHERE ts >= :since AND ts < :until AND {_SYMBOLS}
        GROUP BY severity ORDER BY array_position(ARRAY['CRITICAL', 'HIGH', 'MEDIUM', 'LOW'], severity)""",
                  symbols=symbols, since=since, until=until)


def report_breaker_openings(engine: Engine, symbols: list[str] | None, since, until) -> pd.DataFrame:
    return _frame(engine, f"""
        SELECT symbol, at FROM breaker_transitions
        WHERE state = 'OPEN' AND at >= :since AND at < :until AND {_SYMBOLS} ORDER BY at, symbol""",
                  symbols=symbols, since=since, until=until)


def report_events(engine: Engine, symbols: list[str] | None, since, until) -> pd.DataFrame:
    """Pump-and-dump events that started in the period, in the order they started."""
    return _frame(engine, f"""
        SELECT symbol, state, started_at, start_price, peak_at, peak_price, gain_pct, volume_multiple,
               burst_trades, buy_share, dump_depth_pct, dump_seconds, ended_at
        FROM manipulation_events
        WHERE started_at >= :since AND started_at < :until AND {_SYMBOLS} ORDER BY started_at, symbol""",
                  symbols=symbols, since=since, until=until)


def report_data_quality(engine: Engine, symbols: list[str] | None, since, until,
                        excluded: list[str]) -> dict[str, pd.DataFrame]:
    """Dead letters received in the period by reason (they have no trustworthy event time), late
    trades by reason and trades kept out of OHLC by condition (both by event time)."""
    return {
        "dead_letters": _frame(engine, """
            SELECT reason, count(*) AS messages FROM dead_letters
            WHERE received_at >= :since AND received_at < :until GROUP BY reason ORDER BY 2 DESC, 1""",
                               since=since, until=until),
        "late_trades": _frame(engine, f"""
            SELECT reason, count(DISTINCT trade_id) AS trades FROM late_trades
            WHERE ts >= :since AND ts < :until AND {_SYMBOLS} GROUP BY reason ORDER BY 2 DESC, 1""",
                              symbols=symbols, since=since, until=until),
        "excluded_from_ohlc": _frame(engine, f"""
            SELECT condition, count(*) AS trades FROM trades
            WHERE ts >= :since AND ts < :until AND {_SYMBOLS} AND condition = ANY(CAST(:excluded AS text[]))
            GROUP BY condition ORDER BY 2 DESC, 1""", symbols=symbols, since=since, until=until, excluded=excluded),
    }


def flag_counts(engine: Engine, symbols: list[str] | None, since, until, bucket: str) -> pd.DataFrame:
    """Flagged trades per `bucket` ('1m', '5m' …, epoch-aligned) and anomaly type."""
    return _frame(engine, f"""
        SELECT date_bin(CAST(:bucket AS interval), ts, TIMESTAMPTZ '1970-01-01') AS bucket, anomaly_type,
               count(*) AS trades
        FROM trade_flags, unnest(anomaly_types) AS anomaly_type
        WHERE ts >= :since AND ts < :until AND {_SYMBOLS} GROUP BY 1, 2 ORDER BY 1, 2""",
                  symbols=symbols, since=since, until=until, bucket=bucket)


def storage(engine: Engine, home) -> dict:
    """What the data takes and what is left: the database's size, the span of the stored trades,
    the oldest trades partition, the Parquet archive's size, and the free disk where TRADEWATCH_HOME
    (Kafka's and PostgreSQL's data) lives; `low` below tradewatch.disk's line. Shown by doctor, /health
    and the dashboard's health strip."""
    from tradewatch import disk

    row = _frame(engine, "SELECT pg_database_size(current_database()) AS database_bytes,"
                         " (SELECT min(ts) FROM trades) AS oldest, (SELECT max(ts) FROM trades) AS newest").iloc[0]
    names = _frame(engine, "SELECT c.relname AS name FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
                           " WHERE i.inhparent = 'trades'::regclass")["name"]
    # trades_pYYYYMMDD (a day) or trades_yYYYY (a year): the oldest by its start
    oldest_partition = min(names, key=lambda n: n[8:] + "0101" if n[7] == "y" else n[8:], default=None)
    archive_bytes = disk.archive_bytes(home)
    found = disk.usage(home)
    stamp = lambda v: None if pd.isna(v) else pd.Timestamp(v).isoformat()       # noqa: E731
    return {"database_bytes": int(row["database_bytes"]), "oldest_trade": stamp(row["oldest"]),
            "newest_trade": stamp(row["newest"]), "oldest_partition": oldest_partition,
            "archive_bytes": int(archive_bytes), "free_disk_bytes": found.free,
            "free_disk_percent": round(found.free_percent, 1), "low": found.low}


def oldest_open_window(engine: Engine, since) -> pd.Timestamp | None:
    """Start of the oldest aggregator window starting at or after `since` that is not final yet."""
    value = _frame(engine, "SELECT min(window_start) AS oldest FROM stock_metrics WHERE NOT is_final"
                           " AND window_start >= :since", since=since)["oldest"].iloc[0]
    return None if pd.isna(value) else pd.Timestamp(value)


def stuck_windows(engine: Engine, before) -> tuple[int, str]:
    """How many windows starting before `before` are still not final, and one of them."""
    frame = _frame(engine, "SELECT count(*) OVER () AS n, symbol, window_size, window_start FROM stock_metrics"
                           " WHERE NOT is_final AND window_start < :before ORDER BY window_start LIMIT 1", before=before)
    if frame.empty:
        return 0, ""
    row = frame.iloc[0]
    return int(row["n"]), f"{row['symbol']} {row['window_size']} at {pd.Timestamp(row['window_start']).isoformat()}"


def oldest_trade(engine: Engine) -> pd.Timestamp | None:
    value = _frame(engine, "SELECT min(ts) AS oldest FROM trades")["oldest"].iloc[0]
    return None if pd.isna(value) else pd.Timestamp(value)


def size_histograms(engine: Engine, symbols: list[str] | None, since, until) -> pd.DataFrame:
    """Trades per (symbol, UTC day, size): what the market-quality statistics read
    (tradewatch/detect/quality.py), one row per distinct size however many trades there were."""
    return _frame(engine, f"""
        SELECT symbol, date_trunc('day', ts AT TIME ZONE 'UTC')::date AS day, quantity AS size, count(*) AS trades
        FROM trades
        WHERE (CAST(:since AS timestamptz) IS NULL OR ts >= :since)
          AND (CAST(:until AS timestamptz) IS NULL OR ts < :until) AND {_SYMBOLS}
        GROUP BY 1, 2, 3 ORDER BY 1, 2, 3""", symbols=symbols, since=since, until=until)


def minute_volumes(engine: Engine, symbols: list[str] | None, since, until) -> pd.DataFrame:
    """The aggregator's 1-minute candles' volume and close per (symbol, UTC day), in time order."""
    return _frame(engine, f"""
        SELECT symbol, date_trunc('day', window_start AT TIME ZONE 'UTC')::date AS day, window_start, volume, close
        FROM stock_metrics
        WHERE window_size = '{BASE_SIZE}' AND (CAST(:since AS timestamptz) IS NULL OR window_start >= :since)
          AND (CAST(:until AS timestamptz) IS NULL OR window_start < :until) AND {_SYMBOLS}
        ORDER BY 1, 3""", symbols=symbols, since=since, until=until)
