"""Fuzz: 100,000 generated messages — random bytes, truncated and mutated JSON, every field with a
wrong type, huge numbers, NaN/Infinity spellings, control and non-BMP characters, skewed
timestamps — mixed with valid trades, through the real consumer, aggregator and detector on the
real broker and database. Every message ends in exactly one of `trades` or `dead_letters` (with a
reason), no stage exits, and every valid trade is stored field for field."""
from __future__ import annotations

import json
import random
import signal
import time
from collections import Counter

from tests.conftest import query, start_script, wait_for
from tradewatch import bus
from tradewatch.events import EARLIEST_TIMESTAMP_MS, InvalidTrade, Trade, parse_trade

N = 100_000
SEED = 20261124
SYMBOL_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._/^=-"
ID_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._:/+=@#~-"
PRINTABLE = "".join(chr(c) for c in range(0x20, 0x7f))            # incl. backslash and quotes
HOSTILE_CHARS = ["\x00", "\t", "\n", "\r", "\x1b", "\x7f", "\x85", "\u2028", "\ud800", "\udfff", "\U0001F4A5",
                 "\U0010FFFF", "\ufeff", "é"]
_NOT_TEXT, _NOT_NUMBER = [None, True, [], {}, 12, 1.5], [None, True, [], {}, "12", "x"]
WRONG_TYPES = {"schema_version": [None, True, "1", 1.5, []], "trade_id": _NOT_TEXT, "symbol": _NOT_TEXT,
               "timestamp_ms": [None, True, 1.5e12, "1767225600000", []], "price": _NOT_NUMBER,
               "quantity": _NOT_NUMBER, "side": [*_NOT_TEXT, "BUY"], "exchange": _NOT_TEXT}
NUMBER_SPELLINGS = ["NaN", "-NaN", "Infinity", "-Infinity", "1e999", "-1e999", "1" + "0" * 400, "0", "-0.0", "1e300",
                    "1e-400", '"12.5"', "true", "null", "[]", "{}", "0x10", "+1", ".5", "1.", "01"]


def valid_trade(rng: random.Random, n: int, now_ms: int) -> Trade:
    text = lambda chars, k: "".join(rng.choice(chars) for _ in range(rng.randint(1, k)))   # noqa: E731
    bid = rng.choice([None, rng.uniform(1e-6, 1e6)])
    ask = None if bid is None else rng.choice([None, bid * (1 + rng.random() / 100)])
    return Trade(
        trade_id=f"v{n}-{text(ID_CHARS, 20)}", symbol=text(SYMBOL_CHARS, 20),
        timestamp_ms=rng.choice([rng.randint(EARLIEST_TIMESTAMP_MS, now_ms), now_ms + rng.randint(-5_000, 200_000)]),
        price=rng.choice([rng.uniform(1e-8, 10.0), rng.uniform(1, 1e9), 10 ** rng.uniform(-300, 12)]),
        quantity=rng.choice([rng.uniform(1e-8, 1), float(rng.randint(1, 10**6)), 10 ** rng.uniform(-300, 15)]),
        side=rng.choice(["buy", "sell", "unknown"]), exchange=text(PRINTABLE, 16), bid=bid, ask=ask,
        condition=rng.choice([None, text(PRINTABLE, 32)]),
        injected_anomaly=rng.choice([None, None, None, "price_spike", "flash_crash"]))


def hostile(rng: random.Random, base: Trade, now_ms: int) -> tuple[bytes | None, str]:
    """One message that must not become a trade, and its kind ('maybe' when a mutation may leave
    it valid by chance)."""
    event = json.loads(base.to_json_bytes())
    kind = rng.randrange(10)
    field = rng.choice(list(event))
    if kind == 0:
        return bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 200))), "maybe"
    if kind == 1:
        raw = base.to_json_bytes()
        return raw[:rng.randrange(len(raw))], "truncated"
    if kind == 2:
        raw = bytearray(base.to_json_bytes())
        for _ in range(rng.randint(1, 4)):
            raw[rng.randrange(len(raw))] = rng.getrandbits(8)
        return bytes(raw), "maybe"
    if kind == 3:                       # a required field with a wrong type
        field = rng.choice(list(WRONG_TYPES))
        event[field] = rng.choice(WRONG_TYPES[field])
        return json.dumps(event).encode(), "wrong type"
    if kind == 4:                       # number spellings that are not finite positive numbers
        spelling = rng.choice(NUMBER_SPELLINGS)
        raw = json.dumps({**event, "price": "__P__"}).replace('"__P__"', spelling)
        return raw.encode(), "maybe" if spelling in ("+1", ".5", "1.", "01") else "number"
    if kind == 5:                       # control, surrogate and non-BMP characters in a text field
        name = rng.choice(["trade_id", "symbol", "exchange", "condition"])
        value = str(event.get(name) or "C")
        at = rng.randrange(len(value) + 1)
        event[name] = value[:at] + rng.choice(HOSTILE_CHARS) + value[at:]
        return json.dumps(event, ensure_ascii=rng.random() < 0.5).encode("utf-8", "surrogatepass"), "character"
    if kind == 6:                       # timestamps: beyond the skew bound, seconds, microseconds
        event["timestamp_ms"] = rng.choice([now_ms + 301_000 + rng.randint(0, 10**9), now_ms // 1000,
                                            now_ms * 1000, -1, 0])
        return json.dumps(event).encode(), "timestamp"
    if kind == 7:
        return rng.choice([None, b"", b"null", b"[]", b"1e999", b'"trade"', b" " * 17_000]), "not an event"
    if kind == 8:                       # the same key twice: the last one wins in both decoders
        raw = base.to_json_bytes()
        return raw[:-1] + b',"price":-1}', "duplicate key"
    event["schema_version"] = rng.choice([0, 2, "1", 1.0, None])
    return json.dumps(event).encode(), "schema"


def generate(now_ms: int) -> tuple[list[tuple[bytes | None, bytes | None]], dict[int, Trade], dict[int, str]]:
    """N messages in order; the valid trades and the hostile kinds by position."""
    rng = random.Random(SEED)
    messages, valid, kinds = [], {}, {}
    for n in range(N):
        trade = valid_trade(rng, n, now_ms)
        if rng.random() < 0.3:
            valid[n] = trade
            messages.append((trade.symbol.encode(), trade.to_json_bytes()))
        else:
            raw, kinds[n] = hostile(rng, trade, now_ms)
            messages.append((rng.choice([None, b"AAPL", bytes([rng.getrandbits(8)])]), raw))
    return messages, valid, kinds


def test_every_fuzzed_message_ends_in_exactly_one_table_and_no_stage_exits(settings, tmp_path):
    now_ms = int(time.time() * 1000)
    messages, valid, kinds = generate(now_ms)
    topic = f"{settings.trades_topic}-fuzz"
    settings = settings.with_overrides(trades_topic=topic, trades_partitions=1, idle_timeout_seconds=3600.0)
    bus.ensure_topic(settings, topic, 1)         # one partition: the offset is the message's position
    publisher = bus.publisher(settings)
    for key, value in messages:
        publisher.send(topic, key, value)
    assert publisher.flush(120)
    publisher.close()

    logs = {name: tmp_path / f"{name}.log" for name in ("consumer", "aggregator", "detector")}
    stages = {"consumer": start_script(settings, "consumer.py", log=logs["consumer"]),
              "aggregator": start_script(settings, "aggregator.py", log=logs["aggregator"]),
              "detector": start_script(settings, "anomaly_detector.py", "run", log=logs["detector"])}

    def done(read) -> bool:
        died = [f"{name}: {logs[name].read_text()[-1500:]}" for name, p in stages.items() if p.poll() is not None]
        assert not died, f"a stage exited on fuzzed input: {died}"
        return read() == N

    wait_for(lambda: done(lambda: sum(c for c, _ in bus.group_lag(settings, settings.consumer_group, topic).values())),
             timeout=300, interval=1, message="the consumer to take every message")
    wait_for(lambda: done(lambda: query(settings, "SELECT coalesce(sum(next_offset), 0) FROM stage_positions"
                                                  " WHERE consumer_group = %s", (settings.aggregator_group,))[0][0]),
             timeout=300, interval=1, message="the aggregator to read every message")
    wait_for(lambda: done(lambda: sum(c for c, _ in bus.group_lag(settings, settings.detector_group, topic).values())),
             timeout=300, interval=1, message="the detector to read every message")
    for name, process in stages.items():
        assert process.poll() is None, f"{name} exited on fuzzed input"
        process.send_signal(signal.SIGTERM)
    for name, process in stages.items():
        assert process.wait(timeout=60) == 0, name
        assert "Traceback" not in logs[name].read_text(), f"{name} logged a traceback"

    stored = {offset: row for offset, *row in query(
        settings, "SELECT kafka_offset, trade_id, symbol, (extract(epoch FROM ts) * 1000)::bigint, price, quantity,"
                  " side, exchange, bid, ask, condition, injected_anomaly FROM trades")}
    dead = dict(query(settings, "SELECT kafka_offset, reason FROM dead_letters"))
    assert not stored.keys() & dead.keys(), "no message is in both tables"
    stored_ids = {row[0] for row in stored.values()}
    unaccounted = []
    for n, (_, raw) in enumerate(messages):
        if n in stored or n in dead:
            continue
        try:     # a mutation that happens to repeat a stored trade_id is that trade, stored once
            if parse_trade(raw, now_ms + 600_000).trade_id in stored_ids:
                continue
        except InvalidTrade:
            pass
        unaccounted.append(n)
    assert unaccounted == [], f"{len(unaccounted)} messages in neither table, e.g. offset {unaccounted[:5]}"
    assert all(reason.strip() for reason in dead.values())
    assert not [n for n, kind in kinds.items() if kind != "maybe" and n not in dead], "a hostile message became a trade"
    for n, t in valid.items():
        assert stored[n] == [t.trade_id, t.symbol, t.timestamp_ms, t.price, t.quantity, t.side, t.exchange,
                             t.bid, t.ask, t.condition, t.injected_anomaly], f"valid trade at offset {n}"
    by_reason = Counter(" ".join(reason.split()[:3]) for reason in dead.values())
    print(json.dumps({"messages": N, "valid": len(valid), "stored": len(stored), "dead_letters": len(dead),
                      "by_reason": dict(by_reason.most_common(25))}))
