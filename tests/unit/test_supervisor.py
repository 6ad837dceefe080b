"""The demo's supervisor with real child processes: a stage that exits is restarted with a
doubling backoff, its last lines are logged in one block, a stage that keeps dying gets a banner,
and a stop request ends every child."""
from __future__ import annotations

import logging
import sys
import threading
import time

from tradewatch.demo import Child, Supervisor


def test_dying_stage_is_restarted_with_backoff_and_reported_loudly(caplog):
    crasher = Child("crasher", [sys.executable, "-c", "print('boom: no such table'); raise SystemExit(3)"])
    sleeper = Child("sleeper", [sys.executable, "-c", "import time; time.sleep(60)"])
    supervisor = Supervisor([crasher, sleeper])
    caplog.set_level(logging.INFO, logger="tradewatch.demo")
    supervisor.start_all()
    watcher = threading.Thread(target=supervisor.watch)
    watcher.start()
    time.sleep(4.5)          # deaths at ~0 s, ~1 s (1 s backoff), ~3 s (2 s backoff); next after 4 s more
    supervisor.request_stop()
    watcher.join(timeout=5)
    supervisor.stop_all()
    log = caplog.text
    assert log.count("crasher exited with code 3") == 3
    assert "restarting in 1s" in log and "restarting in 2s" in log and "restarting in 4s" in log
    assert "    | boom: no such table" in log
    assert "CRASHER KEEPS DYING: 3 exits" in log
    assert "sleeper exited" not in log
    assert sleeper.process.poll() is not None, "stop_all ends the stages"


def test_consumers_starts_a_group_of_consumer_processes(monkeypatch):
    from tradewatch.config import Settings
    from tradewatch.demo import stages

    monkeypatch.setenv("CONSUMERS", "3")
    commands = {s.name: s.command for s in stages(Settings.load())}
    assert [n for n in commands if n.startswith("consumer")] == ["consumer-1", "consumer-2", "consumer-3"]
    assert all(commands[f"consumer-{i}"][-1] == "consumer.py" for i in (1, 2, 3))
    monkeypatch.setenv("CONSUMERS", "1")
    assert [s.name for s in stages(Settings.load())][0] == "consumer"


def test_demo_live_runs_the_producer_on_a_live_feed(monkeypatch):
    from tradewatch.config import Settings
    from tradewatch.demo import stages

    monkeypatch.setenv("DEMO_LIVE", "binance")
    monkeypatch.setenv("DEMO_LIVE_URL", "ws://127.0.0.1:8765")
    producer = {s.name: s.command for s in stages(Settings.load())}["producer"]
    assert producer[1:] == ["producer.py", "--live", "binance", "--url", "ws://127.0.0.1:8765", "--book"]
    monkeypatch.delenv("DEMO_LIVE")
    producer = {s.name: s.command for s in stages(Settings.load())}["producer"]
    assert "--live" not in producer and "--rate" in producer


def test_the_demo_runs_the_order_book_unless_told_not_to(monkeypatch):
    """#38: the producer sends books and the quotes stage keeps them, started with the API once the
    path to the first anomaly is up; DEMO_BOOK=false runs trades alone."""
    from tradewatch.config import Settings
    from tradewatch.demo import LATER_S, stages

    children = {s.name: s for s in stages(Settings.load())}
    assert "--book" in children["producer"].command
    producer = children["producer"].command      # with spoofing and quote stuffing for the book watch to catch
    rate = float(producer[producer.index("--book-anomaly-rate") + 1])
    assert 0 < rate < Settings.load().demo_anomaly_rate
    assert children["quotes"].command[1:] == ["consumer.py", "--quotes"]
    assert children["quotes"].start_after_s == LATER_S and children["consumer"].start_after_s == 0
    monkeypatch.setenv("DEMO_BOOK", "false")
    children = {s.name: s for s in stages(Settings.load())}
    assert "--book" not in children["producer"].command and "quotes" not in children


def test_the_producer_sends_its_simulated_past_on_its_first_start_only(monkeypatch, capsys):
    """`make demo` into an empty data folder opens on DEMO_HISTORY_MINUTES of simulated past; a
    producer the supervisor restarts must not send a second past over the first."""
    from tradewatch.config import Settings
    from tradewatch.demo import stages

    producer = {s.name: s for s in stages(Settings.load(), history_s=3600)}["producer"]
    assert producer.first_start_only == ["--history", "3600"]
    monkeypatch.setenv("DEMO_LIVE", "coinbase")
    assert {s.name: s for s in stages(Settings.load(), 3600)}["producer"].first_start_only == [], "live: no past"

    echo = Child("producer", [sys.executable, "-c", "import sys; print(' '.join(sys.argv[1:]) or 'none')"],
                 first_start_only=["--history", "3600"])
    supervisor = Supervisor([echo])
    watcher = threading.Thread(target=supervisor.watch)
    supervisor.start_all()
    watcher.start()
    try:
        wait = time.monotonic() + 10
        while len(echo.deaths) < 2 and time.monotonic() < wait:      # exited, restarted (1 s), exited
            time.sleep(0.1)
        time.sleep(0.3)
    finally:
        supervisor.request_stop()
        watcher.join(timeout=5)
        supervisor.stop_all()
    assert len(echo.deaths) >= 2
    assert capsys.readouterr().out.splitlines()[:2] == ["[producer] --history 3600", "[producer] none"], \
        "the first start sent the past, the restart did not"


def test_what_starts_later_waits_until_the_pipeline_has_caught_up_or_for_at_most_later_max_s():
    """`make demo` starts the API, the quotes stage, reports and maintenance LATER_S in, once the
    stages on the way to the page have caught up, so a slow start is not slowed further; never
    later than `later_max_s`."""
    def child(name: str) -> Child:
        return Child(name, [sys.executable, "-c", "import time; time.sleep(60)"], start_after_s=0.3)

    ready = threading.Event()
    looked = []
    api, quotes = child("api"), child("quotes")
    supervisor = Supervisor([api, quotes], caught_up=lambda: looked.append(time.monotonic()) or ready.is_set(),
                            later_max_s=30)
    capped = child("reports")
    never = Supervisor([capped], caught_up=lambda: False, later_max_s=2.0)
    watchers = [threading.Thread(target=s.watch) for s in (supervisor, never)]
    began = time.monotonic()
    for s in (supervisor, never):
        s.start_all()
    for w in watchers:
        w.start()
    try:
        time.sleep(1.5)
        assert api.process is None and quotes.process is None, "not caught up: waiting"
        assert 1 <= len(looked) <= 3, f"asked about once a second after start_after_s: {len(looked)}"
        ready.set()
        deadline = time.monotonic() + 5
        while (api.process is None or quotes.process is None) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert api.process is not None and quotes.process is not None
        while capped.process is None and time.monotonic() < began + 5:
            time.sleep(0.05)
        assert capped.process is not None and time.monotonic() - began >= 2.0, "started at later_max_s"
    finally:
        for s in (supervisor, never):
            s.request_stop()
        for w in watchers:
            w.join(timeout=5)
        for s in (supervisor, never):
            s.stop_all()
