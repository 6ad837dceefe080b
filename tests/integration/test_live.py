"""`producer.py --live` against the local replay server speaking each venue's format (the samples in
tests/data): every sample trade reaches Kafka and `trades` exactly once with the right fields, across
a connection the server drops mid-stream; the gap is reported, the malformed messages are counted and
skipped, and Ctrl-C stops the producer. With `--book`, the venue's order books reach `order_books`
(consumer.py --quotes) equal to the venue's own, through a dropped connection and a lost message."""
from __future__ import annotations

import calendar
import json
import os
import re
import signal
import subprocess
import sys
import urllib.request
from datetime import datetime
from pathlib import Path

import pytest

from tests.conftest import free_port, query, start_script, wait_for
from tradewatch import bus
from tradewatch.config import PROJECT_ROOT
from tradewatch.market import live

DATA = Path(__file__).parent.parent / "data"


def expected_coinbase(message: dict) -> tuple | None:
    if message.get("type") not in ("match", "last_match") or not isinstance(message.get("trade_id"), int):
        return None
    when = datetime.strptime(message["time"], "%Y-%m-%dT%H:%M:%S.%fZ")
    ms = calendar.timegm(when.timetuple()) * 1000 + when.microsecond // 1000
    taker = {"buy": "sell", "sell": "buy"}[message["side"]]          # `side` is the maker's
    return (f"coinbase:{message['product_id']}:{message['trade_id']}", message["product_id"], ms,
            float(message["price"]), float(message["size"]), taker, "COINBASE")


def expected_binance(message: dict) -> tuple | None:
    if message.get("e") != "trade" or not isinstance(message.get("t"), int):
        return None
    symbol = message["s"].replace("USDT", "-USDT")
    return (f"binance:{message['s']}:{message['t']}", symbol, message["T"], float(message["p"]), float(message["q"]),
            "sell" if message["m"] else "buy", "BINANCE")


VENUES = {"coinbase": ("coinbase_matches.jsonl", expected_coinbase),
          "binance": ("binance_trades.jsonl", expected_binance)}


def expected_trades(venue: str) -> list[tuple]:
    sample, expect = VENUES[venue]
    rows = []
    for line in (DATA / sample).read_text().splitlines():
        try:
            message = json.loads(line)
        except ValueError:
            continue
        if isinstance(message, dict) and (row := expect(message)):
            rows.append(row)
    return sorted(rows)


def metric(port: int, name: str) -> float:
    """The sum of a counter's series on the producer's /metrics page."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        page = response.read().decode()
    return sum(float(value) for value in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", page, re.MULTILINE))


@pytest.fixture
def replay_server(request):
    servers = []

    def start(venue: str, log: Path, *options: str) -> str:
        server = subprocess.Popen([sys.executable, "-m", "tradewatch.market.replay_server", venue, "--port", "0",
                                   "--rate", "400", "--ping-interval", "0.5", *options], cwd=PROJECT_ROOT,
                                  stdout=subprocess.PIPE, stderr=open(log, "w"), text=True)
        servers.append(server)
        line = server.stdout.readline()
        assert line.startswith("listening on ws://"), line
        return line.split()[-1]
    yield start
    for server in servers:
        server.terminate()
        server.wait(timeout=10)


@pytest.mark.parametrize("venue", sorted(VENUES))
def test_live_feed_through_a_dropped_connection_stores_every_trade_once(settings, tmp_path, replay_server, venue):
    expected = expected_trades(venue)
    assert len(expected) > 280 and len({row[0] for row in expected}) == len(expected)
    url = replay_server(venue, tmp_path / "server.log")
    port = free_port()
    consumer = start_script(settings, "consumer.py", log=tmp_path / "consumer.log")
    producer = start_script(settings, "producer.py", "--live", venue, "--url", url, log=tmp_path / "producer.log",
                            env={"PRODUCER_METRICS_PORT": str(port)})
    wait_for(lambda: query(settings, "SELECT count(*) FROM trades")[0][0] >= len(expected), timeout=90,
             message=f"{len(expected)} trades stored")
    wait_for(lambda: metric(port, "tradewatch_live_reconnects_total") >= 1, timeout=30, message="a reconnect counted")
    # the server pings every 0.5 s and drops a client that does not answer within 0.5 s
    wait_for(lambda: "the client answers pings" in (tmp_path / "server.log").read_text(), timeout=30,
             message="the client's answer to the server's keep-alive pings")
    assert metric(port, "tradewatch_live_reconnects_total") == 1, "only the drop in the sample, never a ping timeout"
    # the sample's gap (3 trades never sent), its two malformed frames, the repeats after the drop
    assert metric(port, "tradewatch_live_gaps_total") == 1 and metric(port, "tradewatch_live_missing_trades_total") == 3
    assert metric(port, "tradewatch_live_unexpected_messages_total") == 2
    assert metric(port, "tradewatch_live_duplicates_total") >= 1
    assert metric(port, "tradewatch_live_trades_total") == len(expected)

    producer.send_signal(signal.SIGINT)                      # Ctrl-C
    assert producer.wait(timeout=15) == 0, (tmp_path / "producer.log").read_text()[-3000:]
    log = (tmp_path / "producer.log").read_text()
    assert "Traceback" not in log

    stored = query(settings, "SELECT trade_id, symbol, (extract(epoch FROM ts) * 1000)::bigint, price::float8,"
                             " quantity::float8, side, exchange FROM trades ORDER BY trade_id")
    assert stored == expected, "every sample trade once, with the venue's fields mapped"
    on_topic = bus.read_topic(settings, settings.trades_topic, lambda got: len(got) >= len(expected), timeout_s=30)
    ids = [json.loads(m.value)["trade_id"] for m in on_topic]
    in_kafka = sum(end for _, end in bus.group_lag(settings, settings.consumer_group, settings.trades_topic).values())
    assert in_kafka == len(ids) == len(set(ids)) == len(expected), \
        "each trade once in Kafka too: the repeats after the drop were dropped"

    assert "trade ids jump from" in log and "3 trade(s) missed" in log
    assert log.count("unexpected shape") == 2 and "connection lost" in log and "reconnecting in" in log
    consumer.send_signal(signal.SIGTERM)
    assert consumer.wait(timeout=30) == 0


def test_a_url_that_is_no_websocket_ends_the_producer_with_the_reason(settings):
    result = subprocess.run([sys.executable, "producer.py", "--live", "binance", "--url", "http://127.0.0.1:1/"],
                            cwd=PROJECT_ROOT, env={**os.environ, **settings.as_env(), "PRODUCER_METRICS_PORT": "0"},
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "error: http://127.0.0.1:1/ is not a WebSocket URL" in result.stderr
    assert "Traceback" not in result.stderr


def venue_books(venue: str) -> dict[str, tuple[dict, dict]]:
    """Each book of a book sample as the venue holds it at the end: its `# book` state with every
    change applied, the `# lost` one too (the client never got it, the venue's book has it)."""
    books = {}
    for line in (DATA / f"{venue}_book.jsonl").read_text().splitlines():
        if line.startswith("# book "):
            m = json.loads(line[len("# book "):])
            books[m.get("s") or m.get("product_id")] = ({float(p): float(q) for p, q in m["bids"]},
                                                          {float(p): float(q) for p, q in m["asks"]})
            continue
        try:
            m = json.loads(line.removeprefix("# lost "))
        except ValueError:
            continue
        if isinstance(m, dict) and m.get("e") == "depthUpdate" and isinstance(m["U"], int):
            symbol, changes = m["s"], [(0, p, q) for p, q in m["b"]] + [(1, p, q) for p, q in m["a"]]
        elif isinstance(m, dict) and m.get("type") == "l2update" and all(c[0] in ("buy", "sell") for c in m["changes"]):
            symbol, changes = m["product_id"], [(0 if side == "buy" else 1, p, q) for side, p, q in m["changes"]]
        else:
            continue                                         # trades, and the malformed change
        for side, price, size in changes:
            levels = books[symbol][side]
            if float(size) == 0:
                levels.pop(float(price), None)
            else:
                levels[float(price)] = float(size)
    return {live.binance_symbol(s) if venue == "binance" else s: book for s, book in books.items()}


@pytest.mark.parametrize("venue", sorted(VENUES))
def test_live_books_end_equal_to_the_venues_through_a_dropped_connection_and_a_lost_message(
        settings, tmp_path, replay_server, venue):
    expected = venue_books(venue)
    assert len(expected) == 2 and all(len(bids) > 10 and len(asks) > 10 for bids, asks in expected.values())
    sample = DATA / f"{venue}_book.jsonl"
    trades = sum(1 for line in sample.read_text().splitlines() if '"trade"' in line or '"match"' in line)
    url = replay_server(venue, tmp_path / "server.log", "--file", str(sample), "--now")
    port = free_port()
    stage = start_script(settings, "consumer.py", "--quotes", log=tmp_path / "quotes.log")
    producer = start_script(settings, "producer.py", "--live", venue, "--book", "--url", url,
                            log=tmp_path / "producer.log", env={"PRODUCER_METRICS_PORT": str(port)})

    def stored() -> dict:
        rows = query(settings, "SELECT symbol, stale, gaps, bids::text, asks::text FROM order_books")
        assert all(not stale and gaps == 0 for _, stale, gaps, _, _ in rows), "no gap on our side of Kafka"
        return {symbol: ({p: q for p, q in json.loads(bids)}, {p: q for p, q in json.loads(asks)})
                for symbol, _, _, bids, asks in rows}
    wait_for(lambda: stored() == expected, timeout=90, message="the venue's books, rebuilt from the topic")
    wait_for(lambda: "the client answers pings" in (tmp_path / "server.log").read_text(), timeout=30,
             message="the end of the sample")

    # one reconnect (the sample's drop): every book taken in again — Binance over REST, with one more
    # fetch after the lost change (a gap, counted); Coinbase from the snapshot of each subscription
    assert metric(port, "tradewatch_live_reconnects_total") == 1
    assert metric(port, "tradewatch_live_book_gaps_total") == (1 if venue == "binance" else 0)
    assert metric(port, "tradewatch_live_book_snapshots_total") == (5 if venue == "binance" else 4)
    assert metric(port, "tradewatch_live_unexpected_messages_total") == 1, "the sample's malformed change"
    assert metric(port, "tradewatch_live_trades_total") == trades, "trades and the book on one connection"
    producer.send_signal(signal.SIGINT)
    assert producer.wait(timeout=15) == 0, (tmp_path / "producer.log").read_text()[-3000:]
    log = (tmp_path / "producer.log").read_text()
    assert "Traceback" not in log
    if venue == "binance":
        assert "book update ids jump from" in log and "fetching the book again" in log
    stage.send_signal(signal.SIGTERM)
    assert stage.wait(timeout=30) == 0
    assert "sequence gaps 0;" in (tmp_path / "quotes.log").read_text()
