"""The venues' book streams rebuilt as each venue documents it (tradewatch/market/live_books.py): what
goes on to Kafka is a chain of book messages a reader can check (prev_seq = the seq before), and a
gap is counted and repaired by a new snapshot, never papered over."""
from __future__ import annotations

import pytest

from tradewatch.book import OrderBook, decode_book
from tradewatch.market import live_books
from tradewatch.market.live import binance_symbol
from tradewatch.market.live_books import BinanceBooks, CoinbaseBooks, Malformed, binance_diff
from tradewatch.prometheus import LIVE_BOOK_GAPS

T0 = 1_709_294_400_000


def diff(first: int, last: int, bids=(), asks=(), ms: int = T0, symbol: str = "BNBBTC") -> dict:
    """A `depthUpdate` as Binance's docs show it."""
    return {"e": "depthUpdate", "E": ms, "s": symbol, "U": first, "u": last,
            "b": [[f"{p}", f"{q}"] for p, q in bids], "a": [[f"{p}", f"{q}"] for p, q in asks]}


def reader(messages, book: OrderBook | None = None) -> OrderBook:
    """What the quotes stage makes of them: every message valid on the wire, none a gap."""
    book = book or OrderBook("BNB-BTC")
    for m in messages:
        assert decode_book(m.to_json_bytes(), sent_ms=m.timestamp_ms) == m
        assert book.apply(m), f"seq {m.seq} after {book.seq}: a gap on our side"
    return book


def test_binance_diffs_wait_for_the_snapshot_then_old_ones_are_dropped():
    books = BinanceBooks(binance_symbol, frozenset({"BNBBTC"}))
    assert books.take(diff(157, 160, bids=[(0.0024, 10)])) == [] and books.wanted() == ["BNBBTC"]
    assert books.take(diff(161, 165, asks=[(0.0026, 100)], ms=T0 + 100)) == []
    assert books.take({"e": "trade", "s": "BNBBTC"}) is None, "not a book message: the trade parser's"
    out = books.snapshot("BNBBTC", {"lastUpdateId": 162, "bids": [["0.0023", "5"], ["0.0024", "1"]],
                                    "asks": [["0.0026", "3"], ["0.0027", "4"]]})
    assert [m.type for m in out] == ["snapshot", "update"], "the diff up to 160 is in the snapshot: dropped"
    assert (out[0].seq, out[0].timestamp_ms, out[1].prev_seq, out[1].seq) == (162, T0 + 100, 162, 165)
    assert out[0].symbol == "BNB-BTC" and out[0].exchange == "BINANCE"
    assert out[0].bids == [(0.0024, 1.0), (0.0023, 5.0)], "best first"
    book = reader(out)
    assert book.asks == {0.0026: 100.0, 0.0027: 4.0} and books.wanted() == []
    assert books.take(diff(163, 165)) == [], "a repeat"
    more = books.take(diff(166, 166, bids=[(0.0024, 0)]))
    assert reader(more, book).bids == {0.0023: 5.0}, "size 0 removes the level"


def test_a_snapshot_older_than_the_stream_is_fetched_again_without_counting_a_gap():
    books = BinanceBooks(binance_symbol, frozenset({"BNBBTC"}))
    gaps = LIVE_BOOK_GAPS.labels("binance", "BNBBTC")
    before = gaps._value.get()
    books.take(diff(200, 204))
    out = books.snapshot("BNBBTC", {"lastUpdateId": 150, "bids": [], "asks": []})
    assert [m.type for m in out] == ["snapshot"] and books.wanted() == ["BNBBTC"], "ids 151..199 are in neither"
    out = books.snapshot("BNBBTC", {"lastUpdateId": 202, "bids": [["1", "1"]], "asks": []})
    assert [(m.type, m.seq) for m in out] == [("snapshot", 202), ("update", 204)]
    assert gaps._value.get() == before


def test_a_gap_in_the_update_ids_is_counted_logged_and_repaired_by_a_new_snapshot(caplog):
    books = BinanceBooks(binance_symbol, frozenset({"BNBBTC"}))
    gaps = LIVE_BOOK_GAPS.labels("binance", "BNBBTC")
    before = gaps._value.get()
    books.take(diff(11, 11))
    book = reader(books.snapshot("BNBBTC", {"lastUpdateId": 10, "bids": [["1.0", "2"]], "asks": [["1.1", "2"]]}))
    assert books.take(diff(12, 13, bids=[(0.9, 1)])) and books.wanted() == []
    assert books.take(diff(17, 18, bids=[(0.8, 1)])) == [], "14..16 never came: nothing goes on"
    assert gaps._value.get() == before + 1 and books.wanted() == ["BNBBTC"]
    assert "book update ids jump from 13 to 17 — 3 update(s) missed; fetching the book again" in caplog.text
    assert books.take(diff(19, 19)) == [], "buffered until the new snapshot"
    out = books.snapshot("BNBBTC", {"lastUpdateId": 18, "bids": [["1.0", "2"], ["0.7", "5"]], "asks": [["1.1", "2"]]})
    assert [(m.type, m.seq, m.prev_seq) for m in out] == [("snapshot", 18, None), ("update", 19, 18)]
    assert reader(out, book).bids == {1.0: 2.0, 0.7: 5.0}


def test_binance_odd_book_messages_are_malformed_not_fatal():
    books = BinanceBooks(binance_symbol, frozenset({"BNBBTC"}))
    for odd, reason in [({**diff(1, 2), "U": "n/a"}, "malformed s, U, u or E"),
                        ({**diff(3, 2)}, "malformed"),
                        ({k: v for k, v in diff(1, 2).items() if k != "u"}, "without 'u'"),
                        (diff(1, 2, bids=[("NaN", 1)]), "price <= 0"),
                        ({**diff(1, 2), "b": [["1"]]}, "without a readable price and size"),
                        (diff(1, 2, symbol="ETHBTC"), "not subscribed")]:
        with pytest.raises(Malformed, match=reason):
            books.take(odd)
    with pytest.raises(Malformed, match="lastUpdateId"):
        books.take(diff(1, 2))
        books.snapshot("BNBBTC", {"code": -1121, "msg": "Invalid symbol."})
    assert binance_diff({"stream": "x", **diff(1, 2)}).last == 2


def test_the_whole_book_goes_again_every_minute_of_event_time():
    books = BinanceBooks(binance_symbol, frozenset({"BNBBTC"}))
    books.take(diff(2, 2, ms=T0))
    book = reader(books.snapshot("BNBBTC", {"lastUpdateId": 1, "bids": [["1.0", "2"]], "asks": [["1.1", "2"]]}))
    out = books.take(diff(3, 3, bids=[(0.9, 4)], ms=T0 + live_books.SNAPSHOT_EVERY_MS - 1))
    assert [m.type for m in out] == ["update"]
    reader(out, book)
    out = books.take(diff(4, 4, asks=[(1.2, 4)], ms=T0 + live_books.SNAPSHOT_EVERY_MS))
    assert [(m.type, m.seq) for m in out] == [("update", 4), ("snapshot", 4)]
    late = reader(out[1:], OrderBook("BNB-BTC"))
    assert (late.bids, late.asks) == (reader(out, book).bids, book.asks), "a late reader rebuilds the same book"


def test_coinbase_level2_snapshot_changes_and_a_new_connection():
    books = CoinbaseBooks(frozenset({"BTC-USD"}))
    update = {"type": "l2update", "product_id": "BTC-USD", "time": "2019-08-14T20:42:27.265Z",
              "changes": [["buy", "10101.80000000", "0.162567"], ["sell", "10102.00", "0"]]}
    assert books.take(update) == [], "no book before the snapshot"
    assert books.take({"type": "match", "product_id": "BTC-USD", "time": "2019-08-14T20:42:27.265Z"}) is None
    snapshot = {"type": "snapshot", "product_id": "BTC-USD", "bids": [["10101.10", "0.45054140"]],
                "asks": [["10102.55", "0.57753524"], ["10102.00", "1"]]}
    out = books.take(snapshot)
    assert [(m.type, m.seq, m.timestamp_ms) for m in out] == [("snapshot", 1, 1565815347265)], \
        "no time on a snapshot: the newest venue message's"
    out += books.take(update)
    book = reader(out, OrderBook("BTC-USD"))
    assert book.bids == {10101.8: 0.162567, 10101.1: 0.4505414} and book.asks == {10102.55: 0.57753524}
    books.reset()
    assert books.take(update) == [], "a new connection: nothing applies before its snapshot"
    again = books.take(snapshot)
    assert again[0].seq == 3, "one sequence per book across connections"
    assert reader(again, book).asks == {10102.55: 0.57753524, 10102.0: 1.0}
    for odd, reason in [({**update, "changes": [["up", "1", "1"]]}, "side other than buy or sell"),
                        ({**update, "changes": "none"}, "changes"),
                        ({**update, "time": "yesterday"}, "unreadable time"),
                        ({**snapshot, "product_id": "ETH-USD"}, "not subscribed"),
                        ({**snapshot, "bids": [["-1", "1"]]}, "price <= 0")]:
        with pytest.raises(Malformed, match=reason):
            books.take(odd)
