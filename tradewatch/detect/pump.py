"""Pump-and-dump detection from trade prints alone (no order book, no account ids).

What studies of announced pumps measure in the prints, and what this watches per symbol:
- a *burst*: the trades of the last `BURST_S` seconds against the symbol's own busiest `BURST_S`
  of its past day (pump events left out) — the bar its ordinary bursts set (a market order
  sweeping a few levels, a handful of traders at once). Those add a count on top of the pair's
  rate, so no multiple of the rate fits every pair: 8× missed half the pumps of a simulated pair
  trading 1,600 times an hour, 4× called the sweeps of one trading 400 times an hour pumps. The
  rate (an exponentially decayed count of the trades before the burst, time constant
  `BASELINE_TAU_S`) is reported: the burst's multiple of it. A window's count joins the day's
  reference as its newest trade leaves the burst window, so a rush is never measured against itself;
- *aggressive buying*: the taker-buy share of the burst's notional (trades with side "unknown"
  say nothing; when fewer than half the burst's trades have a side, the share is not required);
- the *run-up*: the price against the last price before the burst, in percent, in ticks and in
  spreads (a burst that only crosses a wide spread and sweeps the levels behind it is no pump).
A burst of at least `MIN_TRADES` trades at `MIN_DISTINCT_MS` distinct timestamps (one market order
sweeping the book prints many trades at one instant: not a crowd), more than in any `BURST_S` of
the symbol's past day, `MIN_BUY_SHARE` of it bought, the price up at least `MIN_GAIN`,
`MIN_GAIN_TICKS` ticks and `MIN_GAIN_SPREADS` spreads, starts an *event*:

    pump   the trigger (CRITICAL alert); the peak is followed as the price makes new highs
    peak   the price gave back `PEAK_RETRACE` of the gain, or made no new high for `PEAK_QUIET_S` (HIGH)
    dump   it gave back `DUMP_RETRACE` of the gain (HIGH)
    over   back within `OVER_RETRACE` of the start, or `EVENT_MAX_S` after the start (MEDIUM)

One alert per phase (a phase may be skipped: a price that falls straight through the dump level
goes pump → dump). Everything is event time, per symbol; the state is JSON-able so it follows the
symbol's partition through checkpoints.
"""
from __future__ import annotations

import itertools
import math
from collections import deque
from dataclasses import dataclass
from typing import Callable

from tradewatch.detect.evidence import Evidence, num, trades_named
from tradewatch.extremes import SpanMax

BURST_S = 20.0
BUSIEST_SPAN_MS = 86_400_000  # a burst's reference: its busiest BURST_S of the past day, as the whale's (WHALE_DAY_MS)
BASELINE_TAU_S = 3600.0
MAX_WINDOW = 1000            # trades kept in the burst window: memory and checkpoint size stay bounded on a
                             # liquid symbol (50 trades/s fills it every 20 s: never a burst by this measure)
WARMUP_S = 1800.0            # of the symbol's event time before a burst can count as one
MIN_TRADES = 12
MIN_DISTINCT_MS = 8
MIN_BUY_SHARE = 0.6
MIN_GAIN = 0.08
MIN_GAIN_TICKS = 4
MIN_GAIN_SPREADS = 3         # as the price rules' spike_spreads: an ordinary sweep prints up to ~2 spreads past the mid
PEAK_RETRACE = 0.30
PEAK_QUIET_S = 120.0
DUMP_RETRACE = 0.70
OVER_RETRACE = 0.90
EVENT_MAX_S = 1800.0
REARM_S = 600.0              # after an event ends, the next may start this much later
PHASES = ("pump", "peak", "dump", "over")
PHASE_SEVERITY = {"pump": "CRITICAL", "peak": "HIGH", "dump": "HIGH", "over": "MEDIUM"}
_SIDE_LETTER = {1: "b", -1: "s", 0: "-"}
_SIDE_OF_LETTER = {letter: side for side, letter in _SIDE_LETTER.items()}


@dataclass
class Event:
    """One pump, as it unfolds (the `manipulation_events` row)."""
    event_id: str
    symbol: str
    state: str
    started_ms: int
    start_price: float
    peak_ms: int
    peak_price: float
    volume_multiple: float        # the burst's trade count / the count the baseline expects
    burst_trades: int
    buy_share: float | None
    low_after_peak: float | None = None
    dump_depth_pct: float | None = None     # (peak - lowest after it) / peak
    dump_seconds: float | None = None       # from the peak to that low
    ended_ms: int | None = None
    updated_ms: int = 0
    busiest_day: int = 0          # the trades of the busiest BURST_S of the past day the burst outnumbered

    @property
    def gain_pct(self) -> float:
        return (self.peak_price / self.start_price - 1) * 100

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    @classmethod
    def from_dict(cls, data: dict) -> "Event":
        return cls(**data)


def _steps(values) -> list[int]:
    """Each value as the step from the one before (the first as itself): short numbers to store."""
    values = list(values)
    return values[:1] + [b - a for a, b in zip(values, values[1:])]


def burst_bar(busiest_day: int) -> int:
    """The count a burst must pass: the busiest BURST_S of the past day, or MIN_TRADES - 1."""
    return max(busiest_day, MIN_TRADES - 1)


class PumpWatch:
    """Per symbol: the burst window, the baseline and the open event. `observe` each trade in
    event order; it returns the phase the event entered with this trade, if any."""

    def __init__(self) -> None:
        self.window: deque[tuple[int, float, float, int]] = deque()   # (ms, price, quantity, side +1/-1/0)
        self.counts: deque[int] = deque()    # the window's count as each of its trades arrived (0 inside an event)
        self.busiest = SpanMax(BUSIEST_SPAN_MS)   # of those counts, as their trades leave the window
        self.before_price: float | None = None     # the last price before the window
        self.decayed = 0.0          # trades that left the window, decayed with BASELINE_TAU_S
        self.decayed_ms: int | None = None
        self.first_ms: int | None = None
        self.event: Event | None = None
        self.ended_ms = -(1 << 62)     # when the last event ended (a new one waits REARM_S)

    def to_dict(self) -> dict:
        # The window is most of a busy symbol's checkpoint (up to MAX_WINDOW trades), so it goes by
        # column: times and counts as steps from the one before, quantities rather than notionals
        # (shorter numbers; price * quantity gives the notional back bit for bit), sides as one letter each.
        window = {"ms_steps": _steps([w[0] for w in self.window]),
                  "prices": [w[1] for w in self.window], "quantities": [w[2] for w in self.window],
                  "sides": "".join(_SIDE_LETTER[w[3]] for w in self.window), "count_steps": _steps(self.counts)}
        return {"window": window, "before_price": self.before_price, "busiest": self.busiest.to_list(),
                "decayed": self.decayed, "decayed_ms": self.decayed_ms, "first_ms": self.first_ms,
                "event": self.event.to_dict() if self.event else None, "ended_ms": self.ended_ms}

    @classmethod
    def from_dict(cls, data: dict) -> "PumpWatch":
        watch = cls()
        window = data["window"]
        if isinstance(window, list):     # stored before the columns: (ms, price, notional, side) rows
            watch.window.extend((ms, price, notional / price if price else 0.0, side)
                                for ms, price, notional, side in window)
        else:
            watch.window.extend(zip(itertools.accumulate(window["ms_steps"]), window["prices"], window["quantities"],
                                    (_SIDE_OF_LETTER[c] for c in window["sides"])))
        # stored before the busiest burst of the day was kept: its windows count as quiet ones
        counts = window.get("count_steps") if isinstance(window, dict) else None
        watch.counts.extend(itertools.accumulate(counts) if counts else itertools.repeat(0, len(watch.window)))
        watch.busiest = SpanMax.from_list(BUSIEST_SPAN_MS, data.get("busiest") or [])
        watch.before_price, watch.decayed = data["before_price"], data["decayed"]
        watch.decayed_ms, watch.first_ms = data["decayed_ms"], data["first_ms"]
        watch.event = Event.from_dict(data["event"]) if data["event"] else None
        watch.ended_ms = data["ended_ms"]
        return watch

    def expected(self, now_ms: int) -> float:
        """Trades the baseline expects in a burst window (decayed count / its effective span)."""
        if self.decayed_ms is None or self.first_ms is None:
            return 0.0
        decay = math.exp(-max(now_ms - self.decayed_ms, 0) / 1000 / BASELINE_TAU_S)
        age_s = max((now_ms - self.first_ms) / 1000 - BURST_S, 1.0)
        span_s = BASELINE_TAU_S * (1 - math.exp(-age_s / BASELINE_TAU_S))     # unbiased for a short history
        return self.decayed * decay / span_s * BURST_S

    def observe(self, symbol: str, ms: int, price: float, quantity: float, side: str,
                tick: float | None, spread: Callable[[], float]) -> tuple[str | None, Event | None]:
        """Fold one trade in: (the phase its event entered with it or None, the event it belongs to
        or None). `spread()` gives the symbol's usual spread (asked only of a burst that could start
        an event)."""
        if self.first_ms is None:
            self.first_ms = ms
        window, counts = self.window, self.counts
        while window and (window[0][0] < ms - BURST_S * 1000 or len(window) >= MAX_WINDOW):
            old_ms, old_price, _, _ = window.popleft()
            if (count := counts.popleft()) >= MIN_TRADES:
                self.busiest.push(old_ms, count)
            self.before_price = old_price
            self._count_out(old_ms)
        window.append((ms, price, quantity, 1 if side == "buy" else -1 if side == "sell" else 0))
        counts.append(0 if self.event is not None else len(window))
        if self.event is not None:
            event = self.event
            return self._follow(ms, price), event
        if (self.before_price is None or ms - self.first_ms < WARMUP_S * 1000 or len(window) < MIN_TRADES
                or ms - self.ended_ms < REARM_S * 1000):
            return None, None
        gain = price / self.before_price - 1
        if gain < MIN_GAIN:
            return None, None
        busiest = int(self.busiest.max_at(ms))
        ticks = (price - self.before_price) / tick if tick else math.inf
        if len(window) <= busiest or ticks < MIN_GAIN_TICKS - 1e-6 or len({w[0] for w in window}) < MIN_DISTINCT_MS:
            return None, None
        if price - self.before_price < MIN_GAIN_SPREADS * spread():
            return None, None
        sided = [w for w in window if w[3]]
        buy_share = None
        if len(sided) * 2 >= len(window):
            total = sum(w[1] * w[2] for w in sided)      # notional
            buy_share = sum(w[1] * w[2] for w in sided if w[3] > 0) / total if total else 0.0
            if buy_share < MIN_BUY_SHARE:
                return None, None
        start_ms = window[0][0]
        counts.clear()          # the burst is the event's: none of its windows is an ordinary day's
        counts.extend(itertools.repeat(0, len(window)))
        self.event = Event(f"{symbol}:{start_ms}", symbol, "pump", start_ms, self.before_price, ms, price,
                           round(len(window) / max(self.expected(ms), 1e-9), 2), len(window),
                           None if buy_share is None else round(buy_share, 4), updated_ms=ms, busiest_day=busiest)
        return "pump", self.event

    def evidence(self, phase: str, e: Event, trade_id: str, ms: int, price: float, tick: float | None,
                 spread: float) -> Evidence:
        """Why the event entered `phase` with this trade (called right after `observe`)."""
        params = {"burst_s": BURST_S, "busiest_span_ms": BUSIEST_SPAN_MS, "min_trades": MIN_TRADES,
                  "min_gain": MIN_GAIN, "min_gain_ticks": MIN_GAIN_TICKS, "min_gain_spreads": MIN_GAIN_SPREADS,
                  "min_buy_share": MIN_BUY_SHARE,
                  "peak_retrace": PEAK_RETRACE, "peak_quiet_s": PEAK_QUIET_S, "dump_retrace": DUMP_RETRACE,
                  "over_retrace": OVER_RETRACE, "event_max_s": EVENT_MAX_S}
        extra = {"event_id": e.event_id, "phase": phase, "start_price": e.start_price, "peak_price": e.peak_price,
                 "peak_ms": e.peak_ms, "started_ms": e.started_ms}
        if phase == "pump":
            expected = self.expected(ms)
            count = len(self.window)
            bar = burst_bar(e.busiest_day)
            gain = price / e.start_price - 1
            ticks = (price - e.start_price) / tick if tick else None
            line = max(e.start_price * (1 + MIN_GAIN), e.start_price + MIN_GAIN_TICKS * (tick or 0.0),
                       e.start_price + MIN_GAIN_SPREADS * spread)       # the price the run-up had to pass
            bought = (f"; {e.buy_share * 100:.0f} % of its notional bought (threshold {MIN_BUY_SHARE * 100:g} %)"
                      if e.buy_share is not None else "; too few trades have a side to weigh the buying")
            busiest = (f"more than the {e.busiest_day} of the busiest {BURST_S:g} s of the symbol's past day"
                       if e.busiest_day else f"at least {MIN_TRADES} (no {BURST_S:g} s of the symbol's past day had "
                                             f"as many)")
            sentence = (f"pump: a burst of {count} trades in {(ms - e.started_ms) / 1000:.0f} s, {busiest}, "
                        f"{count / max(expected, 1e-9):.1f}× the {expected:.2f} its rate of the last hour expects; "
                        f"price {num(price)} is {gain * 100:+.1f} %"
                        f"{f' ({ticks:.0f} ticks)' if ticks is not None else ''} over {num(e.start_price)}, the last "
                        f"price before the burst (thresholds {MIN_GAIN * 100:g} %, {MIN_GAIN_TICKS} ticks and "
                        f"{MIN_GAIN_SPREADS} spreads of {num(spread)}){bought}")
            return Evidence("PUMP_AND_DUMP", params, "burst", count, bar,
                            f"the trades of the busiest {BURST_S:g} s of the symbol's past day, pump events left out "
                            f"({MIN_TRADES - 1} when none had {MIN_TRADES})", count / bar, 1.0,
                            "more than that baseline", "x", sentence,
                            trades_named(trade_id, [], e.started_ms, ms, count), level=line,
                            tick=tick, extra={**extra, "gain_pct": gain * 100, "gain_ticks": ticks,
                                              "buy_share": e.buy_share, "spread": spread,
                                              "busiest_day": e.busiest_day, "expected": expected,
                                              "volume_multiple": e.volume_multiple})
        gain = e.peak_price - e.start_price
        given_back = (e.peak_price - price) / gain if gain > 0 else 1.0
        line = {"peak": PEAK_RETRACE, "dump": DUMP_RETRACE, "over": OVER_RETRACE}[phase]
        timed_out = given_back < line        # the peak went quiet, or the event reached its longest
        if timed_out:
            limit_s, since_ms = (PEAK_QUIET_S, e.peak_ms) if phase == "peak" else (EVENT_MAX_S, e.started_ms)
            elapsed = (ms - since_ms) / 1000
            what = "no new high" if phase == "peak" else "the event"
            sentence = (f"{phase}: {what} for {elapsed:.0f} s (limit {limit_s:g} s); price {num(price)}, peak "
                        f"{num(e.peak_price)}, start {num(e.start_price)}")
            return Evidence("PUMP_AND_DUMP", params, "price", price, e.peak_price, "the event's peak price",
                            elapsed, limit_s, f"{limit_s:g} s {'after the peak' if phase == 'peak' else 'in all'}",
                            "s", sentence, trades_named(trade_id, [], since_ms, ms, 0), tick=tick, extra=extra)
        sentence = (f"{phase}: price {num(price)} gave back {given_back * 100:.0f} % of the gain from "
                    f"{num(e.start_price)} to the peak {num(e.peak_price)} (threshold {line * 100:g} %)")
        return Evidence("PUMP_AND_DUMP", params, "price", price, e.peak_price, "the event's peak price",
                        given_back * 100, line * 100, f"{line * 100:g} % of the gain given back", "%", sentence,
                        trades_named(trade_id, [], e.peak_ms, ms, 0), level=e.peak_price - line * gain, tick=tick,
                        extra=extra)

    def _count_out(self, ms: int) -> None:
        if self.decayed_ms is not None:
            self.decayed *= math.exp(-max(ms - self.decayed_ms, 0) / 1000 / BASELINE_TAU_S)
        self.decayed += 1.0
        self.decayed_ms = ms if self.decayed_ms is None else max(ms, self.decayed_ms)

    def _follow(self, ms: int, price: float) -> str | None:
        e = self.event
        e.updated_ms = ms
        if e.state == "pump":
            e.burst_trades = max(e.burst_trades, len(self.window))
        if price > e.peak_price:
            e.peak_price, e.peak_ms, e.low_after_peak = price, ms, None
            e.dump_depth_pct = e.dump_seconds = None
        elif e.low_after_peak is None or price < e.low_after_peak:
            e.low_after_peak = price
            e.dump_depth_pct = round((e.peak_price - price) / e.peak_price * 100, 3)
            e.dump_seconds = (ms - e.peak_ms) / 1000
        gain = e.peak_price - e.start_price
        given_back = (e.peak_price - price) / gain if gain > 0 else 1.0
        entered = None
        if given_back >= OVER_RETRACE or ms - e.started_ms >= EVENT_MAX_S * 1000:
            e.state, e.ended_ms, entered = "over", ms, "over"
            self.event, self.ended_ms = None, ms
        elif given_back >= DUMP_RETRACE and e.state in ("pump", "peak"):
            e.state = entered = "dump"
        elif e.state == "pump" and (given_back >= PEAK_RETRACE or ms - e.peak_ms >= PEAK_QUIET_S * 1000):
            e.state = entered = "peak"
        return entered
