"""The API's live order book and quote streams (GET /orderbook/stream and /quotes/stream as
Server-Sent Events, /orderbook/ws as a WebSocket) against the real services: `producer.py --book`
→ Kafka `quotes` → `consumer.py --quotes` → PostgreSQL, and api.py reading both. A client that
builds its books from what it is sent ends with the simulator's books, level for level: through a
reconnect with Last-Event-ID, and when it joins while the quotes stage lies dead behind the feed
(its snapshot is then the stage's older checkpoint, and the messages after it come from Kafka)."""
from __future__ import annotations

import asyncio
import json

import websockets

from tests.conftest import query, start_script, wait_for
from tests.integration.test_alert_stream import SSEClient, launch_api
from tests.integration.test_ingest import START, stop_gracefully
from tests.integration.test_quotes import caught_up, expected_run
from tradewatch import bus
from tradewatch.book import OrderBook, decode_book
from tradewatch.events import iso_to_ms

SEED, TRADES, RATE = 7, 6000, 300.0


class Holder:
    """A client's books, built from the book messages it was sent, and every message that did not
    apply (a gap: it must stay empty)."""

    def __init__(self):
        self.books: dict[str, OrderBook] = {}
        self.refused: list[dict] = []
        self.messages = 0

    def take(self, data: str) -> None:
        fields = json.loads(data)
        book = self.books.setdefault(fields["symbol"], OrderBook(fields["symbol"]))
        self.messages += 1
        if not book.apply(decode_book(data.encode())):
            self.refused.append(fields)

    def at(self, expected: dict[str, OrderBook]) -> bool:
        return all(s in self.books and self.books[s].seq == b.seq for s, b in expected.items())


def feed(client: SSEClient, holder: Holder) -> int:
    """Hands the client's book events not yet taken to `holder`; the number taken so far."""
    seen = getattr(client, "seen", 0)
    for event in client.events[seen:]:
        if event.get("event") == "book":
            holder.take(event["data"])
            client.taken = getattr(client, "taken", 0) + 1
    client.seen = len(client.events)
    return getattr(client, "taken", 0)


def topic_end(settings) -> int:
    return sum(end for _, end in bus.group_lag(settings, settings.quotes_group, settings.quotes_topic).values())


def test_a_book_client_ends_with_the_simulators_books_through_a_reconnect_and_a_dead_stage(settings, tmp_path):
    expected, quotes, _, _ = expected_run(SEED, TRADES, RATE)
    first_symbol = sorted(expected)[0]
    producer = start_script(settings, "producer.py", "--book", "--count", str(TRADES), "--rate", str(RATE),
                            "--seed", str(SEED), "--start", START, log=tmp_path / "producer.log")
    log = tmp_path / "quotes.log"
    stage = start_script(settings, "consumer.py", "--quotes", log=log)
    # this one event loop parses every message of four clients; on a busy machine it can fall
    # seconds behind the feed, so each client's queue holds the whole run (dropping a client that
    # does not keep up is tested in test_alert_stream and test_candle_stream)
    settings, base, api = launch_api(settings, tmp_path, api_stream_catch_up=100_000, api_stream_queue=50_000)
    wait_for(lambda: query(settings, "SELECT count(*) FROM order_books")[0][0] == len(expected), timeout=60,
             message="every symbol's book stored")

    async def scenario():
        port = settings.api_port
        everything = SSEClient(port, "/orderbook/stream")
        quote = SSEClient(port, f"/quotes/stream?symbol={first_symbol}")
        for client in (everything, quote):
            await client.connect()
            assert client.status == 200
        held, socket_held, quoted = Holder(), Holder(), []
        done = lambda holder: (lambda c: feed(c, holder) and holder.at(expected))   # noqa: E731
        last_quote = max(q[2] for q in quotes if q[0] == first_symbol)
        reading_quotes = asyncio.create_task(quote.read(
            lambda c: c.events and json.loads(c.events[-1]["data"]).get("seq") == last_quote, timeout=120))

        async def on_socket():
            async with websockets.connect(f"ws://127.0.0.1:{port}/orderbook/ws?symbol={first_symbol}",
                                          max_queue=None) as ws:
                while not socket_held.at({first_symbol: expected[first_symbol]}):
                    socket_held.take(await asyncio.wait_for(ws.recv(), 120))
        socket_task = asyncio.create_task(on_socket())

        # one client reads a while, goes away while the feed goes on, and comes back with its last id
        await everything.read(lambda c: feed(c, held) >= 1500, timeout=60)
        everything.close()
        last_id = [e for e in everything.events if e.get("event") == "book"][-1]["id"]
        end = await asyncio.to_thread(topic_end, settings)
        await asyncio.to_thread(wait_for, lambda: topic_end(settings) > end + 300, 60, 0.05, "the feed goes on")
        back = SSEClient(port, "/orderbook/stream", headers={"Last-Event-ID": last_id})
        await back.connect()
        assert back.status == 200
        reading_back = asyncio.create_task(back.read(done(held), timeout=120))

        # the quotes stage dies; a new client joins while its checkpoint falls behind the feed
        stage.kill()
        stage.wait()
        end = await asyncio.to_thread(topic_end, settings)
        await asyncio.to_thread(wait_for, lambda: topic_end(settings) > end + 300, 60, 0.05, "the feed goes on")
        late, late_held = SSEClient(port, "/orderbook/stream"), Holder()
        await late.connect()
        assert late.status == 200
        reading_late = asyncio.create_task(late.read(done(late_held), timeout=120))
        await asyncio.gather(reading_back, reading_late, reading_quotes, socket_task)
        for client in (back, late, quote):
            client.close()
        quoted = [json.loads(e["data"]) for e in quote.events if e.get("event") == "quote"]
        return held, late_held, socket_held, quoted, late

    held, late_held, socket_held, quoted, late = asyncio.run(scenario())
    assert producer.wait(timeout=60) == 0
    for name, holder in (("reconnected", held), ("joined behind", late_held)):
        assert holder.refused == [], f"{name}: every update applies to the book the client holds"
        assert {s: (b.seq, b.depth(99)) for s, b in holder.books.items()} == \
            {s: (b.seq, b.depth(99)) for s, b in expected.items()}, f"{name}: the simulator's books, level for level"
    assert socket_held.refused == [] and set(socket_held.books) == {first_symbol}
    assert socket_held.books[first_symbol].depth(99) == expected[first_symbol].depth(99)
    late_first = json.loads(next(e["data"] for e in late.events if e.get("event") == "book"))
    assert late_first["type"] == "snapshot" and late_first["seq"] < expected[late_first["symbol"]].seq

    # the quote client: the top of the stored book first, then every change of it, each once
    tops = [(q["symbol"], q["timestamp_ms"], q["seq"], q["bid"], q["bid_size"], q["ask"], q["ask_size"])
            for q in quoted]
    assert {t[0] for t in tops} == {first_symbol}
    assert tops[1:] == sorted((q for q in quotes if q[0] == first_symbol and q[2] > tops[0][2]), key=lambda q: q[2])
    assert len(tops) > 50

    stage = start_script(settings, "consumer.py", "--quotes", log=log)
    wait_for(lambda: caught_up(settings), timeout=60, message="the stage back at the end of the topic")
    assert stop_gracefully(stage) == 0
    api.terminate()
    api.wait(30)
    assert "Traceback" not in (tmp_path / "api.log").read_text()


def book_message(symbol: str, kind: str, seq: int, prev: int | None, bids, asks, ms: int) -> bytes:
    return json.dumps({"schema_version": 1, "symbol": symbol, "exchange": "TEST", "timestamp_ms": ms, "type": kind,
                       "seq": seq, "prev_seq": prev, "bids": bids, "asks": asks}).encode()


def test_a_client_that_missed_more_than_the_catch_up_limit_gets_its_books_anew_and_no_stale_one(settings, tmp_path):
    t = iso_to_ms(START)
    sent = [book_message("ACME", "snapshot", 1, None, [[10.0, 5], [9.9, 8]], [[10.1, 4], [10.2, 6]], t),
            book_message("GAPPY", "snapshot", 1, None, [[5.0, 1]], [[5.1, 1]], t),
            book_message("GAPPY", "update", 9, 8, [[5.0, 2]], [], t + 1)]       # a gap: GAPPY's book is stale
    sent += [book_message("ACME", "update", 1 + k, k, [[10.0, 5 + k]], [], t + 1 + k) for k in range(1, 31)]
    publisher = bus.publisher(settings)
    bus.ensure_topic(settings, settings.quotes_topic, settings.trades_partitions)
    for value in sent:
        publisher.send(settings.quotes_topic, json.loads(value)["symbol"].encode(), value)
    assert publisher.flush(30)
    stage = start_script(settings, "consumer.py", "--quotes", log=tmp_path / "quotes.log")
    wait_for(lambda: caught_up(settings), timeout=60, message="the stage at the end of the topic")
    assert stop_gracefully(stage) == 0
    settings, base, api = launch_api(settings, tmp_path, api_stream_catch_up=10)

    async def scenario():
        resumed = SSEClient(settings.api_port, "/orderbook/stream", headers={"Last-Event-ID": "0"})
        unknown = SSEClient(settings.api_port, "/orderbook/stream?symbol=ACME&symbol=GAPPY",
                            headers={"Last-Event-ID": "tuesday"})
        for client in (resumed, unknown):
            await client.connect()
            assert client.status == 200
            await client.read(lambda c: [e for e in c.events if e.get("event") == "book"
                                         and json.loads(e["data"])["type"] == "snapshot"], timeout=30)
        publisher.send(settings.quotes_topic, b"ACME", book_message("ACME", "update", 32, 31, [], [[10.1, 0]], t + 40))
        assert await asyncio.to_thread(publisher.flush, 30)
        for client in (resumed, unknown):
            await client.read(lambda c: json.loads(c.events[-1]["data"])["seq"] == 32, timeout=30)
            client.close()
        return resumed, unknown

    resumed, unknown = asyncio.run(scenario())
    publisher.close()
    books = [[json.loads(e["data"]) for e in c.events if e.get("event") == "book"] for c in (resumed, unknown)]
    assert len(books[0]) == 10 + 2, "the catch-up limit's 10 messages, then the book anew, then the live update"
    first = [(m["symbol"], m["seq"]) for m in books[0][:10]]
    for symbol in ("ACME", "GAPPY"):
        of_symbol = [(s, q) for s, q in first if s == symbol]
        assert of_symbol == [(s, json.loads(v)["seq"]) for v in sent for s in [json.loads(v)["symbol"]]
                             if s == symbol][:len(of_symbol)], f"{symbol}: its oldest messages, in order"
    assert "more books were missed than the 10 sent" in resumed.comments[0] and "books sent anew" in resumed.comments[0]
    assert "unknown Last-Event-ID 'tuesday'" in unknown.comments[0]
    for client_books in books:
        anew, live = client_books[-2:]
        assert (anew["symbol"], anew["type"], anew["seq"]) == ("ACME", "snapshot", 31), "GAPPY's stale book is not sent"
        assert anew["bids"] == [[10.0, 35.0], [9.9, 8.0]] and anew["asks"] == [[10.1, 4.0], [10.2, 6.0]]
        assert (live["type"], live["prev_seq"]) == ("update", 31)
        holder = Holder()
        for m in (anew, live):
            holder.take(json.dumps(m))
        assert holder.refused == [] and holder.books["ACME"].top().ask == 10.2
    api.terminate()
    api.wait(30)
    assert "Traceback" not in (tmp_path / "api.log").read_text()
