"""The live venues' mappings on the examples of their public documentation, and the sequencer."""
from __future__ import annotations

import calendar

import orjson
import pytest

from tradewatch.events import parse_trade
from tradewatch.market import live
from tradewatch.market.live import Unexpected, binance_symbol, binance_trade, coinbase_trade

# Coinbase Exchange WebSocket docs, channel `matches`: the example `match` message
COINBASE_MATCH = {"type": "match", "trade_id": 10, "sequence": 50,
                  "maker_order_id": "ac928c66-ca53-498f-9c13-a110027a60e8",
                  "taker_order_id": "132fb6ae-456b-4654-b4e0-d681ac05cea1", "time": "2014-11-07T08:19:27.028459Z",
                  "product_id": "BTC-USD", "size": "5.23512", "price": "400.23", "side": "sell"}
# Binance Spot WebSocket Streams docs, "Trade Streams": the example payload
BINANCE_TRADE = {"e": "trade", "E": 1672515782136, "s": "BNBBTC", "t": 12345, "p": "0.001", "q": "100",
                 "T": 1672515782136, "m": True, "M": True}


def test_coinbase_match_maps_to_a_trade_with_the_takers_side():
    item = coinbase_trade(COINBASE_MATCH)
    trade = item.trade
    assert (item.venue_symbol, item.sequence) == ("BTC-USD", 10)
    assert trade.trade_id == "coinbase:BTC-USD:10" and trade.symbol == "BTC-USD" and trade.exchange == "COINBASE"
    assert trade.timestamp_ms == calendar.timegm((2014, 11, 7, 8, 19, 27)) * 1000 + 28
    assert (trade.price, trade.quantity) == (400.23, 5.23512)
    assert trade.side == "buy", "the maker sold (an up-tick): the taker bought"
    assert coinbase_trade({**COINBASE_MATCH, "side": "buy"}).trade.side == "sell"
    assert coinbase_trade({**COINBASE_MATCH, "type": "last_match"}).trade == trade
    # what the producer sends is a valid trade event for the consumer
    assert parse_trade(trade.to_json_bytes(), sent_ms=trade.timestamp_ms) == trade


def test_coinbase_control_messages_and_odd_shapes():
    assert coinbase_trade({"type": "subscriptions", "channels": [{"name": "matches", "product_ids": ["BTC-USD"]}]}) is None
    assert coinbase_trade({"type": "heartbeat", "sequence": 90, "last_trade_id": 20, "product_id": "BTC-USD",
                           "time": "2014-11-07T08:19:28.464459Z"}) is None
    for odd, kind in [({"type": "error", "message": "Failed to subscribe", "reason": "ETH-XYZ is not a valid product"},
                       "error from the venue"),
                      ({"type": "ticker", "product_id": "BTC-USD"}, "type 'ticker'"),
                      ({**COINBASE_MATCH, "trade_id": "10"}, "malformed trade_id"),
                      ({**COINBASE_MATCH, "side": "up"}, "malformed trade_id, side"),
                      ({k: v for k, v in COINBASE_MATCH.items() if k != "price"}, "without a readable 'price'"),
                      ({**COINBASE_MATCH, "price": "four hundred"}, "without a readable"),
                      ({**COINBASE_MATCH, "price": "NaN"}, "not a finite number above 0"),
                      ({**COINBASE_MATCH, "time": "2014-11-07T08:19:27"}, "without a readable")]:
        with pytest.raises(Unexpected, match=kind):
            coinbase_trade(odd)


def test_binance_trade_maps_to_a_trade_with_the_takers_side():
    item = binance_trade(BINANCE_TRADE)
    trade = item.trade
    assert (item.venue_symbol, item.sequence) == ("BNBBTC", 12345)
    assert trade.trade_id == "binance:BNBBTC:12345" and trade.symbol == "BNB-BTC" and trade.exchange == "BINANCE"
    assert trade.timestamp_ms == 1672515782136 and (trade.price, trade.quantity) == (0.001, 100.0)
    assert trade.side == "sell", "the buyer was the maker: the taker sold"
    assert binance_trade({**BINANCE_TRADE, "m": False}).trade.side == "buy"
    assert binance_trade({"stream": "bnbbtc@trade", "data": BINANCE_TRADE}).trade == trade   # combined streams
    assert parse_trade(trade.to_json_bytes(), sent_ms=trade.timestamp_ms) == trade


def test_binance_control_messages_and_odd_shapes():
    assert binance_trade({"result": None, "id": 1}) is None
    for odd, kind in [({"code": 2, "msg": "Invalid request: unknown variant"}, "error from the venue"),
                      ({"e": "aggTrade", "s": "BNBBTC"}, "event 'aggTrade'"),
                      ({**BINANCE_TRADE, "t": "12345"}, "malformed t"),
                      ({**BINANCE_TRADE, "m": "true"}, "malformed"),
                      ({**BINANCE_TRADE, "q": None}, "without a readable"),
                      ({**BINANCE_TRADE, "p": "NaN"}, "not a finite number above 0"),
                      ({**BINANCE_TRADE, "q": "inf"}, "not a finite number above 0"),
                      ({**BINANCE_TRADE, "p": "0"}, "not a finite number above 0"),
                      ({"result": ["x"], "id": 1}, "SUBSCRIBE answered")]:
        with pytest.raises(Unexpected, match=kind):
            binance_trade(odd)


@pytest.mark.parametrize("venue_symbol, ours", [("BTCUSDT", "BTC-USDT"), ("ETHBTC", "ETH-BTC"), ("BTCFDUSD", "BTC-FDUSD"),
                                                ("ethusdc", "ETH-USDC"), ("BTCEUR", "BTC-EUR"), ("USDT", "USDT")])
def test_binance_symbols_in_our_form(venue_symbol, ours):
    assert binance_symbol(venue_symbol) == ours


def test_subscriptions_are_the_documented_messages():
    assert orjson.loads(live.coinbase_subscribe(["BTC-USD", "ETH-USD"])[0]) == {
        "type": "subscribe", "product_ids": ["BTC-USD", "ETH-USD"], "channels": ["matches", "heartbeat"]}
    assert orjson.loads(live.binance_subscribe(["BTCUSDT", "ETHUSDT"])[0]) == {
        "method": "SUBSCRIBE", "params": ["btcusdt@trade", "ethusdt@trade"], "id": 1}


def test_sequencer_drops_repeats_and_reports_gaps_per_symbol():
    """Gaps are labelled by symbol for the subscribed ones only: any other symbol a venue sends is
    counted as "other" (a venue cannot make new metric series)."""
    sequencer = live.Sequencer("unit", labelled=frozenset({"BNBBTC"}))
    other = live.GAPS.labels("unit", "other")
    other_before = other._value.get()
    gaps, missing = live.GAPS.labels("unit", "BNBBTC"), live.MISSING.labels("unit", "BNBBTC")
    before = (gaps._value.get(), missing._value.get(), live.DUPLICATES.labels("unit")._value.get())

    def item(symbol: str, sequence: int):
        return binance_trade({**BINANCE_TRADE, "s": symbol, "t": sequence})

    admitted = [sequencer.admit(item(s, n)) for s, n in [("BNBBTC", 1), ("BNBBTC", 2), ("ETHBTC", 7), ("BNBBTC", 2),
                                                         ("BNBBTC", 1), ("BNBBTC", 6), ("ETHBTC", 8), ("BNBBTC", 7)]]
    assert admitted == [True, True, True, False, False, True, True, True]
    after = (gaps._value.get(), missing._value.get(), live.DUPLICATES.labels("unit")._value.get())
    assert [a - b for a, b in zip(after, before)] == [1, 3, 2]
    assert sequencer.admit(item("ETHBTC", 12)) and other._value.get() - other_before == 1
    assert not any(s.labels.get("symbol") == "ETHBTC" for m in live.GAPS.collect() for s in m.samples)


def test_sequencer_remembers_a_bounded_number_of_symbols():
    """Issue 23: a venue sending ever new symbols grew the tracker without bound."""
    sequencer = live.Sequencer("unit-cap", capacity=100)
    for n in range(1000):
        assert sequencer.admit(binance_trade({**BINANCE_TRADE, "s": f"S{n}BTC", "t": 1}))
    assert len(sequencer.last) == 100 and "S999BTC" in sequencer.last and "S0BTC" not in sequencer.last
    assert not sequencer.admit(binance_trade({**BINANCE_TRADE, "s": "S999BTC", "t": 1})), "recent ones still deduped"


def test_replay_server_checks_subscriptions_and_stamps_trades_with_now():
    import time

    from tradewatch.market.replay_server import (BadSubscription, ReplayServer, Subscription, binance_accept,
                                                 coinbase_accept)

    with pytest.raises(BadSubscription, match="<symbol>@trade or <symbol>@depth@100ms"):
        binance_accept({"method": "SUBSCRIBE", "params": ["bnbbtc@kline_1m"], "id": 3})
    with pytest.raises(BadSubscription, match="matches or level2_batch channel"):
        coinbase_accept({"type": "subscribe", "product_ids": ["BTC-USD"], "channels": ["heartbeat"]})
    subscription, ack = binance_accept(orjson.loads(live.binance_subscribe(["BNBBTC"])[0]))
    assert subscription == Subscription({"BNBBTC"}, {"trade"}) and orjson.loads(ack) == {"result": None, "id": 1}
    with_book = orjson.loads(live.binance_subscribe(["BNBBTC"], book=True)[0])
    assert binance_accept(with_book)[0].channels == {"trade", "book"}
    subscription, ack = coinbase_accept(orjson.loads(live.coinbase_subscribe(["BTC-USD"], book=True)[0]))
    assert subscription == Subscription({"BTC-USD"}, {"trade", "heartbeat", "book"})
    assert orjson.loads(ack)["type"] == "subscriptions"

    server = ReplayServer("binance", [], now=True)
    trades = Subscription({"BNBBTC"}, {"trade"})
    before = int(time.time() * 1000)
    stamped = orjson.loads(server._for(orjson.dumps(BINANCE_TRADE).decode(), trades))
    assert stamped["T"] >= before and stamped["E"] == stamped["T"] and stamped["t"] == BINANCE_TRADE["t"]
    assert server._for(orjson.dumps(BINANCE_TRADE).decode(), Subscription({"ETHBTC"}, {"trade"})) is None, \
        "only subscribed symbols"
    depth = orjson.dumps({"e": "depthUpdate", "E": 1, "s": "BNBBTC", "U": 1, "u": 2, "b": [], "a": []}).decode()
    assert server._for(depth, trades) is None, "only subscribed channels"
    assert server._for("not json", trades) == "not json", "malformed frames go out as written"


def test_replay_server_answers_the_binance_snapshot_its_book_makes():
    """The REST snapshot is the server's book: the `# book` state with every change it has passed,
    a `# lost` one included (never sent)."""
    from tradewatch.market.replay_server import ReplayServer, Subscription

    class Connection:
        def respond(self, status, text):
            return status, orjson.loads(text)

    class Request:
        def __init__(self, path):
            self.path = path

    lines = ['# book {"s":"BNBBTC","lastUpdateId":10,"bids":[["1.0","2"],["0.9","1"]],"asks":[["1.1","2"]]}',
             '{"e":"depthUpdate","E":1,"s":"BNBBTC","U":11,"u":12,"b":[["0.9","0"]],"a":[["1.2","5"]]}',
             '# lost {"e":"depthUpdate","E":2,"s":"BNBBTC","U":13,"u":13,"b":[["0.5","7"]],"a":[]}']
    server = ReplayServer("binance", lines)
    book = Subscription({"BNBBTC"}, {"book"})
    assert server._for(lines[1], book, apply=True) == lines[1] and server._for(lines[2], book, apply=True) is None
    status, answer = server.depth(Connection(), Request("/api/v3/depth?symbol=BNBBTC&limit=100"))
    assert status == 200 and answer == {"lastUpdateId": 13, "bids": [["1.0", "2"], ["0.5", "7"]],
                                        "asks": [["1.1", "2"], ["1.2", "5"]]}
    assert server.depth(Connection(), Request("/api/v3/depth?symbol=BNBBTC&limit=1"))[1]["asks"] == [["1.1", "2"]]
    assert server.depth(Connection(), Request("/api/v3/depth?symbol=XYZ"))[0] == 400
    assert server.depth(Connection(), Request("/")) is None, "the WebSocket stream"


def test_replay_server_loop_goes_on_with_the_ids_where_the_sample_ended():
    """--loop: the sample again and again, ids shifted by each symbol's span, so the client sees
    neither repeats nor gaps at the seams (only the sample's own gap, once per pass)."""
    import subprocess
    import sys
    import threading
    import time

    from tradewatch.config import PROJECT_ROOT
    from tradewatch.market.live import VENUES, LiveFeed

    started_ms = int(time.time() * 1000)
    server = subprocess.Popen([sys.executable, "-m", "tradewatch.market.replay_server", "binance", "--port", "0",
                               "--rate", "2000", "--loop"], cwd=PROJECT_ROOT, stdout=subprocess.PIPE, text=True,
                              stderr=subprocess.DEVNULL)
    try:
        url = server.stdout.readline().split()[-1]
        done = threading.Event()
        feed = LiveFeed(VENUES["binance"], ["BTCUSDT", "ETHUSDT"], url, stop=done.is_set, backoff_s=0.1)
        gaps = live.GAPS.labels("binance", "ETHUSDT"), live.GAPS.labels("binance", "BTCUSDT")
        before = sum(g._value.get() for g in gaps), live.DUPLICATES.labels("binance")._value.get()
        trades = []
        for trade in feed:                       # three passes of the sample's 295 trades
            trades.append(trade)
            if len(trades) == 3 * 295:
                done.set()
        after = sum(g._value.get() for g in gaps), live.DUPLICATES.labels("binance")._value.get()
    finally:
        server.terminate()
        server.wait(timeout=10)
    assert len({t.trade_id for t in trades}) == len(trades)
    assert after[0] - before[0] == 3, "the sample's one gap in each pass, none at the seams"
    assert after[1] - before[1] >= 1, "the repeats after the sample's dropped connection"
    assert all(t.timestamp_ms >= started_ms for t in trades), "stamped with the time sent (--loop implies --now)"


def test_a_feed_that_cannot_go_on_ends_loudly():
    """An endpoint that is no WebSocket URL is not retried for ever in silence: iterating raises
    with the reason (producer.py prints it and exits 1)."""
    from tradewatch.market.live import VENUES, FeedFailed, LiveFeed

    feed = LiveFeed(VENUES["coinbase"], ["BTC-USD"], "http://127.0.0.1:1/")
    with pytest.raises(FeedFailed, match="is not a WebSocket URL"):
        next(iter(feed))
