"""Which line of a batch is each symbol's newest (what `latest_trades` gets): the consumer finds it
as it decodes, write_batch from the COPY lines when not told; both order as PostgreSQL does (ts,
then trade_id in the C collation), escaped trade_ids included."""
from __future__ import annotations

import random

from tradewatch.bus import Message
from tradewatch.events import Trade
from tradewatch.stages.consumer import DeadLetterLog, IngestStats, _Batch
from tradewatch.store.writer import _unescape, copy_line, newest_lines


def batch(seed: int, n: int = 2_000) -> list[Trade]:
    rng = random.Random(seed)
    ids = ["a", "b", "a\\b", "a\tb", "Z", "ä", "a\nb"]
    return [Trade(f"{rng.choice(ids)}{rng.randrange(50)}", f"S{rng.randrange(7)}", 1_767_225_600_000 + rng.randrange(40) * 500,
                  10.0, 1.0, "buy", "X") for _ in range(n)]


def expected(trades: list[Trade], skip: set[int] = frozenset()) -> dict[str, int]:
    best: dict[str, int] = {}
    for i, t in enumerate(trades):
        if i in skip:
            continue
        j = best.get(t.symbol)
        if j is None or (t.timestamp_ms, t.trade_id.encode()) > (trades[j].timestamp_ms, trades[j].trade_id.encode()):
            best[t.symbol] = i
    return best


def test_newest_lines_orders_as_the_database_does():
    for seed in range(5):
        trades = batch(seed)
        lines = [copy_line(t, 0, i) for i, t in enumerate(trades)]
        assert sorted(newest_lines(lines)) == sorted(expected(trades).values())
        skip = set(expected(trades).values())      # refused rows: the next newest of each symbol
        assert sorted(newest_lines(lines, skip)) == sorted(expected(trades, skip).values())


def test_the_consumer_finds_the_same_lines_as_it_decodes():
    trades = batch(9)
    b = _Batch(IngestStats(), 10**12, DeadLetterLog())
    for n in range(0, len(trades), 300):
        b.add([Message("trades", 0, n + i, t.symbol.encode(), t.to_json_bytes(), t.timestamp_ms)
               for i, t in enumerate(trades[n:n + 300])], 1_767_225_600_000)
    assert len(b.lines) > 500 and len(b.newest) == 7
    assert sorted(i for *_, i in b.newest.values()) == sorted(newest_lines(b.lines))


def test_unescape_inverts_copy_escapes():
    for value in ("plain", "a\\b", "tab\there", "new\nline\r", "\\t literal"):
        line = copy_line(Trade(value, "S", 1_767_225_600_000, 1.0, 1.0, "buy", value), 0, 0)
        trade_id, *_, exchange = line.split("\t")[:7]
        assert _unescape(trade_id) == value and _unescape(exchange) == value
