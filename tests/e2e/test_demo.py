"""`make demo` as a new user runs it: from an empty data folder, the demo runner starts Kafka,
PostgreSQL and every stage, and the producer sends an hour of simulated past first; a real headless
Chromium must see that hour of candles (marked as simulated), a live anomaly marker, an alert and a
green health strip within 45 s (the goal is 30: demo_driver.py), at the user's defaults (20 trades/s,
anomaly rate 0.005, a first live anomaly injected once the past is sent); Ctrl-C (SIGINT to the process group) must leave no
process behind within 10 s. The brand-new broker (no `__consumer_offsets` yet) and stages that start
together are exactly the start-up a new user gets. A second test kills stages, then PostgreSQL and
Kafka, with SIGKILL and checks that the supervisor brings them back, the health strip names each
outage and its cause, and nothing is lost or doubled.

The first-anomaly budget is the product's promise on a machine doing nothing else (what a student's
laptop is), so these tests are marked `alone`: `make test` runs them after the parallel part of the
suite, with nothing beside them (on a 2-core machine a Flink test beside a fresh demo doubled its
start: 54 s of the 60)."""
from __future__ import annotations

import os
import re
import signal
import time

import pytest
from playwright.sync_api import sync_playwright

from tests.conftest import query, wait_for
from tests.e2e.demo_driver import (FIRST_ANOMALY_BUDGET_S, Demo, badge, launch_browser, open_dashboard, page_state,
                                   stage_shown, wait_for_everything)
from tradewatch import bus, stack
from tradewatch.detect.pipeline import DetectionPipeline
from tradewatch.detect.rules import RuleDetector
from tradewatch.stages.detector import detector_config
from tradewatch.events import Trade
from tradewatch.market import history
from tradewatch.store.health import EXPECTED_STAGES

SERVICE_BACK_S = 30        # issue 40: a killed Kafka or PostgreSQL is back this soon, without a person


@pytest.fixture
def browser_page():
    with sync_playwright() as p:
        browser = launch_browser(p)
        yield browser.new_page(viewport={"width": 1600, "height": 2400})
        browser.close()


@pytest.mark.browser
@pytest.mark.alone
@pytest.mark.parametrize("attempt", [1, 2, 3])
def test_fresh_demo_shows_an_anomaly_at_the_users_defaults_and_stops_cleanly(attempt, browser_page):
    demo = Demo(f"fresh{attempt}")
    demo.start()
    try:
        open_dashboard(browser_page, demo)
        shown = wait_for_everything(browser_page, demo, FIRST_ANOMALY_BUDGET_S - (time.monotonic() - demo.started_at))
        assert "Deploy" not in shown["text"], "Streamlit's Deploy menu is hidden"
        first_anomaly_s = time.monotonic() - demo.started_at
        print(f"fresh start {attempt}: everything on the page {first_anomaly_s:.1f}s after `make demo`")
        assert "(shaded) was simulated when the demo started, live since" in shown["text"]
        # the past went through the real pipeline: an hour of trades at the demo's rate, stored
        span = history.span(demo.settings)
        past = query(demo.settings, "SELECT count(*) FROM trades WHERE ts < %s", (span[1],))[0][0]
        expected = demo.settings.demo_rate * demo.settings.demo_history_minutes * 60
        assert abs(past - expected) < 4 * expected ** 0.5, (past, expected)

        # the consumer is what fills `trades` (the only writer): it keeps growing
        before = query(demo.settings, "SELECT count(*) FROM trades")[0][0]
        wait_for(lambda: query(demo.settings, "SELECT count(*) FROM trades")[0][0] > before + 100, timeout=20,
                 message="trades to grow")
        # the order book runs too (#38): every symbol's book kept by the quotes stage, on the page
        symbols = query(demo.settings, "SELECT count(DISTINCT symbol) FROM trades")[0][0]
        wait_for(lambda: query(demo.settings, "SELECT count(*) FROM order_books WHERE NOT stale")[0][0] == symbols,
                 timeout=60, message="a book of every symbol stored by the quotes stage")
        wait_for(lambda: "Order books" in page_state(browser_page)["text"]
                 and stage_shown(page_state(browser_page), "quotes", "up"), timeout=30,
                 message="the books and the quotes stage on the page")
        assert "Traceback" not in demo.output(), demo.output()[-4000:]
        assert "exited with code" not in demo.output(), "a stage died during a fresh start"
        stopped_in = demo.interrupt_and_wait()
        print(f"fresh start {attempt}: Ctrl-C stopped every process in {stopped_in:.1f}s")
    finally:
        demo.kill_everything()


def killed_shown(state: dict, stage: str) -> bool:
    return stage_shown(state, stage, "down") or "restarted" in badge(state, stage)


@pytest.mark.browser
@pytest.mark.alone
def test_killed_stages_and_services_are_restarted_and_nothing_is_lost_or_doubled(browser_page):
    # what is tested is the supervisor, the strip and exactness, not the first minute: the market is
    # busier, so enough price moves are flagged to compare. The page refreshes at the user's default
    # (3 s): a successor quicker than that is shown "restarted" (at 1 s, a CI run's page never drew
    # its first chart within the budget)
    # (no simulated past: at 100 trades/s an hour is 360,000 trades to wait for, and this test is
    # about the supervisor)
    demo = Demo("kill", demo_rate=100.0, demo_anomaly_rate=0.01, demo_history_minutes=0)
    demo.start()
    try:
        open_dashboard(browser_page, demo)
        wait_for_everything(browser_page, demo, FIRST_ANOMALY_BUDGET_S - (time.monotonic() - demo.started_at))
        for stage, command in (("detector", "anomaly_detector.py"), ("consumer", "consumer.py")):
            victim = demo.stage_pid(command)
            os.kill(victim, signal.SIGKILL)
            killed_at = time.monotonic()
            # down until its successor beats; a successor quicker than a refresh is shown up and
            # "restarted, a process died N s ago" for a minute instead: either way the kill is on the page
            wait_for(lambda: killed_shown(page_state(browser_page), stage), timeout=20, interval=0.3,
                     message=f"the strip to show {stage} down or restarted")
            shown_down_s = time.monotonic() - killed_at
            wait_for(lambda: stage_shown(page_state(browser_page), stage, "up"), timeout=30, interval=0.3,
                     message=f"the strip to show {stage} up again")
            assert demo.stage_pid(command) != victim
            print(f"{stage}: shown down {shown_down_s:.1f}s after kill -9, up again after "
                  f"{time.monotonic() - killed_at:.1f}s")
        assert f"detector exited with code {-signal.SIGKILL}" in demo.output()
        assert f"consumer exited with code {-signal.SIGKILL}" in demo.output()

        # the services under them (#40): killed as the out-of-memory killer would, each is back within 30 s
        # without a person, the strip names the outage and its cause, and every stage reconnects
        for service, pid in (("postgres", lambda: stack.postgres_pid(demo.settings)),
                             ("kafka", lambda: stack.kafka_pids(demo.settings).get(1))):
            os.kill(pid(), signal.SIGKILL)
            killed_at = time.monotonic()
            wait_for(lambda: "killed" in badge(page_state(browser_page), service), timeout=20, interval=0.3,
                     message=f"the strip to show {service}'s outage and its cause")
            shown = badge(page_state(browser_page), service)
            wait_for(lambda: pid() is not None and badge(page_state(browser_page), service).startswith("up"),
                     timeout=SERVICE_BACK_S, interval=0.3, message=f"{service} back within {SERVICE_BACK_S} s")
            print(f"{service}: shown {shown!r}, back {time.monotonic() - killed_at:.1f}s after kill -9")
            wait_for(lambda: all(stage_shown(page_state(browser_page), s, "up") for s in EXPECTED_STAGES),
                     timeout=60, interval=0.5, message=f"every stage up again after {service}'s restart")
        assert "PostgreSQL stopped: killed" in demo.output() and "Kafka stopped: killed" in demo.output()
        for service in ("PostgreSQL", "Kafka"):      # and the stages waiting for it were told why, in their logs
            told = set(re.findall(rf"\[(\w+)\] .*{service} (?:down|starting): killed", demo.output()))
            assert told >= set(EXPECTED_STAGES), (service, told)

        # stop the market, then everything in the topic must be stored once and examined once
        producer = demo.stage_pid("producer.py")
        os.kill(producer, signal.SIGSTOP)
        settings = demo.settings

        def topic_end() -> int:
            return sum(end for _, end in bus.group_lag(settings, settings.consumer_group,
                                                       settings.trades_topic).values())
        end = topic_end()
        wait_for(lambda: query(settings, "SELECT count(*) FROM trades")[0][0] == end, timeout=60,
                 message="every message in the topic stored")
        assert query(settings, "SELECT count(DISTINCT trade_id), count(*) FROM trades")[0] == (end, end)
        wait_for(lambda: sum(c for c, _ in bus.group_lag(settings, settings.detector_group,
                                                         settings.trades_topic).values()) == end,
                 timeout=60, message="the detector to examine every trade")
        orphans = query(settings, "SELECT count(*) FROM trade_flags f LEFT JOIN trades t USING (trade_id)"
                                  " WHERE t.trade_id IS NULL")[0][0]
        assert orphans == 0, "a flag without a stored trade"
        # no flag lost or doubled: the killed-and-restarted detector flagged exactly the price moves
        # that one undisturbed pass over the same trades, in the same order, flags
        rows = query(settings, "SELECT trade_id, symbol, (extract(epoch FROM ts) * 1000)::bigint, price, quantity,"
                               " side, exchange, bid, ask, condition FROM trades ORDER BY kafka_partition, kafka_offset")
        clean = DetectionPipeline(RuleDetector(detector_config(settings)))
        expected = {d.trade.trade_id for d in clean.process([Trade(*r[:2], int(r[2]), *r[3:]) for r in rows])
                    if {"PRICE_SPIKE", "PRICE_DROP"} & set(d.types)}
        flagged = {r[0] for r in query(settings, "SELECT trade_id FROM trade_flags"
                                                 " WHERE anomaly_types && ARRAY['PRICE_SPIKE', 'PRICE_DROP']")}
        assert len(expected) > 5 and flagged == expected, (len(expected), len(flagged),
                                                           sorted(expected ^ flagged)[:10])
        os.kill(producer, signal.SIGCONT)
        demo.interrupt_and_wait()
    finally:
        demo.kill_everything()
