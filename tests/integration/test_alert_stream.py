"""The API's live alert stream (GET /alerts/stream as Server-Sent Events, /alerts/ws as a WebSocket)
against a real uvicorn process, Kafka and PostgreSQL: an alert raised end to end reaches both kinds
of client, filters hold, a reconnect with Last-Event-ID resumes without loss or duplicates,
heartbeats flow, and one stalled client among 200 is dropped while the others keep receiving."""
from __future__ import annotations

import asyncio
import json
import re
import socket
import time
import urllib.request

import orjson
import websockets

from tests.conftest import free_port, query, run_script, start_script, wait_for
from tradewatch import bus


def start_api(settings, tmp_path, **overrides):
    settings, base, _ = launch_api(settings, tmp_path, **overrides)
    return settings, base


def launch_api(settings, tmp_path, **overrides):
    settings = settings.with_overrides(api_port=free_port(), **overrides)
    process = start_script(settings, "api.py", log=tmp_path / "api.log")
    base = f"http://127.0.0.1:{settings.api_port}"

    def up():
        try:
            with urllib.request.urlopen(base + "/metrics", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False
    wait_for(up, timeout=60, message="the API to answer")
    return settings, base, process


class SSEClient:
    """A raw SSE reader (asyncio streams): events as dicts, comments counted."""

    def __init__(self, port: int, path: str, headers: dict | None = None, receive_buffer: int | None = None):
        self.port, self.path, self.headers, self.receive_buffer = port, path, headers or {}, receive_buffer
        self.events: list[dict] = []
        self.comments: list[str] = []
        self.closed_by_server = False

    async def connect(self) -> None:
        sock = socket.socket()
        if self.receive_buffer:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.receive_buffer)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", self.port))
        self.reader, self.writer = await asyncio.open_connection(sock=sock, limit=1 << 20)
        head = "".join(f"{k}: {v}\r\n" for k, v in self.headers.items())
        self.writer.write(f"GET {self.path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n{head}\r\n".encode())
        await self.writer.drain()
        status = await self.reader.readline()
        self.status = int(status.split()[1])
        while (await self.reader.readline()) not in (b"\r\n", b""):
            pass

    async def read(self, until, timeout: float) -> None:
        """Read events until `until(self)` or the server closes; TimeoutError after `timeout`."""
        async def loop():
            event: dict = {}
            while not until(self):
                line = await self.reader.readline()
                if not line:
                    self.closed_by_server = True
                    return
                text = line.decode().rstrip("\r\n")
                if re.fullmatch(r"[0-9a-fA-F]+", text):      # a chunked-encoding size line
                    continue
                if text.startswith(":"):
                    self.comments.append(text[1:].strip())
                elif text == "":
                    if event:
                        self.events.append(event)
                        event = {}
                elif ":" in text:
                    field, value = text.split(":", 1)
                    event[field] = value[1:] if value.startswith(" ") else value
        await asyncio.wait_for(loop(), timeout)

    def alerts(self) -> list[dict]:
        return [json.loads(e["data"]) for e in self.events if e.get("event") == "alert"]

    def close(self) -> None:
        self.writer.close()


def total(base: str, name: str, stream: str = "alert") -> float:
    """The API's metric `name` of one stream (alert, candle)."""
    with urllib.request.urlopen(base + "/metrics", timeout=5) as response:
        text = response.read().decode()
    labelled = f'{name}{{stream="{stream}"}} '
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(labelled))


def published_alerts(settings, count: int, symbols=("AAPL", "MSFT"), pad: int = 0, start: int = 0) -> list[dict]:
    """`count` alerts in the detector's format, published to the alerts topic as the detector does."""
    alerts = [{"alert_id": f"t{start + i}:PRICE_SPIKE", "timestamp_ms": 1_767_225_600_000 + i,
               "symbol": symbols[i % len(symbols)], "alert_type": "PRICE_SPIKE",
               "severity": ("HIGH", "CRITICAL")[i % 2], "message": "x" * pad, "trade_id": f"t{start + i}",
               "details": {}} for i in range(count)]
    publisher = bus.publisher(settings)
    for alert in alerts:
        publisher.send(settings.alerts_topic, alert["symbol"].encode(), orjson.dumps(alert))
    assert publisher.flush(30)
    publisher.close()
    return alerts


def test_an_alert_raised_end_to_end_reaches_sse_and_websocket_clients(settings, tmp_path):
    bus.ensure_topic(settings, settings.alerts_topic, 1)
    settings, base = start_api(settings, tmp_path, api_stream_heartbeat_seconds=1.0)
    start_script(settings, "anomaly_detector.py", "run", log=tmp_path / "detector.log")

    async def scenario():
        everything = SSEClient(settings.api_port, "/alerts/stream")
        only_critical_aapl = SSEClient(settings.api_port, "/alerts/stream?symbol=AAPL&severity=CRITICAL")
        for client in (everything, only_critical_aapl):
            await client.connect()
            assert client.status == 200
        async with websockets.connect(f"ws://127.0.0.1:{settings.api_port}/alerts/ws") as ws:
            await asyncio.to_thread(run_script, settings, "producer.py", "--count", "4000", "--rate", "max",
                                    "--seed", "5", "--anomaly-rate", "0.01", "--symbols", "AAPL,MSFT")
            def examined_and_published():
                examined = sum(c for c, _ in bus.group_lag(settings, settings.detector_group,
                                                           settings.trades_topic).values())
                return examined == 4000 and not query(settings, "SELECT 1 FROM alerts WHERE published_at IS NULL")
            await asyncio.to_thread(wait_for, examined_and_published, timeout=120,
                                    message="every trade examined, every alert published")
            expected = [r[0] for r in query(settings, "SELECT alert_id FROM alerts ORDER BY created_at, alert_id")]
            assert len(expected) >= 10
            await everything.read(lambda c: len(c.alerts()) >= len(expected), timeout=30)
            received_ws = []
            while len(received_ws) < len(expected):
                received_ws.append(json.loads(await asyncio.wait_for(ws.recv(), 30)))
        table = {r[0]: r[1:] for r in query(settings, "SELECT alert_id, symbol, severity, alert_type, trade_id,"
                                                      " (extract(epoch FROM ts) * 1000)::bigint FROM alerts")}
        for got in (everything.alerts(), received_ws):
            assert sorted(a["alert_id"] for a in got) == sorted(expected), "every alert exactly once"
            for a in got:
                assert table[a["alert_id"]] == (a["symbol"], a["severity"], a["alert_type"], a["trade_id"],
                                                a["timestamp_ms"])
        assert [e["id"] for e in everything.events if e.get("event") == "alert"] == \
            [a["alert_id"] for a in everything.alerts()], "each SSE event's id is its alert id"

        wanted = [a for a in expected if table[a][0] == "AAPL" and table[a][1] == "CRITICAL"]
        await only_critical_aapl.read(lambda c: len(c.alerts()) >= len(wanted) and "heartbeat" in c.comments,
                                      timeout=30)
        assert [a["alert_id"] for a in only_critical_aapl.alerts()] == [
            a["alert_id"] for a in everything.alerts() if a["symbol"] == "AAPL" and a["severity"] == "CRITICAL"]
        assert "heartbeat" in only_critical_aapl.comments, "a heartbeat comment every API_STREAM_HEARTBEAT_SECONDS"

        # a reconnect after the third alert: the ones after it, from the table, then live ones
        resumed = SSEClient(settings.api_port, "/alerts/stream", headers={"Last-Event-ID": expected[2]})
        await resumed.connect()
        await resumed.read(lambda c: len(c.alerts()) >= len(expected) - 3, timeout=30)
        live = await asyncio.to_thread(published_alerts, settings, 2, start=900_000)
        await resumed.read(lambda c: len(c.alerts()) >= len(expected) - 1, timeout=30)
        assert [a["alert_id"] for a in resumed.alerts()] == expected[3:] + [a["alert_id"] for a in live], \
            "resumed after Last-Event-ID: nothing lost, nothing twice"
        unknown = SSEClient(settings.api_port, "/alerts/stream?last_event_id=no-such-alert")
        await unknown.connect()
        await unknown.read(lambda c: c.comments, timeout=30)
        assert "unknown Last-Event-ID" in unknown.comments[0]
        for client in (everything, only_critical_aapl, resumed, unknown):
            client.close()

    asyncio.run(scenario())
    assert "Traceback" not in (tmp_path / "api.log").read_text()


def test_bad_stream_parameters_get_422_and_no_stream(settings, tmp_path):
    settings, base = start_api(settings, tmp_path)

    async def scenario():
        for path in ("/alerts/stream?symbol=aapl;DROP", "/alerts/stream?severity=HUGE",
                     "/alerts/stream?last_event_id=" + "x" * 1001, "/alerts/stream?symbol=" + "A" * 5000,
                     "/candles/stream?size=7m", "/candles/stream?size=1h", "/candles/stream?symbol=aapl;DROP",
                     "/candles/stream?last_event_id=" + "x" * 1001, "/trades/stream?symbol=aapl;DROP",
                     "/trades/stream?last_event_id=" + "1." * 501):
            client = SSEClient(settings.api_port, path)
            await client.connect()
            assert client.status == 422, path
            client.close()
        for path in ("/alerts/ws?severity=HUGE", "/candles/ws?size=7m", "/trades/ws?symbol=aapl;DROP"):
            try:
                async with websockets.connect(f"ws://127.0.0.1:{settings.api_port}{path}") as ws:
                    await asyncio.wait_for(ws.recv(), 10)
                raise AssertionError(f"a WebSocket with a bad filter was served: {path}")
            except websockets.ConnectionClosed as closed:
                assert closed.rcvd.code == 1008
            except websockets.InvalidStatus as refused:
                assert refused.response.status_code == 403
    asyncio.run(scenario())


def test_one_stalled_client_among_200_is_dropped_and_the_others_keep_receiving(settings, tmp_path):
    """The stalled client takes every alert, among them 1,200 of 4 KB: more than the ~3 MB the
    kernel buffers for a connection that is not read, so its writes block. 10 readers take every
    alert too, 189 only AAPL's."""
    bus.ensure_topic(settings, settings.alerts_topic, 1)
    settings, base = start_api(settings, tmp_path, api_stream_queue=2000, api_stream_send_timeout_seconds=2.0,
                               api_stream_clients=250)

    async def scenario():
        stalled = SSEClient(settings.api_port, "/alerts/stream", receive_buffer=4096)
        everything = [SSEClient(settings.api_port, "/alerts/stream") for _ in range(10)]
        aapl = [SSEClient(settings.api_port, "/alerts/stream?symbol=AAPL") for _ in range(189)]
        for client in [stalled, *everything, *aapl]:
            await client.connect()
            assert client.status == 200
        wait_for(lambda: total(base, "tradewatch_api_stream_clients") == 200, message="200 clients subscribed")
        started = time.monotonic()
        sent = await asyncio.to_thread(published_alerts, settings, 1500, symbols=("BULK",) * 4 + ("AAPL",), pad=4000)
        sent_aapl = [a["alert_id"] for a in sent if a["symbol"] == "AAPL"]
        await asyncio.gather(*(c.read(lambda c: len(c.events) >= len(sent), timeout=120) for c in everything),
                             *(c.read(lambda c: len(c.events) >= len(sent_aapl), timeout=120) for c in aapl))
        took = time.monotonic() - started
        for client in everything:
            assert [a["alert_id"] for a in client.alerts()] == [a["alert_id"] for a in sent], "all, in order"
        for client in aapl:
            assert [a["alert_id"] for a in client.alerts()] == sent_aapl, "all of AAPL's, in order"
        await asyncio.to_thread(wait_for, lambda: total(base, "tradewatch_api_stream_dropped_clients_total") == 1,
                                timeout=30, message="the stalled client dropped")
        await stalled.read(lambda c: False, timeout=30)          # now it reads: what was buffered, then EOF
        assert stalled.closed_by_server and len(stalled.alerts()) < len(sent)
        for client in [*everything, *aapl]:
            client.close()
        return took

    took = asyncio.run(scenario())
    print(f"199 readers got their alerts in {took:.1f}s while one client stalled")
    wait_for(lambda: total(base, "tradewatch_api_stream_clients") == 0, timeout=10, message="every client gone")
    assert "Traceback" not in (tmp_path / "api.log").read_text()


def test_stream_clients_past_the_cap_get_503_and_the_api_stays_responsive(settings, tmp_path):
    """1,000 clients at once against API_STREAM_CLIENTS=50: 50 follow the stream, 950 get a 503
    with the reason (a WebSocket is closed with 1013), /health keeps answering meanwhile, and the
    API's memory stays bounded."""
    import statistics
    bus.ensure_topic(settings, settings.alerts_topic, 1)
    settings, base, process = launch_api(settings, tmp_path, api_stream_clients=50)

    async def scenario():
        clients = [SSEClient(settings.api_port, "/alerts/stream") for _ in range(1000)]
        await asyncio.gather(*(c.connect() for c in clients))
        statuses = [c.status for c in clients]
        health = []
        for _ in range(40):
            started = time.perf_counter()
            await asyncio.to_thread(lambda: urllib.request.urlopen(base + "/health", timeout=10).read())
            health.append(time.perf_counter() - started)
        for client in clients:
            client.close()
        return statuses, health

    statuses, health = asyncio.run(scenario())
    assert statuses.count(200) == 50 and statuses.count(503) == 950, {s: statuses.count(s) for s in set(statuses)}
    p95 = statistics.quantiles(health, n=20)[-1]
    assert p95 < 2.0, f"/health p95 {p95:.2f}s with 50 streams held and 950 refused"
    assert total(base, "tradewatch_api_stream_refused_clients_total") == 950
    rss_mb = int(open(f"/proc/{process.pid}/status").read().split("VmRSS:")[1].split()[0]) / 1024
    assert rss_mb < 400, f"API RSS {rss_mb:.0f} MB"
    print(f"/health p95 {p95 * 1000:.0f} ms beside 50 streams and 950 refused; API RSS {rss_mb:.0f} MB")
    assert "Traceback" not in (tmp_path / "api.log").read_text()


def test_a_resumed_stream_sends_at_most_the_catch_up_bound(settings, tmp_path):
    """A client resuming with Last-Event-ID gets at most API_STREAM_CATCH_UP stored alerts (here 10
    of the 30 stored after its id), oldest first; the rest is in GET /alerts."""
    from tradewatch.alerts import Alert
    from tradewatch.store import db, detections
    bus.ensure_topic(settings, settings.alerts_topic, 1)
    alerts = [Alert(f"c{i:02d}:PRICE_SPIKE", 1_767_225_600_000 + i, "AAPL", "PRICE_SPIKE", "HIGH", f"alert {i}",
                    f"c{i:02d}") for i in range(31)]
    conn = db.connect(settings)
    with conn, conn.cursor() as cur:
        for alert in alerts:        # one by one: each its own created_at, in this order
            detections.write_alerts(cur, [(0, alert)])
            cur.execute("SELECT pg_sleep(0.002)")
    conn.close()
    settings, base = start_api(settings, tmp_path, api_stream_catch_up=10)

    async def scenario():
        client = SSEClient(settings.api_port, "/alerts/stream", headers={"Last-Event-ID": alerts[0].alert_id})
        await client.connect()
        assert client.status == 200
        await client.read(lambda c: len(c.alerts()) >= 10, timeout=30)
        try:
            await client.read(lambda c: len(c.alerts()) > 10, timeout=2)
        except TimeoutError:
            pass
        client.close()
        return [a["alert_id"] for a in client.alerts()]

    assert asyncio.run(scenario()) == [a.alert_id for a in alerts[1:11]]
