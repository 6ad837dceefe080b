"""The trade event: schema, validation and serialisation — the one place that defines them.

Wire format (Kafka topic `trades`, key = symbol, value = UTF-8 JSON object), schema_version 1:

    field             type            rule
    schema_version    int             must be 1
    trade_id          string          unique per trade, 1..64 of A-Z a-z 0-9 . _ - : / + = @ # ~
    symbol            string          1..20 of A-Z 0-9 . - _ / ^ =
    timestamp_ms      int             event time, UTC milliseconds since the epoch, from 1990-01-01
                                      to 9999-12-31, and at most MAX_CLOCK_SKEW_SECONDS (default
                                      300) after the moment the message was sent (its Kafka record
                                      timestamp, which a topic with producer timestamps leaves to
                                      the producer's clock)
    price             number          > 0 and <= 1e12 (so sums of price x quantity stay finite)
    quantity          number          > 0 and <= 1e15
    side              string          "buy" | "sell" | "unknown"
    exchange          string          1..16 printable ASCII characters (space to ~)
    bid, ask          number | null   optional quote; > 0 and <= 1e12, bid <= ask
    condition         string | null   optional sale-condition code (recorded data), 1..32
                                      printable ASCII characters
    injected_anomaly  string | null   ground-truth label of a simulated anomaly; stored in its
                                      own column and never read by any detector

Unknown extra fields are ignored, so a producer may add fields without a version bump. Every text
field is ASCII from a documented set: no control character (NUL above all: PostgreSQL text cannot
hold one), no lone surrogate, nothing a reader could mistake for a separator.

The clock-skew bound is measured against the record's own Kafka timestamp (not the reader's clock),
so every stage, and every re-read after a restart, makes the same decision about the same message.
A replay of an old file keeps working: its trades lie in the past. (A trade far ahead of the
*partition's* recent event time — one bad clock inside a replay — is the windows' business: the
aggregator holds it back until the next trade confirms the jump, see tradewatch/windows.py.)

Decoding has a fast path: msgspec decodes and type-checks a well-formed event in C. Anything it
refuses goes through the plain-Python validation below, which is the definition of every rule and
gives the precise reason (the fast path only ever accepts what the slow path accepts — a property
test checks the two agree).
"""
from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Annotated, Literal

import msgspec
import orjson

SCHEMA_VERSION = 1
SUPPORTED_SCHEMA_VERSIONS = frozenset({1})
MAX_EVENT_BYTES = 16 * 1024
SIDES = frozenset({"buy", "sell", "unknown"})
ANOMALY_LABELS = frozenset({"price_spike", "price_drop", "volume_spike", "flash_crash", "pump_and_dump"})
EARLIEST_TIMESTAMP_MS = 631152000000  # 1990-01-01T00:00:00Z
LATEST_TIMESTAMP_MS = 253_402_300_799_999       # 9999-12-31T23:59:59.999Z: the last day Python dates hold
MAX_CLOCK_SKEW_MS = 300_000          # default of the setting MAX_CLOCK_SKEW_SECONDS
_SYMBOL_PATTERN = r"\A[A-Z0-9._/^=-]{1,20}\Z"
_ID_PATTERN = r"\A[A-Za-z0-9._:/+=@#~-]{1,64}\Z"
_EXCHANGE_PATTERN = r"\A[ -~]{1,16}\Z"
_CONDITION_PATTERN = r"\A[ -~]{1,32}\Z"
_SYMBOL = re.compile(_SYMBOL_PATTERN)
_ID = re.compile(_ID_PATTERN)
_PRINTABLE_ASCII = re.compile(r"\A[ -~]*\Z")


class InvalidTrade(ValueError):
    """A message that is not a valid trade event; str(error) is the reason stored in dead_letters."""


@dataclass(slots=True)
class Trade:
    trade_id: str
    symbol: str
    timestamp_ms: int
    price: float
    quantity: float
    side: str
    exchange: str
    bid: float | None = None
    ask: float | None = None
    condition: str | None = None
    injected_anomaly: str | None = None
    schema_version: int = SCHEMA_VERSION

    @property
    def event_time(self) -> datetime:
        return datetime.fromtimestamp(self.timestamp_ms / 1000, tz=timezone.utc)

    def to_json_bytes(self) -> bytes:
        """The wire format: the fields above, in this order (orjson serialises the dataclass)."""
        if not (math.isfinite(self.price) and math.isfinite(self.quantity)
                and (self.bid is None or math.isfinite(self.bid)) and (self.ask is None or math.isfinite(self.ask))):
            raise ValueError(f"trade {self.trade_id}: prices and quantities must be finite numbers")
        return orjson.dumps(self)


MAX_PRICE, MAX_QUANTITY = 1e12, 1e15
_Price = Annotated[float, msgspec.Meta(gt=0, le=MAX_PRICE)]


class _Wire(msgspec.Struct, gc=False):
    """The fast path's view of the wire format (see the table above). The text fields' characters
    are checked by decode_trade: a `pattern` here ran Python's regex from C for each text field of
    each message (decode_trade took 2.0 us a message with them, 1.4 without; issue 39)."""
    schema_version: Literal[1]
    trade_id: str
    symbol: str
    timestamp_ms: Annotated[int, msgspec.Meta(ge=EARLIEST_TIMESTAMP_MS, le=LATEST_TIMESTAMP_MS)]
    price: _Price
    quantity: Annotated[float, msgspec.Meta(gt=0, le=MAX_QUANTITY)]
    side: Literal["buy", "sell", "unknown"]
    exchange: str
    bid: _Price | None = None
    ask: _Price | None = None
    condition: str | None = None
    injected_anomaly: Literal["price_spike", "price_drop", "volume_spike", "flash_crash", "pump_and_dump"] | None = None


class _Seen:
    """Whether a value of a field that repeats (symbol, exchange) matches `pattern`: a set lookup
    for the values seen before, the regex for a new one. Bounded: past 4,096 values it starts
    again (a feed of ever-new values only goes back to the regex)."""

    def __init__(self, pattern: str):
        self.match, self.values = re.compile(pattern).match, set()

    def __call__(self, value: str) -> bool:
        if value in self.values:
            return True
        if not self.match(value):
            return False
        if len(self.values) >= 4_096:
            self.values.clear()
        self.values.add(value)
        return True


_symbol_ok, _exchange_ok = _Seen(_SYMBOL_PATTERN), _Seen(_EXCHANGE_PATTERN)
_id_ok, _condition_ok = _ID.match, re.compile(_CONDITION_PATTERN).match
_decode_wire = msgspec.json.Decoder(_Wire).decode
_convert = msgspec.convert


def parse_trade(raw: bytes | None, sent_ms: int | None = None, max_skew_ms: int = MAX_CLOCK_SKEW_MS) -> Trade:
    """Decode and validate one message value; raise InvalidTrade with a precise reason. `sent_ms`:
    when the message was sent (its Kafka record timestamp; None = now)."""
    t = decode_trade(raw, sent_ms, max_skew_ms)
    if type(t) is Trade:
        return t
    return Trade(t.trade_id, t.symbol, t.timestamp_ms, t.price, t.quantity, t.side, t.exchange,
                 t.bid, t.ask, t.condition, t.injected_anomaly, t.schema_version)


def decode_trade(raw: bytes | None, sent_ms: int | None = None,
                 max_skew_ms: int = MAX_CLOCK_SKEW_MS) -> "Trade | _Wire":
    """parse_trade for hot paths that only read the fields: a valid event may come back as the
    decoder's own record (the same attribute names as Trade), saving a copy."""
    if raw is not None and len(raw) <= MAX_EVENT_BYTES:
        try:
            w = _decode_wire(raw)
        except (msgspec.DecodeError, ValueError):
            pass    # the slow path below says why (msgspec raises UnicodeDecodeError on some bad UTF-8)
        else:
            if _wire_ok(w, sent_ms, max_skew_ms):
                return w
    return _parse_slowly(raw, sent_ms, max_skew_ms)


def _wire_ok(w: _Wire, sent_ms: int | None, max_skew_ms: int) -> bool:
    """What the fast paths check beyond the types and ranges msgspec checked: the rules' other checks."""
    limit = (sent_ms if sent_ms is not None else int(time.time() * 1000)) + max_skew_ms
    return (w.timestamp_ms <= limit and math.isfinite(w.price) and math.isfinite(w.quantity)
            and (w.bid is None or math.isfinite(w.bid)) and (w.ask is None or math.isfinite(w.ask))
            and (w.bid is None or w.ask is None or w.bid <= w.ask) and bool(_id_ok(w.trade_id))
            and _symbol_ok(w.symbol) and _exchange_ok(w.exchange)
            and (w.condition is None or bool(_condition_ok(w.condition))))


def _parse_slowly(raw: bytes | None, sent_ms: int | None, max_skew_ms: int = MAX_CLOCK_SKEW_MS) -> Trade:
    if raw is None:
        raise InvalidTrade("empty message (null value)")
    if len(raw) > MAX_EVENT_BYTES:
        raise InvalidTrade(f"payload of {len(raw)} bytes exceeds the {MAX_EVENT_BYTES}-byte limit")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise InvalidTrade(f"not UTF-8: {error.reason} at byte {error.start}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise InvalidTrade(f"not JSON: {error.msg} at line {error.lineno} column {error.colno}") from None
    return _trade_by_the_rules(data, sent_ms, max_skew_ms)


def trade_from_dict(data: object, sent_ms: int | None = None, max_skew_ms: int = MAX_CLOCK_SKEW_MS) -> Trade:
    """A trade from fields already read (a replayed row): msgspec's checks and _wire_ok, as
    decode_trade's fast path (a fifth of the time); what they refuse gets the rules' precise reason."""
    if type(data) is dict:
        try:
            w = _convert(data, _Wire)
        except (msgspec.ValidationError, OverflowError, ValueError, TypeError):
            pass
        else:
            if _wire_ok(w, sent_ms, max_skew_ms):
                return Trade(w.trade_id, w.symbol, w.timestamp_ms, w.price, w.quantity, w.side, w.exchange,
                             w.bid, w.ask, w.condition, w.injected_anomaly, w.schema_version)
    return _trade_by_the_rules(data, sent_ms, max_skew_ms)


def _trade_by_the_rules(data: object, sent_ms: int | None = None, max_skew_ms: int = MAX_CLOCK_SKEW_MS) -> Trade:
    """Every check in plain Python, one at a time, each with its reason (the definition the fast paths agree with)."""
    if not isinstance(data, dict):
        raise InvalidTrade(f"expected a JSON object, got {type(data).__name__}")
    version = data.get("schema_version")
    if version is None:
        raise InvalidTrade("missing field 'schema_version'")
    if not _is_int(version) or version not in SUPPORTED_SCHEMA_VERSIONS:
        raise InvalidTrade(
            f"unknown schema_version {version!r} (supported: {sorted(SUPPORTED_SCHEMA_VERSIONS)})"
        )
    trade_id = _string(data, "trade_id", 64)
    if not _ID.match(trade_id):
        raise InvalidTrade(f"field 'trade_id' {_shown(trade_id)} has characters outside A-Z a-z 0-9 . _ - : / + = @ # ~")
    symbol = _string(data, "symbol", 20)
    if not _SYMBOL.match(symbol):
        raise InvalidTrade(f"field 'symbol' {_shown(symbol)} has characters outside A-Z 0-9 . - _ / ^ =")
    timestamp_ms = _timestamp(data, sent_ms if sent_ms is not None else int(time.time() * 1000), max_skew_ms)
    price = _positive_number(data, "price", MAX_PRICE)
    quantity = _positive_number(data, "quantity", MAX_QUANTITY)
    side = _string(data, "side", 8)
    if side not in SIDES:
        raise InvalidTrade(f"field 'side' must be one of buy, sell, unknown; got {side!r}")
    exchange = _string(data, "exchange", 16)
    bid = _optional_positive_number(data, "bid", MAX_PRICE)
    ask = _optional_positive_number(data, "ask", MAX_PRICE)
    if bid is not None and ask is not None and bid > ask:
        raise InvalidTrade(f"bid {bid} is above ask {ask}")
    condition = _optional_string(data, "condition", 32)
    label = _optional_string(data, "injected_anomaly", 32)
    if label is not None and label not in ANOMALY_LABELS:
        raise InvalidTrade(f"field 'injected_anomaly' {label!r} is not one of {sorted(ANOMALY_LABELS)}")
    return Trade(trade_id, symbol, timestamp_ms, price, quantity, side, exchange,
                 bid, ask, condition, label, version)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _string(data: dict, name: str, max_length: int) -> str:
    if name not in data or data[name] is None:
        raise InvalidTrade(f"missing field '{name}'")
    value = data[name]
    if not isinstance(value, str):
        raise InvalidTrade(f"field '{name}' must be a string, got {type(value).__name__}")
    if not value or len(value) > max_length:
        raise InvalidTrade(f"field '{name}' must have 1..{max_length} characters, got {len(value)}")
    if "\x00" in value:
        raise InvalidTrade(f"field '{name}' contains a NUL character")
    if not _PRINTABLE_ASCII.match(value):
        bad = next(c for c in value if not " " <= c <= "~")
        raise InvalidTrade(f"field '{name}' contains {_describe(bad)} (only printable ASCII is allowed)")
    return value


def _describe(char: str) -> str:
    code = ord(char)
    if code < 0x20 or 0x7f <= code <= 0x9f:
        return f"the control character U+{code:04X}"
    if 0xD800 <= code <= 0xDFFF:
        return f"a lone surrogate U+{code:04X}"
    return f"the non-ASCII character U+{code:04X}"


def _shown(value: str) -> str:
    """A value for a reason text: printable, never a raw control character."""
    return ascii(value)


def _optional_string(data: dict, name: str, max_length: int) -> str | None:
    return None if data.get(name) is None else _string(data, name, max_length)


def _number(data: dict, name: str) -> float:
    if name not in data or data[name] is None:
        raise InvalidTrade(f"missing field '{name}'")
    value = data[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidTrade(f"field '{name}' must be a number, got {type(value).__name__}")
    try:
        value = float(value)
    except OverflowError:      # an integer too large for a double
        raise InvalidTrade(f"field '{name}' must be finite, got an integer of {len(str(value))} digits") from None
    if not math.isfinite(value):
        raise InvalidTrade(f"field '{name}' must be finite, got {value}")
    return value


def _positive_number(data: dict, name: str, limit: float) -> float:
    value = _number(data, name)
    if value <= 0:
        raise InvalidTrade(f"field '{name}' must be > 0, got {value:g}")
    if value > limit:
        raise InvalidTrade(f"field '{name}' must be at most {limit:g}, got {value:g}")
    return value


def _optional_positive_number(data: dict, name: str, limit: float) -> float | None:
    return None if data.get(name) is None else _positive_number(data, name, limit)


def _timestamp(data: dict, sent_ms: int, max_skew_ms: int) -> int:
    if data.get("timestamp_ms") is None:
        raise InvalidTrade("missing field 'timestamp_ms'")
    value = data["timestamp_ms"]
    if not _is_int(value):
        raise InvalidTrade(f"field 'timestamp_ms' must be an integer (ms since epoch), got {type(value).__name__}")
    if value < EARLIEST_TIMESTAMP_MS:
        raise InvalidTrade(
            f"timestamp_ms {value} ({_iso(value)}) is before 1990-01-01 — seconds sent instead of milliseconds?"
        )
    if value > LATEST_TIMESTAMP_MS:
        raise InvalidTrade(f"timestamp_ms {value} is after 9999-12-31 — a wrong clock, or microseconds sent instead"
                           " of milliseconds?")
    if value > sent_ms + max_skew_ms:
        raise InvalidTrade(
            f"timestamp_ms {value} ({_iso(value)}) is {duration(value - sent_ms)} ahead of the time the message was "
            f"sent ({_iso(sent_ms)}); the clock-skew limit is {duration(max_skew_ms)} (MAX_CLOCK_SKEW_SECONDS) — "
            "a wrong clock, or microseconds sent instead of milliseconds?"
        )
    return value


def duration(ms: int) -> str:
    seconds = ms / 1000
    if seconds < 120:
        return f"{seconds:g} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.0f} days"


def _iso(timestamp_ms: int) -> str:
    try:
        return datetime.fromtimestamp(timestamp_ms / 1000, tz=timezone.utc).isoformat(timespec="milliseconds")
    except (OverflowError, OSError, ValueError):
        return "out of calendar range"


def iso_to_ms(text: str) -> int:
    """'2013-10-07T08:00:00.464Z' (or any ISO-8601 with offset; naive means UTC) -> epoch ms."""
    moment = datetime.fromisoformat(text.replace("Z", "+00:00") if text.endswith("Z") else text)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return int(round(moment.timestamp() * 1000))
