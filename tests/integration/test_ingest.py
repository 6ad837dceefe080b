"""Producer → real Kafka → consumer → real PostgreSQL."""
from __future__ import annotations

import gzip
import json
import os
import re
import signal
import time
from itertools import islice

import pytest

from tests.conftest import SHARED_DATA, query, run_script, start_script, wait_for
from tradewatch import bus, stack
from tradewatch.events import iso_to_ms
from tradewatch.market.simulator import MarketSimulator
from tradewatch.store import db

START = "2026-01-01T00:00:00Z"


def count(settings) -> int:
    return query(settings, "SELECT count(*) FROM trades")[0][0]


def stop_gracefully(process, timeout=30) -> int:
    process.send_signal(signal.SIGTERM)
    return process.wait(timeout=timeout)


@pytest.mark.parametrize("client", bus.CLIENTS)
def test_round_trip_field_for_field(settings, tmp_path, client):
    settings = settings.with_overrides(kafka_client=client)
    run_script(settings, "producer.py", "--count", "3000", "--rate", "max", "--seed", "11",
               "--anomaly-rate", "0.02", "--start", START)
    consumer = start_script(settings, "consumer.py", log=tmp_path / "consumer.log")
    wait_for(lambda: count(settings) == 3000, message="3000 rows")
    assert stop_gracefully(consumer) == 0

    expected = list(islice(MarketSimulator(seed=11, rate=1000.0, anomaly_rate=0.02, start_ms=iso_to_ms(START)), 3000))
    rows = query(settings, """
        SELECT trade_id, symbol, (extract(epoch FROM ts) * 1000)::bigint, price, quantity, side, exchange,
               bid, ask, condition, injected_anomaly, schema_version
        FROM trades ORDER BY trade_id""")
    assert rows == [(t.trade_id, t.symbol, t.timestamp_ms, t.price, t.quantity, t.side, t.exchange, t.bid,
                     t.ask, t.condition, t.injected_anomaly, t.schema_version)
                    for t in sorted(expected, key=lambda t: t.trade_id)]
    assert any(r[10] for r in rows), "some injected anomalies carry their label"


@pytest.mark.parametrize("client", bus.CLIENTS)
def test_exactly_once_when_the_consumer_is_killed_repeatedly(settings, tmp_path, client):
    settings = settings.with_overrides(kafka_client=client)
    total = 30_000
    producer = start_script(settings, "producer.py", "--count", str(total), "--rate", "1500", "--seed", "5",
                            "--start", START, log=tmp_path / "producer.log")
    log = tmp_path / "consumer.log"
    kills = 0
    while kills < 4 and count(settings) < total:
        consumer = start_script(settings, "consumer.py", "--batch-size", "500", log=log)
        before = count(settings)
        wait_for(lambda: count(settings) > before, timeout=90, message="progress after restart")
        time.sleep(0.3 + 0.4 * kills)
        consumer.kill()  # SIGKILL: no flush, no commit
        consumer.wait()
        kills += 1
    assert kills >= 3, "killed mid-stream at least three times"
    assert producer.wait(timeout=120) == 0
    consumer = start_script(settings, "consumer.py", log=log)
    wait_for(lambda: count(settings) == total, timeout=120, message=f"{total} rows")
    # this consumer running with every partition read and committed: what the killed ones left
    # uncommitted has been read again, so a double would be stored by now
    wait_for(lambda: query(settings, "SELECT 1 FROM stage_health WHERE pid = %s AND state = 'running'"
                                     " AND cardinality(partitions) > 0 AND lag = 0", (consumer.pid,))
             and all(c == end for c, end in bus.group_lag(settings, settings.consumer_group,
                                                          settings.trades_topic).values()),
             timeout=60, message="the last consumer at the end of the topic, committed")
    assert stop_gracefully(consumer) == 0
    expected = {t.trade_id for t in islice(MarketSimulator(seed=5, rate=1500, start_ms=iso_to_ms(START)), total)}
    stored = query(settings, "SELECT trade_id, count(*) FROM trades GROUP BY trade_id")
    assert {trade_id for trade_id, _ in stored} == expected
    assert all(n == 1 for _, n in stored)
    assert query(settings, "SELECT count(DISTINCT (kafka_partition, kafka_offset)) FROM trades")[0][0] == total


def good(n: int) -> bytes:
    return json.dumps({"schema_version": 1, "trade_id": f"good-{n}", "symbol": "AAPL",
                       "timestamp_ms": iso_to_ms(START) + n, "price": 100.0 + n, "quantity": 10,
                       "side": "buy", "exchange": "NASDAQ"}).encode()


BAD_MESSAGES = {
    b"this is not json": "not JSON",
    b"\xc3\x28\xa0\xa1": "not UTF-8",
    b'{"schema_version": 1, "trade_id": "x1", "symbol": "AAPL"}': "missing field 'timestamp_ms'",
    good(0).replace(b'"price": 100.0', b'"price": "100"'): "field 'price' must be a number, got str",
    good(0).replace(b'"quantity": 10', b'"quantity": 0'): "field 'quantity' must be > 0",
    good(0).replace(b'"price": 100.0', b'"price": -3'): "field 'price' must be > 0",
    good(0).replace(b'"price": 100.0', b'"price": NaN'): "field 'price' must be finite",
    good(0).replace(b'"quantity": 10', b'"quantity": Infinity'): "field 'quantity' must be finite",
    good(0).replace(b'"schema_version": 1', b'"schema_version": 99'): "unknown schema_version 99",
    good(0).replace(b"1767225600000", b"1767225600"): "before 1990-01-01",
    good(0).replace(b"1767225600000", b"1767225600000000"): "microseconds sent instead of milliseconds?",
    b'{"padding": "' + b"x" * 20_000 + b'"}': "exceeds the 16384-byte limit",
    b"[]": "expected a JSON object",
    # hostile values that once halted ingestion or slipped through
    good(0).replace(b'"trade_id": "good-0"', b'"trade_id": "nul\\u0000id"'): "field 'trade_id' contains a NUL character",
    good(0).replace(b'"symbol": "AAPL"', b'"symbol": "AAPL\\n"'): "field 'symbol' contains the control character",
    # one bad clock: 23 h ahead of the moment Kafka received it (the old rule allowed a day)
    good(0).replace(b"1767225600000", str(int(time.time() * 1000) + 23 * 3_600_000).encode()):
        "h ahead of the time the message was sent",
    good(0).replace(b'"exchange": "NASDAQ"', b'"exchange": "NAS\\u001bDAQ"'): "control character U+001B",
    good(0).replace(b'"trade_id": "good-0"', b'"trade_id": "good 0; DROP TABLE trades"'): "has characters outside",
    good(0).replace(b'"exchange": "NASDAQ"', b'"exchange": "\\ud83d"'): "a lone surrogate U+D83D",
    good(0).replace(b'"price": 100.0', b'"price": 1' + b"0" * 400): "field 'price' must be finite",
}


def test_bad_messages_land_in_dead_letters_and_good_ones_around_them_are_stored(settings, tmp_path):
    publisher = bus.publisher(settings)
    sent_bad = []
    for n, raw in enumerate(BAD_MESSAGES, start=1):
        publisher.send(settings.trades_topic, b"AAPL", good(n))
        publisher.send(settings.trades_topic, b"AAPL", raw)
        sent_bad.append(raw)
    publisher.send(settings.trades_topic, b"AAPL", good(999))
    publisher.flush()
    publisher.close()

    consumer = start_script(settings, "consumer.py", log=tmp_path / "consumer.log")
    wait_for(lambda: query(settings, "SELECT count(*) FROM dead_letters")[0][0] == len(BAD_MESSAGES),
             message="all dead letters")
    wait_for(lambda: count(settings) == len(BAD_MESSAGES) + 1, message="good rows")
    assert consumer.poll() is None, "the consumer keeps running after bad input"
    assert stop_gracefully(consumer) == 0

    letters = {bytes(raw): (reason, topic, partition, offset) for raw, reason, topic, partition, offset in query(
        settings, "SELECT raw, reason, topic, kafka_partition, kafka_offset FROM dead_letters")}
    for raw, reason in BAD_MESSAGES.items():
        assert reason in letters[raw][0], (raw[:40], letters[raw][0])
        assert letters[raw][1] == settings.trades_topic and letters[raw][3] >= 0
    stored = {r[0] for r in query(settings, "SELECT trade_id FROM trades")}
    assert stored == {f"good-{n}" for n in range(1, len(BAD_MESSAGES) + 1)} | {"good-999"}


def test_spy_replay_stores_every_trade_with_its_event_timestamp(settings, tmp_path):
    spy = SHARED_DATA / "lean" / "spy_20131007_trades.csv.gz"
    consumer = start_script(settings, "consumer.py", log=tmp_path / "consumer.log")
    run_script(settings, "producer.py", "--replay", str(spy), "--speed", "max", timeout=600)
    wait_for(lambda: count(settings) == 250_601, timeout=300, message="all SPY trades")
    assert stop_gracefully(consumer) == 0
    with gzip.open(spy, "rt") as handle:
        next(handle)
        rows = [line.split(",") for line in handle]
    expected_ms = sum(iso_to_ms(r[1]) for r in rows)
    (n, ms_sum, qty, first_ts), = query(settings, """
        SELECT count(*), sum((extract(epoch FROM ts) * 1000)::bigint), sum(quantity),
               min(ts) FILTER (WHERE trade_id = 'SPY-20131007-0000001')
        FROM trades WHERE symbol = 'SPY'""")
    assert n == len(rows) and int(ms_sum) == expected_ms
    assert qty == sum(float(r[4]) for r in rows)
    assert first_ts.isoformat() == "2013-10-07T08:00:00.464000+00:00"


def test_a_replay_file_damaged_further_in_sends_the_trades_before_the_damage_and_says_where(settings, tmp_path):
    """Replay streams a file as it sends it (memory holds REORDER_ROWS rows, not the file), so damage
    past the rows read ahead is found after sending began: the producer stops there, says where and
    how many trades went, exits 2, and exactly those trades are stored — the first rows, in order."""
    import subprocess
    import sys

    from tradewatch.config import PROJECT_ROOT
    from tradewatch.market.replay import REORDER_ROWS
    rows = "".join(f"2024-01-02T{10 + n // 3600}:{n // 60 % 60:02d}:{n % 60:02d}Z,ABC,{10 + n % 7},1\n"
                   for n in range(3 * REORDER_ROWS))
    whole = gzip.compress(("timestamp,symbol,price,quantity\n" + rows).encode())
    path = tmp_path / "cut.csv.gz"
    path.write_bytes(whole[:len(whole) * 3 // 4])
    consumer = start_script(settings, "consumer.py", log=tmp_path / "consumer.log")
    result = subprocess.run([sys.executable, "producer.py", "--replay", str(path), "--speed", "max"], cwd=PROJECT_ROOT,
                            env={**os.environ, **settings.as_env()}, capture_output=True, text=True, timeout=300)
    error = result.stderr.strip().splitlines()[-1]
    found = re.search(r"^error: cannot replay .*cut.csv.gz: after line (\d+): the compressed file is cut short or "
                      r"damaged .*\(the ([\d,]+) trades before it are sent\)$", error)
    assert result.returncode == 2 and found, result.stderr[-2000:]
    line, sent = int(found[1]), int(found[2].replace(",", ""))
    assert REORDER_ROWS < sent == line - 1 - REORDER_ROWS
    wait_for(lambda: count(settings) == sent, timeout=120, message=f"{sent} trades stored")
    assert stop_gracefully(consumer) == 0
    assert {r[0] for r in query(settings, "SELECT trade_id FROM trades")} == \
        {f"cut.csv-{n}" for n in range(2, sent + 2)}


def test_two_consumers_in_one_group_share_the_partitions(settings, tmp_path):
    total = 12_000
    logs = [tmp_path / "c1.log", tmp_path / "c2.log"]
    consumers = [start_script(settings, "consumer.py", log=path) for path in logs]
    wait_for(lambda: query(settings, "SELECT count(*) FROM stage_health WHERE pid = ANY(%s) AND state = 'running'"
                                     " AND cardinality(partitions) > 0", ([c.pid for c in consumers],))[0][0] == 2,
             timeout=60, message="both consumers holding partitions before the data arrives")
    run_script(settings, "producer.py", "--count", str(total), "--rate", "max", "--seed", "9")
    wait_for(lambda: count(settings) == total, timeout=120, message=f"{total} rows")
    assert [stop_gracefully(c) for c in consumers] == [0, 0]
    handled = []
    for path in logs:
        last = [line for line in path.read_text().splitlines() if "partitions [" in line][-1]
        handled.append(set(json.loads(last.split("partitions ")[1])))
    assert all(handled), f"each consumer handled some partitions: {handled}"
    # key = symbol, so only the partitions that some symbol hashes to carry data
    with_data = {p for (p,) in query(settings, "SELECT DISTINCT kafka_partition FROM trades")}
    assert len(with_data) >= 3
    assert handled[0] | handled[1] == with_data


def test_sigterm_flushes_and_commits_what_was_stored(settings, tmp_path):
    producer = start_script(settings, "producer.py", "--rate", "1000", "--duration", "20", "--seed", "2")
    consumer = start_script(settings, "consumer.py", log=tmp_path / "consumer.log")
    wait_for(lambda: count(settings) > 2000, message="rows flowing")
    assert stop_gracefully(consumer) == 0
    stored = count(settings)
    committed = sum(c for c, _ in bus.group_lag(settings, settings.consumer_group, settings.trades_topic).values())
    assert committed == stored
    producer.send_signal(signal.SIGINT)
    assert producer.wait(timeout=30) == 0


def test_consumer_rides_out_a_postgres_outage_and_a_kafka_outage(settings, tmp_path):
    log = tmp_path / "consumer.log"
    consumer = start_script(settings, "consumer.py", log=log)
    run_script(settings, "producer.py", "--count", "2000", "--rate", "max", "--seed", "21")
    wait_for(lambda: count(settings) == 2000, message="first 2000")

    try:
        stack.stop_postgres(settings)
        run_script(settings, "producer.py", "--count", "2000", "--rate", "max", "--seed", "22")
        wait_for(lambda: "PostgreSQL unavailable" in log.read_text(), timeout=60,
                 message="the consumer to see the outage")
        stack.start_postgres(settings)
        wait_for(lambda: count(settings) == 4000, timeout=60, message="rows after the PostgreSQL outage")

        stack.stop_kafka(settings)
        wait_for(lambda: "cannot reach Kafka" in log.read_text(), timeout=60, message="the consumer to see the outage")
    finally:        # whatever failed, the next tests of this worker find their services up
        stack.start(settings)
    bus.wait_for_kafka(settings, 60)
    run_script(settings, "producer.py", "--count", "2000", "--rate", "max", "--seed", "23")
    wait_for(lambda: count(settings) == 6000, timeout=120, message="rows after the Kafka outage")
    assert consumer.poll() is None
    assert stop_gracefully(consumer) == 0
    text = log.read_text()
    assert text.count("PostgreSQL unavailable") == 1
    assert "cannot reach Kafka" in text
    assert "Traceback" not in text


def test_a_row_the_database_refuses_is_isolated_and_dead_lettered(settings, tmp_path):
    """Validation cannot know every rule of the database (here an operator's CHECK constraint):
    the batch is split until the refused row is found; it is dead-lettered with PostgreSQL's
    message, and the 200 trades around it are stored."""
    with db.connect(settings) as conn, conn.cursor() as cur:
        cur.execute("ALTER TABLE trades ADD CONSTRAINT sane_quantity CHECK (quantity < 1e9) NOT VALID")
    conn.close()
    try:
        publisher = bus.publisher(settings)
        for n in range(1, 201):
            publisher.send(settings.trades_topic, b"AAPL", good(n))
            if n in (77, 150):
                publisher.send(settings.trades_topic, b"AAPL", good(n).replace(b'"quantity": 10', b'"quantity": 5e9')
                               .replace(b'"good-', b'"huge-'))
        publisher.flush()
        publisher.close()
        consumer = start_script(settings, "consumer.py", log=tmp_path / "consumer.log")
        wait_for(lambda: count(settings) == 200 and query(settings, "SELECT count(*) FROM dead_letters")[0][0] == 2,
                 message="200 rows and 2 dead letters")
        assert consumer.poll() is None, "the consumer keeps running"
        assert stop_gracefully(consumer) == 0
    finally:
        with db.connect(settings) as conn, conn.cursor() as cur:
            cur.execute("ALTER TABLE trades DROP CONSTRAINT sane_quantity")
        conn.close()
    reasons = [r[0] for r in query(settings, "SELECT reason FROM dead_letters")]
    assert all(re.match(r'refused by PostgreSQL: ERROR:  new row for relation "trades(_p\d{8})?" violates check'
                        r' constraint "sane_quantity"', r) for r in reasons), reasons      # (a day partition)
    assert {r[0] for r in query(settings, "SELECT trade_id FROM trades")} == {f"good-{n}" for n in range(1, 201)}


def test_a_large_burst_at_max_rate_is_stamped_no_later_than_now(settings, tmp_path):
    """`producer.py --count 400000 --rate max` advances event time 1 ms a trade; started at "now" the
    last 100,000 trades were stamped more than 5 minutes ahead and dead-lettered by the clock-skew
    rule (found by bench/scale.py). The burst now ends at the time it is sent. Here 100,000 trades
    against a skew limit of one minute: stamped from "now", the last third would be dead letters."""
    settings = settings.with_overrides(max_clock_skew_seconds=60.0)
    before = time.time() * 1000
    run_script(settings, "producer.py", "--count", "100000", "--rate", "max", "--seed", "4")
    consumer = start_script(settings, "consumer.py", log=tmp_path / "consumer.log")
    wait_for(lambda: query(settings, "SELECT count(*) FROM trades")[0][0] + query(
        settings, "SELECT count(*) FROM dead_letters")[0][0] == 100_000, timeout=180, message="every trade handled")
    consumer.send_signal(signal.SIGTERM)
    assert consumer.wait(timeout=30) == 0
    assert query(settings, "SELECT count(*) FROM dead_letters")[0][0] == 0
    newest = query(settings, "SELECT extract(epoch FROM max(ts)) * 1000 FROM trades")[0][0]
    assert newest <= time.time() * 1000 and newest >= before - 10_000


def test_a_simulated_past_goes_first_then_trades_follow_the_clock(settings, tmp_path):
    """`producer.py --history 600` (what `make demo` does with an hour): ten minutes of simulated
    past reach Kafka in a few seconds, marked for the dashboard; then live trades stamped with the
    wall clock; the first anomaly is a live one. Through the consumer into PostgreSQL, every one."""
    home = tmp_path / "home"                  # the mark is the dashboard's business: not the suite's home
    began_ms = time.time() * 1000
    producer = start_script(settings.with_overrides(tradewatch_home=str(home)), "producer.py", "--rate", "20",
                            "--history", "600", "--first-anomaly-after", "1", "--duration", "4", "--seed", "3",
                            log=tmp_path / "producer.log")
    consumer = start_script(settings, "consumer.py", log=tmp_path / "consumer.log")
    assert producer.wait(timeout=120) == 0
    ended_ms = time.time() * 1000
    log = (tmp_path / "producer.log").read_text()
    sent = int(re.search(r"done: sent ([\d,]+) trades", log).group(1).replace(",", ""))
    wait_for(lambda: count(settings) == sent, timeout=60, message=f"{sent} rows")
    assert stop_gracefully(consumer) == 0

    mark = json.loads((home / "simulated-history.json").read_text())
    assert mark["until_ms"] - mark["from_ms"] == 600_000 and began_ms <= mark["until_ms"] <= began_ms + 10_000
    rows = query(settings, "SELECT (extract(epoch FROM ts) * 1000)::bigint, injected_anomaly FROM trades ORDER BY ts")
    past = [ts for ts, _ in rows if ts < mark["until_ms"]]
    live = [ts for ts, _ in rows if ts >= mark["until_ms"]]
    assert min(past) >= mark["from_ms"] and abs(len(past) - 12_000) < 450, len(past)     # 20/s, within 4 σ
    assert live and max(live) <= ended_ms, "live trades are stamped with the clock, never ahead of it"
    assert 40 <= len(live) <= 150, len(live)                                           # ~4 s at 20/s
    assert [ts >= mark["until_ms"] for ts, label in rows if label] == [True], "one anomaly, a live one"
    assert "of simulated history (600 s); now live" in log
