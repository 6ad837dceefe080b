"""Writes and restart state of the window tables (stock_metrics, late_trades, indicators), the
outbox of the `candles` topic (candle_outbox), and the backfill that rebuilds windows straight
from `trades`. (The aggregator's position is kept by the stage runtime: tradewatch/store/positions.py.)"""
from __future__ import annotations

from datetime import datetime

import psycopg2.extensions
from psycopg2.extras import execute_values

from psycopg2.extras import RealDictCursor

from tradewatch import candles, volatility
from tradewatch.indicators import INDICATOR_COLUMNS, Indicators, IndicatorState
from tradewatch.store import partitions
from tradewatch.volatility import FORECAST_COLUMNS, ForecastState
from tradewatch.windows import LateTrade, Window, parse_size, size_label

Cursor = psycopg2.extensions.cursor
_MS = "timestamptz 'epoch' + %s * interval '1 millisecond'"

# every write, restore and rebuild of stock_metrics is spelled from tradewatch/candles.py
_COLUMNS = candles.names(candles.STOCK_METRICS)
_TEMPLATE = "(" + ", ".join(_MS if c.is_time else "%s" for c in candles.STOCK_METRICS) + ")"
UPSERT_SET = ", ".join(f"{c.name} = EXCLUDED.{c.name}" for c in candles.STOCK_METRICS
                       if c.name not in candles.KEY) + ", updated_at = now()"
_FROM_TRADES = ", ".join(c.from_trades for c in candles.STOCK_METRICS)


def write_windows(cur: Cursor, windows: list[Window]) -> None:
    if not windows:
        return
    partitions.ensure_candles(cur, "stock_metrics", {(size_label(w.size_ms), w.start_ms) for w in windows})
    execute_values(
        cur,
        f"INSERT INTO stock_metrics ({_COLUMNS}) VALUES %s "
        # a final window is never changed again (a restart must not turn it back into an open one)
        f"ON CONFLICT ({', '.join(candles.KEY)}) DO UPDATE SET {UPSERT_SET} WHERE NOT stock_metrics.is_final",
        [candles.row(w) for w in windows],
        template=_TEMPLATE,
        page_size=1000,
    )


def queue_final(cur: Cursor, final: list[Window]) -> None:
    """The newly final windows into the `candles` outbox, in the checkpoint's transaction (a
    redone checkpoint finds them there: each candle is queued once, at its first place)."""
    if final:
        execute_values(cur, "INSERT INTO candle_outbox (symbol, window_size, window_start, kafka_partition) "
                            "VALUES %s ON CONFLICT DO NOTHING",
                       [(w.symbol, size_label(w.size_ms), w.start_ms, w.partition) for w in final],
                       template=f"(%s, %s, {_MS}, %s)")


def final_candles(picked: str, limit: str) -> str:
    """The queued candles `picked` (a condition on candle_outbox), the `limit` oldest, as they are
    published (candles.STREAMED), with their place in the outbox. The outbox rows are chosen first
    and only they are joined: joined first, PostgreSQL's plan matched a whole backlog (27,000 candles
    of a catch-up, scanning every stock_metrics partition) for each batch of 1,000."""
    return f"""
    SELECT o.seq, o.symbol, o.window_size, (extract(epoch FROM o.window_start) * 1000)::bigint AS window_start_ms,
           (extract(epoch FROM m.window_end) * 1000)::bigint AS window_end_ms,
           {', '.join(f'm.{c}' for c in candles.FIGURES)},
           {', '.join(f'i.{c}' for c in (*INDICATOR_COLUMNS, *FORECAST_COLUMNS))}
    FROM (SELECT seq, symbol, window_size, window_start FROM candle_outbox WHERE {picked}
          ORDER BY seq LIMIT {limit}) o
    JOIN stock_metrics m USING (symbol, window_size, window_start)
    LEFT JOIN indicators i USING (symbol, window_size, window_start)
    ORDER BY o.seq"""


_UNPUBLISHED = final_candles("published_at IS NULL AND kafka_partition = ANY(%s)", "%s")


def unpublished(cur: Cursor, partitions: list[int], limit: int) -> list[tuple[int, str, bytes]]:
    """The `candles` outbox of an aggregator holding `partitions`, oldest first: (seq, symbol, message)."""
    with cur.connection.cursor(cursor_factory=RealDictCursor) as named:
        named.execute(_UNPUBLISHED, (partitions, limit))
        return [(r["seq"], r["symbol"], candles.message(r)) for r in named.fetchall()]


def mark_published(cur: Cursor, seqs: list[int]) -> None:
    cur.execute("UPDATE candle_outbox SET published_at = now() WHERE seq = ANY(%s) AND published_at IS NULL", (seqs,))


def forget_published(cur: Cursor, older_than: str) -> int:
    """Delete the published candles final longer ago than `older_than` (a resume reaches no further)."""
    cur.execute("DELETE FROM candle_outbox WHERE published_at IS NOT NULL AND final_at < now() - CAST(%s AS interval)",
                (older_than,))
    return cur.rowcount


def write_late(cur: Cursor, late: list[LateTrade]) -> None:
    if late:
        partitions.ensure(cur, "late_trades", {partitions.day_of(t.timestamp_ms) for t in late})
        execute_values(
            cur,
            "INSERT INTO late_trades (trade_id, window_size, symbol, ts, window_start, watermark, reason) VALUES %s "
            "ON CONFLICT DO NOTHING",
            [(t.trade_id, size_label(t.size_ms), t.symbol, t.timestamp_ms, t.window_start_ms, t.watermark_ms,
              t.reason) for t in late],
            template=f"(%s, %s, %s, {_MS}, {_MS}, {_MS}, %s)",
        )


Series = tuple[IndicatorState, ForecastState]      # what the aggregator folds each final candle of a series into
# a final candle as `indicator_rows` takes it
Final = tuple[str, str, int, float | None, float | None, float | None, float | None, float, int]
_STORED = ("close", *INDICATOR_COLUMNS, *FORECAST_COLUMNS)


def indicator_rows(states: dict[tuple[str, str], Series], forecasters: volatility.Forecasters,
                   final: list[Final]) -> list[list]:
    """The `indicators` rows of final candles (symbol, size label, start ms, open, high, low, close,
    volume, trade count; each series in start order) folded into their series' states: the
    indicators at the candle's close and the forecast of the window after it. A candle without a
    close (its trades all had excluded conditions) moves the forecast's state but has no row."""
    rows, inputs = [], {}
    for symbol, label, start, *candle in final:
        indicators, forecast = states[(symbol, label)]
        known = forecast.update(start, *candle, features=forecasters[label].needs_features)
        close = candle[3]
        if close is None:
            continue
        rows.append([symbol, label, start, close, *_values(indicators.update(close)), *[None] * len(FORECAST_COLUMNS)])
        if known is not None:
            inputs.setdefault(label, []).append((rows[-1], {"symbol": symbol, **known}))
    for label, pairs in inputs.items():
        for row, values in zip([r for r, _ in pairs], forecasters[label].forecast([k for _, k in pairs])):
            row[-len(FORECAST_COLUMNS):] = values
    return rows


def _values(indicators: Indicators) -> list:
    return [getattr(indicators, c) for c in INDICATOR_COLUMNS]


def write_indicators(cur: Cursor, rows: list[list]) -> None:
    if rows:
        partitions.ensure_candles(cur, "indicators", {(r[1], r[2]) for r in rows})
        execute_values(
            cur,
            f"INSERT INTO indicators (symbol, window_size, window_start, {', '.join(_STORED)}) "
            f"VALUES %s ON CONFLICT (symbol, window_size, window_start) DO UPDATE SET "
            + ", ".join(f"{c} = EXCLUDED.{c}" for c in _STORED),
            rows,
            template=f"(%s, %s, {_MS}, " + ", ".join(["%s"] * len(_STORED)) + ")",
        )


def open_windows(cur: Cursor, partition: int, sizes_ms: tuple[int, ...]) -> list[Window]:
    """The windows of one partition that were not final at the last checkpoint (to go on folding)."""
    labels = {size_label(s): s for s in sizes_ms}
    with cur.connection.cursor(cursor_factory=RealDictCursor) as named:
        named.execute(f"SELECT (extract(epoch FROM window_start) * 1000)::bigint AS start_ms, {_COLUMNS}"
                      " FROM stock_metrics WHERE kafka_partition = %s AND NOT is_final", (partition,))
        return [candles.restore(r["symbol"], labels[r["window_size"]], int(r["start_ms"]), partition, r)
                for r in named.fetchall() if r["window_size"] in labels]


def _final_candles(cur: Cursor, label: str, symbols: list[str]) -> None:
    """Execute: the final candles of `symbols` of one size, as `indicator_rows` takes them, in order
    (a constant size: only its partitions are read)."""
    cur.execute("SELECT symbol, window_size, (extract(epoch FROM window_start) * 1000)::bigint,"
                " open, high, low, close, volume, trade_count FROM stock_metrics"
                " WHERE window_size = %s AND symbol = ANY(%s) AND is_final ORDER BY symbol, window_start",
                (label, symbols))


def new_series(label: str) -> Series:
    return IndicatorState(), ForecastState(parse_size(label))


def load_series(cur: Cursor, series: list[tuple[str, str]]) -> dict[tuple[str, str], Series]:
    """Replay the stored final candles of each series (symbol, window size) into fresh states, with
    one query per window size (one per series cost half a catch-up's time on fresh symbols)."""
    states = {key: new_series(key[1]) for key in series}
    for label in sorted({label for _, label in series}):
        _final_candles(cur, label, [symbol for symbol, s in series if s == label])
        for symbol, _, start, *candle in cur:
            indicators, forecast = states[(symbol, label)]
            forecast.update(start, *candle)
            if candle[3] is not None:
                indicators.update(candle[3])
    return states


def backfill(conn: psycopg2.extensions.connection, since: datetime, until: datetime,
             sizes_ms: tuple[int, ...], ohlc_exclude_conditions: frozenset[str],
             live_group: str | None = None, topic: str | None = None,
             forecasters: volatility.Forecasters | None = None) -> int:
    """Rebuild the whole windows between `since` and `until` (both moved to window boundaries:
    `until` down, so no partial window is ever marked final) straight from `trades`, then
    recompute the indicators of every series touched. A window the live aggregator (`live_group`
    on `topic`) still holds open — its row is not final, or it ends after the watermark of its
    partition — is left to the aggregator. `forecasters`: the live aggregator's (the untrained EWMA
    when not given). Returns the number of windows written."""
    forecasters = forecasters if forecasters is not None else volatility.Forecasters()
    written = 0
    excluded = sorted(ohlc_exclude_conditions)
    with conn.cursor() as cur:
        cur.execute("SELECT (extract(epoch FROM min(ts)) * 1000)::bigint, (extract(epoch FROM max(ts)) * 1000)::bigint"
                    " FROM trades WHERE ts >= %s AND ts < %s", (since, until))
        first_ms, last_ms = cur.fetchone()
        for size in sizes_ms:
            label = size_label(size)
            if first_ms is not None:
                partitions.ensure_candles(cur, "stock_metrics", months_between(label, first_ms, last_ms))
            cur.execute(f"""
                WITH binned AS (
                    SELECT *, date_bin(%(step)s * interval '1 millisecond', ts, timestamptz 'epoch') AS bin
                    FROM trades
                    WHERE ts >= date_bin(%(step)s * interval '1 millisecond', %(since)s, timestamptz 'epoch')
                      AND ts < date_bin(%(step)s * interval '1 millisecond', %(until)s, timestamptz 'epoch')),
                held AS (
                    SELECT kafka_partition, (kept ->> 'watermark_ms')::bigint AS watermark_ms FROM stage_positions
                    WHERE consumer_group = %(group)s AND topic = %(topic)s)
                INSERT INTO stock_metrics ({_COLUMNS})
                SELECT {_FROM_TRADES}
                FROM binned GROUP BY symbol, bin
                HAVING NOT EXISTS (
                    SELECT 1 FROM held WHERE held.kafka_partition = min(binned.kafka_partition)
                      AND (held.watermark_ms IS NULL OR (extract(epoch FROM bin) * 1000)::bigint + %(step)s
                                                         > held.watermark_ms))
                ON CONFLICT (symbol, window_size, window_start) DO UPDATE SET {UPSERT_SET}
                    WHERE stock_metrics.is_final
                RETURNING symbol""",
                dict(step=size, since=since, until=until, label=label, excluded=excluded, group=live_group,
                     topic=topic))
            symbols = {r[0] for r in cur.fetchall()}
            written += cur.rowcount
            for symbol in symbols:
                recompute_indicators(cur, symbol, label, forecasters)
    conn.commit()
    return written


def months_between(label: str, first_ms: int, last_ms: int) -> set[tuple[str, int]]:
    """(label, a start in each month from `first_ms` to `last_ms`): the candle partitions a range needs."""
    month, last, found = partitions.month_of(first_ms), partitions.month_of(last_ms), set()
    while month <= last:
        found.add((label, month * partitions.DAY_MS))
        month = partitions.month_of((month + 32) * partitions.DAY_MS)
    return found


def recompute_indicators(cur: Cursor, symbol: str, label: str, forecasters: volatility.Forecasters) -> None:
    _final_candles(cur, label, [symbol])
    rows = indicator_rows({(symbol, label): new_series(label)}, forecasters, cur.fetchall())
    cur.execute("DELETE FROM indicators WHERE symbol = %s AND window_size = %s", (symbol, label))
    write_indicators(cur, rows)
