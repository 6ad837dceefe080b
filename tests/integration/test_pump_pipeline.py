"""Pump-and-dump through the real pipeline: simulated illiquid pairs written as Binance's public
trade files (data.binance.vision: a zip a pair, no header) and replayed by `producer.py --replay`
into Kafka, the consumer storing them, `anomaly_detector.py run` detecting: the alert within
seconds of each pump's start, one alert per phase, the event record's phases, and calm ordinary
days."""
from __future__ import annotations

import signal
import zipfile
from datetime import datetime, timezone

from tests.conftest import free_port, query, run_script, start_script, wait_for
from tests.integration.test_api import call
from tests.integration.test_report import markdown_table
from tradewatch.formatting import integer, percent
from tradewatch.market.simulator import illiquid_market


def test_pumps_alerted_followed_and_ordinary_days_calm(settings, tmp_path):
    settings = settings.with_overrides(model_dir=str(tmp_path / "models"), api_port=free_port())    # rules only
    trades, pumps = illiquid_market(symbols=4, days=2, seed=5, pump_symbols=2)
    consumer = start_script(settings, "consumer.py", log=tmp_path / "consumer.log")
    detector = start_script(settings, "anomaly_detector.py", "run", log=tmp_path / "detector.log")
    files = []
    for symbol in sorted({t.symbol for t in trades}):
        rows = "".join(f"{n},{t.price:.8f},{t.quantity:.8f},{t.price * t.quantity:.8f},{t.timestamp_ms * 1000},"
                       f"{'true' if t.side == 'sell' else 'false'},true\n"
                       for n, t in enumerate((t for t in trades if t.symbol == symbol), start=1))
        files += ["--replay", str(tmp_path / f"{symbol}-trades-2026-01-01.zip")]
        with zipfile.ZipFile(files[-1], "w", zipfile.ZIP_DEFLATED) as archive:
            archive.writestr(f"{symbol}-trades-2026-01-01.csv", rows)
    run_script(settings, "producer.py", *files, "--speed", "max", timeout=300)
    wait_for(lambda: query(settings, "SELECT count(*) FROM trades")[0][0] == len(trades), timeout=120,
             message=f"{len(trades)} trades stored")
    wait_for(lambda: query(settings, "SELECT count(*) FROM manipulation_events WHERE state = 'over'")[0][0] == 2,
             timeout=120, message="both events over")
    for process in (consumer, detector):
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
    sides = query(settings, "SELECT exchange, count(*) FILTER (WHERE side = 'buy'),"
                            " count(*) FILTER (WHERE side = 'sell'),"
                            " count(*) FILTER (WHERE trade_id LIKE 'binance:ILQ__-BTC:%%') FROM trades GROUP BY 1")
    assert sides == [("BINANCE", sum(t.side == "buy" for t in trades), sum(t.side == "sell" for t in trades),
                       len(trades))], "every trade with its taker's side and its Binance id"

    for p in pumps:
        alerts = query(settings, "SELECT details->>'phase', severity, extract(epoch FROM ts) * 1000 FROM alerts"
                                 " WHERE symbol = %s AND alert_type = 'PUMP_AND_DUMP' ORDER BY ts", (p.symbol,))
        assert [a[0] for a in alerts] == ["pump", "peak", "dump", "over"], alerts
        assert [a[1] for a in alerts] == ["CRITICAL", "HIGH", "HIGH", "MEDIUM"]
        assert 0 <= alerts[0][2] - p.start_ms <= 5_000, "alerted within 5 s of the first buy of the rush"
        (state, started, peak, gain, burst, depth), = query(
            settings, "SELECT state, extract(epoch FROM started_at) * 1000, extract(epoch FROM peak_at) * 1000,"
                      " gain_pct, burst_trades, dump_depth_pct FROM manipulation_events WHERE symbol = %s",
            (p.symbol,))
        assert state == "over" and abs(started - p.start_ms) <= 20_000 and burst >= 12
        assert gain >= 0.8 * p.gain * 100 and depth > 20 and peak >= p.start_ms
    api = start_script(settings, "api.py", log=tmp_path / "api.log")     # the events in the API
    base = f"http://127.0.0.1:{settings.api_port}"

    def answered():
        try:
            return call(base, "/events", symbol=pumps[0].symbol)
        except OSError:
            return None
    status, events = wait_for(answered, timeout=60, message="the API to answer")
    api.terminate()
    api.wait(timeout=30)
    assert status == 200 and [(e["symbol"], e["state"]) for e in events] == [(pumps[0].symbol, "over")]
    assert events[0]["gain_pct"] >= 0.8 * pumps[0].gain * 100 and events[0]["dump_seconds"] > 0

    # ordinary days: every day of the pump-free pairs, the first day of the others (all alert types)
    last_day = trades[0].timestamp_ms + 86_400_000
    pumped = [p.symbol for p in pumps]
    ordinary = query(settings, "SELECT count(*) FROM alerts WHERE NOT (symbol = ANY(%s) AND ts >= timestamptz 'epoch'"
                               " + %s * interval '1 millisecond')", (pumped, last_day))[0][0]
    assert ordinary <= 6, f"{ordinary} alerts on 6 ordinary symbol-days"

    # the events in the day's report (report.py), as stored
    day = datetime.fromtimestamp(pumps[0].start_ms / 1000, timezone.utc).strftime("%Y-%m-%d")
    out = tmp_path / "reports"
    run_script(settings, "report.py", "--date", day, "--out", str(out))
    text = next(out.glob("report-*.md")).read_text()
    header = next(line for line in text.splitlines() if "| Dump from the peak |" in line)
    rows = markdown_table(text[text.index(header):], "Symbol")
    stored = query(settings, "SELECT symbol, gain_pct, burst_trades, state FROM manipulation_events"
                             " WHERE started_at >= %s::date AND started_at < %s::date + 1 ORDER BY started_at",
                   (day, day))
    assert len(stored) == 2
    assert [(r["Symbol"], r["Gain"], r["Burst trades"], r["State"]) for r in rows] == \
        [(symbol, percent(gain / 100), integer(burst), state) for symbol, gain, burst, state in stored]
