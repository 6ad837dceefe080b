#!/usr/bin/env python3
"""Order book benchmark, on a private local stack, with the defaults a user gets.

Prints JSON:
- book messages/s through the topic into storage: the simulator's books (`producer.py --book`)
  in a fresh `quotes` topic, then `consumer.py --quotes` timed from the moment it has its
  partitions until its stored positions reach the end (quotes, book_snapshots and order_books
  written in the same transaction): what it drains from a backlog, with no producer beside it on
  the two cores; the median of `--runs` drains, each by a new reader into emptied tables;
- beside it, in the same run and the same way, the trade path: `consumer.py` draining the same
  run's trades into `trades`; and PostgreSQL's raw COPY ceiling on this machine;
- the book endpoint: `GET /orderbook/{symbol}?depth=10` p50/p95 over `--requests` requests across
  1,000 symbols' books (20 levels a side) held in `order_books`;
- a recorded quotes file (`producer.py --replay quotes.csv --book`): quotes/s read, checked and
  turned into encoded book messages — the producer's own part, before Kafka — for a file of the
  simulated books' tops.
"""
from __future__ import annotations

import argparse
import random
import signal
import statistics
import tempfile
import time
from pathlib import Path
import urllib.request
import uuid

from common import bench_settings, percentile, query, raw_copy_rate, report, start_stage

from tradewatch import bus
from tradewatch.book import OrderBook, Top
from tradewatch.events import Trade
from tradewatch.market import replay
from tradewatch.market.books import with_books
from tradewatch.market.simulator import MarketSimulator
from tradewatch.store import books as store, db


def publish(settings, topic: str, items: list) -> None:
    bus.ensure_topic(settings, topic, settings.trades_partitions)
    publisher = bus.publisher(settings)
    publisher.send_many(topic, items)
    publisher.flush()
    publisher.close()


def drain_rate(settings, script_args: list[str], total: int, stored: str, *params) -> float:
    """Messages/s a stage stores from a topic holding `total` messages: from the moment it has its
    partitions (its start-up not counted) until `stored` (SQL: how many of them are stored) says
    all. Watched in PostgreSQL every 20 ms: a Kafka reader made that often to read the group's
    offsets took CPU from the stage on the two cores (and what is stored is what is measured)."""
    stage = start_stage(settings, *script_args)
    while not query(settings, "SELECT 1 FROM stage_health WHERE pid = %s AND cardinality(partitions) = %s",
                    stage.pid, settings.trades_partitions):
        time.sleep(0.02)
    started = time.perf_counter()
    done_before = int(query(settings, stored, *params)[0][0])
    while query(settings, stored, *params)[0][0] < total:
        time.sleep(0.02)
    elapsed = time.perf_counter() - started
    stage.send_signal(signal.SIGTERM)
    stage.wait(timeout=60)
    return (total - done_before) / elapsed


def truncate(settings, tables: str) -> None:
    conn = db.connect(settings)
    with conn.cursor() as cur:
        cur.execute(f"TRUNCATE {tables}")
    conn.commit()
    conn.close()


def replay_rate(tops: list[tuple[int, str, Top]]) -> tuple[int, float]:
    """Quotes/s from a CSV of the given tops of book (time, symbol, top) to encoded book messages."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "quotes.csv"
        with path.open("w") as out:
            out.write("timestamp,symbol,bid,bid_size,ask,ask_size\n")
            for ms, symbol, top in tops:
                out.write(f"{ms},{symbol},{top.bid or ''},{top.bid_size or 0},{top.ask or ''},{top.ask_size or 0}\n")
        started = time.perf_counter()
        loaded = replay.load_files([path])
        for event in replay.events(loaded):
            event.to_json_bytes()
        return len(loaded.quotes), len(loaded.quotes) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--trades", type=int, default=60_000, help="simulated trades (about ten book messages each)")
    parser.add_argument("--requests", type=int, default=2_000, help="book endpoint requests")
    parser.add_argument("--runs", type=int, default=3, help="drains of each topic (the median is reported)")
    args = parser.parse_args()

    tag = uuid.uuid4().hex[:6]
    settings = bench_settings(trades_topic=f"bench-trades-{tag}", quotes_topic=f"bench-quotes-{tag}",
                              consumer_group=f"bench-{tag}", quotes_group=f"bench-q-{tag}")
    truncate(settings, "trades, dead_letters, quotes, book_snapshots, order_books")

    sim = MarketSimulator(seed=1, rate=1000.0, start_ms=int(time.time() * 1000) - 3_600_000)
    trades, messages, tops, rebuilt = [], [], [], {}
    for event in with_books(sim, settings.book_depth, seed=1):
        if type(event) is Trade:
            trades.append(event)
            if len(trades) == args.trades:
                break
        else:
            messages.append((event.symbol.encode(), event.to_json_bytes()))
            book = rebuilt.setdefault(event.symbol, OrderBook(event.symbol))
            book.apply(event)
            tops.append((event.timestamp_ms, event.symbol, book.top()))
    # each run a reader of its own (a new group) draining the same topic into emptied tables; the
    # median is reported (this machine's speed varies by a fifth from one minute to the next)
    publish(settings, settings.quotes_topic, messages)
    quotes_rates = []
    for run in range(args.runs):
        truncate(settings, "quotes, book_snapshots, order_books, stage_positions")
        quotes_rates.append(drain_rate(settings.with_overrides(quotes_group=f"{settings.quotes_group}-{run}"),
                                       ["consumer.py", "--quotes"], len(messages),
                                       "SELECT coalesce(sum(next_offset), 0) FROM stage_positions"))
    quote_rows = query(settings, "SELECT count(*) FROM quotes")[0][0]
    publish(settings, settings.trades_topic, [(t.symbol.encode(), t.to_json_bytes()) for t in trades])
    trades_rates = []
    for run in range(args.runs):
        truncate(settings, "trades")
        trades_rates.append(drain_rate(settings.with_overrides(consumer_group=f"{settings.consumer_group}-{run}"),
                                       ["consumer.py"], len(trades), "SELECT count(*) FROM trades"))
    copy_rate = raw_copy_rate(settings, trades)
    replayed, replay_per_s = replay_rate(tops)

    # the book endpoint with 1,000 symbols' books of 20 levels a side
    rng = random.Random(3)
    books = []
    for i in range(1000):
        mid = rng.uniform(5, 500)
        book = OrderBook(f"B{i:04d}", "SIM", 1, int(time.time() * 1000),
                         {round(mid - 0.01 * (k + 1), 2): float(rng.randint(1, 900)) for k in range(20)},
                         {round(mid + 0.01 * (k + 1), 2): float(rng.randint(1, 900)) for k in range(20)}, False)
        books.append((i % settings.trades_partitions, book, None))
    conn = db.connect(settings)
    with conn.cursor() as cur:
        store.write_books(cur, books, set())
    conn.commit()
    conn.close()
    api = start_stage(settings, "api.py")
    base = f"http://127.0.0.1:{settings.api_port}"
    for _ in range(600):
        try:
            urllib.request.urlopen(f"{base}/orderbook/B0000", timeout=5).read()
            break
        except OSError:
            time.sleep(0.1)
    latencies = []
    for n in range(args.requests):
        started = time.perf_counter()
        with urllib.request.urlopen(f"{base}/orderbook/B{rng.randrange(1000):04d}?depth=10", timeout=10) as response:
            response.read()
        latencies.append((time.perf_counter() - started) * 1000)
    api.send_signal(signal.SIGTERM)
    api.wait(timeout=30)

    report({
        "benchmark": "quotes",
        "book_messages": len(messages),
        "book_messages_per_s_into_storage": round(statistics.median(quotes_rates)),
        "book_messages_per_s_runs": [round(r) for r in quotes_rates],
        "quote_rows_written": quote_rows,
        "trades": len(trades),
        "trades_per_s_into_storage_same_run": round(statistics.median(trades_rates)),
        "trades_per_s_runs": [round(r) for r in trades_rates],
        "ceiling_postgres_copy_rows_per_s": round(copy_rate),
        "orderbook_endpoint": {"symbols": 1000, "levels_a_side": 20, "depth": 10, "requests": len(latencies),
                               "p50_ms": round(percentile(latencies, 50), 2),
                               "p95_ms": round(percentile(latencies, 95), 2)},
        "quotes_file_replay": {"quotes": replayed, "quotes_per_s_to_book_messages": round(replay_per_s)},
    })


if __name__ == "__main__":
    main()
