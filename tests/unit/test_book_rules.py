"""Surveillance on the order book (tradewatch/detect/book_rules.py): spoofing and layering, quote
stuffing; the simulator's labelled episodes (tradewatch/market/books.py) and their score."""
from __future__ import annotations

from itertools import islice

import orjson

from tradewatch.book import BookMessage, OrderBook, decode_book
from tradewatch.detect import book_rules
from tradewatch.detect.book_rules import BookWatch
from tradewatch.detect.evaluate import BOOK_KINDS, book_detections, score_book
from tradewatch.events import Trade
from tradewatch.market.books import Episode, with_books
from tradewatch.market.simulator import MarketSimulator

T0 = 1_767_225_600_000
BIDS = [(round(100.0 - i * 0.01, 2), 100.0) for i in range(10)]      # touch 100.00, ten levels of 100
ASKS = [(round(100.01 + i * 0.01, 2), 100.0) for i in range(10)]


class Feed:
    """One symbol's book messages through a BookWatch, as the stage would send them."""

    def __init__(self, bids=BIDS, asks=ASKS):
        self.book, self.watch, self.seq, self.found = OrderBook("AAPL"), BookWatch(), 1, []
        self.send(BookMessage("AAPL", "SIM", T0, "snapshot", 1, list(bids), list(asks)))

    def send(self, m: BookMessage) -> list:
        applied, found = self.watch.apply(self.book, m)
        assert applied
        self.found += found
        return found

    def update(self, ms: int, bids=(), asks=()) -> list:
        self.seq += 1
        return self.send(BookMessage("AAPL", "SIM", T0 + ms, "update", self.seq, list(bids), list(asks),
                                     prev_seq=self.seq - 1))


def test_a_large_bid_near_the_touch_cancelled_within_seconds_is_spoofing_and_says_why():
    feed = Feed()
    assert feed.update(1_000, bids=[(99.97, 100.0 + 1_500)]) == [], "placing it is not an alert yet"
    feed.update(1_500, asks=[(100.01, 40.0)])                       # trades take the other side
    [alert] = feed.update(3_500, bids=[(99.97, 100.0)])             # pulled, three levels behind the touch
    e = alert.evidence
    assert (alert.kind, alert.severity, alert.seq) == ("SPOOFING", "HIGH", feed.seq)
    assert (e.measured, e.value, e.baseline, e.change, e.threshold, e.unit) == ("size", 1500.0, 100.0, 15.0, 8.0, "x")
    assert e.level == 99.97 and e.extra["side"] == "bid" and e.extra["layers"] == 1 and e.extra["life_s"] == 2.5
    assert e.extra["levels_from_touch_placed"] == [3] and e.extra["levels_from_touch_cancelled"] == 3
    assert "cancelled without trading after 2.5 s" in e.sentence
    assert "15× the side's typical level of 100" in e.sentence
    assert e.trades["first_ms"] == T0 + 1_000 and e.trades["last_ms"] == T0 + 3_500
    assert e.params["spoof_size_multiple"] == book_rules.SPOOF_SIZE_MULTIPLE


def test_orders_that_trade_rest_long_are_small_or_far_are_not_spoofing():
    feed = Feed()
    # filled: it became the touch and the trades took it
    feed.update(0, bids=[(99.99, 1_600.0)])
    feed.update(500, bids=[(100.0, 0.0)])                            # the touch above it traded away
    feed.update(900, bids=[(99.99, 0.0)])                            # taken at the touch
    # swept: the levels in front of it emptied in the same message
    feed.update(1_000, bids=[(99.96, 1_600.0)])
    feed.update(1_400, bids=[(99.98, 0.0), (99.97, 0.0), (99.96, 0.0)])
    # resting longer than SPOOF_MAX_LIFE_S: liquidity
    feed.update(2_000, bids=[(99.93, 1_600.0)])
    feed.update(2_000 + int(book_rules.SPOOF_MAX_LIFE_S * 1000) + 1, bids=[(99.93, 100.0)])
    # small against the side's levels, or too far from the touch
    feed.update(20_000, asks=[(100.03, 100.0 + 7 * 100.0)])
    feed.update(21_000, asks=[(100.03, 100.0)])
    feed.update(22_000, asks=[(100.09, 100.0 + 1_600.0)])            # nine levels out
    feed.update(23_000, asks=[(100.09, 100.0)])
    assert feed.found == []


def test_layers_placed_and_pulled_together_are_one_layering_alert():
    feed = Feed()
    feed.update(0, asks=[(100.03, 1_000.0), (100.04, 1_100.0), (100.05, 1_200.0)])
    found = feed.update(1_200, asks=[(100.03, 100.0), (100.04, 100.0), (100.05, 100.0)])
    assert len(found) == 1
    e = found[0].evidence
    assert e.extra["layers"] == 3 and e.extra["total_size"] == 3_000.0 and e.extra["prices"] == [100.03, 100.04, 100.05]
    assert e.sentence.startswith("layering: 3 levels at once; ask 900 at 100.03")


def test_quote_stuffing_is_a_burst_against_the_symbols_own_rate():
    quiet, busy = Feed(), Feed()
    for ms in range(0, 30_000, 100):                                 # 10 updates a second
        quiet.update(ms, bids=[(99.95, 100.0 + ms % 7)])
    for ms in range(0, 30_000, 2):                                   # 500 updates a second
        busy.update(ms, bids=[(99.95, 100.0 + ms % 7)])
    burst = [(30_000 + i, 150.0 if i % 2 else 100.0) for i in range(400)]     # 400 updates in 0.4 s
    for feed in (quiet, busy):
        for ms, size in burst:
            feed.update(ms, asks=[(100.06, size)])
    [alert] = quiet.found
    e = alert.evidence
    assert alert.kind == "QUOTE_STUFFING" and alert.severity == "MEDIUM"
    assert 9 <= e.baseline <= 11, "the symbol's own rate, 10 a second"
    assert e.value >= book_rules.STUFFING_MULTIPLE * e.baseline and e.unit == "x"
    assert busy.found == [], "400 in a second is ordinary for a book that sends 500"
    # one alert a burst: it goes on, nothing new; a later burst alerts again, measured against a
    # rate the first one raised (800 more updates in the decayed count: ~30 a second now)
    for ms in range(30_400, 30_800):
        quiet.update(ms, asks=[(100.06, 150.0 if ms % 2 else 100.0)])
    assert len(quiet.found) == 1
    for ms in range(40_000, 40_600):
        quiet.update(ms, asks=[(100.06, 150.0 if ms % 2 else 100.0)])
    assert len(quiet.found) == 1, "600 in a second is under 20x the raised rate"
    for i in range(2_000):
        quiet.update(41_000 + i // 4, asks=[(100.06, 150.0 if i % 2 else 100.0)])
    assert len(quiet.found) == 2 and 25 <= quiet.found[1].evidence.baseline <= 40


def test_a_watch_stays_bounded_whatever_the_book_sends():
    feed = Feed()
    for i in range(200):                                             # 200 large orders, none pulled
        feed.update(i, bids=[(99.99 - (i % 4) * 0.01, 10_000.0 + i)])
    state = feed.watch.symbols["AAPL"]
    assert len(state.orders) <= book_rules.MAX_WATCHED
    for ms in range(20_000):                                         # 20,000 updates in one second
        feed.update(1_000 + ms // 20, asks=[(100.05, 100.0 + ms % 2)])
    assert len(state.window) < book_rules.STUFFING_WINDOW_S * 1000 / book_rules.BUCKET_MS
    feed.watch.forget(["AAPL"])
    assert feed.watch.symbols == {}


def test_a_watch_exported_and_restored_mid_stream_finds_what_an_unbroken_one_finds():
    """The quotes stage checkpoints each symbol's watch (as JSON) with its book: a stage killed and
    restarted from that checkpoint must raise exactly the alerts of one that never stopped."""
    events = [e for e in simulated(3_000, 4, 0.01, []) if type(e) is not Trade]
    unbroken, _ = book_detections(events)
    assert {d.kind for d in unbroken} == {"SPOOFING", "QUOTE_STUFFING"}
    books, watch, found = {}, BookWatch(), []
    for i, m in enumerate(events):
        if i % 997 == 0:          # a checkpoint and a restart: every symbol's watch through JSON
            states = {s: orjson.loads(orjson.dumps(watch.export(s))) for s in books}
            watch = BookWatch()
            for symbol, state in states.items():
                watch.restore(symbol, state)
        book = books.get(m.symbol) or books.setdefault(m.symbol, OrderBook(m.symbol))
        found += watch.apply(book, m)[1]
    assert found == unbroken
    watch.restore("AAPL", None)
    assert "AAPL" not in watch.symbols and watch.export("AAPL") is None


def simulated(n_trades: int, seed: int, anomaly_rate: float, episodes: list, books=None) -> list:
    sim = MarketSimulator(rate=20, seed=seed, start_ms=T0)
    return list(with_books(islice(sim, n_trades), seed=seed, anomaly_rate=anomaly_rate, episodes=episodes,
                           books=books))


def test_the_simulators_episodes_are_labelled_keep_the_book_consistent_and_leave_the_trades_alone():
    episodes: list[Episode] = []
    books: dict[str, OrderBook] = {}
    events = simulated(5_000, 3, 0.01, episodes, books)
    assert [e for e in events if type(e) is Trade] == [e for e in simulated(5_000, 3, 0.0, []) if type(e) is Trade]
    assert {e.kind for e in episodes} == set(BOOK_KINDS) and len(episodes) > 20
    rebuilt: dict[str, OrderBook] = {}
    for event in events:
        if type(event) is Trade:
            top = rebuilt[event.symbol].top()
            assert event.price == (top.ask if event.side == "buy" else top.bid)
            continue
        m = decode_book(event.to_json_bytes(), event.timestamp_ms)       # the label goes over the wire
        assert m.injected_anomaly == event.injected_anomaly
        assert rebuilt.setdefault(m.symbol, OrderBook(m.symbol)).apply(m)
    for symbol, book in books.items():
        assert rebuilt[symbol].depth(100) == book.depth(100)
    for e in episodes:
        labelled = [m for m in events if type(m) is not Trade and m.symbol == e.symbol
                    and e.first_ms <= m.timestamp_ms <= e.last_ms and m.injected_anomaly == e.kind]
        assert labelled, e
        if e.kind == "quote_stuffing":
            assert len(labelled) >= 500


def test_injected_episodes_caught_and_calm_books_quiet_on_runs_not_tuned_on():
    result = score_book(trades=6_000, runs={"scoring": [(21, 4.0, 10, 50.0), (22, 20.0, 20, 5.0)]})["scoring"]
    spoofing, stuffing = result["per_kind"]["spoofing"], result["per_kind"]["quote_stuffing"]
    assert spoofing["injected"] >= 20 and stuffing["injected"] >= 10
    assert spoofing["recall"] >= 0.85 and stuffing["recall"] >= 0.7, result
    assert spoofing["false_alarms_per_10k_updates"] <= 0.2 and stuffing["false_alarms_per_10k_updates"] <= 0.2
    assert sum(result["calm"]["alerts"].values()) <= 1 and result["calm"]["book_updates"] > 50_000


def test_a_calm_simulated_day_raises_no_book_alert():
    """A whole day of event time (one trade a second over ten symbols, ~860,000 book updates)."""
    sim = MarketSimulator(seed=5, rate=1.0, start_ms=T0)
    found, updates = book_detections(with_books(islice(sim, 86_400), seed=5))
    assert updates > 500_000 and found == []
