"""Which row of a batch is each symbol's newest (what `latest_trades` gets): the consumer finds it
as it decodes, write_batch from the binary COPY rows when not told; both order as PostgreSQL does
(ts, then trade_id in the C collation), trade_ids with any characters included."""
from __future__ import annotations

import random
import struct
from datetime import datetime, timedelta, timezone

from tradewatch.bus import Message
from tradewatch.events import Trade
from tradewatch.stages.consumer import DeadLetterLog, IngestStats, _Batch
from tradewatch.store.writer import COLUMNS, copy_data, copy_row, latest_values, newest_rows


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


def test_newest_rows_orders_as_the_database_does():
    for seed in range(5):
        trades = batch(seed)
        rows = [copy_row(t, 0, i) for i, t in enumerate(trades)]
        assert sorted(newest_rows(rows)) == sorted(expected(trades).values())
        skip = set(expected(trades).values())      # refused rows: the next newest of each symbol
        assert sorted(newest_rows(rows, skip)) == sorted(expected(trades, skip).values())


def test_the_consumer_finds_the_same_lines_as_it_decodes():
    trades = batch(9)
    b = _Batch(IngestStats(), 10**12, DeadLetterLog())
    for n in range(0, len(trades), 300):
        b.add([Message("trades", 0, n + i, t.symbol.encode(), t.to_json_bytes(), t.timestamp_ms)
               for i, t in enumerate(trades[n:n + 300])], 1_767_225_600_000)
    assert len(b.rows) > 500 and len(b.newest) == 7
    assert sorted(i for *_, i in b.newest.values()) == sorted(newest_rows(b.rows))


def fields(row: bytes) -> list[bytes | None]:
    """A row of binary COPY read as PostgreSQL's documentation describes it."""
    (count,), at, found = struct.unpack_from("!h", row), 2, []
    for _ in range(count):
        (size,) = struct.unpack_from("!i", row, at)
        found.append(None if size == -1 else row[at + 4:at + 4 + size])
        at += 4 + max(size, 0)
    assert at == len(row)
    return found


def test_a_row_holds_every_column_in_the_binary_format():
    t = Trade("a\tb\\ä", "BTC/USDT", 1_767_225_600_123, 0.1 + 0.2, 1e-8, "sell", "ex\\x", None, 2.5,
              "@ T", "pump_and_dump")
    got = fields(copy_row(t, 3, 2**40))
    assert len(got) == len(COLUMNS.split(","))
    since_2000 = (datetime(2026, 1, 1, 0, 0, 0, 123_000, tzinfo=timezone.utc)
                  - datetime(2000, 1, 1, tzinfo=timezone.utc)) // timedelta(microseconds=1)
    assert got == [t.trade_id.encode(), b"BTC/USDT", struct.pack("!q", since_2000), struct.pack("!d", 0.1 + 0.2),
                   struct.pack("!d", 1e-8), b"sell", b"ex\\x", None, struct.pack("!d", 2.5), b"@ T",
                   struct.pack("!h", 1), b"pump_and_dump", struct.pack("!i", 3), struct.pack("!q", 2**40)]
    assert fields(copy_row(Trade("x", "S", 1_767_225_600_000, 1.0, 1.0, "buy", "X"), None, None))[7:] == \
        [None, None, None, struct.pack("!h", 1), None, None, None]
    data = copy_data([copy_row(t, 0, 0)] * 2)
    assert data.startswith(b"PGCOPY\n\xff\r\n\x00") and data.endswith(b"\xff\xff")


def test_latest_values_reads_a_row_back():
    t = Trade("id\n1", "S", 1_767_225_600_007, 12.5, 3.0, "buy", "tab\tx")
    assert latest_values(copy_row(t, 0, 0)) == (
        "S", datetime(2026, 1, 1, 0, 0, 0, 7_000, tzinfo=timezone.utc), "id\n1", 12.5, 3.0, "buy", "tab\tx")
