"""`report.py --every` on a database of many days (issue 23): a fresh folder gets a bounded backlog,
not a report for every hour since the oldest trade, and a window that never becomes final is
reported once and no longer holds up later reports."""
from __future__ import annotations

import signal
import time
from datetime import datetime, timedelta, timezone

from tests.conftest import query, start_script, wait_for
from tradewatch.events import Trade
from tradewatch.store import db
from tradewatch.store.candles import backfill
from tradewatch.store.writer import copy_row, write_batch
from tradewatch.windows import parse_size

START = datetime(2013, 10, 1, tzinfo=timezone.utc)
DAYS = 10


def test_every_hour_starts_with_a_bounded_backlog_and_is_not_stopped_by_a_never_final_window(settings, tmp_path):
    start_ms = int(START.timestamp() * 1000)
    trades = [Trade(f"h{i}", "SPY", start_ms + i * 1_800_000, 170.0 + i % 5, 10.0, "buy", "X")
              for i in range(DAYS * 48)]                           # one trade every 30 minutes for ten days
    conn = db.connect(settings)
    try:
        with conn.cursor() as cur:
            write_batch(cur, [copy_row(t, 0, i) for i, t in enumerate(trades)], [])
        conn.commit()
        backfill(conn, START, START + timedelta(days=DAYS), tuple(parse_size(s) for s in ("1m", "5m", "15m")),
                 frozenset())
    finally:
        conn.close()
    # a window that will never be final (as after WINDOW_SIZES changed): eight days back
    stuck = START + timedelta(days=2)
    assert query(settings, "UPDATE stock_metrics SET is_final = false WHERE window_size = '1m'"
                           " AND window_start = %s RETURNING symbol", (stuck,)) == [("SPY",)]

    out, log = tmp_path / "reports", tmp_path / "report.log"
    scheduled = start_script(settings, "report.py", "--every", "1h", "--out", str(out), "--check-seconds", "1",
                             "--backlog", "3", log=log)
    wait_for(lambda: len(list(out.glob("report-*.html"))) >= 3, timeout=120, message="three reports")
    checks = log.read_text().count(" written: ")
    time.sleep(3)                       # three more checks: nothing else is due
    scheduled.send_signal(signal.SIGTERM)
    assert scheduled.wait(timeout=30) == 0
    newest = datetime.fromtimestamp(trades[-1].timestamp_ms / 1000, timezone.utc).replace(minute=0)
    expected = [f"report-{newest - timedelta(hours=h):%Y-%m-%dT%H}.html" for h in (3, 2, 1)]
    assert sorted(p.name for p in out.glob("report-*.html")) == expected, "the last three closed hours only"
    assert log.read_text().count(" written: ") == checks == 3
    text = log.read_text()
    assert text.count("still not final") == 1 and "SPY 1m at 2013-10-03T00:00:00+00:00" in text, text[-2000:]
    index = (out / "index.html").read_text()
    assert all(name in index for name in expected)
