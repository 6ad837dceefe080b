"""`producer.py --live` against the local replay server speaking each venue's format (the samples in
tests/data): every sample trade reaches Kafka and `trades` exactly once with the right fields, across
a connection the server drops mid-stream; the gap is reported, the malformed messages are counted and
skipped, and Ctrl-C stops the producer."""
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

    def start(venue: str, log: Path) -> str:
        server = subprocess.Popen([sys.executable, "-m", "tradewatch.market.replay_server", venue, "--port", "0",
                                   "--rate", "400", "--ping-interval", "0.5"], cwd=PROJECT_ROOT,
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
