"""The dashboard's panels (Streamlit AppTest) against a real PostgreSQL loaded with known data:
every number shown equals the SQL truth computed straight from the trades table."""
from __future__ import annotations

import base64
import json

import numpy as np
import pytest
import streamlit as st
from streamlit.testing.v1 import AppTest

from tests.conftest import query
from tests.market_fixture import load_known_books, load_known_market
from tradewatch.config import PROJECT_ROOT
from tradewatch.book import imbalance
from tradewatch.formatting import compact, exact

APP = str(PROJECT_ROOT / "dashboard.py")


@pytest.fixture
def app(settings, monkeypatch):
    for key, value in settings.as_env().items():
        monkeypatch.setenv(key, value)
    st.cache_data.clear()
    st.cache_resource.clear()

    def run(at: AppTest | None = None) -> AppTest:
        at = at or AppTest.from_file(APP, default_timeout=60)
        at.run()
        assert not at.exception, at.exception
        return at
    return run


def metric(at: AppTest, label: str) -> str:
    return next(m.value for m in at.metric if m.label == label)


def decoded(values) -> np.ndarray:
    """A figure's array as plotly sends it: a list, or a numpy array as its bytes."""
    if isinstance(values, dict):
        return np.frombuffer(base64.b64decode(values["bdata"]), dtype=values["dtype"])
    return np.asarray(values, dtype=float)


def test_empty_database_shows_no_data_yet(app):
    at = app()
    assert any("No data yet" in i.value for i in at.info)
    assert not at.error


def test_kpis_equal_the_sql_truth(settings, app):
    load_known_market(settings)
    at = app()
    trades, volume, value, symbols = query(settings, """
        SELECT count(*), sum(quantity), sum(price * quantity), count(DISTINCT symbol) FROM trades""")[0]
    anomalies = query(settings, "SELECT count(*) FROM trade_flags f JOIN trades USING (trade_id)")[0][0]
    assert metric(at, "Trades") == f"{trades:,.0f}"
    assert metric(at, "Volume") == compact(volume)
    assert metric(at, "Traded value") == compact(value, "$")
    value_tile = next(m for m in at.metric if m.label == "Traded value")
    assert value_tile.help.startswith("exactly $")     # cents, thousands separated (sum order aside)
    assert float(value_tile.help.removeprefix("exactly $").replace(",", "")) == pytest.approx(value, abs=0.01)
    assert metric(at, "Active symbols") == f"{symbols:,.0f}"
    assert metric(at, "Anomalies") == f"{anomalies:,.0f}" and anomalies > 10


def test_every_configured_window_size_is_offered_and_drawn(settings, app, monkeypatch):
    """#27: a 1h size in WINDOW_SIZES is a choice under "Candle size", and choosing it draws the
    hour's candle as the trades make it."""
    monkeypatch.setenv("WINDOW_SIZES", "1m,5m,15m,1h")
    load_known_market(settings, sizes=("1m", "5m", "15m", "1h"))
    at = app()
    sizes = at.radio(key="candle_size")
    assert list(sizes.options) == ["1m", "5m", "15m", "1h"]
    sizes.set_value("1h")
    at = app(at)
    chart = next(json.loads(c.proto.spec) for c in at.get("plotly_chart") if " 1h candles" in c.proto.spec)
    symbol = chart["layout"]["title"]["text"].split()[0]
    candle = next(t for t in chart["data"] if t["type"] == "candlestick")
    high, low = query(settings, "SELECT max(price), min(price) FROM trades WHERE symbol = %s", (symbol,))[0]
    assert list(decoded(candle["high"])) == pytest.approx([float(high)])
    assert list(decoded(candle["low"])) == pytest.approx([float(low)])


def test_scanner_equals_the_sql_truth(settings, app):
    load_known_market(settings)
    at = app()
    frame = next(d.value for d in at.dataframe if "signal" in d.value.columns).set_index("symbol")
    truth = query(settings, """
        SELECT symbol, (array_agg(price ORDER BY ts DESC, kafka_offset DESC))[1],
               (array_agg(price ORDER BY ts, kafka_offset))[1], sum(price * quantity) / sum(quantity), sum(quantity),
               sum(quantity) FILTER (WHERE side = 'buy') / sum(quantity) FILTER (WHERE side IN ('buy', 'sell'))
        FROM trades GROUP BY symbol""")
    assert len(frame) == len(truth) == 10
    for symbol, last, first, vwap, volume, buy_share in truth:
        row = frame.loc[symbol]
        assert row["last"] == pytest.approx(last) and row["vwap"] == pytest.approx(vwap, rel=1e-9)
        assert row["volume"] == pytest.approx(volume) and row["buy_share"] == pytest.approx(buy_share)
        assert row["change_pct"] == pytest.approx(round((last / first - 1) * 100, 3), abs=1e-9)
        expected = "BUY" if buy_share > 0.55 and last > vwap else "SELL" if buy_share < 0.45 and last < vwap else "NEUTRAL"
        assert row["signal"] == expected


def test_tape_whales_and_anomalies_only(settings, app):
    load_known_market(settings)
    at = app()
    tape = next(t.value for t in at.table if "Exchange" in t.value.columns)
    latest = query(settings, "SELECT symbol, price FROM trades ORDER BY ts DESC LIMIT 25")
    # every digit shown, thousands separated (BTC-USD at 95,002.79 is never '5002.79')
    assert sorted(zip(tape.Symbol, tape.Price)) == sorted((s, exact(p)) for s, p in latest)
    whales = [m.value for m in at.markdown if m.value.startswith(":material/waves:")]
    expected_whales = query(settings, "SELECT count(*) FROM trade_flags WHERE 'VOLUME_SPIKE' = ANY(anomaly_types)")[0][0]
    assert len(whales) == min(6, expected_whales) and expected_whales > 0
    at.checkbox(key="anomalies_only").check()
    at = app(at)
    tape = next(t.value for t in at.table if "Exchange" in t.value.columns)
    assert len(tape) > 0 and (tape.Anomaly != "").all()


def test_alert_feed_filter_and_acknowledge(settings, app):
    load_known_market(settings)
    at = app()
    alerts = query(settings, "SELECT alert_id, severity, message FROM alerts ORDER BY ts DESC, alert_id")
    shown = [m.value for m in at.markdown if ":material/notifications_active:" in m.value]
    assert len(shown) == min(20, len(alerts)) and alerts[0][2] in shown[0]
    first_id = alerts[0][0]
    at.button(key=f"ack-{first_id}").click()
    at = app(at)
    assert query(settings, "SELECT acknowledged FROM alerts WHERE alert_id = %s", (first_id,))[0][0] is True
    at.multiselect(key="alert_severities").set_value(["CRITICAL"])
    at = app(at)
    shown = [m.value for m in at.markdown if ":material/notifications_active:" in m.value or ":material/check_circle:" in m.value]
    critical = [a for a in alerts if a[1] == "CRITICAL"]
    assert len(shown) == min(20, len(critical)) and all("CRITICAL" in s for s in shown)


def test_pump_and_dump_events_are_shown(settings, app):
    from tradewatch.detect.rules import RuleDetector
    from tradewatch.store import db, detections
    from tradewatch.market.simulator import illiquid_market
    load_known_market(settings)
    assert not [t for t in app().table if "Gain" in t.value.columns], "no events: no panel"
    trades, pumps = illiquid_market(symbols=1, days=2, seed=5, pump_symbols=1)
    rules = RuleDetector()
    events = {d.event["event_id"]: d.event for d in map(rules.process, trades) if d.event}
    with db.connect(settings) as conn, conn.cursor() as cur:
        detections.write_events(cur, list(events.values()))
    conn.close()
    st.cache_data.clear()                  # the page caches its queries for a second
    table = next(t.value for t in app().table if "Gain" in t.value.columns)
    (event,) = events.values()
    assert list(table.Symbol) == [pumps[0].symbol] and list(table.State) == ["over"]
    assert list(table.Gain) == [f"{event['gain_pct']:+.1f}%"] and table.Dump.iloc[0].startswith("-")


def test_database_down_shows_a_banner_not_a_traceback(settings, app, monkeypatch):
    monkeypatch.setenv("POSTGRES_PORT", "1")
    at = app()
    assert any("Database unavailable" in e.value for e in at.error)


def test_the_pipeline_panel_draws_the_stages_samples(settings, app):
    load_known_market(settings)
    assert any("No pipeline samples yet" in i.value for i in app().info)
    # two 30-s steps of the panel: each stage's first sample (no rate yet), then one a step later
    rows = [("consumer", 0, None, 40, None, None, 0), ("consumer", 30, 150.0, 60, 6.0, 90.0, 16),
            ("detector", 0, None, 0, None, None, 0), ("detector", 30, 149.0, 2, 120.0, 800.0, 2)]
    for stage, seconds, per_s, lag, p50, p99, count in rows:
        query(settings, "INSERT INTO stage_samples (stage, host, pid, at, processed, per_s, arriving_per_s, lag,"
                        " latency_p50_ms, latency_p99_ms, latency_count) VALUES (%s, 'h', 1, to_timestamp(floor(extract("
                        "epoch FROM now()) / 30) * 30 - 60 + %s), 0, %s, %s, %s, %s, %s, %s)",
              (stage, seconds, per_s, per_s, lag, p50, p99, count))
    st.cache_data.clear()
    at = app()
    assert any(s.value == "Pipeline over the last hour" for s in at.subheader)
    assert "Now: consumer 150.0/s, lag 60 · trade → row p50 6.0 ms, p99 90 ms · detector 149.0/s, lag 2 · " \
           "trade → alert p50 120 ms, p99 800 ms" in [c.value for c in at.caption]
    specs = [json.loads(c.proto.spec) for c in at.get("plotly_chart")]
    charts = {s["layout"]["title"]["text"]: s for s in specs if s["layout"].get("title", {}).get("text") in
              ("Records per second", "Lag", "Latency from Kafka")}
    names = sorted(t["name"] for spec in charts.values() for t in spec["data"])
    assert names == sorted(["arriving in Kafka", "consumer", "detector", "consumer", "detector",
                            "trade → row p50", "trade → row p99", "trade → alert p50", "trade → alert p99"])
    consumer = next(t for t in charts["Records per second"]["data"] if t["name"] == "consumer")
    values = decoded(consumer["y"])
    assert np.isnan(values[0]) and values[-1] == 150.0, "no rate at the first sample"
    assert charts["Latency from Kafka"]["layout"]["yaxis"]["type"] == "log"


def test_an_opened_alert_shows_why_with_its_baseline_and_threshold(settings, app):
    """#37: "Why?" on an alert opens its evidence: the sentence, the table, and a chart of the
    symbol's trades around it with the baseline and the threshold at the evidence's values."""
    load_known_market(settings)
    at = app()
    alert_id, evidence = query(settings, "SELECT alert_id, evidence FROM alerts WHERE alert_type = 'PRICE_SPIKE'"
                                         " ORDER BY ts DESC LIMIT 1")[0]
    at.button(key=f"why-{alert_id}").click()
    at = app(at)
    assert at.query_params["alert"] == [alert_id] or at.query_params["alert"] == alert_id
    assert any(evidence["sentence"] in m.value for m in at.markdown)
    table = next(t.value for t in at.table if "Evidence" in t.value.columns)
    assert table.loc["Rule", "Evidence"] == "PRICE_SPIKE"
    assert table.loc["Baseline", "Evidence"] == exact(evidence["baseline"])
    chart = next(json.loads(c.proto.spec) for c in at.get("plotly_chart") if "around the alert" in c.proto.spec)
    lines = {t["name"]: t for t in chart["data"]}
    assert lines["Baseline"]["y"] == [evidence["baseline"]] * 2 and lines["Threshold"]["y"] == [evidence["level"]] * 2
    trade_ms = query(settings, "SELECT extract(epoch FROM ts) * 1000 FROM trades WHERE trade_id = %s",
                     (evidence["trades"]["trade_id"],))[0][0]
    assert "This trade" in lines and lines["Price"]["x"], "the trades around it, this one marked"
    assert float(trade_ms) >= evidence["trades"]["first_ms"]
    at.button(key="close-alert").click()
    at = app(at)
    assert "alert" not in at.query_params and not [t for t in at.table if "Evidence" in t.value.columns]

    query(settings, "INSERT INTO alerts (alert_id, ts, symbol, alert_type, severity, message)"
                    " SELECT 'old:PRICE_SPIKE', ts, symbol, alert_type, severity, 'HIGH PRICE_SPIKE from before'"
                    " FROM alerts WHERE alert_id = %s", (alert_id,))
    st.cache_data.clear()
    at.query_params["alert"] = "old:PRICE_SPIKE"
    at = app(at)
    assert any("Stored before alerts carried their evidence" in m.value for m in at.markdown)


def test_an_opened_book_alert_shows_the_pulled_order_over_the_trades(settings, app):
    """#38: a spoofing alert of the quotes stage opens like a trade's: its sentence, its evidence
    (measured against the side's typical level, the book messages that made it) and the trades
    around it with the pulled order's price over its life; no baseline drawn as a price."""
    load_known_market(settings)
    load_known_books(settings, anomaly_rate=0.01)
    alert_id, evidence = query(settings, "SELECT alert_id, evidence FROM alerts WHERE alert_type = 'SPOOFING'"
                                         " AND source = 'quotes' ORDER BY ts DESC LIMIT 1")[0]
    at = app()
    at.query_params["alert"] = alert_id
    at = app(at)
    assert any(evidence["sentence"] in m.value for m in at.markdown)
    table = next(t.value for t in at.table if "Evidence" in t.value.columns)
    assert table.loc["Rule", "Evidence"] == "SPOOFING"
    assert table.loc["Baseline", "Evidence"] == exact(evidence["baseline"])
    assert table.loc["Book messages", "Evidence"].endswith(f"fired on {alert_id.rsplit(':', 1)[0]}")
    chart = next(json.loads(c.proto.spec) for c in at.get("plotly_chart") if "around the alert" in c.proto.spec)
    pulled = [t for t in chart["data"] if t["name"].startswith("Pulled")]
    assert sorted(t["y"][0] for t in pulled) == sorted(evidence["extra"]["prices"])
    assert not any(t["name"] in ("Baseline", "Threshold") for t in chart["data"])
    assert len(chart["layout"]["shapes"]) == 1, "the time of the book messages, shaded"


def test_an_analyst_records_a_verdict_and_its_history_is_shown(settings, app):
    """#37: the opened alert's verdict, note and name go into its history; the feed shows it."""
    load_known_market(settings)
    at = app()
    alert_id = query(settings, "SELECT alert_id FROM alerts ORDER BY ts DESC, alert_id LIMIT 1")[0][0]
    at.button(key=f"why-{alert_id}").click()
    at = app(at)
    assert any("not marked yet" in m.value for m in at.markdown)
    at.radio(key=f"verdict-{alert_id}").set_value("false_positive")
    at.text_input(key=f"note-{alert_id}").input("one-tick bounce")
    at.text_input(key="analyst").input("ana")
    at = app(at)
    at.button(key="record-verdict").click()
    at = app(at)
    assert query(settings, "SELECT disposition FROM alerts WHERE alert_id = %s", (alert_id,)) == [("false_positive",)]
    assert query(settings, "SELECT previous, disposition, note, by_whom, via FROM alert_dispositions"
                           " WHERE alert_id = %s", (alert_id,)) == [(None, "false_positive", "one-tick bounce", "ana",
                                                                     "dashboard")]
    history = next(t.value for t in at.table if "Who" in t.value.columns)
    assert list(history.Who) == ["ana (dashboard)"] and list(history.To) == ["False positive"]
    assert any("**Disposition:** False positive" in m.value for m in at.markdown)
    assert any(alert_id and ":gray-badge[False positive]" in m.value for m in at.markdown), "the feed shows it"


def test_the_order_book_is_shown_beside_the_candles_as_stored(settings, app):
    """#38: a symbol's view shows its book as the quotes stage stored it (order_books): best bid and
    ask, spread in price and basis points, imbalance, and a depth chart cumulated from the touch; the
    overview lists every symbol's top of book."""
    load_known_market(settings)
    at = app()
    assert not any(s.value == "Order books" for s in at.subheader), "no book stored: no panel"
    books = load_known_books(settings)
    st.cache_data.clear()
    at = app(at)
    table = next(d.value for d in at.dataframe if "Spread (bps)" in d.value.columns)
    assert list(table.index) == sorted(books)
    symbol = sorted(books)[0]
    bids, asks = query(settings, "SELECT bids, asks FROM order_books WHERE symbol = %s", (symbol,))[0]
    (bid, _), (ask, ask_size) = bids[0], asks[0]
    assert table.loc[symbol, "Bid"] == exact(bid) and table.loc[symbol, "Ask size"] == exact(ask_size, 0)
    assert table.loc[symbol, "Spread (bps)"] == round((ask - bid) / ((ask + bid) / 2) * 1e4, 1)

    at.selectbox(key="view").set_value(symbol)
    at = app(at)
    assert metric(at, "Best bid") == exact(bid) and metric(at, "Best ask") == exact(ask)
    assert metric(at, "Spread") == exact(ask - bid)
    assert next(m for m in at.metric if m.label == "Spread").delta == f"{(ask - bid) / ((ask + bid) / 2) * 1e4:.1f} bps"
    assert metric(at, "Imbalance") == f"{imbalance(bids[:10], asks[:10]):+.2f}"
    chart = next(json.loads(c.proto.spec) for c in at.get("plotly_chart") if f"{symbol} depth" in c.proto.spec)
    sides = {t["name"]: t for t in chart["data"]}
    assert sides["Bids"]["x"] == [p for p, _ in bids[:10]] and sides["Asks"]["x"] == [p for p, _ in asks[:10]]
    assert sides["Bids"]["y"] == pytest.approx(np.cumsum([s for _, s in bids[:10]]).tolist())
    assert sides["Asks"]["y"] == pytest.approx(np.cumsum([s for _, s in asks[:10]]).tolist())
    assert books[symbol].depth(10) == ([tuple(b) for b in bids[:10]], [tuple(a) for a in asks[:10]])


def test_a_symbol_without_a_book_says_where_books_come_from(settings, app):
    load_known_market(settings)
    symbol = query(settings, "SELECT min(symbol) FROM trades")[0][0]
    at = app()
    at.selectbox(key="view").set_value(symbol)
    at = app(at)
    assert any(f"No order book of {symbol}" in i.value and "consumer.py --quotes" in i.value for i in at.info)
