"""Per-symbol rolling state and the engineered features of each trade.

The rolling statistics are kept over *normal* trades only, so an anomaly does not hide the next
one; a level shift that persists for `LEVEL_SHIFT_TRADES` trades is accepted as the new normal.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from tradewatch.detect.band import BandWatch
from tradewatch.detect.pump import PumpWatch
from tradewatch.events import Trade
from tradewatch.extremes import RecentMax, SpanMax

WHALE_WINDOW = 1000         # a whale is measured against the largest of this many previous trades
WHALE_MIN_HISTORY = 200     # ... once the symbol has at least this many
WHALE_DAY_MS = 86_400_000   # and is told (an alert) only when that large against the past day's trades
                            # too, whales left out, where the day held more (RuleDetector.process)
PRICE_Z_MIN_STD = 0.002     # the z-score's spread is at least 0.2 % of the price: a quiet tape's
                            # one-cent move is not an 8-sigma event
FEATURE_NAMES = ("return_1", "return_5", "return_20", "price_z", "deviation", "volume_log_z",
                 "volume_ratio", "gap_log_ratio", "spread_bps", "signed_run")
LEVEL_SHIFT_TRADES = 10
WALK_MIN_AGE_MS = 1000      # a window traded within a second tells nothing of the walk per second
AUCTION_PRINTS = 20         # a symbol's auction prints kept per sale condition: a month of trading days
TOLD_PRINTS = 16            # told prints kept (a day's, to know one reported again; SPY's recorded day tells 12)
SPREAD_WINDOW = 64          # the spread is the median of this many observations: a few quotes or bounces
                            # across a real move do not widen it


@dataclass(slots=True)
class TradeFeatures:
    history: int                 # normal trades of this symbol seen before (warm-up guard)
    return_1: float
    return_5: float
    return_20: float
    price_z: float               # (price - rolling mean) / rolling std
    deviation: float             # price / rolling mean - 1
    volume_log_z: float          # z-score of log(quantity)
    volume_ratio: float          # quantity / rolling mean quantity
    gap_log_ratio: float         # log(time since previous trade / typical gap)
    spread_bps: float
    run_length: int              # consecutive same-direction moves, including this one
    run_move: float              # relative price change over that run
    signed_run: float
    whale_ratio: float = 0.0     # quantity / largest of the previous WHALE_WINDOW trades (0 = too few)

    def vector(self) -> list[float]:
        return [getattr(self, name) for name in FEATURE_NAMES]


@dataclass(frozen=True, slots=True)
class Walk:
    """The price lines' σ at a time (SymbolState.walk_at), and what it was grown by."""
    sigma: float
    age_ms: float       # the age of the window's mean, as a random walk weighs its trades
    fresh_ms: float     # ... right after a window traded as this one was
    quiet_ms: int       # the time since the window's last trade


def _mean_pair_min(ages: list[float]) -> float:
    """The mean over all ordered pairs (i, j) of min(ages[i], ages[j]), `ages` ascending: the
    variance, per unit of a random walk's, of a price's distance from the mean of prices that old."""
    n = len(ages)
    return sum(a * (2 * (n - k) + 1) for k, a in enumerate(ages, 1)) / (n * n)


class _Rolling:
    """Mean and standard deviation over the last n values."""

    def __init__(self, n: int):
        self.values: deque[float] = deque(maxlen=n)
        self.total = 0.0
        self.total_sq = 0.0

    def push(self, value: float) -> None:
        if len(self.values) == self.values.maxlen:
            old = self.values[0]
            self.total -= old
            self.total_sq -= old * old
        self.values.append(value)
        self.total += value
        self.total_sq += value * value

    def to_list(self) -> list[float]:
        """[total, total_sq, *values]: the exact state (running sums included, so a restored
        window gives bit-identical means)."""
        return [self.total, self.total_sq, *self.values]

    @classmethod
    def from_list(cls, n: int, data: list[float]) -> "_Rolling":
        rolling = cls(n)
        rolling.total, rolling.total_sq = data[0], data[1]
        rolling.values.extend(data[2:])
        return rolling

    @property
    def mean(self) -> float:
        return self.total / len(self.values) if self.values else 0.0

    @property
    def std(self) -> float:
        n = len(self.values)
        if n < 2:
            return 0.0
        return math.sqrt(max(self.total_sq / n - (self.total / n) ** 2, 0.0))


class SymbolState:
    def __init__(self, price_window: int, volume_window: int):
        self.prices = _Rolling(price_window)
        self.log_quantities = _Rolling(volume_window)
        self.quantities = _Rolling(volume_window)
        self.gaps = _Rolling(volume_window)
        self.largest = RecentMax(WHALE_WINDOW)        # of every trade's quantity, whales included
        self.day_largest = SpanMax(WHALE_DAY_MS)      # of the quantities of the past day but whales
        self.recent: deque[float] = deque(maxlen=21)   # last normal prices, for returns
        # the trades of `prices` (id, event ms), named by the evidence of the price rules
        self.price_trades: deque[tuple[str, int]] = deque(maxlen=price_window)
        self.last_trade: tuple[str, int] | None = None        # the trade of `last_price`
        self.run_start_trade: tuple[str, int] | None = None   # the trade of `run_start_price`
        self.last_ts: int | None = None
        self.last_price: float | None = None
        self.run_direction = 0
        self.run_length = 0
        self.run_start_price: float | None = None
        self.shift_streak = 0
        self.tick: float | None = None        # the smallest price change seen: the instrument's tick
        self.last_any: float | None = None    # the previous trade's price, anomalies included
        self.last_side: str | None = None     # ... and its aggressor side
        self.last_change = 0.0                # ... and its price change
        self.spreads: deque[float] = deque(maxlen=SPREAD_WINDOW)   # observed spreads (see learn)
        self.pump = PumpWatch()
        self.band = BandWatch()
        self.episode_side = 0                 # a price move being told: +1 up, -1 down, 0 none (RuleDetector._tell)
        self.episode_told: str | None = None  # ... and the highest severity its alerts had
        # prints whose move or whale was told (RuleDetector._once): (ms, trade id, price, quantity,
        # the move's side or 0, whale)
        self.told_prints: deque[tuple[int, str, float, float, int, bool]] = deque(maxlen=TOLD_PRINTS)
        # the opening and closing auction prints (AUCTION_CONDITIONS) by sale condition: (quantity, trade id, ms)
        self.auctions: dict[str, deque[tuple[float, str, int]]] = {}

    def to_dict(self) -> dict:
        """The whole state as JSON-able values (floats round-trip exactly through JSON)."""
        # log_quantities keeps its running sums only: its values are the logs of those of `quantities`
        return {"prices": self.prices.to_list(), "log_quantities": self.log_quantities.to_list()[:2],
                "quantities": self.quantities.to_list(), "gaps": self.gaps.to_list(), "recent": list(self.recent),
                "largest": self.largest.to_list(), "largest_ids": self.largest.ids(),
                "day_largest": self.day_largest.to_list(),
                "price_trades": [list(t) for t in self.price_trades],
                "last_trade": self.last_trade and list(self.last_trade),
                "run_start_trade": self.run_start_trade and list(self.run_start_trade),
                "last_ts": self.last_ts, "last_price": self.last_price, "run_direction": self.run_direction,
                "run_length": self.run_length, "run_start_price": self.run_start_price,
                "shift_streak": self.shift_streak, "tick": self.tick, "last_any": self.last_any,
                "last_side": self.last_side, "last_change": self.last_change, "spreads": list(self.spreads),
                "pump": self.pump.to_dict(), "band": self.band.to_dict(),
                "episode": [self.episode_side, self.episode_told], "told_prints": [list(p) for p in self.told_prints],
                "auctions": {c: [list(p) for p in prints] for c, prints in self.auctions.items()}}

    @classmethod
    def from_dict(cls, data: dict, price_window: int, volume_window: int) -> "SymbolState":
        state = cls(price_window, volume_window)
        state.prices = _Rolling.from_list(price_window, data["prices"])
        for name in ("log_quantities", "quantities", "gaps"):
            setattr(state, name, _Rolling.from_list(volume_window, data[name]))
        if not state.log_quantities.values:     # stored as its sums alone (older checkpoints hold the values)
            state.log_quantities.values.extend(math.log(q) for q in state.quantities.values)
        state.recent.extend(data["recent"])
        state.largest = RecentMax.from_list(WHALE_WINDOW, data["largest"], data.get("largest_ids"))
        # absent in checkpoints from before it: the whales of the first day after are measured as before
        state.day_largest = SpanMax.from_list(WHALE_DAY_MS, data.get("day_largest") or [])
        # state stored before the evidence named trades: the window's trades are unknown ("", 0)
        held = len(state.prices.values)
        if held:
            state.price_trades.extend(tuple(t) for t in (data.get("price_trades") or [("", 0)] * held)[-held:])
        for name in ("last_trade", "run_start_trade"):
            setattr(state, name, tuple(data[name]) if data.get(name) else None)
        state.last_ts, state.last_price = data["last_ts"], data["last_price"]
        state.run_direction, state.run_length = data["run_direction"], data["run_length"]
        state.run_start_price, state.shift_streak = data["run_start_price"], data["shift_streak"]
        state.tick, state.last_any = data.get("tick"), data.get("last_any")     # absent in older checkpoints
        state.last_side, state.last_change = data.get("last_side"), data.get("last_change", 0.0)
        state.spreads.extend(data.get("spreads", ()))
        if data.get("pump"):
            state.pump = PumpWatch.from_dict(data["pump"])
        if data.get("band"):                    # absent in checkpoints from before OUT_OF_RANGE
            state.band = BandWatch.from_dict(data["band"])
        state.episode_side, state.episode_told = data.get("episode", (0, None))
        state.told_prints.extend(tuple(p) for p in data.get("told_prints", ()))   # absent in older checkpoints
        for condition, prints in data.get("auctions", {}).items():                 # ... and this
            state.auctions[condition] = deque((tuple(p) for p in prints), maxlen=AUCTION_PRINTS)
        return state

    def learn(self, trade: Trade) -> None:
        """Learn the instrument from a trade (anomalies included: a tick or a spread is not an anomaly).

        The tick: the smallest non-zero change between consecutive prices (a relative 1e-9 or less
        is float noise, not a tick). The spread: the trade's quote (ask - bid) when it carries one;
        else a bid-ask bounce: the price change between a buy and a sell that follow each other,
        or, where sides are unknown, the smaller change of a reversal (up then down)."""
        price, last = trade.price, self.last_any
        change = price - last if last is not None else 0.0
        if trade.bid is not None and trade.ask is not None:
            self.spreads.append(trade.ask - trade.bid)
        elif last is not None:
            side, last_side = trade.side, self.last_side
            if side == "unknown" or last_side == "unknown":
                if change * self.last_change < 0:
                    self.spreads.append(min(abs(change), abs(self.last_change)))
            elif side != last_side and last_side:     # a buy after a sell, or a sell after a buy
                self.spreads.append(abs(change))
        if abs(change) > price * 1e-9 and (self.tick is None or abs(change) < self.tick * 0.999):
            self.tick = abs(change)
        self.last_any, self.last_side, self.last_change = price, trade.side, change

    def tick_share(self) -> float:
        """One tick as a share of the rolling mean price (0 before either is known)."""
        mean = self.prices.mean
        return self.tick / mean if self.tick and mean > 0 else 0.0

    def spread(self) -> float:
        """The symbol's usual spread in price (0 before one is seen): the median observation."""
        seen = sorted(self.spreads)
        return seen[len(seen) // 2] if seen else 0.0

    def walk_at(self, ts_ms: int) -> Walk:
        """The σ of the price lines for a trade at `ts_ms`: the window's, grown by the pair's walk
        over the time since the window's trades. What the window's variance holds beyond the bid-ask
        bounce ((spread / 2)²) is its walk, over the window's own spread of times S; a price strays
        from the mean of earlier prices by the walk of their age (for a random walk: the mean over
        pairs of trades of the younger one's age), which right after a window traded evenly is 2·S
        (W/3 for span W); so σ² = std² + walk²·(age / 2S − 1) when the age is more, and the first
        trades after a quiet hour are judged against how far the pair's own walk goes in an hour
        (until new trades fill the window). A pair that only bounced between bid and ask has no
        walk: its lines stay where they were."""
        std, stamps = self.prices.std, self.price_trades
        if len(stamps) < 2 or not stamps[0][1]:     # (state stored before trades were named: times unknown)
            return Walk(std, 0.0, 0.0, 0)
        times = sorted(ms for _, ms in stamps)
        scatter_ms = sum(times) / len(times) - times[0] - _mean_pair_min([ms - times[0] for ms in times])
        fresh = max(2 * scatter_ms, WALK_MIN_AGE_MS)
        age = _mean_pair_min([max(ts_ms - ms, 0) for ms in reversed(times)])
        walk = max(std * std - (self.spread() / 2) ** 2, 0.0)
        return Walk(math.sqrt(std * std + walk * max(age / fresh - 1, 0.0)), age, fresh, max(ts_ms - times[-1], 0))

    def features(self, trade: Trade) -> TradeFeatures:
        price = trade.price
        mean = self.prices.mean
        std = max(self.prices.std, PRICE_Z_MIN_STD * mean, self.tick or 0.0)   # never below one tick
        recent = self.recent

        def back(k: int) -> float:
            return price / recent[-k] - 1 if len(recent) >= k else 0.0

        log_q = math.log(trade.quantity)
        q_std = self.log_quantities.std
        # Out-of-order or equal timestamps (another venue's clock, a re-read) count as no gap.
        gap = max(trade.timestamp_ms - self.last_ts, 0) if self.last_ts is not None else 0
        typical_gap = self.gaps.mean
        direction = 0 if self.last_price is None or price == self.last_price else (1 if price > self.last_price else -1)
        run_length = self.run_length + 1 if direction and direction == self.run_direction else (1 if direction else 0)
        run_start = self.run_start_price if direction and direction == self.run_direction else self.last_price
        spread = ((trade.ask - trade.bid) / ((trade.ask + trade.bid) / 2) * 1e4
                  if trade.bid is not None and trade.ask is not None else 0.0)
        return TradeFeatures(
            history=len(self.prices.values),
            return_1=back(1), return_5=back(5), return_20=back(20),
            price_z=(price - mean) / std if std > 0 else 0.0,
            deviation=price / mean - 1 if mean else 0.0,
            volume_log_z=(log_q - self.log_quantities.mean) / q_std if q_std > 0 else 0.0,
            volume_ratio=trade.quantity / self.quantities.mean if self.quantities.mean else 1.0,
            gap_log_ratio=math.log((gap + 1) / (typical_gap + 1)) if self.last_ts is not None else 0.0,
            spread_bps=spread, run_length=run_length,
            run_move=price / run_start - 1 if run_start else 0.0,
            signed_run=float(direction * run_length),
            whale_ratio=trade.quantity / self.largest.max if self.largest.count >= WHALE_MIN_HISTORY else 0.0,
        )

    def whale_day_ratio(self, trade: Trade) -> float:
        """The quantity / the larger of the previous WHALE_WINDOW trades' largest and the past day's
        but whales (looked up for a whale only)."""
        return trade.quantity / max(self.largest.max, self.day_largest.max_at(trade.timestamp_ms))

    def update(self, trade: Trade, features: TradeFeatures, price_is_normal: bool, volume_is_normal: bool,
               auction: bool = False) -> None:
        """Fold the trade into the rolling state (anomalous values stay out; an auction print's size
        goes to its own kind's reference only: a closing auction is no trade of continuous trading)."""
        if auction:
            self.auctions.setdefault(trade.condition, deque(maxlen=AUCTION_PRINTS)).append(
                (trade.quantity, trade.trade_id, trade.timestamp_ms))
        else:
            self.largest.push(trade.quantity, trade.trade_id)
        if self.last_ts is not None:
            self.gaps.push(float(max(trade.timestamp_ms - self.last_ts, 0)))
        self.last_ts = trade.timestamp_ms
        if price_is_normal:
            self.shift_streak = 0
            self._take_price(trade, features)
        else:
            self.shift_streak += 1
            if self.shift_streak >= LEVEL_SHIFT_TRADES:  # the market really moved: accept the new level
                self.prices = _Rolling(self.prices.values.maxlen or 50)
                self.recent.clear()
                self.price_trades.clear()
                self.shift_streak = 0
                self.episode_side, self.episode_told = 0, None     # and the move's story is over
                self._take_price(trade, features)
        if volume_is_normal and not auction:
            self.day_largest.push(trade.timestamp_ms, trade.quantity, trade.trade_id)
            self.quantities.push(trade.quantity)
            self.log_quantities.push(math.log(trade.quantity))

    def _take_price(self, trade: Trade, features: TradeFeatures) -> None:
        price = trade.price
        self.prices.push(price)
        self.recent.append(price)
        self.price_trades.append((trade.trade_id, trade.timestamp_ms))
        direction = 0 if self.last_price is None or price == self.last_price else (1 if price > self.last_price else -1)
        if direction:
            if direction != self.run_direction:
                self.run_start_price, self.run_start_trade = self.last_price, self.last_trade
            self.run_direction = direction
            self.run_length = features.run_length
        self.last_price, self.last_trade = price, (trade.trade_id, trade.timestamp_ms)
