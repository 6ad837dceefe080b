"""The Kafka outage flag (tradewatch/bus/core.py OutageLog): once set, it clears when data arrives
or when a TCP probe — every 2 s, however often the stage polls — finds the broker's port
answering again. While it is set, offset commits are skipped: a probe that never ran again once
polls came faster than its interval left the flag up until data arrived, long after Kafka was back."""
from __future__ import annotations

import socket
import time

from tradewatch.bus.core import OutageLog
from tradewatch.config import Settings


def polled_until_clear(outage: OutageLog, seconds: float) -> float | None:
    """Call check() as a stage's poll loop does (every 50 ms); seconds until the flag cleared."""
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        outage.check(False)
        if outage.down_since is None:
            return time.monotonic() - started
        time.sleep(0.05)
    return None


def closed_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as server:
        return server.getsockname()[1]


def test_the_flag_stays_while_nothing_answers_then_clears_by_a_probe_when_the_port_answers():
    port = closed_port()
    outage = OutageLog(Settings(kafka_bootstrap_servers=f"127.0.0.1:{port}"))
    outage.failed("test: all brokers down")
    assert polled_until_clear(outage, 2.5) is None, "nothing listens: still down"
    with socket.create_server(("127.0.0.1", port)):          # the broker is back
        took = polled_until_clear(outage, 6.0)
    assert took is not None and took <= 3.0, f"cleared after {took} s of polls every 50 ms"


def test_data_clears_the_flag_at_once():
    outage = OutageLog(Settings(kafka_bootstrap_servers=f"127.0.0.1:{closed_port()}"))
    outage.failed("test: all brokers down")
    outage.check(True)
    assert outage.down_since is None
