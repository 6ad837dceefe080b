"""Every entry point, given a bad setting, prints one line naming it and exits with status 2 — no
traceback (issue 24). The settings are checked at load with their ranges."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tradewatch.config import PROJECT_ROOT, Settings

ENTRY_POINTS = [["consumer.py"], ["producer.py", "--count", "1"], ["aggregator.py"], ["anomaly_detector.py", "run"],
                ["flink_job.py", "--print-sql"], ["report.py", "--date", "2013-10-07"], ["api.py"],
                ["-m", "tradewatch", "doctor"], ["-m", "tradewatch.stack", "status"], ["-m", "tradewatch.demo"]]
BAD = [("API_STREAM_QUEUE", "0", "must be more than 0"), ("ZSCORE_WINDOW", "0", "must be more than 0"),
       ("MAX_CLOCK_SKEW_SECONDS", "nan", "must be a finite number"), ("WINDOW_SIZES", " , ", "must list window sizes"),
       ("CONSUMERS", "three", "must be a whole number"), ("DEMO_RATE", "-1", "must be more than 0"),
       ("LOG_FORMAT", "xml", "must be one of text, json"), ("API_PORT", "70000", "must be a port"),
       ("WINDOW_SIZES", "5m,15m", "must include 1m"), ("ALERT_ROUTES", "CRITICAL=pager", "must be like"),
       ("ALERT_ROUTES", "HIGH=webhook", "sends alerts to the webhook but ALERT_WEBHOOK_URL is empty")]


@pytest.mark.parametrize("entry, bad", [(e, BAD[i % len(BAD)]) for i, e in enumerate(ENTRY_POINTS)],
                         ids=[" ".join(e) for e in ENTRY_POINTS])
def test_a_bad_setting_is_one_line_and_exit_status_2(entry, bad):
    key, value, message = bad
    env = {**os.environ, key: value, "TRADEWATCH_HOME": "/nonexistent/never-created"}
    result = subprocess.run([sys.executable, *entry], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True,
                            timeout=60)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"error: setting {key} {message}"), \
        (result.returncode, result.stderr[-2000:])


@pytest.mark.parametrize("key, value, message", BAD)
def test_each_bad_setting_is_named(key, value, message):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(key, value)
        with pytest.raises(ValueError, match=f"setting {key} {message}"):
            Settings.load()


def test_the_dashboard_shows_a_bad_setting_as_one_line_instead_of_its_page(monkeypatch):
    from streamlit.testing.v1 import AppTest
    monkeypatch.setenv("ZSCORE_WINDOW", "0")
    page = AppTest.from_file(str(PROJECT_ROOT / "dashboard.py"), default_timeout=30).run()
    assert not page.exception, page.exception
    assert [e.value for e in page.error] == ["setting ZSCORE_WINDOW must be more than 0, got 0 — fix it in .env or "
                                             "the environment, then reload this page"]
