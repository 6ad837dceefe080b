"""A known market written straight into PostgreSQL: trades (COPY path), windows (backfill),
indicators, flags and alerts (the detector's own code), for tests that read the tables."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone
from itertools import islice

from tradewatch.alerts import Deduplicator, alerts_for, book_alert
from tradewatch.book import OrderBook
from tradewatch.detect.evaluate import book_detections
from tradewatch.detect.pipeline import DetectionPipeline
from tradewatch.events import Trade
from tradewatch.market.books import with_books
from tradewatch.market.simulator import MarketSimulator
from tradewatch.store import db
from tradewatch.store.books import write_books
from tradewatch.store import detections as flags
from tradewatch.store.candles import backfill
from tradewatch.store.writer import copy_row, write_batch
from tradewatch.windows import parse_size

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


def load_known_market(settings, count: int = 6000, seed: int = 8, sizes: tuple[str, ...] = ("1m", "5m", "15m")) -> int:
    trades = list(islice(MarketSimulator(seed=seed, rate=20.0, anomaly_rate=0.01,
                                         start_ms=int(T0.timestamp() * 1000)), count))
    conn = db.connect(settings)
    try:
        return _load(conn, trades, sizes)
    finally:
        conn.close()      # never left open in a transaction: its locks would hold up every TRUNCATE


def load_known_books(settings, count: int = 2000, seed: int = 8, anomaly_rate: float = 0.0) -> dict[str, OrderBook]:
    """Each symbol's book after `count` trades of the simulator's market with its books, stored in
    `order_books` as the quotes stage stores its checkpoint (store/books.py); with `anomaly_rate`,
    spoofing and quote stuffing injected and the book watch's alerts stored as the stage stores them."""
    books: dict[str, OrderBook] = {}
    events = with_books(MarketSimulator(seed=seed, rate=20.0, start_ms=int(T0.timestamp() * 1000)), 10, seed=seed,
                        books=books, anomaly_rate=anomaly_rate)
    messages, trades = [], 0
    for e in events:
        if type(e) is not Trade:
            messages.append(e)
            continue
        trades += 1
        if trades == count:
            break
    found, _ = book_detections(messages)
    conn = db.connect(settings)
    try:
        with conn.cursor() as cur:
            write_books(cur, [(0, book, None) for book in books.values()], set())
            flags.write_alerts(cur, [(0, book_alert(d)) for d in found], source="quotes")
        conn.commit()
    finally:
        conn.close()
    return books


def _load(conn, trades, sizes: tuple[str, ...]) -> int:
    with conn.cursor() as cur:
        write_batch(cur, [copy_row(t, 0, i) for i, t in enumerate(trades)], [])
    conn.commit()
    backfill(conn, T0, T0 + timedelta(days=1), tuple(parse_size(s) for s in sizes), frozenset())
    pipeline = DetectionPipeline()
    detections = pipeline.process(trades)
    dedup = Deduplicator({"CRITICAL": 300, "HIGH": 60, "MEDIUM": 30})
    flagged = [d for d in detections if d.is_anomaly]
    with conn.cursor() as cur:
        flags.write_flags(cur, flagged, pipeline.version)
        flags.write_alerts(cur, [(0, a) for d in flagged for a in alerts_for(d) if dedup.allow(a)])
    conn.commit()
    return len(trades)
