"""`consumer.py --replay-dead-letters` on the real Kafka and PostgreSQL (issue 22, item 8): after a
fix (here: a clock-skew limit that was too strict), the dead letters it caused are validated again
and stored; those still invalid stay with their reason; nothing is ever stored twice."""
from __future__ import annotations

import re
import signal
import time

from tests.conftest import query, run_script, start_script, wait_for
from tradewatch import bus
from tradewatch.events import Trade


def test_replayed_dead_letters_are_stored_once_after_the_fix_and_the_rest_keep_their_reason(settings, tmp_path):
    strict = settings.with_overrides(max_clock_skew_seconds=60.0)
    now_ms = int(time.time() * 1000)
    ahead = [Trade(f"ahead-{i}", "AAPL", now_ms + 600_000 + i, 100.0, 1.0, "buy", "X") for i in range(5)]
    fine = [Trade(f"fine-{i}", "AAPL", now_ms - 1_000 + i, 100.0, 1.0, "buy", "X") for i in range(5)]
    again = Trade("fine-0", "AAPL", now_ms + 600_000, 100.0, 1.0, "buy", "X")  # a stored trade, re-sent ahead
    publisher = bus.publisher(strict)
    for t in [*fine, *ahead, again]:
        publisher.send(strict.trades_topic, b"AAPL", t.to_json_bytes())
    publisher.send(strict.trades_topic, b"AAPL", b"not json")
    assert publisher.flush(30)
    publisher.close()
    consumer = start_script(strict, "consumer.py", log=tmp_path / "consumer.log")
    wait_for(lambda: query(strict, "SELECT count(*) FROM dead_letters")[0][0] == 7
             and query(strict, "SELECT count(*) FROM trades")[0][0] == 5, timeout=60, message="5 stored, 7 dead")
    consumer.send_signal(signal.SIGTERM)
    assert consumer.wait(timeout=30) == 0

    # the limit unchanged: nothing to store, every reason the same
    out = run_script(strict, "consumer.py", "--replay-dead-letters", "--reason", "ahead of").stdout
    assert "0 stored" in out and "6 still invalid" in out, out
    assert query(strict, "SELECT count(*) FROM dead_letters")[0][0] == 7

    relaxed = settings.with_overrides(max_clock_skew_seconds=900.0)
    out = run_script(relaxed, "consumer.py", "--replay-dead-letters", "--reason", "ahead of",
                     "--since", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now_ms / 1000 - 3600))).stdout
    assert re.search(r"\b5 stored\b", out) and "1 already stored" in out and "0 still invalid" in out, out
    assert "aggregator.py --backfill" in out, "says how to bring the candles up to date"
    rows = query(relaxed, "SELECT trade_id, (extract(epoch FROM ts) * 1000)::bigint FROM trades ORDER BY 1")
    assert [r[0] for r in rows] == sorted(t.trade_id for t in [*fine, *ahead])
    assert dict(rows)["fine-0"] == fine[0].timestamp_ms, "the stored trade is kept, not replaced"
    assert [r[0][:9] for r in query(relaxed, "SELECT reason FROM dead_letters")] == ["not JSON:"]

    out = run_script(relaxed, "consumer.py", "--replay-dead-letters").stdout     # every reason, again
    assert "0 stored" in out and "1 still invalid" in out, out
    assert query(relaxed, "SELECT count(*) FROM trades")[0][0] == 10, "never doubled"


def test_a_dead_letter_keeps_at_most_64_kib_of_its_message_with_its_size_and_hash(settings):
    """A 1 MB message (Kafka's limit) is not stored whole: its first 64 KiB, its size and SHA-256."""
    import hashlib

    from tradewatch.store import db
    from tradewatch.store.writer import RAW_KEPT, DeadLetter, write_dead_letters
    huge = bytes(range(256)) * 4096                       # 1 MiB
    conn = db.connect(settings)
    with conn, conn.cursor() as cur:
        write_dead_letters(cur, [DeadLetter("trades", 0, 1, b"K" * 5000, huge, "payload too large " * 500, None)])
    conn.close()
    raw, size, digest, key, reason = query(settings, "SELECT raw, raw_bytes, raw_sha256, message_key, reason"
                                                     " FROM dead_letters")[0]
    assert bytes(raw) == huge[:RAW_KEPT] and RAW_KEPT == 65_536
    assert size == len(huge) and bytes(digest) == hashlib.sha256(huge).digest()
    assert len(bytes(key)) == 1024 and len(reason) == 2000


def test_ten_thousand_distinct_bad_messages_make_few_metric_series_and_few_log_lines(settings, tmp_path):
    """Through the real consumer: 10,000 distinct malformed messages are all dead-lettered, yet the
    dead-letter metric has at most one series per kind of reason and the log at most 20 lines a
    minute plus a summary (issue 24: every distinct bad message made a series and a WARNING)."""
    from tests.integration.test_metrics import scrape
    from tradewatch.prometheus import REASON_KINDS
    publisher = bus.publisher(settings)
    for i in range(10_000):
        raw = [b'{"schema_version": 1, "trade_id": "bad %d", "symbol": "A"}' % i, b"{%d" % i,
               b'{"schema_version": 1, "trade_id": "t%d", "symbol": "A", "timestamp_ms": 1767225600000, "price": 1,'
               b' "quantity": 1, "side": "hold%d", "exchange": "X"}' % (i, i)][i % 3]
        publisher.send(settings.trades_topic, b"K", raw)
    assert publisher.flush(60)
    publisher.close()
    log = tmp_path / "consumer.log"
    consumer = start_script(settings, "consumer.py", log=log)
    wait_for(lambda: query(settings, "SELECT count(*) FROM dead_letters")[0][0] == 10_000, timeout=120,
             message="10,000 dead letters")
    port = re.search(r"metrics of the consumer on http://([\d.:]+)/metrics", log.read_text()).group(1)

    def counted() -> dict[str, float]:      # counted once the transaction committed: a moment after the rows
        return {dict(labels)["reason"]: value for (name, labels), value in scrape(f"http://{port}/metrics").items()
                if name == "tradewatch_dead_letters_total"}
    wait_for(lambda: sum(counted().values()) == 10_000, timeout=30, message="10,000 dead letters counted")
    series = set(counted())
    assert series and series <= {k for k, _ in REASON_KINDS} | {"other"}, series
    assert query(settings, "SELECT count(DISTINCT reason) FROM dead_letters")[0][0] > 6_000, "distinct reasons kept"
    consumer.send_signal(signal.SIGTERM)
    assert consumer.wait(timeout=60) == 0
    text = log.read_text()
    lines = text.count("WARNING tradewatch.consumer: dead letter ")
    assert 0 < lines <= 40, f"{lines} dead-letter lines"      # at most two minutes' worth
    assert "more dead letters in the last minute" in text, "the rest summed up"


def test_the_replay_leaves_the_quote_stages_dead_letters_alone(settings):
    """dead_letters also holds the quotes stage's (another topic, another message): validating those
    as trades again would overwrite their reason with a trade's."""
    from tradewatch.store import db
    from tradewatch.store.writer import DeadLetter, write_dead_letters
    conn = db.connect(settings)
    with conn, conn.cursor() as cur:
        write_dead_letters(cur, [DeadLetter(settings.quotes_topic, 0, 1, b"ACME", b'{"type": "snapshot"}',
                                            "snapshot is crossed: best bid 10 is not below best ask 9", None),
                                 DeadLetter(settings.trades_topic, 0, 1, b"ACME", b"not json", "not JSON: x", None)])
    conn.close()
    out = run_script(settings, "consumer.py", "--replay-dead-letters").stdout
    assert "0 stored" in out and "1 still invalid" in out, out
    assert query(settings, "SELECT topic, reason FROM dead_letters ORDER BY topic") == sorted([
        (settings.quotes_topic, "snapshot is crossed: best bid 10 is not below best ask 9"),
        (settings.trades_topic, "not JSON: Expecting value at line 1 column 1")])
