"""The order book through the real services: `producer.py --book` → Kafka `quotes` →
`consumer.py --quotes` → PostgreSQL (quotes, book_snapshots, order_books) → api.py."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import free_port, query, run_script, start_script, wait_for
from tests.integration.test_api import call, serve_api
from tests.integration.test_ingest import START, stop_gracefully
from tradewatch import bus
from tradewatch.alerts import Alert, Deduplicator, book_alert
from tradewatch.book import OrderBook
from tradewatch.config import PROJECT_ROOT
from tradewatch.detect.book_rules import BookWatch
from tradewatch.events import Trade, iso_to_ms
from tradewatch.market.books import with_books
from tradewatch.market.simulator import MarketSimulator
from tradewatch.store import db, detections

SNAPSHOT_MS = 10_000          # BOOK_SNAPSHOT_SECONDS


def expected_run(seed: int, trades: int, rate: float, anomaly_rate: float = 0.0, settings=None
                 ) -> tuple[dict[str, OrderBook], set[tuple], set[tuple], list[Alert]]:
    """What the stage must store for the producer's run, worked out here from the simulator: each
    symbol's final book, a quote row for every message that changed a top of book, a snapshot row
    for the first message of each BOOK_SNAPSHOT_SECONDS slot of event time, and the book watch's
    alerts after the cooldowns of `settings`."""
    books: dict[str, OrderBook] = {}
    rebuilt: dict[str, OrderBook] = {}
    quotes, snapshots, n = set(), set(), 0
    watch, alerts = BookWatch(), []
    dedup = Deduplicator.from_settings(settings) if settings else None
    for event in with_books(MarketSimulator(rate=rate, seed=seed, start_ms=iso_to_ms(START)), 10, seed=seed,
                            books=books, anomaly_rate=anomaly_rate):
        if type(event) is Trade:
            n += 1
            if n == trades:
                break
            continue
        book = rebuilt.setdefault(event.symbol, OrderBook(event.symbol))
        before = None if book.stale else (book.top(), book.timestamp_ms // SNAPSHOT_MS)
        applied, found = watch.apply(book, event)
        assert applied
        alerts += [a for a in map(book_alert, found) if dedup and dedup.allow(a)]
        top = book.top()
        if before is None or top != before[0]:
            quotes.add((event.symbol, event.timestamp_ms, event.seq, top.bid, top.bid_size, top.ask, top.ask_size))
        if before is None or event.timestamp_ms // SNAPSHOT_MS > before[1]:
            bids, asks = book.depth(10)
            snapshots.add((event.symbol, event.timestamp_ms, event.seq, json.dumps([list(b) for b in bids]),
                           json.dumps([list(a) for a in asks])))
    return books, quotes, snapshots, alerts


def stored_quotes(settings) -> int:
    return query(settings, "SELECT count(*) FROM quotes")[0][0]


def caught_up(settings) -> bool:
    """The stage's stored position (it keeps its own, beside its books) at the end of the topic."""
    end = sum(end for _, end in bus.group_lag(settings, settings.quotes_group, settings.quotes_topic).values())
    return end > 0 and end == query(settings, "SELECT coalesce(sum(next_offset), 0) FROM stage_positions"
                                              " WHERE consumer_group = %s", (settings.quotes_group,))[0][0]


def test_the_stored_book_and_its_alerts_equal_the_simulators_after_kill_9s_mid_stream(settings, tmp_path):
    """The book, its quotes and snapshots, and the book watch's alerts (spoofing injected; a cooldown
    short enough that a symbol alerts more than once in the run) come out as one unbroken run's."""
    settings = settings.with_overrides(alert_cooldown_high_seconds=2.0)
    trades = 4000
    # ~10 s of book messages at 400 trades/s: the three kills below come while they flow
    producer = start_script(settings, "producer.py", "--book", "--count", str(trades), "--rate", "400", "--seed", "5",
                            "--start", START, "--book-anomaly-rate", "0.01", log=tmp_path / "producer.log")
    log = tmp_path / "quotes.log"
    kills = 0
    while kills < 3:
        stage = start_script(settings, "consumer.py", "--quotes", log=log)
        before = stored_quotes(settings)
        # (on a slow machine the feed may have ended and the last run stored it all: no progress to wait for)
        wait_for(lambda: stored_quotes(settings) > before or (producer.poll() is not None and caught_up(settings)),
                 timeout=90, message="progress after a (re)start")
        stage.kill()                     # SIGKILL: no last checkpoint, no offset commit
        stage.wait()
        kills += 1
    assert producer.wait(timeout=120) == 0
    stage = start_script(settings, "consumer.py", "--quotes", log=log)
    wait_for(lambda: caught_up(settings) and query(settings, "SELECT 1 FROM stage_health WHERE pid = %s"
                                                             " AND state = 'running'", (stage.pid,)),
             timeout=120, message="the stage running, its position at the end of the topic")
    wait_for(lambda: query(settings, "SELECT count(*) FROM alerts WHERE published_at IS NULL") == [(0,)],
             message="the stage's alerts published")
    assert stop_gracefully(stage) == 0

    books, quotes, snapshots, alerts = expected_run(5, trades, 400.0, 0.01, settings)
    stored = query(settings, "SELECT symbol, seq, stale, gaps, bids::text, asks::text FROM order_books")
    levels = {s: [json.dumps([list(x) for x in side]) for side in b.depth(99)] for s, b in books.items()}
    assert {row[0]: row[1:] for row in stored} == {s: (b.seq, False, 0, *levels[s]) for s, b in books.items()}, \
        "each stored book is the simulator's, level for level"
    rows = query(settings, "SELECT symbol, (extract(epoch FROM ts) * 1000)::bigint, seq, bid, bid_size, ask, ask_size"
                           " FROM quotes")
    assert len(rows) == len(set(rows)) and set(rows) == quotes, "every change of a top of book, once"
    assert len(quotes) > 3 * trades
    rows = query(settings, "SELECT symbol, (extract(epoch FROM ts) * 1000)::bigint, seq, bids::text, asks::text"
                           " FROM book_snapshots")
    assert set(rows) == snapshots and len(snapshots) >= 10

    stored = query(settings, "SELECT alert_id, alert_type, severity, message, evidence, source FROM alerts")
    assert len(alerts) >= 15 and {a.alert_type for a in alerts} == {"SPOOFING"}
    assert sorted(stored) == sorted((a.alert_id, a.alert_type, a.severity, a.message, a.evidence, "quotes")
                                    for a in alerts), "each alert of an unbroken run, once, with its evidence"
    # each stage's outboxes deliver their own: the detector's (trades partitions) never sends these
    query(settings, "UPDATE alerts SET published_at = NULL")
    every = list(range(settings.trades_partitions))
    conn = db.connect(settings)
    with conn.cursor() as cur:
        assert detections.unpublished_alerts(cur, every, 1000, "detector") == []
        assert {a.alert_id for a in detections.unpublished_alerts(cur, every, 1000, "quotes")} == \
            {a.alert_id for a in alerts}
    conn.close()
    assert query(settings, "SELECT count(*) FROM dead_letters")[0][0] == 0
    assert "Traceback" not in log.read_text()


def message(kind: str, seq: int, prev: int | None, bids, asks, ms: int) -> bytes:
    return json.dumps({"schema_version": 1, "symbol": "ACME", "exchange": "TEST", "timestamp_ms": ms, "type": kind,
                       "seq": seq, "prev_seq": prev, "bids": bids, "asks": asks}).encode()


def test_bad_messages_are_dead_lettered_a_gap_is_counted_and_the_api_serves_the_book(settings, tmp_path):
    t = iso_to_ms(START)
    sent = [
        message("snapshot", 10, None, [[10.0, 5], [9.9, 8], [9.8, 9]], [[10.1, 4], [10.2, 6]], t),
        b"not json",
        message("update", 11, 10, [[10.0, 2]], [], t + 1),
        message("snapshot", 12, None, [[10.0, 1]], [[9.0, 1]], t + 2),          # crossed: refused
        message("update", 14, 13, [[9.9, 0]], [], t + 3),                      # seq 12 and 13 never came: a gap
        message("update", 15, 14, [[9.7, 1]], [], t + 4),                      # stale: not applied
    ]
    publisher = bus.publisher(settings)
    bus.ensure_topic(settings, settings.quotes_topic, settings.trades_partitions)
    for value in sent:
        publisher.send(settings.quotes_topic, b"ACME", value)
    assert publisher.flush(30)
    stage = start_script(settings, "consumer.py", "--quotes", log=tmp_path / "quotes.log")
    wait_for(lambda: query(settings, "SELECT stale, gaps FROM order_books") == [(True, 1)], message="the gap")
    reasons = sorted(r for (r,) in query(settings, "SELECT reason FROM dead_letters WHERE topic = %s",
                                         (settings.quotes_topic,)))
    assert len(reasons) == 2 and reasons[0].startswith("not JSON") and "snapshot is crossed" in reasons[1]
    assert "sequence gap (update 14 follows 13, not 11)" in (tmp_path / "quotes.log").read_text()

    publisher.send(settings.quotes_topic, b"ACME", message("snapshot", 20, None, [[10.0, 3], [9.9, 8]],
                                                           [[10.1, 4], [10.3, 1]], t + 5))
    assert publisher.flush(30)
    publisher.close()
    wait_for(lambda: query(settings, "SELECT stale, seq FROM order_books") == [(False, 20)], message="rebuilt")
    assert query(settings, "SELECT seq, bid, bid_size, ask FROM quotes ORDER BY seq") == [
        (10, 10.0, 5.0, 10.1), (11, 10.0, 2.0, 10.1), (20, 10.0, 3.0, 10.1)], "no quote while the book was stale"
    assert stop_gracefully(stage) == 0

    api, base = serve_api(settings.with_overrides(api_port=free_port()), tmp_path / "api.log")
    try:
        status, book = call(base, "/orderbook/ACME", depth=1)
        assert status == 200
        assert (book["bids"], book["asks"], book["seq"], book["stale"], book["gaps"]) == ([[10.0, 3]], [[10.1, 4]], 20,
                                                                                          False, 1)
        assert abs(book["imbalance"] - (3 - 4) / 7) < 1e-12
        status, quote = call(base, "/quotes/ACME")
        assert status == 200 and (quote["bid"], quote["ask"], quote["bid_size"]) == (10.0, 10.1, 3)
        assert abs(quote["spread"] - 0.1) < 1e-9 and abs(quote["mid"] - 10.05) < 1e-9
        assert call(base, "/orderbook/ACME")[1]["bids"] == [[10.0, 3], [9.9, 8]]
        status, missing = call(base, "/orderbook/NOPE")
        assert status == 404 and "no order book for 'NOPE'" in missing["detail"]
        assert call(base, "/orderbook/ACME", depth=0)[0] == 422
        assert call(base, "/quotes/acme%3B")[0] == 422
    finally:
        api.terminate()
        api.wait(timeout=30)


def test_quotes_and_snapshots_past_their_retention_are_archived_and_dropped(settings, tmp_path):
    """RETENTION_DAYS_QUOTES: older days of both tables go to the Parquet archive, every row once."""
    from datetime import datetime, timedelta, timezone

    from tests.integration.test_maintain import archived_ids
    from tradewatch.store import books as store, db

    settings = settings.with_overrides(tradewatch_home=str(tmp_path / "home"), retention_days_quotes=1)
    day0 = datetime.now(timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0) - timedelta(days=6)
    start = int(day0.timestamp() * 1000)
    hours = range(0, 5 * 24, 3)          # five days, a row every three hours
    conn = db.connect(settings)
    with conn.cursor() as cur:
        store.write_quotes(cur, [("ACME", start + h * 3_600_000, h, 10.0, 1.0, 10.1, 2.0) for h in hours])
        store.write_snapshots(cur, [("ACME", start + h * 3_600_000, h, [[10.0, 1.0]], [[10.1, 2.0]]) for h in hours])
    conn.commit()
    conn.close()
    out = subprocess.run([sys.executable, "-m", "tradewatch", "maintain"], cwd=PROJECT_ROOT, capture_output=True,
                         env={**os.environ, **settings.as_env()}, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    for table in ("quotes", "book_snapshots"):
        kept = [s for (s,) in query(settings, f"SELECT seq FROM {table}")]
        archived = archived_ids(settings, table, "seq")
        assert sorted(kept + archived) == list(hours) and not set(kept) & set(archived), table
        # the newest row is on day five at 21:00: a day goes once it ended a day before that
        assert min(kept) == 3 * 24, table


def recorded_day(tmp_path, seed: int = 3) -> tuple[list[list], list[list]]:
    """A trades file without sides and its quotes file (three symbols, twenty minutes, ticks of a cent):
    each quote changes its symbol's book; each trade is at its moment's bid or ask."""
    import random
    rng = random.Random(seed)
    t0 = iso_to_ms(START)
    state = {s: [round(rng.uniform(20, 200), 2), 3] for s in ("AAA", "BBB", "CCC")}  # bid, spread in ticks
    quotes, trades, last = [], [], {}
    for n in range(4_500):
        symbol = rng.choice(sorted(state))
        bid, ticks = state[symbol]
        bid, ticks = round(bid + rng.choice((-0.01, 0, 0.01)), 2), max(1, ticks + rng.choice((-1, 0, 1)))
        state[symbol] = [bid, ticks]
        row = [t0 + n * 266, symbol, bid, rng.randint(1, 9) * 100, round(bid + ticks / 100, 2), rng.randint(1, 9) * 100]
        if last.get(symbol) and last[symbol][2:] == row[2:]:
            row[3] += 1                                  # every row changes its book
        quotes.append(row)
        last[symbol] = row
        if rng.random() < 0.15:                          # a trade in the same millisecond or after
            side = rng.choice(("buy", "sell"))
            trades.append([f"T{n}", row[0] + rng.choice((0, 100)), symbol, row[4] if side == "buy" else row[2],
                           rng.randint(1, 5) * 10, side])
    header = "timestamp,symbol,bid,bid_size,ask,ask_size\n"
    (tmp_path / "quotes.csv").write_text(header + "".join(",".join(map(str, q)) + "\n" for q in quotes))
    (tmp_path / "trades.csv").write_text("trade_id,timestamp,symbol,price,quantity\n" + "".join(
        f"{t[0]},{t[1]},{t[2]},{t[3]},{t[4]}\n" for t in trades))        # epoch ms, no side column
    return quotes, trades


def test_a_recorded_day_and_its_quotes_replay_into_trades_with_their_quotes_and_the_book(settings, tmp_path):
    """`producer.py --replay trades.csv --replay quotes.csv --book`: every quote is in `quotes` with its
    seq, the stored books are the last quotes, and each stored trade carries the quote of its moment
    and its side read from it (the file has none)."""
    import bisect
    quotes, trades = recorded_day(tmp_path)
    stages = [start_script(settings, "consumer.py", log=tmp_path / "consumer.log"),
              start_script(settings, "consumer.py", "--quotes", log=tmp_path / "quotes.log")]
    result = run_script(settings, "producer.py", "--replay", str(tmp_path / "trades.csv"), "--replay",
                        str(tmp_path / "quotes.csv"), "--book", "--speed", "max")
    assert f"replayed {len(trades):,} trades and {len(quotes):,} quotes" in result.stderr
    wait_for(lambda: stored_quotes(settings) == len(quotes) and query(settings, "SELECT count(*) FROM trades")[0][0]
             == len(trades), timeout=120, message="every quote and trade stored")
    assert [stop_gracefully(stage) for stage in stages] == [0, 0]

    seqs: dict[str, int] = {}
    expected = set()
    for ms, symbol, bid, bid_size, ask, ask_size in quotes:
        seqs[symbol] = seqs.get(symbol, 0) + 1
        expected.add((symbol, ms, seqs[symbol], bid, bid_size, ask, ask_size))
    rows = query(settings, "SELECT symbol, (extract(epoch FROM ts) * 1000)::bigint, seq, bid, bid_size, ask, ask_size"
                           " FROM quotes")
    assert set(rows) == expected and len(rows) == len(quotes)
    books = query(settings, "SELECT symbol, seq, stale, gaps, bids::text, asks::text FROM order_books")
    final = {q[1]: q for q in quotes}
    assert {b[0]: b[1:] for b in books} == {
        s: (seqs[s], False, 0, f"[[{q[2]}, {float(q[3])}]]", f"[[{q[4]}, {float(q[5])}]]") for s, q in final.items()}
    times = {s: [q[0] for q in quotes if q[1] == s] for s in final}
    by_symbol = {s: [q for q in quotes if q[1] == s] for s in final}
    stored = {r[0]: r[1:] for r in query(settings, "SELECT trade_id, bid, ask, side FROM trades")}
    for trade_id, ms, symbol, price, _, side in trades:
        quote = by_symbol[symbol][bisect.bisect_right(times[symbol], ms) - 1]
        assert stored[trade_id] == (quote[2], quote[4], side), trade_id
    assert query(settings, "SELECT count(*) FROM dead_letters")[0][0] == 0
    assert query(settings, "SELECT count(*) FROM book_snapshots")[0][0] == len({(q[1], q[0] // SNAPSHOT_MS)
                                                                               for q in quotes})
