"""Reports (report.py) on the recorded SPY and IBM days of 2013-10-07, replayed through the real
pipeline (producer -> Kafka -> consumer, aggregator, detector -> PostgreSQL): every per-symbol
figure of the Markdown equals a direct SQL computation, the charts' 1-minute candles are the
aggregator's (which match the vendor's bars), the HTML renders offline in Chromium, and the
scheduled mode writes each closed hour exactly once across a kill -9."""
from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
from datetime import datetime, timezone

import pandas as pd
import pytest

from tests.conftest import PROJECT_ROOT, query, run_script, start_script, wait_for
from tests.recorded_days import DAY, LEAN, SYMBOLS, replay_recorded_days
from tradewatch.detect import quality
from tradewatch.formatting import exact, integer, money, percent


@pytest.fixture(scope="module")
def replayed(services, tmp_path_factory):
    return replay_recorded_days(services, tmp_path_factory.mktemp("pipeline"))


def report_cli(settings, *args, check=True) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, str(PROJECT_ROOT / "report.py"), *args], cwd=PROJECT_ROOT,
                            env={**os.environ, **settings.as_env()}, capture_output=True, text=True,
                            timeout=300)
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


def markdown_table(text: str, first_header: str) -> list[dict]:
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    headers = [h.strip() for h in lines[start].strip("|").split(" | ")]
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(headers, [c.strip() for c in line.strip("|").split(" | ")])))
    return rows


def excluded(settings) -> list[str]:
    return sorted(c.strip() for c in settings.ohlc_exclude_conditions.split(",") if c.strip())


def test_daily_report_figures_equal_direct_sql(replayed, tmp_path):
    settings = replayed
    report_cli(settings, "--date", "2013-10-07", "--out", str(tmp_path))
    text = (tmp_path / "report-2013-10-07.md").read_text()
    rows = {r["Symbol"]: r for r in markdown_table(text, "Symbol")}
    assert sorted(rows) == list(SYMBOLS)
    day = (DAY, DAY.replace(day=8))
    for symbol, row in rows.items():
        priced = query(settings, "SELECT price FROM trades WHERE symbol = %s AND ts >= %s AND ts < %s AND"
                                 " (condition IS NULL OR NOT condition = ANY(%s)) ORDER BY ts, trade_id",
                       (symbol, *day, excluded(settings)))
        prices = [p for (p,) in priced]
        trades, volume, value = query(settings, "SELECT count(*), sum(quantity::numeric),"
                                                " sum(price::numeric * quantity::numeric) FROM trades"
                                                " WHERE symbol = %s AND ts >= %s AND ts < %s", (symbol, *day))[0]
        largest_quantity, largest_price = query(settings, "SELECT quantity, price FROM trades WHERE symbol = %s"
                                                          " ORDER BY quantity DESC, ts, trade_id LIMIT 1", (symbol,))[0]
        assert row["Open"] == exact(prices[0]) and row["Close"] == exact(prices[-1])
        assert row["High"] == exact(max(prices)) and row["Low"] == exact(min(prices))
        assert row["Trades"] == integer(trades) and row["Volume"] == exact(volume, 0)
        assert row["Traded value"] == money(value)
        assert row["VWAP"] == exact(value / volume, 2, 6)
        assert row["Change"] == percent(prices[-1] / prices[0] - 1)
        assert row["Largest trade"].startswith(f"{exact(largest_quantity, 0)} @ {exact(largest_price)} (")
        minute_closes = [p for (p,) in query(settings, """
            SELECT close FROM stock_metrics WHERE symbol = %s AND window_size = '1m' AND close IS NOT NULL
            ORDER BY window_start""", (symbol,))]
        realised = math.sqrt(sum(math.log(b / a) ** 2 for a, b in zip(minute_closes, minute_closes[1:])))
        assert row["Realised volatility"] == percent(realised).lstrip("+")

    # each symbol's closing RSI and MACD (#27): the last 1-minute window's stored indicators
    closing = {r["Symbol"]: r for r in markdown_table(text[text.index("| Symbol | Last window (UTC) |"):], "Symbol")}
    assert sorted(closing) == list(SYMBOLS)
    for symbol, row in closing.items():
        (start, rsi, macd, signal_line, histogram), (_, _, _, _, previous) = query(settings, """
            SELECT window_start, rsi_14, macd, macd_signal, macd_histogram FROM indicators
            WHERE symbol = %s AND window_size = '1m' ORDER BY window_start DESC LIMIT 2""", (symbol,))
        state = "overbought" if rsi > 70 else "oversold" if rsi < 30 else "neutral"
        assert row["RSI 14 at the close"] == f"{rsi:.1f} ({state})"
        assert row["Last window (UTC)"] == f"{start:%Y-%m-%d %H:%M:%S} UTC"
        assert row["MACD"] == exact(macd, 2, 6) and row["Signal"] == exact(signal_line, 2, 6)
        side = "above signal (bullish)" if histogram >= 0 else "below signal (bearish)"
        assert row["MACD state"] == ("crossed " if (previous >= 0) != (histogram >= 0) else "") + side

    flagged = {(t, s): n for t, s, n in query(settings, "SELECT kind, anomaly_severity, count(*) FROM trade_flags,"
                                                        " unnest(anomaly_types) AS kind GROUP BY 1, 2")}
    assert flagged, "the detector flagged something on the real days"
    assert {(r["Anomaly type"], r["Severity"]): r["Flagged trades"] for r in markdown_table(text, "Anomaly type")} \
        == {k: integer(n) for k, n in flagged.items()}
    alerts = {s: (n, a) for s, n, a in query(settings, "SELECT severity, count(*), count(*) FILTER (WHERE"
                                                       " acknowledged) FROM alerts GROUP BY 1")}
    assert {r["Severity"]: (r["Alerts"], r["Acknowledged"]) for r in markdown_table(text, "Severity")} == \
        {s: (integer(n), integer(a)) for s, (n, a) in alerts.items()}
    why = markdown_table(text, "Alert time")          # #37: the most severe alerts say why they fired
    expected = query(settings, """
        SELECT to_char(ts AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS "UTC"'), symbol, alert_type, severity,
               evidence->>'sentence' FROM alerts
        ORDER BY array_position(ARRAY['CRITICAL', 'HIGH', 'MEDIUM', 'LOW'], severity), ts, alert_id LIMIT 20""")
    assert [tuple(r.values()) for r in why] == [tuple(e) for e in expected] and all(e[4] for e in expected)
    top = markdown_table(text, "Time")
    assert len(top) == min(20, query(settings, "SELECT count(*) FROM trade_flags")[0][0])
    kept_out = dict(query(settings, "SELECT condition, count(*) FROM trades WHERE condition = ANY(%s) GROUP BY 1",
                          (excluded(settings),)))
    assert {r["Kept out of OHLC, by condition"]: r["Trades"] for r in markdown_table(text, "Kept out of OHLC, by condition")} \
        == {c: integer(n) for c, n in kept_out.items()}


def test_per_rule_precision_from_what_analysts_marked(replayed, tmp_path):
    """#37: the report and `analyze` count each rule's alerts and verdicts, and give a precision
    only once five of its alerts are marked true or false (needs_review is not a verdict)."""
    from tradewatch.store import detections, queries
    settings = replayed
    by_rule = query(settings, "SELECT alert_type, array_agg(alert_id ORDER BY alert_id) FROM alerts"
                              " GROUP BY 1 ORDER BY count(*) DESC, 1")
    assert by_rule, "the detector raised alerts on the real days"
    busiest, ids = by_rule[0]
    assert len(ids) >= 6, by_rule
    engine = queries.engine_for(settings.sqlalchemy_url)

    def mark(alert_ids, verdict):
        for alert_id in alert_ids:
            detections.set_disposition(engine, alert_id, verdict, None, "test", "api")

    def report() -> dict[str, tuple]:
        expected = {rule: tuple(integer(n) for n in counts) for rule, *counts in query(
            settings, "SELECT alert_type, count(*), count(*) FILTER (WHERE disposition = 'true_positive'),"
                      " count(*) FILTER (WHERE disposition = 'false_positive'),"
                      " count(*) FILTER (WHERE disposition = 'needs_review') FROM alerts GROUP BY 1")}
        report_cli(settings, "--date", "2013-10-07", "--out", str(tmp_path))
        rows = markdown_table((tmp_path / "report-2013-10-07.md").read_text(), "Rule")
        assert {r["Rule"]: (r["Alerts"], r["True positive"], r["False positive"], r["Needs review"])
                for r in rows} == expected
        return {r["Rule"]: r["Precision"] for r in rows}
    try:
        mark(ids[:2], "true_positive")
        mark(ids[2:4], "false_positive")
        mark(ids[4:5], "needs_review")
        assert report()[busiest] == "—", "four marked: too few to say"
        mark(ids[5:6], "false_positive")
        assert report()[busiest] == "40%"
        analyzed = json.loads(run_script(settings, "anomaly_detector.py", "analyze", "--json").stdout)["rules"]
        assert {r["rule"]: r["precision"] for r in analyzed} == {
            rule: 0.4 if rule == busiest else None for rule, _ in by_rule}
        assert sum(r["alerts"] for r in analyzed) == query(settings, "SELECT count(*) FROM alerts")[0][0]
        text = run_script(settings, "anomaly_detector.py", "analyze").stdout
        line = next(line for line in text.splitlines() if line.strip().startswith(busiest))
        assert line.split()[1:] == [integer(len(ids)), "2", "3", "1", "40%"], line
    finally:
        with engine.begin() as conn:                      # the module's other tests see no verdicts
            conn.exec_driver_sql("UPDATE alerts SET disposition = NULL")
            conn.exec_driver_sql("DELETE FROM alert_dispositions")
        engine.dispose()


def test_market_quality_of_the_recorded_days_is_unremarkable(replayed, tmp_path):
    """`anomaly_detector.py quality` and the report's section read the stored days: the same
    statistics as the recorded files give, and both regulated days unremarkable."""
    out = subprocess.run([sys.executable, str(PROJECT_ROOT / "anomaly_detector.py"), "quality", "--json"],
                         cwd=PROJECT_ROOT, env={**os.environ, **replayed.as_env()}, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    results = {q["symbol"]: q for q in json.loads(out.stdout)}
    assert sorted(results) == list(SYMBOLS) and {q["day"] for q in results.values()} == {"2013-10-07"}
    for symbol, q in results.items():
        sizes = pd.read_csv(LEAN / f"{symbol.lower()}_20131007_trades.csv.gz")["quantity"].value_counts()
        from_file = quality.quality(sizes.index.to_numpy(), sizes.to_numpy())
        for statistic in ("benford", "clustering", "tail"):
            assert q[statistic] == from_file[statistic], (symbol, statistic)
        assert q["volume_volatility"]["minutes"] > 400 and q["volume_volatility"]["t"] > 2, q
        assert q["verdict"] == "unremarkable" and q["signs"] == [], q
    one = subprocess.run([sys.executable, str(PROJECT_ROOT / "anomaly_detector.py"), "quality", "IBM"],
                         cwd=PROJECT_ROOT, env={**os.environ, **replayed.as_env()}, capture_output=True, text=True,
                         timeout=120)
    assert one.returncode == 0 and one.stdout.startswith("IBM 2013-10-07: unremarkable · 24,293 trades"), one.stdout
    assert "SPY" not in one.stdout
    report_cli(replayed, "--date", "2013-10-07", "--out", str(tmp_path))
    text = (tmp_path / "report-2013-10-07.md").read_text()
    section = text[text.index("## Market quality"):]
    rows = {r["Symbol"]: r for r in markdown_table(section, "Symbol")}
    assert sorted(rows) == list(SYMBOLS)
    for symbol, row in rows.items():
        assert row["Verdict"] == "unremarkable"
        assert row["Benford MAD"] == f"{results[symbol]['benford']['mad']:g} (nonconforming)"
    assert "First digits of trade sizes" in section


def test_chart_candles_are_the_aggregators_and_match_the_vendor_bars(replayed):
    from tradewatch.report import build
    from tradewatch.store import queries
    settings = replayed
    report = build(queries.engine_for(settings.sqlalchemy_url), settings, DAY, DAY.replace(day=8))
    assert report.bucket_minutes == 1
    for symbol in SYMBOLS:
        candles = report.candles[symbol]
        stored = query(settings, "SELECT open, high, low, close, volume FROM stock_metrics WHERE symbol = %s"
                                 " AND window_size = '1m' ORDER BY window_start", (symbol,))
        assert [tuple(r) for r in candles[["open", "high", "low", "close", "volume"]].itertuples(index=False)] == stored
        with open(LEAN / f"{symbol.lower()}_20131007_bars_1m.csv") as handle:
            vendor = {r["window_start"][:16]: (float(r["open"]), float(r["high"]), float(r["low"]), float(r["close"]))
                      for r in csv.DictReader(handle)}
        ours = {c.window_start.strftime("%Y-%m-%dT%H:%M"): (c.open, c.high, c.low, c.close)
                for c in candles.itertuples()}
        assert set(ours) == set(vendor)
        same = sum(tuple(round(v, 4) for v in ours[m]) == vendor[m] for m in vendor) / len(vendor)
        assert same >= 0.98, f"{symbol}: {same:.3f} of the minutes equal the vendor's bars"


def test_html_report_renders_offline_in_chromium(replayed, tmp_path):
    from playwright.sync_api import sync_playwright

    from tests.e2e.demo_driver import launch_browser
    report_cli(replayed, "--date", "2013-10-07", "--out", str(tmp_path))
    page_file = tmp_path / "report-2013-10-07.html"
    with sync_playwright() as p:
        browser = launch_browser(p)
        context = browser.new_context(offline=True, viewport={"width": 1200, "height": 900})
        requests, errors = [], []
        context.on("request", lambda r: requests.append(r.url))
        page = context.new_page()
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(page_file.as_uri())
        charts = page.locator("figure.chart svg")
        assert charts.count() == len(SYMBOLS) + 2, "a chart per symbol, the anomalies over time, first digits"
        for i in range(charts.count()):
            box = charts.nth(i).bounding_box()
            assert box and box["width"] > 300 and box["height"] > 100
        assert page.locator("figure.chart svg path").count() > 500, "candles drawn"
        page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        browser.close()
    assert errors == [] and requests == [page_file.as_uri()], (errors, requests)
    assert (tmp_path / "report.png").stat().st_size > 10_000


def test_an_empty_period_and_bad_arguments(replayed, tmp_path):
    result = report_cli(replayed, "--date", "2001-01-01", "--out", str(tmp_path))
    assert "no trades" in result.stdout
    assert "There were no trades in this period." in (tmp_path / "report-2001-01-01.md").read_text()
    assert "report-2001-01-01.html" in (tmp_path / "index.html").read_text()
    for args, message in ((["--date", "2013-13-45"], "--date must be a day"),
                          (["--since", "2013-10-07T10:00:00Z"], "--since needs --until"),
                          (["--since", "2013-10-07T10:00:00Z", "--until", "2013-10-07T09:00:00Z"], "must be after"),
                          (["--since", "yesterday", "--until", "today"], "not an ISO-8601 time"),
                          (["--every", "1w"], "invalid choice"), ([], "one of the arguments")):
        bad = report_cli(replayed, *args, check=False)
        assert bad.returncode == 2 and message in bad.stderr, (args, bad.stderr)


def test_every_hour_writes_each_closed_hour_once_across_a_kill_9(replayed, tmp_path):
    settings = replayed
    hours = [h for (h,) in query(settings, "SELECT DISTINCT date_trunc('hour', ts) FROM trades")]
    first, newest = min(hours), query(settings, "SELECT date_trunc('hour', max(ts)) FROM trades")[0][0]
    expected = [f"report-{first.replace(hour=h):%Y-%m-%dT%H}.html" for h in range(first.hour, newest.hour)]
    out = tmp_path / "reports"
    scheduled = start_script(settings, "report.py", "--every", "1h", "--out", str(out), "--check-seconds", "1",
                             log=tmp_path / "first.log")
    wait_for(lambda: len(list(out.glob("report-*.html"))) >= 3, timeout=120, message="three reports")
    scheduled.send_signal(signal.SIGKILL)
    scheduled.wait(timeout=10)
    restarted = start_script(settings, "report.py", "--every", "1h", "--out", str(out), "--check-seconds", "1",
                             log=tmp_path / "second.log")
    wait_for(lambda: len(list(out.glob("report-*.html"))) >= len(expected), timeout=300, message="every closed hour")
    restarted.send_signal(signal.SIGTERM)
    assert restarted.wait(timeout=30) == 0
    assert sorted(p.name for p in out.glob("report-*.html")) == expected, "each closed hour once, the open one not"
    assert sorted(p.name for p in out.glob("report-*.md")) == [e.replace(".html", ".md") for e in expected]
    assert not list(out.glob(".*.tmp")), "no half-written file left"
    index = (out / "index.html").read_text()
    assert all(name in index for name in expected)
    # a report written by the schedule equals one written on demand for the same hour
    middle = expected[len(expected) // 2][len("report-"):-len(".html")]
    since = datetime.strptime(middle, "%Y-%m-%dT%H").replace(tzinfo=timezone.utc)
    report_cli(settings, "--since", since.isoformat(), "--until", since.replace(hour=since.hour + 1).isoformat(),
               "--out", str(tmp_path / "once"))
    assert (tmp_path / "once" / f"report-{middle}.md").read_text() == (out / f"report-{middle}.md").read_text()
