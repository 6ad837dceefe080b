"""Numbers for people: every digit kept, thousands separated, big values in compact units."""
from __future__ import annotations

import math


def exact(value: float | int | None, min_decimals: int = 2, max_decimals: int = 8) -> str:
    """95002.79 -> '95,002.79'; 0.00012345 -> '0.00012345'; 100.0 -> '100.00' (min_decimals=2).
    Never rounds away a digit the value has within `max_decimals`."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    text = f"{value:,.{max_decimals}f}"
    whole, _, fraction = text.partition(".")
    fraction = fraction.rstrip("0")
    if len(fraction) < min_decimals:
        fraction = fraction.ljust(min_decimals, "0")
    return f"{whole}.{fraction}" if fraction else whole


_UNITS = ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K"))


def compact(value: float | int, prefix: str = "") -> str:
    """95_752_123.4 -> '95.75M' (with `prefix` '$': '$95.75M'); below 1,000 the plain number."""
    sign = "-" if value < 0 else ""
    magnitude = abs(value)
    for threshold, unit in _UNITS:
        if magnitude >= threshold:
            return f"{sign}{prefix}{magnitude / threshold:,.2f}{unit}"
    return f"{sign}{prefix}{magnitude:,.0f}"


def money(value, currency: str = "USD") -> str:
    """1234567.5 -> 'USD 1,234,567.50' (every digit kept, as `exact`)."""
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{currency} {exact(value)}"


def percent(fraction, decimals: int = 2) -> str:
    """0.012345 -> '+1.23%'; the sign always shown."""
    if fraction is None or (isinstance(fraction, float) and math.isnan(fraction)):
        return "—"
    return f"{float(fraction) * 100:+,.{decimals}f}%"


def integer(value) -> str:
    return "—" if value is None else f"{int(value):,}"
