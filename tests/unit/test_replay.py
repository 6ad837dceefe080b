import gzip
import re

import pytest

from tests.conftest import SHARED_DATA
from tradewatch.market import replay

SPY = SHARED_DATA / "lean" / "spy_20131007_trades.csv.gz"


def test_spy_file_replays_every_trade_in_event_order():
    loaded = replay.load(SPY)
    with gzip.open(SPY, "rt") as handle:
        rows = sum(1 for _ in handle) - 1
    assert len(loaded.trades) == rows == 250_601
    assert loaded.skipped_rows == []
    times = [t.timestamp_ms for t in loaded.trades]
    assert times == sorted(times)
    first = loaded.trades[0]
    assert (first.trade_id, first.symbol, first.timestamp_ms, first.price, first.quantity, first.exchange,
            first.condition) == ("SPY-20131007-0000001", "SPY", 1381132800464, 167.41, 100.0, "P", "20002000")
    assert {t.side for t in loaded.trades[1:]} <= {"buy", "sell", "unknown"}
    assert sum(t.side == "buy" for t in loaded.trades) > 50_000


def test_tick_rule_infers_sides(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("timestamp,price,quantity\n2020-01-01T00:00:00Z,10,1\n2020-01-01T00:00:01Z,11,1\n"
                    "2020-01-01T00:00:02Z,11,1\n2020-01-01T00:00:03Z,10.5,1\n")
    trades = replay.load(path, symbol="abc").trades
    assert [t.side for t in trades] == ["unknown", "buy", "buy", "sell"]
    assert {t.symbol for t in trades} == {"ABC"}


def test_column_mapping_epoch_times_sorting_and_bad_rows(tmp_path):
    path = tmp_path / "custom.csv"
    path.write_text("when,px,size,ticker,dir\n1577836802000,10,5,XYZ,S\n1577836801000,9,5,XYZ,B\n"
                    "1577836803000,oops,5,XYZ,B\n1577836804000,-1,5,XYZ,B\n")
    columns = replay.ColumnMap(timestamp="when", price="px", quantity="size", symbol="ticker", side="dir")
    loaded = replay.load(path, columns)
    assert [(t.timestamp_ms, t.price, t.side) for t in loaded.trades] == [
        (1577836801000, 9.0, "buy"), (1577836802000, 10.0, "sell")]
    assert len(loaded.skipped_rows) == 2
    assert loaded.skipped_rows[0].startswith("line 4:") and "oops" in loaded.skipped_rows[0]
    assert loaded.skipped_rows[1].startswith("line 5:") and "must be > 0" in loaded.skipped_rows[1]


def test_a_row_cut_short_is_skipped_with_its_line_and_the_rest_replays(tmp_path):
    """A row with fewer fields than the header (a line cut short) is a bad row, in every kind of
    file: it once stopped the replay with a Python error where its time should have been."""
    trades, bars, quotes = tmp_path / "t.csv", tmp_path / "b.csv", tmp_path / "q.csv"
    trades.write_text("trade_id,timestamp,symbol,price,quantity\n1,2013-10-07T08:00:00Z,SPY,10,1\n2\n"
                      "3,2013-10-07T08:00:01Z,SPY,10.5\n")
    bars.write_text("symbol,window_start,open,high,low,close,volume\nIBM,2013-10-07T13:30:00Z,1,2,1,2,8\nIBM\n")
    quotes.write_text("symbol,timestamp,bid,bid_size,ask,ask_size\nSPY,2013-10-07T08:00:00Z,9,1,11,1\nSPY\n")
    loaded = replay.load(trades)
    assert [(t.trade_id, t.price, t.quantity) for t in loaded.trades] == [("1", 10.0, 1.0), ("3", 10.5, 1.0)]
    assert len(loaded.skipped_rows) == 1 and loaded.skipped_rows[0].startswith("line 3: ")
    assert "time" in loaded.skipped_rows[0]
    for path, kept in ((bars, 4), (quotes, 1)):
        loaded = replay.load(path)
        assert len(loaded.trades) + len(loaded.quotes) == kept
        assert len(loaded.skipped_rows) == 1 and loaded.skipped_rows[0].startswith("line 3: ")


def test_bars_file_becomes_four_trades_per_bar():
    loaded = replay.load(SHARED_DATA / "lean" / "ibm_20131007_bars_1m.csv")
    assert len(loaded.trades) == 453 * 4
    first_bar = loaded.trades[:4]
    assert [t.price for t in first_bar][0] == 181.52
    assert sum(t.quantity for t in loaded.trades) == pytest.approx(
        sum(float(line.split(",")[6]) for line in
            (SHARED_DATA / "lean" / "ibm_20131007_bars_1m.csv").read_text().splitlines()[1:]))


def test_missing_columns_give_a_clear_error(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="no column 'timestamp', 'price'"):
        replay.load(path)


def bad_files(tmp_path):
    header = "time,symbol,price,quantity\n"
    big = tmp_path / "big.csv"
    big.write_text(header + "2013-10-07T13:30:00Z,SPY,170,1\n2013-10-07T13:30:01Z,SPY,170," + "9" * 200_000 + "\n")
    cut = tmp_path / "cut.csv.gz"
    whole = gzip.compress((header + "".join(f"2013-10-07T13:30:{i % 60:02d}Z,SPY,170,1\n"
                                            for i in range(2_000))).encode())      # found in the rows read ahead
    cut.write_bytes(whole[:len(whole) // 2])
    latin = tmp_path / "latin.csv"
    latin.write_bytes((header + "2013-10-07T13:30:00Z,SPY,170,1\n2013-10-07T13:30:01Z,SPÿ,170,1\n").encode("latin-1"))
    two = tmp_path / "two.zip"
    import zipfile
    with zipfile.ZipFile(two, "w") as archive:
        archive.writestr("a.csv", header)
        archive.writestr("b.csv", header)
    return {"big": big, "cut": cut, "latin": latin, "two": two}


@pytest.mark.parametrize("name, message", [("big", "line 3: not readable as CSV"),
                                           ("cut", "the compressed file is cut short or damaged"),
                                           ("latin", "line 3: not UTF-8"),
                                           ("two", "a .zip to replay holds one CSV file; this one holds 2")])
def test_the_producer_says_it_in_one_line_and_exits_2(tmp_path, name, message):
    import os
    import subprocess
    import sys

    from tradewatch.config import PROJECT_ROOT
    path = bad_files(tmp_path)[name]
    result = subprocess.run([sys.executable, "producer.py", "--replay", str(path), "--timestamp-column", "time"],
                            cwd=PROJECT_ROOT, env={**os.environ, "TRADEWATCH_HOME": str(tmp_path / "home")},
                            capture_output=True, text=True, timeout=60)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1 and message in lines[0], result.stderr[-2000:]


def test_files_that_cannot_be_read_say_where_and_why(tmp_path):
    """A field over the csv module's 128 KiB, a cut .gz and a line that is not UTF-8 each end the
    replay with one clear error naming the line (they ended it with a traceback)."""
    files = bad_files(tmp_path)
    big, cut, latin = files["big"], files["cut"], files["latin"]
    columns = replay.ColumnMap(timestamp="time")
    with pytest.raises(ValueError, match=r"^line 3: not readable as CSV \(field larger than field limit"):
        replay.load(big, columns)
    with pytest.raises(ValueError, match=r"^after line \d+: the compressed file is cut short or damaged"):
        replay.load(cut, columns)
    with pytest.raises(ValueError, match=r"^line 3: not UTF-8"):
        replay.load(latin, columns)


QUOTES = ("timestamp,symbol,bid,bid_size,ask,ask_size\n"
          "2024-01-02T10:00:00.000Z,ABC,10.00,100,10.02,200\n"
          "2024-01-02T10:00:00.400Z,ABC,10.00,100,10.01,50\n"
          "2024-01-02T10:00:00.450Z,ABC,10.00,100,10.01,50\n"      # repeats the last: no message
          "2024-01-02T10:00:00.900Z,ABC,10.01,100,10.00,50\n"      # crossed: a book cannot hold it
          "2024-01-02T10:00:00.950Z,ABC,9.99,80,,\n"               # no ask: that side empty
          "2024-01-02T10:00:00.970Z,ABC,x,1,10.5,1\n")
TRADES = ("timestamp,symbol,price,quantity\n"
          "2024-01-02T10:00:00.000Z,ABC,10.02,5\n"                 # the quote of the same millisecond is its
          "2024-01-02T10:00:00.500Z,ABC,10.01,5\n"                 # at the ask after a downtick: a buy
          "2024-01-02T10:00:01.000Z,ABC,10.00,5\n"                 # no ask to a midpoint: the tick rule
          "2024-01-02T09:59:59.000Z,ABC,10.00,5\n")                # before any quote: none


def test_a_day_with_its_quotes_file_replays_as_trades_with_their_quotes_and_a_one_level_book(tmp_path):
    from tradewatch.book import OrderBook, decode_book
    from tradewatch.events import Trade
    (tmp_path / "t.csv").write_text(TRADES)
    (tmp_path / "q.csv").write_text(QUOTES)
    loaded = replay.load_files([tmp_path / "t.csv", tmp_path / "q.csv"])
    assert [(t.price, t.bid, t.ask, t.side) for t in loaded.trades] == [
        (10.00, None, None, "unknown"), (10.02, 10.00, 10.02, "buy"), (10.01, 10.00, 10.01, "buy"),
        (10.00, 9.99, None, "sell")]
    assert [row.split(": ", 1)[1][:17] for row in loaded.skipped_rows] == ["line 5: not a quo", "line 7: unreadabl"]
    assert str(tmp_path / "q.csv") in loaded.skipped_rows[0] and "crossed" in loaded.skipped_rows[0]
    assert len(loaded.quotes) == 4

    events = list(replay.events(loaded))
    assert [type(e).__name__[0] + (e.type[0] if type(e) is not Trade else "") for e in events] == \
        ["T", "Bs", "T", "Bu", "T", "Bu", "T"], "a quote before a trade of its millisecond; a repeat sends nothing"
    book = OrderBook("ABC")
    for event in events:
        if type(event) is Trade:
            top = book.top()
            assert (top.bid, top.ask) == (event.bid, event.ask), "the book at each trade is the trade's quote"
        else:
            assert decode_book(event.to_json_bytes()) == event and book.apply(event)
    assert (book.bids, book.asks, book.seq, book.gaps) == ({9.99: 80.0}, {}, 3, 0)


def test_quote_books_rebuild_every_quote_and_send_the_book_whole_each_minute():
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from tradewatch.book import OrderBook

    side = st.one_of(st.none(), st.tuples(st.sampled_from([1.0, 1.01, 1.02]), st.sampled_from([1.0, 2.0])))

    @settings(max_examples=200, deadline=None)
    @given(st.lists(st.tuples(st.integers(0, 40_000), side, side), max_size=30))
    def rebuilt(rows):
        quotes, ms = [], 0
        for step, bid, ask in rows:
            ms += step
            bid = bid and (bid[0] - 0.05, bid[1])              # bids below asks: never crossed
            quotes.append(replay.Quote(ms, "X", *(bid or (None, 0.0)), *(ask or (None, 0.0))))
        book, due = OrderBook("X"), 0
        messages = iter(replay.quote_books(quotes))
        last = None
        for quote in quotes:
            now = (quote.bid, quote.bid_size, quote.ask, quote.ask_size)
            if now == last and quote.timestamp_ms < due:
                continue                                         # nothing sent
            message = next(messages)
            assert message.timestamp_ms == quote.timestamp_ms and book.apply(message)
            assert message.type == ("snapshot" if quote.timestamp_ms >= due else "update")
            if message.type == "snapshot":
                due = quote.timestamp_ms + 60_000
            top = book.top()
            assert (top.bid, top.bid_size or 0.0, top.ask, top.ask_size or 0.0) == now
            assert len(book.bids) <= 1 and len(book.asks) <= 1
            last = now
        assert next(messages, None) is None

    rebuilt()


def test_a_trades_file_with_bid_and_ask_columns_keeps_them_and_sides_follow_the_quote(tmp_path):
    """(A replayed trades file's bid and ask were dropped, so `--replay … --book` sent no book.)"""
    from tradewatch.market.books import with_books
    path = tmp_path / "t.csv"
    path.write_text("timestamp,symbol,price,quantity,bid,ask\n2024-01-02T10:00:00Z,ABC,10.02,5,10.00,10.02\n"
                    "2024-01-02T10:00:01Z,ABC,10.00,5,10.00,10.01\n2024-01-02T10:00:02Z,ABC,10.00,5,,\n")
    trades = replay.load(path).trades
    assert [(t.bid, t.ask, t.side) for t in trades] == [(10.0, 10.02, "buy"), (10.0, 10.01, "sell"),
                                                         (None, None, "sell")]
    assert sum(type(e) is not type(trades[0]) for e in with_books(trades, seed=1)) > 2


def test_a_quotes_file_needs_its_sizes_and_a_quotes_file_alone_needs_book(tmp_path):
    import os
    import subprocess
    import sys

    from tradewatch.config import PROJECT_ROOT
    path = tmp_path / "q.csv"
    path.write_text("timestamp,symbol,bid,ask\n2024-01-02T10:00:00Z,ABC,10.00,10.02\n")
    with pytest.raises(ValueError, match=r"a quotes file \(bid and ask, no price\) needs the column\(s\) 'bid_size', "
                                         "'ask_size'"):
        replay.load(path)
    path.write_text(QUOTES)
    run = [sys.executable, "producer.py", "--replay", str(path)]
    env = {**os.environ, "TRADEWATCH_HOME": str(tmp_path / "home")}
    result = subprocess.run(run, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "error: no trades to replay: a quotes file alone is sent as a book with --book" \
        in result.stderr, result.stderr[-2000:]
    result = subprocess.run(run + ["--replay", str(tmp_path / "none.csv")], cwd=PROJECT_ROOT, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and f"error: cannot replay {tmp_path / 'none.csv'}: " in result.stderr


def zipped(path, member, text):
    import zipfile
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(member, text)
    return path


def test_binance_trade_files_replay_as_downloaded(tmp_path):
    """data.binance.vision's files as they come: a spot `trades` zip without a header (times in
    microseconds), a futures `aggTrades` file with one (milliseconds); the taker's side from
    is_buyer_maker, the symbol from the file's name, ids as the live feed's."""
    spot = zipped(tmp_path / "PUMPBTC-trades-2025-03-01.zip", "PUMPBTC-trades-2025-03-01.csv",
                  "101,0.00000810,20000.00000000,0.16200000,1740787200123456,false,true\n"
                  "102,0.00000820,5000.00000000,0.04100000,1740787200500000,true,true\n"
                  "103,x,1.00000000,1.00000000,1740787201000000,false,true\n"
                  "104,0.00000830,100.00000000,0.00083000,1740787202000000,maybe,true\n"
                  "105,0.00000830,300.00000000,0.00249000,1740787203000000,false,true\n")
    loaded = replay.load(spot)
    assert [(t.trade_id, t.symbol, t.timestamp_ms, t.price, t.quantity, t.side, t.exchange) for t in loaded.trades] == [
        ("binance:PUMPBTC:101", "PUMPBTC", 1740787200123, 8.1e-6, 20000.0, "buy", "BINANCE"),
        ("binance:PUMPBTC:102", "PUMPBTC", 1740787200500, 8.2e-6, 5000.0, "sell", "BINANCE"),
        ("binance:PUMPBTC:105", "PUMPBTC", 1740787203000, 8.3e-6, 300.0, "buy", "BINANCE")]
    assert [row[:7] for row in loaded.skipped_rows] == ["line 3:", "line 4:"]
    assert "'maybe' is neither true nor false" in loaded.skipped_rows[1]

    futures = tmp_path / "ETHUSDT-aggTrades-2024-05.csv"
    futures.write_text("agg_trade_id,price,quantity,first_trade_id,last_trade_id,transact_time,is_buyer_maker\n"
                       "7,3000.10,0.5,70,72,1714521600000,true\n8,3000.20,1.5,73,73,1714521600250,false\n")
    assert [(t.trade_id, t.symbol, t.timestamp_ms, t.quantity, t.side) for t in replay.load(futures).trades] == [
        ("binance:ETHUSDT:a7", "ETHUSDT", 1714521600000, 0.5, "sell"),
        ("binance:ETHUSDT:a8", "ETHUSDT", 1714521600250, 1.5, "buy")]

    renamed = tmp_path / "dump.csv"
    renamed.write_text("9,1.5,2,3,1714521600000,false,true\n")
    with pytest.raises(ValueError, match="no 'symbol' column and no symbol in the file's name; pass --symbol"):
        replay.load(renamed)
    named = replay.load(renamed, symbol="xyzbtc").trades
    assert [(t.trade_id, t.symbol) for t in named] == [("binance:XYZBTC:9", "XYZBTC")]


def test_a_zip_holds_one_csv_or_says_why_not(tmp_path):
    two = bad_files(tmp_path)["two"]
    with pytest.raises(replay.ReplayError, match=r"two.zip: a .zip to replay holds one CSV file; this one holds 2"):
        replay.load_files([two])
    fake = tmp_path / "fake.zip"
    fake.write_text("timestamp,price\n")
    with pytest.raises(replay.ReplayError, match=r"fake.zip: not a readable .zip"):
        replay.load_files([fake])
    plain = zipped(tmp_path / "plain.zip", "day/trades.csv", "timestamp,symbol,price\n2024-01-02T10:00:00Z,abc,10\n")
    assert [(t.symbol, t.price, t.exchange) for t in replay.load(plain).trades] == [("ABC", 10.0, "REPLAY")]


def test_a_replay_streams_holding_a_bounded_number_of_rows_and_sends_a_row_far_out_of_order_late(tmp_path):
    """A replay reads as it sends (a month of a busy pair is tens of millions of rows): at most `hold`
    rows a file are held, those put a row a little out of order back in event time, and a row further
    out than that is sent when read, counted as late, not lost."""
    rows = [(1_700_000_000_000 + 1000 * n, n) for n in range(3_000)]
    rows[1000], rows[1040] = rows[1040], rows[1000]             # 40 rows apart: within what is held
    rows.insert(2_500, (1_700_000_000_000 + 1000 * 100, "late"))  # 2,400 rows back: further
    path = tmp_path / "t.csv.gz"
    with gzip.open(path, "wt") as handle:
        handle.write("trade_id,timestamp,symbol,price\n" + "".join(f"{n},{ms},ABC,10\n" for ms, n in rows))
    feed = replay.Replay([path], hold=100)
    held, taken = [], []
    for trade in feed:
        held.append(len(feed.files[0].held))
        taken.append(trade.trade_id)
    assert max(held) == 100 and sorted(taken) == sorted(str(n) for _, n in rows), "every row once, 100 held"
    assert taken[:1041] == [str(n) for n in range(1041)], "a row 40 out of order back in its place"
    assert taken.index("late") == 2_500 - 100 + 1, "sent as soon as read: the rows held then go after it"
    assert (feed.trades, feed.late, feed.skipped) == (3_001, 1, 0)


def test_damage_further_into_a_file_ends_the_replay_after_the_rows_before_it(tmp_path):
    rows = "".join(f"2024-01-02T{10 + n // 3600}:{n // 60 % 60:02d}:{n % 60:02d}Z,ABC,{10 + n % 7}\n"
                   for n in range(20_000))
    whole = gzip.compress(("timestamp,symbol,price\n" + rows).encode())
    path = tmp_path / "cut.csv.gz"
    path.write_bytes(whole[:len(whole) * 3 // 4])
    feed = replay.Replay([path], hold=1_000)        # opens: the damage is further in than what is read ahead
    taken = []
    with pytest.raises(replay.ReplayError, match=r"cut.csv.gz: after line (\d+): the compressed file is cut short") \
            as error:
        for trade in feed:
            taken.append(trade.trade_id)
    line = int(re.search(r"after line (\d+)", str(error.value))[1])
    assert 10_000 < line < 20_000 and feed.trades == len(taken) == line - 1 - 1_000
    assert taken == [f"cut.csv-{n}" for n in range(2, line - 1_000 + 1)], "the rows before it, in order"
