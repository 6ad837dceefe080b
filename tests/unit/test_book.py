"""The book message and the order book (tradewatch/book.py), and the simulated books
(tradewatch/market/books.py): trades, quotes and book agree."""
from __future__ import annotations

import json
from itertools import islice

import pytest

from tradewatch import bus
from tradewatch.book import MAX_LEVELS, BookMessage, InvalidBook, OrderBook, Top, decode_book, imbalance
from tradewatch.events import Trade
from tradewatch.market.books import with_books
from tradewatch.market.simulator import MarketSimulator
from tradewatch.config import Settings
from tradewatch.publish import publish
from tradewatch.stages.quotes import Quotes

T0 = 1_767_225_600_000


def snapshot(seq=1, bids=((100.0, 5.0), (99.9, 7.0)), asks=((100.1, 4.0), (100.2, 6.0)), **more) -> dict:
    return {"schema_version": 1, "symbol": "AAPL", "exchange": "SIM", "timestamp_ms": T0, "type": "snapshot",
            "seq": seq, "bids": [list(b) for b in bids], "asks": [list(a) for a in asks], **more}


def update(seq, prev_seq, bids=(), asks=(), **more) -> dict:
    return {"schema_version": 1, "symbol": "AAPL", "exchange": "SIM", "timestamp_ms": T0 + seq, "type": "update",
            "seq": seq, "prev_seq": prev_seq, "bids": [list(b) for b in bids], "asks": [list(a) for a in asks], **more}


def raw(message: dict) -> bytes:
    return json.dumps(message).encode()


def test_a_valid_message_round_trips():
    m = decode_book(raw(snapshot()), T0)
    assert (m.type, m.seq, m.bids[0], m.asks[1]) == ("snapshot", 1, (100.0, 5.0), (100.2, 6.0))
    assert decode_book(m.to_json_bytes(), T0) == m
    u = decode_book(raw(update(2, 1, bids=[(100.0, 0)])), T0)
    assert (u.prev_seq, u.bids) == (1, [(100.0, 0.0)])


HOSTILE = {
    None: "empty message",
    b"x" * 70_000: "exceeds the 65536-byte limit",
    b"not json": "not JSON",
    b"\xc3\x28": "not JSON",
    b"[]": "Expected `object`",
    raw({**snapshot(), "seq": "1"}): "at `$.seq`",
    raw({**snapshot(), "type": "trade"}): "at `$.type`",
    raw({**snapshot(), "symbol": "AAPL\n"}): "at `$.symbol`",
    raw({**snapshot(), "schema_version": 2}): "at `$.schema_version`",
    raw(snapshot(bids=[(-1.0, 5.0)])): "at `$.bids[0][0]`",
    raw(snapshot(bids=[(1.0, 2.0, 3.0)])): "at `$.bids[0]`",
    raw(snapshot()).replace(b"100.0", b"1e400", 1): "at `$.bids[0][0]`",
    raw(snapshot(bids=[(2000.0 - i, 5.0) for i in range(MAX_LEVELS + 1)])): "Expected `array` of length <= 1000",
    raw(snapshot(bids=[(99.0, 1.0), (99.5, 1.0)])): "strictly descending",
    raw(snapshot(asks=[(100.1, 1.0), (100.1, 1.0)])): "strictly ascending",
    raw(snapshot(bids=[(99.0, 0.0)])): "a snapshot lists only levels with size > 0",
    raw(snapshot(bids=[(100.5, 1.0)])): "snapshot is crossed",
    raw({**update(2, 1), "prev_seq": None}): "an update needs prev_seq",
    raw(update(2, 2)): "must be above its prev_seq",
    raw({**snapshot(), "timestamp_ms": T0 + 3_600_000}): "ahead of the time the message was sent",
    raw({**snapshot(), "injected_anomaly": "pump_and_dump"}): "at `$.injected_anomaly`",
    raw(snapshot()).replace(b"5.0", b"NaN", 1): "not JSON",
}


@pytest.mark.parametrize("message, reason", list(HOSTILE.items()), ids=[r for r in HOSTILE.values()])
def test_a_bad_message_is_refused_with_its_reason(message, reason):
    with pytest.raises(InvalidBook) as refused:
        decode_book(message, T0)
    assert reason in str(refused.value)


def test_a_stored_books_top_spread_mid_and_imbalance_have_one_definition():
    """What /quotes, /orderbook and the dashboard show of stored levels ([price, size], best first)."""
    top = Top.of([[99.9, 5], [99.8, 1]], [[100.1, 2]])
    assert (top.bid, top.bid_size, top.ask, top.ask_size) == (99.9, 5, 100.1, 2)
    assert top.spread == pytest.approx(0.2) and top.mid == pytest.approx(100.0)
    assert imbalance([[99.9, 5], [99.8, 1]], [[100.1, 2]]) == pytest.approx((6 - 2) / 8)
    one_sided = Top.of([], [[100.1, 2]])
    assert one_sided.bid is None and one_sided.spread is None and one_sided.mid is None
    assert imbalance([], []) is None and imbalance([[1.0, 3]], []) == 1.0


def test_a_book_applies_changes_and_a_gap_makes_it_stale_until_the_next_snapshot():
    book = OrderBook("AAPL")
    assert book.stale and not book.apply(decode_book(raw(update(2, 1, bids=[(100.0, 1)])), T0))
    assert book.apply(decode_book(raw(snapshot()), T0))
    assert book.top().bid == 100.0 and book.top().spread == pytest.approx(0.1)
    assert book.apply(decode_book(raw(update(2, 1, bids=[(100.0, 0), (100.05, 3)], asks=[(100.3, 2)])), T0))
    assert (book.top().bid, book.top().bid_size) == (100.05, 3.0)
    assert book.depth(2) == ([(100.05, 3.0), (99.9, 7.0)], [(100.1, 4.0), (100.2, 6.0)])
    assert book.imbalance(1) == pytest.approx((3 - 4) / 7)
    # seq 3 never came: a gap, counted; nothing applies until a snapshot
    assert not book.apply(decode_book(raw(update(4, 3, asks=[(100.1, 0)])), T0))
    assert book.stale and book.gaps == 1 and book.seq == 2
    assert not book.apply(decode_book(raw(update(5, 4, asks=[(100.1, 0)])), T0))
    assert book.gaps == 1, "one gap, not one per message after it"
    assert book.apply(decode_book(raw(snapshot(seq=9)), T0))
    assert not book.stale and book.seq == 9 and book.top().bid == 100.0


def test_a_book_keeps_at_most_max_levels_a_side():
    book = OrderBook("X")
    book.apply(BookMessage("X", "SIM", T0, "snapshot", 1, [(100.0, 1.0)], [(101.0, 1.0)]))
    far = [(99.0 - i * 0.01, 1.0) for i in range(MAX_LEVELS + 5)]
    for n in range(0, len(far), 500):
        assert book.apply(BookMessage("X", "SIM", T0, "update", book.seq + 1, far[n:n + 500], [], prev_seq=book.seq))
    assert len(book.bids) == MAX_LEVELS and max(book.bids) == 100.0, "the levels farthest from the touch went"


def simulated(n_trades: int, seed: int = 3, anomaly_rate: float = 0.01, books=None) -> list:
    """The simulator's events up to its `n_trades`-th trade."""
    sim = MarketSimulator(rate=20, seed=seed, anomaly_rate=anomaly_rate, start_ms=T0)
    events, trades = [], 0
    for event in with_books(sim, books=books, seed=seed):
        events.append(event)
        trades += type(event) is Trade
        if trades == n_trades:
            return events


def test_every_simulated_trade_is_at_the_touch_and_the_rebuilt_book_equals_the_simulators():
    books: dict[str, OrderBook] = {}
    events = simulated(6000, books=books)
    rebuilt: dict[str, OrderBook] = {}
    trades = messages = 0
    last_ms = 0
    for n, event in enumerate(events):
        assert event.timestamp_ms >= last_ms, "event time never goes back"
        last_ms = event.timestamp_ms
        if type(event) is Trade:
            trades += 1
            top = rebuilt[event.symbol].top()
            assert (top.bid, top.ask) == (event.bid, event.ask), "the trade's quotes are the book's"
            assert event.price == (top.ask if event.side == "buy" else top.bid), "a buy lifts the ask, a sell the bid"
            assert (top.ask_size if event.side == "buy" else top.bid_size) > event.quantity, "enough size at the touch"
            continue
        messages += 1
        m = decode_book(event.to_json_bytes(), event.timestamp_ms)      # through the wire format
        assert rebuilt.setdefault(m.symbol, OrderBook(m.symbol)).apply(m), f"message {n} applies"
        assert not rebuilt[m.symbol].stale
    assert trades == 6000 and 8 * trades < messages < 12 * trades, "about ten book messages a trade"
    assert set(rebuilt) == set(books)
    for symbol, book in books.items():
        assert rebuilt[symbol].depth(MAX_LEVELS) == book.depth(MAX_LEVELS), symbol
        assert len(book.bids) == len(book.asks) == 10


def test_the_books_do_not_change_the_trades_and_repeat_with_the_seed():
    plain = list(islice(MarketSimulator(rate=20, seed=4, anomaly_rate=0.02, start_ms=T0), 2000))
    with_book = simulated(2000, seed=4, anomaly_rate=0.02)
    assert [e for e in with_book if type(e) is Trade] == plain
    assert simulated(2000, seed=4, anomaly_rate=0.02) == with_book
    snapshots = [e for e in with_book if type(e) is not Trade and e.type == "snapshot"]
    assert {s.symbol for s in snapshots} == {t.symbol for t in plain}, "each book opens on a snapshot"


def test_a_counted_publish_counts_trades_and_stops_right_after_the_last():
    sent = []
    events = with_books(MarketSimulator(rate=20, seed=6, start_ms=T0), seed=6)      # endless
    stats = publish(lambda e: sent.append(e) or True, events, speed=None, count=500)
    assert stats.sent == 500 and type(sent[-1]) is Trade
    assert stats.book_messages == len(sent) - 500 > 4000


def test_the_quotes_stage_holds_no_book_for_a_symbol_before_its_first_snapshot():
    """Updates of symbols that never sent a snapshot (joined mid-stream, or a hostile sender making
    up symbols) cost no memory: a book starts at its snapshot."""
    stage = Quotes(Settings())
    stage.take([bus.Message("quotes", 0, i, b"S", raw({**update(2, 1), "symbol": f"S{i}"}), T0) for i in range(1000)])
    assert not stage.books and stage.before_snapshot == 1000 and not stage.effects.changed
    stage.take([bus.Message("quotes", 0, 1000, b"AAPL", raw(snapshot()), T0),
                bus.Message("quotes", 0, 1001, b"AAPL", raw(update(2, 1, asks=[(100.3, 1)])), T0)])
    assert list(stage.books) == ["AAPL"] and stage.books["AAPL"].seq == 2
    assert len(stage.effects.quotes) == 1, "a change away from the touch is no new quote"
    assert len(stage.effects.snapshots) == 1 and len(stage.effects.changed) == 1


def test_a_sealed_checkpoint_keeps_its_books_while_the_stage_reads_on():
    """The quotes stage's checkpoint is written on the writer thread while the stage applies the
    next batch: what was sealed is the books as they were, not as they become."""
    stage = Quotes(Settings())
    stage.take([bus.Message("quotes", 0, 0, b"AAPL", raw(snapshot()), T0),
                bus.Message("quotes", 0, 1, b"AAPL", raw(update(2, 1, bids=[(100.05, 3.0)])), T0)])
    sealed = stage.seal()
    stage.take([bus.Message("quotes", 0, 2, b"AAPL", raw(update(3, 2, bids=[(100.05, 0.0), (100.0, 9.0)])), T0)])
    [(partition, book, watch)] = sealed.books
    assert (partition, book.seq, book.bids) == (0, 2, {100.0: 5.0, 99.9: 7.0, 100.05: 3.0})
    assert watch is not None and sealed.pending() == 2 and len(sealed.quotes) == 2
    assert stage.books["AAPL"].bids == {100.0: 9.0, 99.9: 7.0} and stage.pending() == 1
    assert len(stage.effects.quotes) == 1 and len(stage.effects.changed) == 1
