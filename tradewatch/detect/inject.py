"""Known anomalies injected into real recorded trades, and the score of a detector against them.

The background is a real trading day (../shared/data/lean); a seeded injector changes it at known
places, one event per slot of `SPACING` trades (never in the first `LEAD` trades):

    price_spike   one trade 6–9 % above the price
    price_drop    the price falls 10–14 % over 3 trades and stays there (every later trade too)
    flash_crash   12–20 % down within 3 trades, back to the price over the next 10
    whale         one trade 3–6× the largest of the previous 1,000 trades of its symbol

Scoring: an event is found when a flag of its expected types lands on one of its trades (or the 3
after). Trades within `MARGIN` trades of an event count neither as found nor as false alarms; a
flag of any type on any other trade is a false alarm, reported per 10,000 of those normal trades.
Natural events in the background that meet an injected definition themselves (a real trade 3× the
largest of the previous 1,000) are counted apart, so a detector is not blamed for finding them.

`jumps` makes another kind of event, the one OUT_OF_RANGE is for: a lasting jump of the price by a
given share, smaller than the price rules' fixed 5 % line (a 1 % jump on SPY is some 30 σ of a calm
minute), a few a day so the market around each is the day's own.
"""
from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass, replace

from tradewatch.events import Trade

KINDS = ("price_spike", "price_drop", "flash_crash", "whale")
EXPECTED = {"price_spike": {"PRICE_SPIKE", "CIRCUIT_BREAKER", "OUT_OF_RANGE"},
            "price_drop": {"PRICE_DROP", "CIRCUIT_BREAKER", "OUT_OF_RANGE"},
            "flash_crash": {"CIRCUIT_BREAKER", "PRICE_DROP", "OUT_OF_RANGE"}, "whale": {"VOLUME_SPIKE"}}
LABELS = {"price_spike": "price_spike", "price_drop": "price_drop", "flash_crash": "flash_crash",
          "whale": "volume_spike"}
SPACING, LEAD, MARGIN, WHALE_WINDOW = 600, 1000, 50, 1000


@dataclass(frozen=True)
class Event:
    kind: str
    first: int          # index of the first changed trade
    last: int           # index of the last changed trade
    size: float         # the move (fraction) or the whale's multiple of the recent maximum


def inject(trades: list[Trade], seed: int, per_kind: int) -> tuple[list[Trade], list[Event]]:
    """A copy of `trades` (one symbol, in event-time order) with `per_kind` events of each kind."""
    rng = random.Random(seed)
    slots = list(range(LEAD, len(trades) - SPACING, SPACING))
    if len(slots) < per_kind * len(KINDS):
        raise ValueError(f"{len(trades)} trades hold {len(slots)} events, {per_kind * len(KINDS)} asked")
    chosen = sorted(rng.sample(slots, per_kind * len(KINDS)))
    kinds = [k for k in KINDS for _ in range(per_kind)]
    rng.shuffle(kinds)
    starts = {slot + rng.randrange(SPACING // 3): kind for slot, kind in zip(chosen, kinds)}
    out, events = [], []
    level = 1.0                                     # persistent multiplier of the price drops
    path: dict[int, float] = {}                     # index -> temporary multiplier (spikes, crashes)
    recent: deque[float] = deque(maxlen=WHALE_WINDOW)
    for i, trade in enumerate(trades):
        kind = starts.get(i)
        quantity = trade.quantity
        if kind == "price_spike":
            size = rng.uniform(0.06, 0.09)
            path[i] = 1 + size
            events.append(Event(kind, i, i, size))
        elif kind == "price_drop":
            size = rng.uniform(0.10, 0.14)
            for k in range(3):
                path[i + k] = (1 - size * (k + 1) / 3) / (1 - size)   # the level below takes over
            level *= 1 - size
            events.append(Event(kind, i, i + 2, size))
        elif kind == "flash_crash":
            size = rng.uniform(0.12, 0.20)
            for k in range(3):
                path[i + k] = 1 - size * (k + 1) / 3
            for k in range(1, 11):
                path[i + 2 + k] = 1 - size * (1 - k / 10)
            events.append(Event(kind, i, i + 12, size))
        elif kind == "whale":
            size = rng.uniform(3.0, 6.0)
            quantity = round(size * max(recent), 8)
            events.append(Event(kind, i, i, size))
        price = trade.price * level * path.get(i, 1.0)
        label = LABELS[kind] if kind else (trade.injected_anomaly if i not in path else out[-1].injected_anomaly)
        out.append(replace(trade, price=round(price, 8), quantity=quantity, injected_anomaly=label))
        recent.append(quantity)
    return out, events


def jumps(trades: list[Trade], seed: int, count: int, size: float) -> tuple[list[Trade], list[int]]:
    """A copy of `trades` (one symbol, in event-time order) whose price jumps by ±`size` (a share)
    at `count` trades, one in each of `count` equal stretches after the first `LEAD` trades, and
    stays there; and the index of each jump's first trade."""
    rng = random.Random(seed)
    stretch = (len(trades) - LEAD) // count
    if stretch < 2:
        raise ValueError(f"{len(trades)} trades hold no {count} jumps")
    at = {LEAD + k * stretch + rng.randrange(stretch // 4, 3 * stretch // 4): rng.choice((1 + size, 1 - size))
          for k in range(count)}
    out, level = [], 1.0
    for i, trade in enumerate(trades):
        level *= at.get(i, 1.0)
        out.append(replace(trade, price=round(trade.price * level, 8)) if level != 1.0 else trade)
    return out, sorted(at)


def natural_whales(trades: list[Trade], factor: float = 3.0) -> set[int]:
    """Indexes of background trades `factor`× the largest of the previous 1,000 (real whales)."""
    found, recent = set(), deque(maxlen=WHALE_WINDOW)
    for i, t in enumerate(trades):
        if len(recent) == WHALE_WINDOW and t.quantity >= factor * max(recent):
            found.add(i)
        recent.append(t.quantity)
    return found


def score(flags: list[set[str]], events: list[Event], natural: set[int] = frozenset()) -> dict:
    """Recall per kind and false alarms per 10,000 normal trades, from each trade's flag types."""
    near = set()
    for e in events:
        near.update(range(max(e.first - MARGIN, 0), e.last + MARGIN + 1))
    found = {k: 0 for k in KINDS}
    count = {k: 0 for k in KINDS}
    for e in events:
        count[e.kind] += 1
        found[e.kind] += any(flags[i] & EXPECTED[e.kind] for i in range(e.first, min(e.last + 4, len(flags))))
    normal = [i for i in range(len(flags)) if i not in near]
    alarms = [i for i in normal if flags[i]]
    unexplained = [i for i in alarms if i not in natural]
    plain = len([i for i in normal if i not in natural])
    return {
        "recall": {k: round(found[k] / count[k], 4) if count[k] else None for k in KINDS},
        "events": count,
        "normal_trades": len(normal),
        "false_alarms": len(alarms),
        "false_alarms_per_10k": round(len(alarms) / len(normal) * 1e4, 3) if normal else 0.0,
        "natural_whales": len([i for i in normal if i in natural]),
        "false_alarms_per_10k_besides_natural_whales": round(len(unexplained) / plain * 1e4, 3) if plain else 0.0,
    }
