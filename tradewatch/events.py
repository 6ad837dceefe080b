"""The trade event: schema, validation and serialisation — the one place that defines them.

Wire format (Kafka topic `trades`, key = symbol, value = UTF-8 JSON object), schema_version 1:

    field             type            rule
    schema_version    int             must be 1
    trade_id          string          unique per trade, 1..64 characters
    symbol            string          1..20 of A-Z 0-9 . - _ / ^ =
    timestamp_ms      int             event time, UTC milliseconds since the epoch,
                                      between 1990-01-01 and one day ahead of now
    price             number          finite, > 0
    quantity          number          finite, > 0
    side              string          "buy" | "sell" | "unknown"
    exchange          string          1..16 characters
    bid, ask          number | null   optional quote; finite, > 0, bid <= ask
    condition         string | null   optional sale-condition code (recorded data)
    injected_anomaly  string | null   ground-truth label of a simulated anomaly; stored in its
                                      own column and never read by any detector

Unknown extra fields are ignored, so a producer may add fields without a version bump. No string
may contain a NUL character (PostgreSQL text cannot hold one).

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
ANOMALY_LABELS = frozenset({"price_spike", "price_drop", "volume_spike", "flash_crash"})
EARLIEST_TIMESTAMP_MS = 631152000000  # 1990-01-01T00:00:00Z
MAX_FUTURE_MS = 24 * 3600 * 1000
_SYMBOL_PATTERN = r"\A[A-Z0-9._/^=-]{1,20}\Z"
_SYMBOL = re.compile(_SYMBOL_PATTERN)


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


_Positive = Annotated[float, msgspec.Meta(gt=0)]


class _Wire(msgspec.Struct, gc=False):
    """The fast path's view of the wire format (see the table above)."""
    schema_version: Literal[1]
    trade_id: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
    symbol: Annotated[str, msgspec.Meta(pattern=_SYMBOL_PATTERN)]
    timestamp_ms: Annotated[int, msgspec.Meta(ge=EARLIEST_TIMESTAMP_MS)]
    price: _Positive
    quantity: _Positive
    side: Literal["buy", "sell", "unknown"]
    exchange: Annotated[str, msgspec.Meta(min_length=1, max_length=16)]
    bid: _Positive | None = None
    ask: _Positive | None = None
    condition: Annotated[str, msgspec.Meta(min_length=1, max_length=32)] | None = None
    injected_anomaly: Literal["price_spike", "price_drop", "volume_spike", "flash_crash"] | None = None


_decode_wire = msgspec.json.Decoder(_Wire).decode


def parse_trade(raw: bytes | None, now_ms: int | None = None) -> Trade:
    """Decode and validate one message value; raise InvalidTrade with a precise reason."""
    t = decode_trade(raw, now_ms)
    if type(t) is Trade:
        return t
    return Trade(t.trade_id, t.symbol, t.timestamp_ms, t.price, t.quantity, t.side, t.exchange,
                 t.bid, t.ask, t.condition, t.injected_anomaly, t.schema_version)


def decode_trade(raw: bytes | None, now_ms: int | None = None) -> "Trade | _Wire":
    """parse_trade for hot paths that only read the fields: a valid event may come back as the
    decoder's own record (the same attribute names as Trade), saving a copy."""
    if raw is not None and len(raw) <= MAX_EVENT_BYTES:
        try:
            w = _decode_wire(raw)
        except msgspec.DecodeError:
            pass    # the slow path below says why
        else:
            limit = (now_ms if now_ms is not None else int(time.time() * 1000)) + MAX_FUTURE_MS
            if (w.timestamp_ms <= limit and math.isfinite(w.price) and math.isfinite(w.quantity)
                    and (w.bid is None or math.isfinite(w.bid)) and (w.ask is None or math.isfinite(w.ask))
                    and (w.bid is None or w.ask is None or w.bid <= w.ask)
                    and "\x00" not in w.trade_id and "\x00" not in w.exchange
                    and (w.condition is None or "\x00" not in w.condition)):
                return w
    return _parse_slowly(raw, now_ms)


def _parse_slowly(raw: bytes | None, now_ms: int | None) -> Trade:
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
    return trade_from_dict(data, now_ms)


def trade_from_dict(data: object, now_ms: int | None = None) -> Trade:
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
    symbol = _string(data, "symbol", 20)
    if not _SYMBOL.match(symbol):
        raise InvalidTrade(f"field 'symbol' {symbol!r} has characters outside A-Z 0-9 . - _ / ^ =")
    timestamp_ms = _timestamp(data, now_ms if now_ms is not None else int(time.time() * 1000))
    price = _positive_number(data, "price")
    quantity = _positive_number(data, "quantity")
    side = _string(data, "side", 8)
    if side not in SIDES:
        raise InvalidTrade(f"field 'side' must be one of buy, sell, unknown; got {side!r}")
    exchange = _string(data, "exchange", 16)
    bid = _optional_positive_number(data, "bid")
    ask = _optional_positive_number(data, "ask")
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
    return value


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


def _positive_number(data: dict, name: str) -> float:
    value = _number(data, name)
    if value <= 0:
        raise InvalidTrade(f"field '{name}' must be > 0, got {value:g}")
    return value


def _optional_positive_number(data: dict, name: str) -> float | None:
    return None if data.get(name) is None else _positive_number(data, name)


def _timestamp(data: dict, now_ms: int) -> int:
    if data.get("timestamp_ms") is None:
        raise InvalidTrade("missing field 'timestamp_ms'")
    value = data["timestamp_ms"]
    if not _is_int(value):
        raise InvalidTrade(f"field 'timestamp_ms' must be an integer (ms since epoch), got {type(value).__name__}")
    if value < EARLIEST_TIMESTAMP_MS:
        raise InvalidTrade(
            f"timestamp_ms {value} ({_iso(value)}) is before 1990-01-01 — seconds sent instead of milliseconds?"
        )
    if value > now_ms + MAX_FUTURE_MS:
        raise InvalidTrade(
            f"timestamp_ms {value} ({_iso(value)}) is more than a day in the future — microseconds sent instead of milliseconds?"
        )
    return value


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
