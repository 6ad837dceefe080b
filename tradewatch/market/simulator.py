"""Simulated trades: geometric Brownian motion per symbol, with labelled injected anomalies.

Pure code (no I/O): the same seed and start time give the same stream, trade ids included.
Event time advances by exponential gaps with mean 1/rate seconds, so at the producer's pace it
follows the wall clock. Injected anomalies carry their ground-truth label in `injected_anomaly`;
they never change the underlying GBM price, so the market returns to normal afterwards.

Trade sizes follow a log-logistic distribution around each symbol's median (shape
`SIZE_SHAPE`, fitted to the recorded SPY and IBM days: 90th percentile ≈ 3×, 99th ≈ 10×, 99.9th
≈ 32× the median — heavy-tailed like the market, tests/unit/test_simulator.py compares them).
An injected whale is 3–6× the largest ordinary size of the symbol's previous 1,000 trades or of its
past day, whichever is larger, and on its first day that many times more as a whole day's largest
would be than the largest so far (SpanMax.understatement): a whale for its day, as the rule tells
one. At most one per 1,000 trades of a symbol; ordinary sizes are kept below 2.5× the largest
ordinary size of the previous 1,000 trades, so the only whales in a simulated stream are the
labelled ones and whales never compound (no size is measured against a whale).
"""
from __future__ import annotations

import hashlib
import itertools
import math
import random
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Iterator

from tradewatch.events import Trade
from tradewatch.extremes import SpanMax

SECONDS_PER_YEAR = 365.25 * 24 * 3600
SIZE_SHAPE = 2.0            # log-logistic shape β: P(size > m·x) = 1 / (1 + x^β)
WHALE_WINDOW, NATURAL_CAP, DAY_MS = 1000, 2.5, 86_400_000
FIRST_ANOMALY_HISTORY = 22       # above the rules' min_history (20): a spike they are warm enough to see


@dataclass(frozen=True)
class SymbolProfile:
    symbol: str
    start_price: float
    annual_drift: float
    annual_volatility: float
    exchange: str
    activity: float = 1.0          # relative share of trades
    spread_bps: float = 2.0        # bid/ask spread in basis points of the mid price
    median_quantity: float = 100.0
    quantity_decimals: int = 0     # 0 = whole shares; crypto trades fractions


DEFAULT_PROFILES: dict[str, SymbolProfile] = {p.symbol: p for p in (
    SymbolProfile("AAPL", 230.0, 0.08, 0.25, "NASDAQ", 1.4),
    SymbolProfile("GOOGL", 175.0, 0.07, 0.30, "NASDAQ", 1.0),
    SymbolProfile("MSFT", 420.0, 0.08, 0.22, "NASDAQ", 1.1),
    SymbolProfile("AMZN", 200.0, 0.08, 0.30, "NASDAQ", 1.1),
    SymbolProfile("TSLA", 250.0, 0.05, 0.60, "NASDAQ", 1.5, 3.0),
    SymbolProfile("META", 600.0, 0.08, 0.35, "NASDAQ", 0.9),
    SymbolProfile("NVDA", 130.0, 0.10, 0.50, "NASDAQ", 1.6),
    SymbolProfile("JPM", 240.0, 0.06, 0.20, "NYSE", 0.7),
    SymbolProfile("BTC-USD", 95000.0, 0.10, 0.60, "COINBASE", 1.2, 1.0, 0.05, 4),
    SymbolProfile("ETH-USD", 3300.0, 0.10, 0.75, "COINBASE", 1.0, 1.5, 1.0, 4),
)}
DEFAULT_SYMBOLS = tuple(DEFAULT_PROFILES)

# Injected anomaly kinds and their share of injections.
ANOMALY_WEIGHTS = {"price_spike": 0.3, "price_drop": 0.3, "volume_spike": 0.3, "flash_crash": 0.1}
# Price deviation of a flash crash over its consecutive trades of one symbol (down, then back).
FLASH_CRASH_PATH = (-0.04, -0.09, -0.13, -0.08, -0.03)


def profile_for(symbol: str) -> SymbolProfile:
    return DEFAULT_PROFILES.get(symbol) or SymbolProfile(symbol, 100.0, 0.05, 0.30, "SIM")


@dataclass
class _SymbolState:
    profile: SymbolProfile
    price: float
    last_ms: int
    crash_steps: list[float]
    sizes: deque = field(default_factory=lambda: deque(maxlen=WHALE_WINDOW))   # ordinary sizes, 0 for a whale
    day_sizes: SpanMax = field(default_factory=lambda: SpanMax(DAY_MS))          # ... of the past day
    since_whale: int = WHALE_WINDOW      # trades of this symbol since its last whale


class MarketSimulator:
    """An endless iterator of trades; call `next_trade()` or iterate."""

    def __init__(self, symbols: tuple[str, ...] | list[str] = DEFAULT_SYMBOLS, rate: float = 10.0,
                 seed: int | None = None, anomaly_rate: float = 0.0, start_ms: int = 0,
                 first_anomaly_after_s: float | None = None):
        """`first_anomaly_after_s`: the first trade after that much event time on a symbol with a
        history the rules accept (FIRST_ANOMALY_HISTORY trades) is an injected price spike, so a demo
        shows an anomaly early whatever the rate (at 20 trades/s and a rate of 0.005 the first would
        come after 10 s on average, after 30 s one time in twenty)."""
        if rate <= 0:
            raise ValueError("rate must be > 0 trades per second")
        if not 0 <= anomaly_rate <= 1:
            raise ValueError("anomaly_rate must be between 0 and 1")
        if not symbols:
            raise ValueError("at least one symbol is needed")
        self.rate = rate
        self.anomaly_rate = anomaly_rate
        self._rng = random.Random(seed)
        tag = f"{seed}-{start_ms}" if seed is not None else uuid.uuid4().hex
        self.run_id = hashlib.sha1(tag.encode()).hexdigest()[:10]
        self._now_ms = float(start_ms)
        self._states = [_SymbolState(profile_for(s), profile_for(s).start_price, start_ms, []) for s in symbols]
        # cumulative weights once (choices() would add them up on every call; same draws either way)
        self._cum_weights = list(itertools.accumulate(state.profile.activity for state in self._states))
        self._labels = list(ANOMALY_WEIGHTS)
        self._label_cum_weights = list(itertools.accumulate(ANOMALY_WEIGHTS.values()))
        self._sequence = 0
        self.injected: dict[str, int] = {kind: 0 for kind in ANOMALY_WEIGHTS}
        self._force_first_at_ms = None if first_anomaly_after_s is None else start_ms + first_anomaly_after_s * 1000

    def __iter__(self) -> Iterator[Trade]:
        while True:
            yield self.next_trade()

    def next_trade(self) -> Trade:
        self._now_ms += self._rng.expovariate(self.rate) * 1000.0
        return self._trade_now()

    def trades_until(self, until_ms: int) -> Iterator[Trade]:
        """The trades with event time before `until_ms` (a simulated past, sent as fast as it goes);
        the clock then stands at `until_ms`. Arrivals are memoryless, so stopping there and going on
        with `next_trade()` is the same market as never stopping."""
        while True:
            gap_ms = self._rng.expovariate(self.rate) * 1000.0
            if self._now_ms + gap_ms >= until_ms:
                self._now_ms = max(self._now_ms, float(until_ms))
                return
            self._now_ms += gap_ms
            yield self._trade_now()

    def skip_to(self, ms: int) -> None:
        """No trade until `ms` (the time it took to send a past): prices move on over the gap."""
        self._now_ms = max(self._now_ms, float(ms))

    def _trade_now(self) -> Trade:
        rng = self._rng
        now_ms = int(self._now_ms)
        state = rng.choices(self._states, cum_weights=self._cum_weights)[0]
        profile = state.profile
        self._step_price(state, now_ms)

        mid = state.price
        half_spread = max(0.005, mid * profile.spread_bps / 20_000)
        side = "buy" if rng.random() < 0.5 else "sell"
        u = rng.random()
        quantity = profile.median_quantity * (u / (1.0 - u)) ** (1.0 / SIZE_SHAPE) if u > 0 else 0.0
        if len(state.sizes) >= 200:
            quantity = min(quantity, NATURAL_CAP * max(state.sizes))
        label, forced = None, False
        if state.crash_steps:
            label = "flash_crash"
            mid *= 1 + state.crash_steps.pop(0)
        elif (forced := self._first_is_due(state, now_ms)) or (self.anomaly_rate and rng.random() < self.anomaly_rate):
            label = "price_spike" if forced else rng.choices(self._labels, cum_weights=self._label_cum_weights)[0]
            if label == "volume_spike" and (len(state.sizes) < 200 or state.since_whale < WHALE_WINDOW):
                label = None                 # a whale needs a history, and none in it (no compounding)
            if label == "price_spike":
                mid *= 1 + rng.uniform(0.06, 0.09)
            elif label == "price_drop":
                mid *= 1 - rng.uniform(0.06, 0.09)
            elif label == "volume_spike":       # a whale
                quantity = (max(max(state.sizes), state.day_sizes.max_at(now_ms)) * rng.uniform(3.0, 6.0)
                            * state.day_sizes.understatement(now_ms))
            elif label == "flash_crash":
                state.crash_steps = list(FLASH_CRASH_PATH)
                mid *= 1 + state.crash_steps.pop(0)
        if label is not None:
            self.injected[label] += 1
        if forced:       # a random anomaly before it does not count: on a cold symbol the rules cannot see it
            self._force_first_at_ms = None

        bid = round(mid - half_spread, 2)
        ask = round(mid + half_spread, 2)
        if ask <= bid:
            ask = round(bid + 0.01, 2)
        price = ask if side == "buy" else bid
        decimals = profile.quantity_decimals
        quantity = max(round(quantity, decimals), 10.0 ** -decimals)
        if decimals == 0:
            quantity = float(int(quantity))
        state.sizes.append(0.0 if label == "volume_spike" else quantity)
        if label != "volume_spike":
            state.day_sizes.push(now_ms, quantity)
        state.since_whale = 0 if label == "volume_spike" else state.since_whale + 1
        self._sequence += 1
        return Trade(
            trade_id=f"sim-{self.run_id}-{self._sequence:09d}", symbol=profile.symbol,
            timestamp_ms=now_ms, price=price, quantity=quantity, side=side,
            exchange=profile.exchange, bid=bid, ask=ask, injected_anomaly=label,
        )

    def _first_is_due(self, state: _SymbolState, now_ms: int) -> bool:
        return (self._force_first_at_ms is not None and now_ms >= self._force_first_at_ms
                and len(state.sizes) >= FIRST_ANOMALY_HISTORY)

    def _step_price(self, state: _SymbolState, now_ms: int) -> None:
        """Advance the symbol's GBM price over the time since its previous trade."""
        dt = max(now_ms - state.last_ms, 1) / 1000.0 / SECONDS_PER_YEAR
        sigma = state.profile.annual_volatility
        drift = (state.profile.annual_drift - 0.5 * sigma * sigma) * dt
        state.price *= math.exp(drift + sigma * math.sqrt(dt) * self._rng.gauss(0.0, 1.0))
        state.last_ms = now_ms


def rotating_days(start_ms: int, days: int, active: int = 1_000, new_per_day: int = 100, per_hour: int = 1,
                  seed: int = 23) -> Iterator[list[Trade]]:
    """Days of trades for a symbol set that keeps changing, one list per simulated hour in time
    order (the soak test and `bench/soak.py`): `active` symbols at a time, `new_per_day` new ones
    each day while as many go quiet for good; symbol i trades `per_hour` times in each hour where
    (i + hour) % 4 == 0 (quiet gaps of three hours), a random walk with a rare 8 % jump."""
    rng, price = random.Random(seed), {}
    for day in range(days):
        for hour in range(24):
            trades = []
            for i in range(day * new_per_day, day * new_per_day + active):
                if (i + hour) % 4:
                    continue
                symbol = f"S{i:05d}"
                p = price.get(symbol, 20.0 + i % 80)
                for k in range(per_hour):
                    p *= (1.08 if rng.random() < 0.005 else 1.0) * (1 + rng.gauss(0, 0.002))
                    ts = start_ms + (day * 24 + hour) * 3_600_000 + (i * 7_919 + k * 3_600_000 // per_hour) % 3_600_000
                    trades.append(Trade(f"{symbol}-{day}-{hour}-{k}", symbol, ts, round(p, 4),
                                        float(rng.randint(1, 500)), rng.choice(["buy", "sell"]), "X"))
                price[symbol] = p
            trades.sort(key=lambda t: t.timestamp_ms)
            yield trades


@dataclass(frozen=True)
class IlliquidProfile:
    """A thinly traded pair: a price of a few ticks' hundreds (one tick ≈ 1.2 % at the default),
    a spread of `spread_ticks` ticks, sparse trading (`trades_per_hour`, Poisson) with ordinary
    bursts (a market order sweeping the touch and up to two spreads past it, a handful of traders
    at once). `quiet_spells_per_day`: spells of 2–8 hours without a trade, after which the pair
    trades where its price would have walked meanwhile (a few percent away)."""
    start_price: float = 8.1e-6
    tick: float = 1e-7
    spread_ticks: int = 1
    trades_per_hour: float = 40.0
    bursts_per_day: float = 8.0
    median_quantity: float = 20_000.0
    quiet_spells_per_day: float = 0.0


@dataclass(frozen=True)
class Pump:
    symbol: str
    start_ms: int         # the first trade of the rush (the announcement)
    peak_ms: int
    gain: float           # the peak over the start price, minus one


def illiquid_market(symbols: int = 10, days: float = 2.0, start_ms: int = 1_767_225_600_000, seed: int = 0,
                    pump_symbols: int = 0, profile: IlliquidProfile = IlliquidProfile()) -> tuple[list[Trade], list[Pump]]:
    """Trades of `symbols` illiquid pairs over `days`, in time order, the first `pump_symbols` of
    them with one labelled pump-and-dump in the last day: accumulation (30 min of buy-leaning
    trading at twice the rate), a rush of 100–400 trades in 20–60 s, 85 % taker buys, lifting the
    price 30–200 %, a peak of 30–120 s, then a dump over 2–10 minutes back to near the start. The
    rush's trades carry `injected_anomaly="pump_and_dump"`; the rest of every day is ordinary."""
    rng = random.Random(seed)
    end_ms = start_ms + int(days * 86_400_000)
    trades: list[Trade] = []
    pumps: list[Pump] = []
    tick, spread = profile.tick, profile.spread_ticks       # prices in ticks: the bid is `level`
    for k in range(symbols):
        symbol = f"ILQ{k:02d}-BTC"
        base = max(round(profile.start_price * rng.uniform(0.5, 2.0) / tick), 20)    # price in ticks
        level = base
        rows: list[tuple[int, int, str, float, str | None]] = []     # (ms, price in ticks, side, quantity, label)

        def size() -> float:
            u = rng.random()
            return round(profile.median_quantity * (u / (1 - u)) ** (1 / SIZE_SHAPE), 0) + 1 if u > 0 else 1.0

        def trade_at(ms: int, side: str, at: int | None = None, label: str | None = None) -> None:
            price = at if at is not None else (level + spread if side == "buy" else level)
            rows.append((ms, price, side, size(), label))

        pump_ms = (start_ms + int((days - 1) * 86_400_000) + rng.randrange(2 * 3_600_000, 20 * 3_600_000)
                   if k < pump_symbols else None)
        t = float(start_ms)
        while True:
            t += rng.expovariate(profile.trades_per_hour / 3_600_000)
            if pump_ms is not None and pump_ms - 1_800_000 <= t < pump_ms:
                t = float(pump_ms)                # accumulation, then the rush, then the dump
                acc = pump_ms - 1_800_000
                while acc < pump_ms:
                    acc += rng.expovariate(2 * profile.trades_per_hour / 3_600_000)
                    if acc < pump_ms:
                        if rng.random() < 0.05:
                            level += 1
                        trade_at(int(acc), "buy" if rng.random() < 0.6 else "sell")
                start_level, gain = level, rng.uniform(0.3, 2.0)
                peak_level = max(round(start_level * (1 + gain)), start_level + 5 * spread)
                n, span = rng.randrange(100, 401), rng.uniform(20_000, 60_000)
                for i in range(n):
                    at = start_level + round((peak_level - start_level) * math.sqrt((i + 1) / n))
                    side = "buy" if rng.random() < 0.85 else "sell"
                    trade_at(int(pump_ms + span * i / n), side, at if side == "buy" else at - spread, "pump_and_dump")
                peak_at = int(pump_ms + span)
                hold = rng.uniform(30_000, 120_000)
                m = peak_at
                while m < peak_at + hold:
                    m += int(rng.expovariate(1 / 2_000)) + 1
                    trade_at(m, "buy" if rng.random() < 0.5 else "sell", peak_level - rng.randrange(0, 2 * spread + 1))
                dump_s, low = rng.uniform(120_000, 600_000), start_level + round((peak_level - start_level) * 0.1)
                steps = rng.randrange(60, 200)
                for i in range(steps):
                    at = peak_level - round((peak_level - low) * (i + 1) / steps)
                    trade_at(int(m + dump_s * i / steps), "sell" if rng.random() < 0.7 else "buy", at)
                level = low
                pumps.append(Pump(symbol, pump_ms, peak_at, peak_level / start_level - 1))
                t = m + dump_s
                pump_ms = None
                continue
            if t >= end_ms:
                break
            spells = profile.quiet_spells_per_day
            if spells and rng.random() < spells / (profile.trades_per_hour * 24):
                hours = rng.uniform(2, 8)           # the level walks 8 % of trades a tick: its variance over the spell
                t += hours * 3_600_000
                if pump_ms is not None:
                    t = min(t, pump_ms - 1_800_000.0)
                level = max(level + round(rng.gauss(0, math.sqrt(0.08 * profile.trades_per_hour * hours))), 5)
                continue
            ms = int(t)
            if rng.random() < profile.bursts_per_day / (profile.trades_per_hour * 24):
                side = "buy" if rng.random() < 0.5 else "sell"       # an ordinary burst: a sweep, a few traders
                for j in range(rng.randrange(3, 16)):
                    trade_at(ms + (0 if j < 4 else rng.randrange(0, 8_000)), side,
                             (level + spread + rng.randrange(0, 2 * spread + 1)) if side == "buy"
                             else (level - rng.randrange(0, 2 * spread + 1)))
                continue
            r = rng.random()
            if r < 0.08:
                level += 1 if (rng.random() < 0.5 + 0.1 * (base - level) / base * 10) else -1
                level = max(level, 5)
            trade_at(ms, "buy" if rng.random() < 0.5 else "sell")
        rows.sort(key=lambda r: r[0])
        for i, (ms, at, side, quantity, label) in enumerate(rows):
            trades.append(Trade(f"{symbol}-{seed}-{i:07d}", symbol, ms, round(at * tick, 12), quantity, side,
                                "BINANCE", injected_anomaly=label))
    trades.sort(key=lambda t: (t.timestamp_ms, t.trade_id))
    return trades, pumps
