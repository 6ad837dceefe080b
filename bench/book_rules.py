#!/usr/bin/env python3
"""Book surveillance benchmark, in-process (no Kafka, no PostgreSQL).

Prints JSON:
- book messages/s applied to their books alone (`OrderBook.apply`: the book without its watch)
  and applied through the spoofing and quote-stuffing watch (`BookWatch.apply`), on the simulator's
  books with episodes injected at the evaluation's rate: the watch's cost beside its peer, the bare
  book, measured on the same messages in the same run (best of `--rounds`, alternated);
- the evaluation's score (`anomaly_detector.py evaluate`'s `book_simulated`).
"""
from __future__ import annotations

import argparse
import time
from itertools import islice

from common import report

from tradewatch.book import BookMessage, OrderBook
from tradewatch.detect import evaluate
from tradewatch.detect.book_rules import BookWatch
from tradewatch.market.books import with_books
from tradewatch.market.simulator import MarketSimulator


def rate(messages: list[BookMessage], watched: bool) -> float:
    books: dict[str, OrderBook] = {}
    watch = BookWatch()
    started = time.perf_counter()
    for m in messages:
        book = books.get(m.symbol)
        if book is None:
            book = books[m.symbol] = OrderBook(m.symbol)
        if watched:
            watch.apply(book, m)
        else:
            book.apply(m)
    return len(messages) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--trades", type=int, default=30_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    result = {}
    # the evaluation's market (20 trades/s over ten symbols), and a busy one (1,000 trades/s: each
    # symbol's book ~1,000 updates a second, over the stuffing watch's minimum all the time)
    for name, trades_per_s in (("evaluation_rate", 20.0), ("busy", 1000.0)):
        sim = MarketSimulator(seed=7, rate=trades_per_s, start_ms=1_767_225_600_000)
        messages = [e for e in with_books(islice(sim, args.trades), seed=7, anomaly_rate=0.005)
                    if isinstance(e, BookMessage)]
        bare, watched = [], []
        for _ in range(args.rounds):
            bare.append(rate(messages, False))
            watched.append(rate(messages, True))
        result[name] = {"trades_per_s": trades_per_s, "book_messages": len(messages),
                        "messages_per_s_book_alone": round(max(bare)),
                        "messages_per_s_book_and_watch": round(max(watched)),
                        "watch_cost_us_per_message": round((1 / max(watched) - 1 / max(bare)) * 1e6, 2)}
    report({**result, "evaluation": evaluate.score_book()})


if __name__ == "__main__":
    main()
