"""The API's live trade stream (GET /trades/stream as Server-Sent Events, /trades/ws as a WebSocket)
against a real Kafka and uvicorn process: every valid trade reaches its clients in the order it was
sent, invalid messages never do, a client that comes back with Last-Event-ID (even to an API that
was restarted meanwhile) gets what it missed from Kafka and then the live trades, without a gap or
a duplicate, and a catch-up longer than API_STREAM_CATCH_UP says so."""
from __future__ import annotations

import asyncio
import json
import signal
import time

import websockets

from tests.conftest import publish_trades, wait_for
from tests.integration.test_alert_stream import SSEClient, launch_api, start_api, total
from tradewatch import bus
from tradewatch.events import Trade

SYMBOLS = ("AAPL", "MSFT", "BTC-USD")


def batch(part: int, count: int) -> list[Trade]:
    """`count` trades a symbol, an hour ago, each with its own price and quantity."""
    start = int(time.time() * 1000) - 3_600_000 + part * 100_000
    return [Trade(f"{symbol}-{part}-{k}", symbol, start + k, 100.0 + s * 10 + k / 100, 1.0 + part + k / 1000,
                  ("buy", "sell")[k % 2], "X") for k in range(count) for s, symbol in enumerate(SYMBOLS)]


def publish_raw(settings, messages: list[tuple[bytes, bytes]]) -> None:
    publisher = bus.publisher(settings)
    for key, value in messages:
        publisher.send(settings.trades_topic, key, value)
    assert publisher.flush(30)
    publisher.close()


def trades_of(client: SSEClient) -> list[dict]:
    return [json.loads(e["data"]) for e in client.events if e.get("event") == "trade"]


def ids(trades: list, symbol: str | None = None) -> list[str]:
    return [t["trade_id"] if isinstance(t, dict) else t.trade_id for t in trades
            if symbol is None or (t["symbol"] if isinstance(t, dict) else t.symbol) == symbol]


def test_every_trade_reaches_the_stream_in_order_and_a_resume_across_an_api_restart_has_no_gap(settings, tmp_path):
    settings, base, api = launch_api(settings, tmp_path)
    sent = [*batch(0, 100), *batch(1, 150), *batch(2, 80)]
    one, two, three = sent[:300], sent[300:750], sent[750:]

    async def scenario():
        first = SSEClient(settings.api_port, "/trades/stream?symbol=AAPL")
        everything = SSEClient(settings.api_port, "/trades/stream")
        for client in (first, everything):
            await client.connect()
            assert client.status == 200
        # part one, read live; then the client goes away, and so does the API
        async with websockets.connect(f"ws://127.0.0.1:{settings.api_port}/trades/ws?symbol=MSFT",
                                      max_queue=None) as ws:
            await asyncio.to_thread(publish_raw, settings, [(b"AAPL", b"{not json"),
                                                            (b"AAPL", b'{"schema_version": 1, "symbol": "AAPL"}')])
            await asyncio.to_thread(publish_trades, settings, one)
            await first.read(lambda c: len(trades_of(c)) >= 100, timeout=30)
            await everything.read(lambda c: len(trades_of(c)) >= 300, timeout=30)
            on_socket = [json.loads(await asyncio.wait_for(ws.recv(), 30)) for _ in range(100)]
        for client in (first, everything):
            client.close()
        return first, everything, on_socket

    first, everything, on_socket = asyncio.run(scenario())
    api.send_signal(signal.SIGTERM)
    api.wait(30)
    assert [e["id"] for e in first.events if e.get("event") == "trade"] == \
        [t["position"] for t in trades_of(first)], "each event's id is its trade's position"
    assert ids(trades_of(first)) == ids(one, "AAPL"), "every AAPL trade once, in order, the bad messages left out"
    assert ids(trades_of(everything)) and sorted(ids(trades_of(everything))) == sorted(ids(one))
    for symbol in SYMBOLS:
        assert ids(trades_of(everything), symbol) == ids(one, symbol), f"{symbol}'s trades in the order sent"
    assert ids(on_socket) == ids(one, "MSFT"), "the WebSocket: every MSFT trade once, in order"
    streamed, published = trades_of(first)[7], next(t for t in one if t.trade_id == trades_of(first)[7]["trade_id"])
    assert {k: streamed[k] for k in ("symbol", "timestamp_ms", "price", "quantity", "side", "exchange")} == \
        {"symbol": published.symbol, "timestamp_ms": published.timestamp_ms, "price": published.price,
         "quantity": published.quantity, "side": published.side, "exchange": published.exchange}

    # part two while no API runs; a new API; the client resumes there, then part three live
    publish_trades(settings, two)
    settings, base, _ = launch_api(settings, tmp_path)

    async def resume():
        resumed = SSEClient(settings.api_port, "/trades/stream?symbol=AAPL",
                            headers={"Last-Event-ID": first.events[-1]["id"]})
        again = f"ws://127.0.0.1:{settings.api_port}/trades/ws?symbol=MSFT&last_event_id={on_socket[-1]['position']}"
        async with websockets.connect(again, max_queue=None) as ws:
            await resumed.connect()
            assert resumed.status == 200
            await resumed.read(lambda c: len(trades_of(c)) >= 150, timeout=30)
            await asyncio.to_thread(publish_trades, settings, three)
            await resumed.read(lambda c: len(trades_of(c)) >= 230, timeout=30)
            on_socket_again = [json.loads(await asyncio.wait_for(ws.recv(), 30)) for _ in range(230)]
        resumed.close()
        return trades_of(resumed), on_socket_again

    after, on_socket_again = asyncio.run(resume())
    assert ids(trades_of(first) + after) == ids(sent, "AAPL"), "across the restart: every AAPL trade once, in order"
    assert ids(on_socket + on_socket_again) == ids(sent, "MSFT"), "the WebSocket's resume: no gap, no duplicate"
    assert "Traceback" not in (tmp_path / "api.log").read_text()


def test_a_client_resuming_from_the_start_gets_the_catch_up_limit_then_a_note_then_live_trades(settings, tmp_path):
    settings, base = start_api(settings, tmp_path, api_stream_catch_up=50)
    publish_trades(settings, batch(0, 40))      # 120 trades, 40 of AAPL

    async def scenario():
        everything = SSEClient(settings.api_port, "/trades/stream", headers={"Last-Event-ID": "0"})
        aapl = SSEClient(settings.api_port, "/trades/stream?symbol=AAPL", headers={"Last-Event-ID": "0"})
        unknown = SSEClient(settings.api_port, "/trades/stream?symbol=AAPL", headers={"Last-Event-ID": "yesterday"})
        for client in (everything, aapl, unknown):
            await client.connect()
            assert client.status == 200
        await everything.read(lambda c: any("API_STREAM_CATCH_UP" in note for note in c.comments), timeout=30)
        await aapl.read(lambda c: len(trades_of(c)) >= 40, timeout=30)
        await unknown.read(lambda c: c.comments, timeout=30)
        live = batch(1, 5)
        await asyncio.to_thread(publish_trades, settings, live)
        await everything.read(lambda c: len(trades_of(c)) >= 65, timeout=30)
        await unknown.read(lambda c: len(trades_of(c)) >= 5, timeout=30)
        await aapl.read(lambda c: len(trades_of(c)) >= 45, timeout=30)
        for client in (everything, aapl, unknown):
            client.close()
        return trades_of(everything), trades_of(aapl), unknown, live

    async def back(last_id: str, since: list[Trade]) -> list[dict]:
        client = SSEClient(settings.api_port, "/trades/stream?symbol=AAPL", headers={"Last-Event-ID": last_id})
        await client.connect()
        await client.read(lambda c: len(trades_of(c)) >= len(ids(since, "AAPL")), timeout=30)
        client.close()
        return trades_of(client)

    everything, aapl, unknown, live = asyncio.run(scenario())
    assert len(everything) == 65 and set(ids(everything[50:])) == set(ids(live)), \
        "50 missed trades (the limit), then the live ones"
    assert ids(aapl) == ids(batch(0, 40), "AAPL") + ids(live, "AAPL"), "under the limit: all missed, then live"
    assert "unknown Last-Event-ID 'yesterday'" in unknown.comments[0]
    assert ids(trades_of(unknown)) == ids(live, "AAPL"), "an unknown id: live trades only"
    wait_for(lambda: total(base, "tradewatch_api_stream_clients", "trade") == 0, timeout=10,
             message="every client gone")
    # nobody follows the stream now, so the API reads nothing; what is sent meanwhile is still there for a resume
    meanwhile = batch(2, 5)
    publish_trades(settings, meanwhile)
    assert ids(asyncio.run(back(aapl[-1]["position"], meanwhile))) == ids(meanwhile, "AAPL")
