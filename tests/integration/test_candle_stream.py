"""The `candles` topic and the API's live candle stream (GET /candles/stream as Server-Sent Events,
/candles/ws as a WebSocket) against a real aggregator, Kafka, PostgreSQL and uvicorn process:
every final candle of a replay reaches the stream in order with its indicators, a reconnect with
Last-Event-ID resumes from the table without a gap or a duplicate, and one stalled client among
100 does not delay the others."""
from __future__ import annotations

import asyncio
import json
import statistics
import time

import orjson
import websockets

from tests.conftest import publish_trades, query, start_script, wait_for
from tests.integration.test_alert_stream import SSEClient, start_api, total
from tradewatch import bus, candles
from tradewatch.events import Trade
from tradewatch.indicators import INDICATOR_COLUMNS

MINUTE = 60_000


def replay(start_ms: int, minutes: range, symbols=("AAPL", "MSFT")) -> list[Trade]:
    """Five trades a minute per symbol over `minutes` after `start_ms`, prices drifting so each
    candle (and its RSI and MACD) differs."""
    return [Trade(f"{symbol}-{m}-{k}", symbol, start_ms + m * MINUTE + k * 10_000,
                  100.0 + (m % 7) * 0.5 - k * 0.1 + (s * 50), 1.0 + k, ("buy", "sell")[k % 2], "X")
            for m in minutes for k in range(5) for s, symbol in enumerate(symbols)]


def queued(settings, symbol: str = "AAPL", size: str = "1m") -> tuple[int, int]:
    """(final candles of `symbol`/`size` in the outbox, how many of all outbox rows are unpublished)."""
    return query(settings, "SELECT count(*) FILTER (WHERE symbol = %s AND window_size = %s),"
                           " count(*) FILTER (WHERE published_at IS NULL) FROM candle_outbox", (symbol, size))[0]


def candles_of(client: SSEClient) -> list[dict]:
    return [json.loads(e["data"]) for e in client.events if e.get("event") == "candle"]


def test_every_final_candle_reaches_the_stream_in_order_and_a_resume_has_no_gap_nor_duplicate(settings, tmp_path):
    settings = settings.with_overrides(idle_timeout_seconds=3.0)
    bus.ensure_topic(settings, settings.candles_topic, 1)
    settings, base = start_api(settings, tmp_path)
    start_script(settings, "aggregator.py", log=tmp_path / "aggregator.log")
    start = (int(time.time()) // 3600 - 3) * 3600_000      # three hours ago, on the hour: every window whole
    path = "/candles/stream?symbol=AAPL&size=1m"

    def published(count: int) -> None:
        wait_for(lambda: queued(settings) == (count, 0), timeout=120,
                 message=f"{count} final AAPL 1m candles queued and published")

    async def scenario():
        first, everything = SSEClient(settings.api_port, path), SSEClient(settings.api_port, "/candles/stream")
        for client in (first, everything):
            await client.connect()
            assert client.status == 200
        # read at the end: its 40 candles wait in the client (no flow control, which would stop it reading pongs)
        async with websockets.connect(f"ws://127.0.0.1:{settings.api_port}/candles/ws?symbol=AAPL&size=1m",
                                      max_queue=None) as ws:
            # part one: 15 minutes, read live, then the client goes away
            await asyncio.to_thread(publish_trades, settings, replay(start, range(0, 15)))
            await asyncio.to_thread(published, 15)
            await first.read(lambda c: len(candles_of(c)) >= 15, timeout=30)
            first.close()
            assert [e["id"] for e in first.events if e.get("event") == "candle"] == \
                [c["candle_id"] for c in candles_of(first)], "each SSE event's id is its candle id"
            # part two while it is away (gaps of 15 minutes between the parts: an idle partition's
            # watermark follows the clock, and a part must never arrive late)
            await asyncio.to_thread(publish_trades, settings, replay(start, range(30, 45)))
            await asyncio.to_thread(published, 30)
            resumed = SSEClient(settings.api_port, path, headers={"Last-Event-ID": first.events[-1]["id"]})
            await resumed.connect()
            await resumed.read(lambda c: len(candles_of(c)) >= 15, timeout=30)
            # part three, live after the catch-up
            await asyncio.to_thread(publish_trades, settings, replay(start, range(60, 70)))
            await asyncio.to_thread(published, 40)
            await resumed.read(lambda c: len(candles_of(c)) >= 25, timeout=30)
            on_socket = [json.loads(await asyncio.wait_for(ws.recv(), 30)) for _ in range(40)]
        await asyncio.to_thread(wait_for, lambda: queued(settings, "MSFT", "5m") == (8, 0), timeout=60,
                                message="MSFT's eight 5m candles final and published")
        everyone = query(settings, "SELECT count(*) FROM candle_outbox")[0][0]
        await everything.read(lambda c: len(candles_of(c)) >= everyone, timeout=30)
        for client in (resumed, everything):
            client.close()
        return candles_of(first), candles_of(resumed), on_socket, candles_of(everything)

    before, after, on_socket, everything = asyncio.run(scenario())
    stored = query(settings, f"""
        SELECT (extract(epoch FROM m.window_start) * 1000)::bigint, m.open, m.high, m.low, m.close, m.volume,
               m.trade_count, {', '.join(f'i.{c}' for c in INDICATOR_COLUMNS)}
        FROM stock_metrics m LEFT JOIN indicators i USING (symbol, window_size, window_start)
        WHERE m.symbol = 'AAPL' AND m.window_size = '1m' AND m.is_final ORDER BY m.window_start""")
    assert len(stored) == 40
    expected = [candles.candle_id("AAPL", "1m", row[0]) for row in stored]
    got = [c["candle_id"] for c in before + after]
    assert got == expected, "before the disconnect and after the resume: every candle once, in order"
    assert [c["candle_id"] for c in on_socket] == expected, "the WebSocket: every candle once, in order"
    figures = ("window_start_ms", "open", "high", "low", "close", "volume", "trade_count", *INDICATOR_COLUMNS)
    for row, candle in zip(stored, before + after):
        assert tuple(candle[f] for f in figures) == row, "the streamed candle is the stored one"
    assert after[-1]["rsi_14"] is not None and after[-1]["macd_signal"] is not None, "indicators filled by now"

    final = {candles.candle_id(s, size, ms) for s, size, ms in query(
        settings, "SELECT symbol, window_size, (extract(epoch FROM window_start) * 1000)::bigint FROM stock_metrics"
                  " WHERE is_final")}
    assert {c["candle_id"] for c in everything} == final and len(everything) == len(final), \
        "every final candle of every symbol and size on the unfiltered stream, once"
    assert {c["window_size"] for c in everything} == {"1m", "5m", "15m"}
    log = (tmp_path / "api.log").read_text() + (tmp_path / "aggregator.log").read_text()
    assert "Traceback" not in log


def bulk_candles(count: int, symbols: tuple[str, ...], pad: int, first: int = 0) -> list[tuple[str, bytes]]:
    """`count` synthetic candle messages of the topic's shape (the `first`th minute of 2026 on), with
    `pad` bytes of padding each."""
    out = []
    for i in range(first, first + count):
        row = {name: None for name in candles.STREAMED} | {
            "symbol": symbols[i % len(symbols)], "window_size": "1m", "window_start_ms": 1_767_225_600_000 + i * MINUTE,
            "window_end_ms": 1_767_225_660_000 + i * MINUTE, "close": 100.0 + i}
        fields = orjson.loads(candles.message(row)) | {"pad": "x" * pad}
        out.append((fields["candle_id"], orjson.dumps(fields)))
    return out


def publish_timed(settings, messages: list[tuple[str, bytes]]) -> dict[str, float]:
    """Publish to the candles topic as the aggregator's outbox does; the time each was handed to Kafka."""
    publisher, sent = bus.publisher(settings), {}
    for candle_id, raw in messages:
        sent[candle_id] = time.monotonic()
        publisher.send(settings.candles_topic, orjson.loads(raw)["symbol"].encode(), raw)
    assert publisher.flush(30)
    publisher.close()
    return sent


class TimedSSEClient(SSEClient):
    """An SSE reader that notes when each candle event arrived."""

    async def read(self, until, timeout: float) -> None:
        self.arrived = getattr(self, "arrived", {})
        await super().read(lambda c: (self._note() or until(c)), timeout)

    def _note(self) -> None:
        for event in self.events[len(self.arrived):]:
            self.arrived.setdefault(event.get("id", f"#{len(self.arrived)}"), time.monotonic())


def test_one_stalled_client_among_100_does_not_delay_the_others(settings, tmp_path):
    """The same 99 readers (10 take every candle, 89 one symbol's) get two rounds of 1,500 candles of
    4 KB: the first with no other client, the second beside a 100th client that stopped reading
    (more than the ~3 MB the kernel buffers for it: its writes block and it is dropped). The
    readers' p95 delay from Kafka to client in the second round is no worse than in the first."""
    bus.ensure_topic(settings, settings.candles_topic, 1)
    settings, base = start_api(settings, tmp_path, api_stream_queue=2000, api_stream_send_timeout_seconds=2.0)
    symbols = ("BULK",) * 4 + ("AAPL",)

    async def round_of(readers, wanted, start: int) -> list[float]:
        messages = bulk_candles(1500, symbols, 4000, first=start)
        sent = await asyncio.to_thread(publish_timed, settings, messages)
        ids = {name: [i for i, raw in messages if wanted[name](orjson.loads(raw))] for name in wanted}
        await asyncio.gather(*(c.read(lambda c, n=len(ids[kind]): len(c.events) >= n + c.offset, timeout=120)
                               for kind, group in readers.items() for c in group))
        delays = []
        for kind, group in readers.items():
            for client in group:
                got = [e["id"] for e in client.events[client.offset:] if e.get("event") == "candle"]
                assert got == ids[kind], f"a {kind} reader got all of its candles, in order"
                delays += [client.arrived[i] - sent[i] for i in got]
                client.offset = len(client.events)
        return delays

    async def scenario():
        readers = {"all": [TimedSSEClient(settings.api_port, "/candles/stream") for _ in range(10)],
                   "aapl": [TimedSSEClient(settings.api_port, "/candles/stream?symbol=AAPL") for _ in range(89)]}
        wanted = {"all": lambda c: True, "aapl": lambda c: c["symbol"] == "AAPL"}
        for client in [c for group in readers.values() for c in group]:
            await client.connect()
            assert client.status == 200
            client.offset = 0
        await asyncio.to_thread(wait_for, lambda: total(base, "tradewatch_api_stream_clients", "candle") == 99,
                                message="99 clients subscribed")
        alone = await round_of(readers, wanted, 0)
        stalled = SSEClient(settings.api_port, "/candles/stream", receive_buffer=4096)
        await stalled.connect()
        await asyncio.to_thread(wait_for, lambda: total(base, "tradewatch_api_stream_clients", "candle") == 100,
                                message="the 100th client subscribed")
        beside = await round_of(readers, wanted, 1500)
        dropped = lambda: total(base, "tradewatch_api_stream_dropped_clients_total", "candle") == 1
        await asyncio.to_thread(wait_for, dropped, timeout=30, message="the stalled client dropped")
        await stalled.read(lambda c: False, timeout=30)           # now it reads: what was buffered, then EOF
        assert stalled.closed_by_server and len(candles_of(stalled)) < 1500
        for client in [c for group in readers.values() for c in group]:
            client.close()
        return alone, beside

    alone, beside = asyncio.run(scenario())
    p95 = lambda values: statistics.quantiles(values, n=20)[-1]
    print(f"candle stream, 99 readers: p95 Kafka → client {p95(alone) * 1000:.0f} ms alone, "
          f"{p95(beside) * 1000:.0f} ms beside a stalled client")
    assert p95(beside) <= max(2 * p95(alone), p95(alone) + 0.5), (p95(alone), p95(beside))
    wait_for(lambda: total(base, "tradewatch_api_stream_clients", "candle") == 0, timeout=10,
             message="every client gone")
    assert "Traceback" not in (tmp_path / "api.log").read_text()
