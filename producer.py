#!/usr/bin/env python3
"""Produce trades into Kafka: simulated (GBM with labelled anomalies), replayed from CSV files (trades,
bars, quotes), or live from an exchange's public trade stream (Coinbase, Binance)."""
from __future__ import annotations

import argparse
import sys
import time

from tradewatch import bus, prometheus
from tradewatch.cli import StopFlag, load_settings, setup_logging
from tradewatch.book import MAX_LEVELS, BookMessage
from tradewatch.events import Trade
from tradewatch.market import history as history_mark
from tradewatch.market import replay
from tradewatch.market.books import with_books
from tradewatch.market.live import VENUES, FeedFailed, LiveFeed
from tradewatch.market.simulator import DEFAULT_SYMBOLS, FIRST_ANOMALY_HISTORY, MarketSimulator
from tradewatch.publish import PublishStats, publish


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Send trades to the Kafka topic `trades` (key = symbol). By default it simulates "
                    "a market; with --replay it sends the trades of a recorded CSV file; with --live the "
                    "trades of an exchange's public WebSocket trade stream.",
        epilog="examples:\n"
               "  python producer.py --rate 50 --anomaly-rate 0.01\n"
               "  python producer.py --count 10000 --rate max --seed 7\n"
               "  python producer.py --book          # and an order book: python consumer.py --quotes\n"
               "  python producer.py --replay ../shared/data/lean/spy_20131007_trades.csv.gz --speed 60\n"
               "  python producer.py --replay trades.csv --replay quotes.csv --book   # a day with its quotes\n"
               "  python producer.py --replay BTCUSDT-trades-2025-03-01.zip --speed max   # as Binance serves it\n"
               "  python producer.py --live coinbase --symbols BTC-USD,ETH-USD --book\n"
               "  python producer.py --live binance --url ws://127.0.0.1:8765   # python -m tradewatch.market.replay_server binance",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sim = parser.add_argument_group("simulator")
    sim.add_argument("--rate", default="10", help="trades per second, e.g. 0.5, 200, or 'max' (default 10)")
    sim.add_argument("--symbols", help="comma-separated symbols (default: the ten simulated ones; with --live "
                                       "the venue's BTC and ETH pairs)")
    sim.add_argument("--seed", type=int, help="random seed: the same seed gives the same stream")
    sim.add_argument("--anomaly-rate", type=float, default=0.0,
                     help="share of trades that are injected anomalies, 0..1 (default 0)")
    sim.add_argument("--first-anomaly-after", type=float, metavar="SECONDS",
                     help="inject a price spike this many seconds into the feed, on the first symbol with "
                          f"{FIRST_ANOMALY_HISTORY} trades (what `make demo` does, so a class sees one early)")
    sim.add_argument("--start", help="event time of the first trade, ISO-8601 (default: now)")
    sim.add_argument("--history", type=float, metavar="SECONDS",
                     help="first send a simulated past, event time from SECONDS ago up to now, as fast as it "
                          "goes, then trade live: charts full from the first minute (`make demo` sends an hour "
                          "into an empty data folder; the dashboard marks it as simulated)")
    book = parser.add_argument_group("order book")
    book.add_argument("--book", action="store_true",
                      help="also send an order book per symbol, its snapshots and changes, to the topic `quotes` "
                           "(QUOTES_TOPIC; `python consumer.py --quotes` stores them): with --live the venue's own "
                           "(Binance depth diffs with their REST snapshot, Coinbase level2_batch); with a replayed "
                           "quotes file its quotes (a one-level book); else one kept around the trades' quotes (the "
                           "simulator, or a replayed trades file with bid and ask), about ten messages per trade")
    book.add_argument("--book-depth", type=int,
                      help="levels a side of a simulated book (default BOOK_DEPTH from .env, 10)")
    book.add_argument("--book-anomaly-rate", type=float, default=0.0,
                      help="chance per trade, 0..1, that a simulated book starts a labelled spoofing (2 in 3) or "
                           "quote-stuffing episode, for the quotes stage's book watch to catch (default 0)")
    rep = parser.add_argument_group("replay")
    rep.add_argument("--replay", metavar="FILE", action="append",
                     help="CSV (or .csv.gz, or a .zip of one CSV) of trades, of 1-minute bars or of quotes (bid, "
                          "bid_size, ask, ask_size, no price), or one of Binance's trade files as downloaded "
                          "(data.binance.vision trades or aggTrades, e.g. BTCUSDT-trades-2025-03-01.zip); repeat it "
                          "to replay files as one, e.g. a day's trades and its quotes: each trade takes the quote "
                          "of its moment, and its side from it (above the midpoint a buy)")
    rep.add_argument("--speed", default="1", help="1 = real pace, N = N times faster, 'max' = no waiting")
    rep.add_argument("--symbol", help="symbol for files without a symbol column")
    for name, default in vars(replay.ColumnMap()).items():
        rep.add_argument(f"--{name.replace('_', '-')}-column", dest=f"{name}_column", default=default,
                         help=f"column holding the {name.replace('_', ' ')} (default {default!r})"
                         if name != "buyer_maker" else f"column saying whether the buyer was the maker, where there is "
                         f"no side column (true: the taker sold; default {default!r})")
    live = parser.add_argument_group("live (public trade and book streams, no API key)")
    live.add_argument("--live", choices=sorted(VENUES), help="the venue: coinbase (matches channel) or binance (@trade)")
    live.add_argument("--url", help="WebSocket endpoint instead of the venue's, e.g. ws://127.0.0.1:8765 "
                                    "(python -m tradewatch.market.replay_server); Binance book snapshots are then "
                                    "fetched from the same host and port over http")
    stop = parser.add_argument_group("when to stop (default: never, or at the end of the file)")
    stop.add_argument("--count", type=int, help="stop after this many trades")
    stop.add_argument("--duration", type=float, help="stop after this many seconds")
    parser.add_argument("--topic", help="topic (default: TRADES_TOPIC from .env)")
    return parser.parse_args(argv)


def _positive_or_max(text: str, name: str) -> float | None:
    if text.lower() == "max":
        return None
    try:
        value = float(text)
    except ValueError:
        raise SystemExit(f"error: {name} must be a number or 'max', got {text!r}")
    if value <= 0:
        raise SystemExit(f"error: {name} must be > 0, got {text}")
    return value


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    settings = load_settings()
    topic = args.topic or settings.trades_topic
    stop = StopFlag()

    if args.live and args.replay:
        print("error: --live and --replay are two different sources: choose one", file=sys.stderr)
        return 2
    if args.history is not None and (args.live or args.replay or args.start or args.history <= 0
                                     or args.rate.lower() == "max"):
        print("error: --history is a simulated past before live trades: a number of seconds > 0, "
              "with the simulator at a --rate in trades per second (not max, --start, --replay or --live)",
              file=sys.stderr)
        return 2
    if args.book_depth is not None and not 1 <= args.book_depth <= MAX_LEVELS:
        print(f"error: --book-depth must be 1..{MAX_LEVELS}, got {args.book_depth}", file=sys.stderr)
        return 2
    if not 0 <= args.book_anomaly_rate <= 1 or (args.book_anomaly_rate and not args.book):
        print(f"error: --book-anomaly-rate is a chance per trade, 0..1, for a simulated --book; got "
              f"{args.book_anomaly_rate:g}" + ("" if args.book else " without --book"), file=sys.stderr)
        return 2
    recorded_book = False       # a replay's quotes files are the book
    if args.live:
        venue = VENUES[args.live]
        symbols = [s.strip().upper() for s in args.symbols.split(",") if s.strip()] if args.symbols \
            else list(venue.default_symbols)
        trades = LiveFeed(venue, symbols, args.url, stop=stop, book=args.book)
        speed = None
        prometheus.serve(settings, "producer")
    elif args.replay:
        speed = _positive_or_max(args.speed, "--speed")
        columns = replay.ColumnMap(**{name: getattr(args, f"{name}_column") for name in vars(replay.ColumnMap())})
        try:
            feed = replay.Replay(args.replay, columns, symbol=args.symbol)
        except replay.ReplayError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        if not feed.has("trades") and not (feed.has("quotes") and args.book):
            feed.close()
            print("error: no trades to replay" + (": a quotes file alone is sent as a book with --book"
                                                  if feed.has("quotes") else ""), file=sys.stderr)
            return 2
        recorded_book = args.book and feed.has("quotes")
        if recorded_book:
            trades: object = replay.quote_books(feed)    # the recorded quotes are the book: with_books is not used
        else:
            trades = (event for event in feed if type(event) is not replay.Quote)
        print(f"replaying {', '.join(args.replay)}", file=sys.stderr)
        if args.book and not feed.has("quotes") and all(t.bid is None and t.ask is None for t in feed.held_trades()):
            print("note: these trades have no bid and ask and there is no quotes file, so no book is sent "
                  "(add one: --replay quotes.csv)", file=sys.stderr)
    else:
        rate = _positive_or_max(args.rate, "--rate")
        start_ms = int(time.time() * 1000)
        if args.start:
            start_ms = replay.parse_time_ms(args.start)
        symbols = [s.strip().upper() for s in (args.symbols or ",".join(DEFAULT_SYMBOLS)).split(",") if s.strip()]
        def simulator(start_ms: int, history_s: float = 0.0) -> MarketSimulator:
            # With --rate max, event time still advances 1 ms per trade on average. The first
            # anomaly is due that long into the live trades, after any history.
            first = None if args.first_anomaly_after is None else history_s + args.first_anomaly_after
            return MarketSimulator(symbols, rate or 1000.0, args.seed, args.anomaly_rate, start_ms, first)
        try:
            trades = simulator(start_ms)
        except ValueError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        speed = None if rate is None else 1.0

    try:
        bus.ensure_topic(settings, topic, settings.trades_partitions)
        if args.book:
            bus.ensure_topic(settings, settings.quotes_topic, settings.trades_partitions)
        publisher = bus.publisher(settings, stop=stop)
    except bus.KafkaUnavailable as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if not args.replay and not args.live and not args.start:
        # live: event time starts now, as sending does. A counted burst at --rate max (1 ms of event
        # time per trade) ends now instead of running ahead of the clock, where the consumers' clock-skew
        # rule (MAX_CLOCK_SKEW_SECONDS) would reject what lies more than 5 minutes ahead.
        backdate_ms = args.count if rate is None and args.count else 0
        origin_ms = int(time.time() * 1000) - backdate_ms
        trades = simulator(origin_ms)
    else:
        origin_ms = None     # paced from the first trade's time
    past = None              # the simulated past, sent first when asked for
    if args.history:
        now_ms = int(time.time() * 1000)
        trades = simulator(now_ms - int(args.history * 1000), args.history)
        history_mark.mark(settings, now_ms - int(args.history * 1000), now_ms)
        past = trades.trades_until(now_ms)

    # the live part only: a simulated past (--history) has trades alone; a venue's feed brings its own book
    live = trades
    if args.book and not args.live and not recorded_book:
        live = with_books(trades, args.book_depth or settings.book_depth, seed=args.seed,
                          anomaly_rate=args.book_anomaly_rate)

    def send(event: Trade | BookMessage) -> bool:
        return publisher.send(topic if type(event) is Trade else settings.quotes_topic, event.symbol.encode(),
                              event.to_json_bytes())

    def progress(stats: PublishStats) -> None:
        print(f"sent {stats.sent:,} trades ({stats.rate:,.0f}/s)"
              + (f", {stats.book_messages:,} book messages" if stats.book_messages else "")
              + (f", injected {stats.injected}" if stats.injected else ""), file=sys.stderr, flush=True)

    try:
        sent = 0
        if past is not None:
            sent = publish(send, past, speed=None, count=args.count, stop=stop, progress=progress).sent
            print(f"sent {sent:,} trades of simulated history ({args.history:g} s); now live", file=sys.stderr)
            origin_ms = int(time.time() * 1000)
            trades.skip_to(origin_ms)                       # live event time is the wall clock again
        stats = publish(send, live, speed=speed, count=None if args.count is None else args.count - sent,
                        duration_s=args.duration, stop=stop, progress=progress, origin_ms=origin_ms)
        stats.sent += sent
    except FeedFailed as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except replay.ReplayError as error:      # damage further into a file: what was read before it is sent
        print(f"error: {error} (the {feed.trades:,} trades before it are sent)", file=sys.stderr)
        return 2
    finally:                        # whatever ended the feed, what was queued is sent first
        publisher.flush()
        publisher.close()
        if args.replay:
            feed.close()
    print(f"done: sent {stats.sent:,} trades in {stats.elapsed_s:.1f}s ({stats.rate:,.0f}/s)"
          + (f" and {stats.book_messages:,} book messages" if stats.book_messages else "")
          + (f", injected anomalies {stats.injected}" if stats.injected else ""), file=sys.stderr)
    if args.replay:
        print(f"replayed {feed.trades:,} trades" + (f" and {feed.quotes:,} quotes" if feed.quotes else "")
              + (f"; {feed.skipped:,} unreadable rows skipped (first: {feed.skipped_rows[0]})" if feed.skipped else "")
              + (f"; {feed.late:,} came more than {replay.REORDER_ROWS:,} rows out of event-time order and were sent"
                 " late (sort the file to replay it in order)" if feed.late else ""), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
