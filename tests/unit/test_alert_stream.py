"""The alert stream's fan-out: filters, and a client whose queue is full is dropped at once while
the others get every alert (the hub never waits for a client)."""
from __future__ import annotations

import asyncio

import orjson

from tradewatch.alert_stream import AlertHub, StreamedAlert
from tradewatch.config import Settings


def alert(i: int, symbol: str = "AAPL", severity: str = "HIGH") -> StreamedAlert:
    return StreamedAlert.parse(orjson.dumps({"alert_id": f"t{i}:PRICE_SPIKE", "symbol": symbol, "severity": severity}))


def test_a_full_queue_drops_that_client_and_no_other():
    async def scenario():
        hub = AlertHub(Settings(api_stream_queue=5), engine=None)
        slow, fast = hub.subscribe(None, None), hub.subscribe(None, None)
        critical_msft = hub.subscribe(["MSFT"], ["CRITICAL"])
        received = []
        for i in range(12):
            hub._fan_out([alert(i, *(("MSFT", "CRITICAL") if i % 3 == 0 else ("AAPL", "HIGH")))])
            while not fast.queue.empty():
                received.append(fast.queue.get_nowait().alert_id)
        assert received == [f"t{i}:PRICE_SPIKE" for i in range(12)]
        assert slow.dropped and "5 alerts waiting" in slow.dropped and slow not in hub.subscribers
        assert [a.alert_id async for a in limited(hub.alerts(slow, None), 10)] == [], "a dropped client's stream ends"
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
            StreamedAlert.parse(raw)
        except (ValueError, KeyError, TypeError):
            continue
        raise AssertionError(f"{raw!r} was accepted")


def test_a_resume_while_the_database_is_unreachable_says_so_and_goes_on_live():
    from tradewatch.store import queries

    async def scenario():
        unreachable = queries.engine_for("postgresql+psycopg2://tradewatch:x@127.0.0.1:1/tradewatch")
        hub = AlertHub(Settings(), engine=unreachable)
        subscriber = hub.subscribe(None, None)
        stream = hub.alerts(subscriber, "t1:PRICE_SPIKE")
        note = await stream.__anext__()
        assert "database cannot be read" in note
        hub._fan_out([alert(2)])
        assert (await stream.__anext__()).alert_id == "t2:PRICE_SPIKE", "live alerts still flow"
    asyncio.run(scenario())
