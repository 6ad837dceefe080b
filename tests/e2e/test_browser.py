"""The dashboard in a real headless Chromium (Debian's, driven by Playwright) against real PostgreSQL."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import urllib.request

import pytest
from playwright.sync_api import expect, sync_playwright

from tests.conftest import free_port, query
from tests.market_fixture import load_known_market
from tradewatch.config import PROJECT_ROOT

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture
def dashboard(settings, tmp_path):
    load_known_market(settings)
    yield from serve_dashboard(settings, tmp_path)


@pytest.fixture
def empty_dashboard(settings, tmp_path):
    yield from serve_dashboard(settings.with_overrides(dashboard_refresh_seconds=1), tmp_path)


def serve_dashboard(settings, tmp_path):
    port = free_port()
    log = open(tmp_path / "streamlit.log", "wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", str(PROJECT_ROOT / "dashboard.py"), "--server.headless", "true",
         "--server.port", str(port), "--browser.gatherUsageStats", "false"],
        cwd=PROJECT_ROOT, env={**os.environ, **settings.as_env()}, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).status == 200:
                break
        except OSError:
            if time.monotonic() > deadline or process.poll() is not None:
                raise AssertionError(f"streamlit did not start: {(tmp_path / 'streamlit.log').read_text()}")
            time.sleep(0.5)
    yield url
    process.terminate()
    process.wait(timeout=30)


@pytest.mark.browser
def test_dashboard_renders_charts_and_reacts_to_controls(settings, dashboard, tmp_path):
    assert os.path.exists(CHROMIUM), "chromium missing: `make system` installs it"
    trades = query(settings, "SELECT count(*) FROM trades")[0][0]
    with sync_playwright() as p:
        browser = launch(p)
        page = browser.new_page(viewport={"width": 1600, "height": 2400})
        page.goto(dashboard)
        expect(page.get_by_text("TradeWatch — live market surveillance")).to_be_visible(timeout=60_000)
        expect(page.locator('[data-testid="stMetricValue"]').first).to_have_text(f"{trades:,}", timeout=60_000)
        page.wait_for_function("document.querySelectorAll('.js-plotly-plot').length >= 4", timeout=60_000)
        trace_types = page.evaluate("[...document.querySelectorAll('.js-plotly-plot')].map(d => d.data[0].type)")
        assert trace_types[:1] == ["candlestick"] and "pie" in trace_types
        expect(page.get_by_text("Market scanner")).to_be_visible()
        expect(page.get_by_text("Whale trades")).to_be_visible()
        expect(page.get_by_text("Last hour of data", exact=False)).to_be_visible()

        # change a control: the time range
        page.locator('[data-testid="stSidebar"] [data-testid="stSelectbox"]').first.click()
        page.get_by_role("option", name="Last 15 minutes").click()
        expect(page.get_by_text("Last 15 minutes of data", exact=False)).to_be_visible(timeout=30_000)

        shot = tmp_path / "dashboard.png"
        page.screenshot(path=str(shot), full_page=True)
        browser.close()
    assert shot.stat().st_size > 20_000


def launch(p):
    return p.chromium.launch(executable_path=CHROMIUM, args=[
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"])


@pytest.mark.browser
def test_page_opened_before_any_data_shows_candles_once_they_exist(settings, empty_dashboard):
    """A user opens the page before the aggregator has written a window: the live panels must pick
    up the symbols when they appear, without a reload."""
    with sync_playwright() as p:
        browser = launch(p)
        page = browser.new_page(viewport={"width": 1600, "height": 2400})
        page.goto(empty_dashboard)
        expect(page.get_by_text("No data yet", exact=False).first).to_be_visible(timeout=60_000)
        load_known_market(settings)
        page.wait_for_function("[...document.querySelectorAll('.js-plotly-plot')]"
                               ".some(d => d.data && d.data[0].type === 'candlestick')", timeout=30_000)
        browser.close()
