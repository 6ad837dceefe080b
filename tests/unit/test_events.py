import json

import pytest

from tradewatch.events import InvalidTrade, Trade, iso_to_ms, parse_trade

NOW_MS = iso_to_ms("2026-01-01T00:00:00Z")


def event(**changes):
    base = {"schema_version": 1, "trade_id": "t-1", "symbol": "AAPL", "timestamp_ms": NOW_MS - 1000,
            "price": 190.25, "quantity": 100, "side": "buy", "exchange": "NASDAQ",
            "bid": 190.24, "ask": 190.26}
    base.update(changes)
    return {k: v for k, v in base.items() if v is not ...}


def encode(data) -> bytes:
    return json.dumps(data).encode()


def test_round_trip_keeps_every_field():
    trade = Trade("t-9", "BTC-USD", NOW_MS, 95000.5, 0.0123, "sell", "COINBASE", 95000.0, 95001.0,
                  None, "price_spike")
    assert parse_trade(trade.to_json_bytes(), NOW_MS) == trade


def test_iso_timestamps_convert_to_epoch_milliseconds():
    assert iso_to_ms("2013-10-07T08:00:00.464Z") == 1381132800464
    assert iso_to_ms("2013-10-07T10:00:00.464+02:00") == 1381132800464


@pytest.mark.parametrize("raw, reason", [
    (b"\xff\xfe{}", "not UTF-8"),
    # a cut multi-byte character inside a string: msgspec raised UnicodeDecodeError and the consumer
    # died (found by the fuzz suite, tests/integration/test_fuzz.py)
    (b'{"schema_version":1,"trade_id":"ab\xf4"}', "not UTF-8: invalid continuation byte at byte 34"),
    (b"{not json", "not JSON"),
    (b"[1, 2]", "expected a JSON object"),
    (b"x" * 20000, "exceeds the 16384-byte limit"),
    (None, "empty message"),
    (encode(event(schema_version=2)), "unknown schema_version 2"),
    (encode(event(schema_version=...)), "missing field 'schema_version'"),
    (encode(event(price=...)), "missing field 'price'"),
    (encode(event(trade_id=...)), "missing field 'trade_id'"),
    (encode(event(price="190.25")), "field 'price' must be a number, got str"),
    (encode(event(quantity=True)), "field 'quantity' must be a number, got bool"),
    (encode(event(price=0)), "field 'price' must be > 0"),
    (encode(event(quantity=-5)), "field 'quantity' must be > 0"),
    (b'{"schema_version":1,"trade_id":"a","symbol":"X","timestamp_ms":1381132800464,"price":NaN,'
     b'"quantity":1,"side":"buy","exchange":"P"}', "field 'price' must be finite"),
    (b'{"schema_version":1,"trade_id":"a","symbol":"X","timestamp_ms":1381132800464,"price":1,'
     b'"quantity":Infinity,"side":"buy","exchange":"P"}', "field 'quantity' must be finite"),
    (encode(event(side="long")), "field 'side' must be one of buy, sell, unknown"),
    (encode(event(symbol="aapl!")), "has characters outside"),
    (encode(event(timestamp_ms=1381132800)), "before 1990-01-01 — seconds sent instead of milliseconds?"),
    (encode(event(timestamp_ms=1381132800464000)), "microseconds sent instead of milliseconds?"),
    (encode(event(timestamp_ms=NOW_MS + 23 * 3600_000)), "is 23.0 h ahead of the time the message was sent"),
    (encode(event(timestamp_ms=NOW_MS + 300_001)), "the clock-skew limit is 5.0 min"),
    (encode(event(trade_id="t\x00")), "field 'trade_id' contains a NUL character"),
    (encode(event(trade_id="t 1")), "field 'trade_id' 't 1' has characters outside"),
    (encode(event(trade_id="t\u0085")), "the control character U+0085"),
    (encode(event(exchange="NAS\x1bDAQ")), "field 'exchange' contains the control character U+001B"),
    (encode(event(exchange="B\u00f6rse")), "field 'exchange' contains the non-ASCII character U+00F6"),
    (b'{"schema_version":1,"trade_id":"a","symbol":"X","timestamp_ms":1381132800464,"price":1,'
     b'"quantity":1,"side":"buy","exchange":"P","condition":"\\ud800"}', "a lone surrogate U+D800"),
    (encode(event(condition="\U0001F4A5")), "the non-ASCII character U+1F4A5"),
    (encode(event(symbol="AAPL\n")), "field 'symbol' contains the control character U+000A"),
    (encode(event(timestamp_ms=1.5e12)), "must be an integer"),
    (encode(event(bid=191.0, ask=190.0)), "bid 191.0 is above ask 190.0"),
    (encode(event(injected_anomaly="meteor")), "is not one of"),
    (encode(event(price=1e300)), "field 'price' must be at most 1e+12, got 1e+300"),
    (encode(event(quantity=2e15)), "field 'quantity' must be at most 1e+15"),
])
def test_every_violation_has_a_precise_reason(raw, reason):
    with pytest.raises(InvalidTrade) as error:
        parse_trade(raw, NOW_MS)
    assert reason in str(error.value)


def test_the_skew_bound_is_measured_from_the_send_time_and_is_configurable():
    sent = NOW_MS
    assert parse_trade(encode(event(timestamp_ms=sent + 300_000)), sent).timestamp_ms == sent + 300_000
    with pytest.raises(InvalidTrade):
        parse_trade(encode(event(timestamp_ms=sent + 60_001)), sent, max_skew_ms=60_000)
    # a replay of an old file keeps working: its trades lie in the past of the send time
    assert parse_trade(encode(event(timestamp_ms=iso_to_ms("2013-10-07T13:30:00Z"))), sent)


def test_optional_fields_may_be_absent_and_unknown_fields_are_ignored():
    trade = parse_trade(encode(event(bid=..., ask=..., note="extra")), NOW_MS)
    assert trade.bid is None and trade.ask is None and trade.price == 190.25
