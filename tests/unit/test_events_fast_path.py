"""The msgspec fast paths of parse_trade (JSON bytes) and trade_from_dict (fields already read, a
replayed row) accept exactly what the plain-Python rules accept, and build the same Trade; whatever
they refuse gets the precise reason from the rules."""
from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tradewatch.events import (EARLIEST_TIMESTAMP_MS, InvalidTrade, _parse_slowly, _trade_by_the_rules, parse_trade,
                               trade_from_dict)

NOW_MS = 1_790_000_000_000

texts = st.one_of(st.sampled_from(["AAPL", "BTC-USD", "^GSPC", "aapl", "AAPL\n", "", "A" * 21, "x\x00y",
                                   "buy", "sell", "unknown", "BUY", "NASDAQ", "é" * 16, "é" * 17]),
                  st.text(max_size=70))
numbers = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-10, 10**20),
                    st.sampled_from([10**400, 0, -1, 1e-300, 1.5, True, None]))
any_value = st.one_of(texts, numbers, st.none(), st.booleans(), st.lists(st.integers(), max_size=2))
timestamps = st.one_of(st.integers(EARLIEST_TIMESTAMP_MS - 10, NOW_MS + 90_000_000),
                       st.sampled_from([1.5e12, "1700000000000", 2**63, -(2**63) - 1, 10**30]))
fields = {
    "schema_version": st.one_of(st.just(1), st.sampled_from([0, 2, 1.0, True, "1"])),
    "trade_id": st.one_of(texts, st.just("T" * 64), st.just("T" * 65)),
    "symbol": texts, "timestamp_ms": timestamps, "price": numbers, "quantity": numbers,
    "side": st.one_of(st.sampled_from(["buy", "sell", "unknown"]), texts),
    "exchange": texts, "bid": st.one_of(st.none(), numbers), "ask": st.one_of(st.none(), numbers),
    "condition": st.one_of(st.none(), texts), "injected_anomaly": st.one_of(
        st.none(), st.sampled_from(["price_spike", "flash_crash", "whale", ""])),
    "extra": any_value,
}


@st.composite
def events(draw):
    valid = {"schema_version": 1, "trade_id": "t-1", "symbol": "AAPL", "timestamp_ms": NOW_MS, "price": 101.5,
             "quantity": 3, "side": "buy", "exchange": "NASDAQ", "bid": 101.4, "ask": 101.6}
    for name in draw(st.sets(st.sampled_from(sorted(fields)), max_size=4)):
        if draw(st.booleans()):
            valid[name] = draw(fields[name])
        else:
            valid.pop(name, None)
    return json.dumps(valid).encode()


def outcome(parse, raw):
    try:
        return parse(raw, NOW_MS)
    except InvalidTrade as error:
        return f"invalid: {error}"


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(events())
def test_fast_path_agrees_with_the_rules(raw):
    assert outcome(parse_trade, raw) == outcome(_parse_slowly, raw)


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(events())
def test_the_fast_path_of_fields_already_read_agrees_with_the_rules(raw):
    fields = json.loads(raw)
    assert outcome(trade_from_dict, fields) == outcome(_trade_by_the_rules, fields)


def test_reasons_come_from_the_rules():
    raw = json.dumps({"schema_version": 1, "trade_id": "a\x00b", "symbol": "AAPL", "timestamp_ms": NOW_MS,
                      "price": 1, "quantity": 1, "side": "buy", "exchange": "X"}).encode()
    assert outcome(parse_trade, raw) == "invalid: field 'trade_id' contains a NUL character"
    raw = raw.replace(b"a\\u0000b", b"ok").replace(b'"price": 1', b'"price": 1' + b"0" * 400)
    assert outcome(parse_trade, raw).startswith("invalid: field 'price' must be finite")


def test_the_symbols_known_good_stay_bounded_and_a_bad_one_is_still_refused():
    """The fast path remembers the symbols and exchanges it found valid (a set lookup instead of a
    regex a message); a feed of ever-new symbols cannot grow that memory without bound."""
    from tradewatch.events import _symbol_ok

    def event(symbol: str) -> bytes:
        return json.dumps({"schema_version": 1, "trade_id": "t-1", "symbol": symbol, "timestamp_ms": NOW_MS,
                           "price": 1.5, "quantity": 2, "side": "buy", "exchange": "X"}).encode()
    for i in range(10_000):
        assert parse_trade(event(f"S{i}"), NOW_MS).symbol == f"S{i}"
    assert 0 < len(_symbol_ok.values) <= 4_096
    assert outcome(parse_trade, event("S1\n")).startswith("invalid: field 'symbol'")
    assert outcome(parse_trade, event("s1")).startswith("invalid: field 'symbol'")
