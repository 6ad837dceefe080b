"""Simulated trades: geometric Brownian motion per symbol, with labelled injected anomalies.

Pure code (no I/O): the same seed and start time give the same stream, trade ids included.
Event time advances by exponential gaps with mean 1/rate seconds, so at the producer's pace it
follows the wall clock. Injected anomalies carry their ground-truth label in `injected_anomaly`;
they never change the underlying GBM price, so the market returns to normal afterwards.

Trade sizes follow a log-logistic distribution around each symbol's median (shape
`SIZE_SHAPE`, fitted to the recorded SPY and IBM days: 90th percentile ≈ 3×, 99th ≈ 10×, 99.9th
≈ 32× the median — heavy-tailed like the market, tests/unit/test_simulator.py compares them).
An injected whale is 3–6× the largest of the symbol's previous 1,000 trades, at most one per 1,000
trades of a symbol (so whales never compound); ordinary sizes are kept below 2.5× that largest, so
the only whales in a simulated stream are the labelled ones.
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

SECONDS_PER_YEAR = 365.25 * 24 * 3600
SIZE_SHAPE = 2.0            # log-logistic shape β: P(size > m·x) = 1 / (1 + x^β)
WHALE_WINDOW, NATURAL_CAP = 1000, 2.5


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
    sizes: deque = field(default_factory=lambda: deque(maxlen=WHALE_WINDOW))
    since_whale: int = WHALE_WINDOW      # trades of this symbol since its last whale


class MarketSimulator:
    """An endless iterator of trades; call `next_trade()` or iterate."""

    def __init__(self, symbols: tuple[str, ...] | list[str] = DEFAULT_SYMBOLS, rate: float = 10.0,
                 seed: int | None = None, anomaly_rate: float = 0.0, start_ms: int = 0):
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

    def __iter__(self) -> Iterator[Trade]:
        while True:
            yield self.next_trade()

    def next_trade(self) -> Trade:
        rng = self._rng
        self._now_ms += rng.expovariate(self.rate) * 1000.0
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
        label = None
        if state.crash_steps:
            label = "flash_crash"
            mid *= 1 + state.crash_steps.pop(0)
        elif self.anomaly_rate and rng.random() < self.anomaly_rate:
            label = rng.choices(self._labels, cum_weights=self._label_cum_weights)[0]
            if label == "volume_spike" and (len(state.sizes) < 200 or state.since_whale < WHALE_WINDOW):
                label = None                 # a whale needs a history, and none in it (no compounding)
            if label == "price_spike":
                mid *= 1 + rng.uniform(0.06, 0.09)
            elif label == "price_drop":
                mid *= 1 - rng.uniform(0.06, 0.09)
            elif label == "volume_spike":       # a whale
                quantity = max(state.sizes) * rng.uniform(3.0, 6.0)
            elif label == "flash_crash":
                state.crash_steps = list(FLASH_CRASH_PATH)
                mid *= 1 + state.crash_steps.pop(0)
        if label is not None:
            self.injected[label] += 1

        bid = round(mid - half_spread, 2)
        ask = round(mid + half_spread, 2)
        if ask <= bid:
            ask = round(bid + 0.01, 2)
        price = ask if side == "buy" else bid
        decimals = profile.quantity_decimals
        quantity = max(round(quantity, decimals), 10.0 ** -decimals)
        if decimals == 0:
            quantity = float(int(quantity))
        state.sizes.append(quantity)
        state.since_whale = 0 if label == "volume_spike" else state.since_whale + 1
        self._sequence += 1
        return Trade(
            trade_id=f"sim-{self.run_id}-{self._sequence:09d}", symbol=profile.symbol,
            timestamp_ms=now_ms, price=price, quantity=quantity, side=side,
            exchange=profile.exchange, bid=bid, ask=ask, injected_anomaly=label,
        )

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
