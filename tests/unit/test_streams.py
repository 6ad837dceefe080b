"""The live streams' fan-out: filters, and a client whose queue is full is dropped at once while
the others get every item (the hub never waits for a client); a candle is streamed by its id and
filtered by its size."""
from __future__ import annotations

import asyncio

import orjson

from tradewatch import candles
from tradewatch.streams import Hub, Streamed, alert_feed, candle_feed
from tradewatch.config import Settings


ALERTS = alert_feed(Settings())


def alert(i: int, symbol: str = "AAPL", severity: str = "HIGH") -> Streamed:
    return ALERTS.parse(orjson.dumps({"alert_id": f"t{i}:PRICE_SPIKE", "symbol": symbol, "severity": severity}))


def test_a_full_queue_drops_that_client_and_no_other():
    async def scenario():
        hub = Hub(Settings(api_stream_queue=5), None, ALERTS)
        slow, fast = hub.subscribe(None, None), hub.subscribe(None, None)
        critical_msft = hub.subscribe(["MSFT"], ["CRITICAL"])
        received = []
        for i in range(12):
            hub._fan_out([alert(i, *(("MSFT", "CRITICAL") if i % 3 == 0 else ("AAPL", "HIGH")))])
            while not fast.queue.empty():
                received.append(fast.queue.get_nowait().id)
        assert received == [f"t{i}:PRICE_SPIKE" for i in range(12)]
        assert slow.dropped and "5 alerts waiting" in slow.dropped and slow not in hub.subscribers
        assert [a.id async for a in limited(hub.items(slow, None), 10)] == [], "a dropped client's stream ends"
        assert critical_msft.queue.qsize() == 4 and critical_msft.dropped is None
        assert hub.subscribers == {fast, critical_msft}
    asyncio.run(scenario())


async def limited(stream, n: int):
    async for item in stream:
        yield item
        n -= 1
        if n == 0:
            return


def test_an_alert_without_its_fields_is_refused():
    for raw in (b"not json", b"[]", b'{"alert_id": "x"}'):
        try:
            ALERTS.parse(raw)
        except (ValueError, KeyError, TypeError):
            continue
        raise AssertionError(f"{raw!r} was accepted")


def test_a_resume_while_the_database_is_unreachable_says_so_and_goes_on_live():
    from tradewatch.store import queries

    async def scenario():
        unreachable = queries.engine_for("postgresql+psycopg2://tradewatch:x@127.0.0.1:1/tradewatch")
        hub = Hub(Settings(), unreachable, ALERTS)
        subscriber = hub.subscribe(None, None)
        stream = hub.items(subscriber, "t1:PRICE_SPIKE")
        note = await stream.__anext__()
        assert "database cannot be read" in note
        hub._fan_out([alert(2)])
        assert (await stream.__anext__()).id == "t2:PRICE_SPIKE", "live alerts still flow"
    asyncio.run(scenario())


def test_a_candle_streams_by_its_id_and_the_size_filter_picks_it():
    row = {name: None for name in candles.STREAMED} | {"symbol": "BTC-USD", "window_size": "5m",
                                                       "window_start_ms": 1_767_225_600_000,
                                                       "window_end_ms": 1_767_225_900_000, "close": 1.5, "rsi_14": 61.0}
    raw = candles.message(row)
    fields = orjson.loads(raw)
    assert fields["candle_id"] == "BTC-USD:5m:1767225600000" and fields["window_start"] == "2026-01-01T00:00:00Z"
    assert fields["rsi_14"] == 61.0 and set(candles.STREAMED) <= set(fields)

    async def scenario():
        hub = Hub(Settings(), None, candle_feed(Settings()))
        five, one = hub.subscribe(["BTC-USD"], ["5m"]), hub.subscribe(None, ["1m"])
        other = hub.subscribe(["ETH-USD"], None)
        item = hub.feed.parse(raw)
        assert (item.id, item.symbol, item.kind) == ("BTC-USD:5m:1767225600000", "BTC-USD", "5m")
        hub._fan_out([item])
        assert (five.queue.qsize(), one.queue.qsize(), other.queue.qsize()) == (1, 0, 0)
    asyncio.run(scenario())
