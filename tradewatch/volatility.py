"""The next window's volatility forecast, live: one final candle at a time, constant work per candle,
no pandas (issue 28). The definitions are those of tradewatch/detect/forecast.py, where the
forecasters are trained and scored walk-forward; `ForecastState.update` returns what
`forecast.rows` computes for the same window (a test holds the two equal, gaps included).

What the aggregator stores with each final candle, for the window after it (columns of `indicators`):
    next_sigma        σ of the next window's log price (Garman–Klass scale), a fraction of the price
    next_range        its expected high–low range ln(H/L), also a fraction of the price
    next_band_low     close·exp(−w) and close·exp(+w), w = band_ratio·σ: the prices the whole next
    next_band_high    window stays inside 90 % of the time
    forecaster        which forecaster said so: `ewma (untrained)` or e.g. `ewma (forecast-v2)`

Until `anomaly_detector.py train` has fitted one, every size uses RiskMetrics' EWMA with the ratios
of Brownian motion (`UNTRAINED`): the farthest excursion from the start over a window stays inside
±1.96 σ 90 % of the time (P(max |W| > x) ≈ 4·P(W > x) for x this large), and the expected range is
2·sqrt(2/π)·σ. Real tails are fatter and the EWMA lags a storm: on the recorded SPY minutes the
next minute stayed inside the untrained band 80 % of the time (IBM 88 %); training set ±2.06 σ there.
"""
from __future__ import annotations

import json
import logging
import math
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from tradewatch.detect import versions

log = logging.getLogger("tradewatch.volatility")

HISTORY = 22                 # windows of a symbol's past the features need (the HAR's longest mean)
FLOOR = 1e-12                # variance floor before a symbol's tick is seen (σ of 0.01 bp a window)
LAMBDA = 0.94                # RiskMetrics
GK = 2 * math.log(2) - 1
RETURNS = (1, 5, 15)         # horizons of the return features, in windows
FEATURES = ("last_vs_day", "week_vs_day", "range_vs_day", *(f"return_{n}" for n in RETURNS), "volume_vs_day",
            "count_vs_day", "time_of_day")
FORECAST_COLUMNS = ("next_sigma", "next_range", "next_band_low", "next_band_high", "forecaster")
DAY_MS = 86_400_000
LOG_CAP = 50.0               # a band edge is never further than e^±50 × the close: past any real move, and
                             # absurd prices (a tick a million times the price) give no overflow
VARIANCE_BOUNDS = (1e-30, LOG_CAP ** 2)   # every variance inside: finite, above 0, so logs and JSON hold
                                          # whatever prices come (1e-300 after 1e12: a fuzzer's, not a market's)


def bounded(variance: float) -> float:
    return min(max(variance, VARIANCE_BOUNDS[0]), VARIANCE_BOUNDS[1])


def scaled(price: float, log_move: float) -> float:
    """price·exp(log_move), the move capped at ±LOG_CAP."""
    return price * math.exp(max(-LOG_CAP, min(LOG_CAP, log_move)))


class ForecastState:
    """One symbol's windows of one size, folded in start order. `update` returns the forecast inputs
    known at the end of the window (None before HISTORY windows from the first that set a price).
    A window without a trade is filled in as `forecast.rows` fills it: the price stood at the last
    close, nothing moved, no volume; a window whose trades all had excluded conditions (close None)
    likewise, but with its volume and count."""

    def __init__(self, size_ms: int):
        self.size_ms = size_ms
        self.start_ms: int | None = None
        self.close: float | None = None
        self.tick: float | None = None          # the smallest price step seen so far
        self.num = self.den = 0.0                # the adjusted EWMA of v, as pandas' ewm(adjust=True)
        self.windows = 0
        self.v: deque[float] = deque(maxlen=HISTORY)
        self.volume: deque[float] = deque(maxlen=HISTORY)
        self.count: deque[float] = deque(maxlen=HISTORY)
        self.log_close: deque[float] = deque(maxlen=max(RETURNS) + 1)

    def to_dict(self) -> dict:
        """The whole state as JSON-able values (the detector stores it with its symbol's state)."""
        return {"size_ms": self.size_ms, "start_ms": self.start_ms, "close": self.close, "tick": self.tick,
                "num": self.num, "den": self.den, "windows": self.windows, "v": list(self.v),
                "volume": list(self.volume), "count": list(self.count), "log_close": list(self.log_close)}

    @classmethod
    def from_dict(cls, data: dict) -> "ForecastState":
        state = cls(data["size_ms"])
        state.start_ms, state.close, state.tick = data["start_ms"], data["close"], data["tick"]
        state.num, state.den, state.windows = data["num"], data["den"], data["windows"]
        for name in ("v", "volume", "count", "log_close"):
            getattr(state, name).extend(data[name])
        return state

    def floor(self, close: float) -> float:
        if self.tick is None:
            return FLOOR
        half = self.tick / close / 2            # (inf or 0 for absurd prices, never an exception)
        return bounded(half * half)

    def update(self, start_ms: int, open_: float | None, high: float | None, low: float | None,
               close: float | None, volume: float, count: int, features: bool = True) -> dict | None:
        if self.close is None and close is None:
            return None                                      # no price yet
        if self.start_ms is not None:
            if start_ms <= self.start_ms:
                return None                                  # already folded
            self._flat((start_ms - self.start_ms) // self.size_ms - 1)
        if close is None:
            open_ = high = low = close = self.close
        step = high - low if self.close is None else min(high - low, abs(close - self.close))
        if step > close * 1e-9:                              # (below: float noise)
            self.tick = step if self.tick is None else min(self.tick, step)
        floor = self.floor(close)
        log_range, drift = math.log(high) - math.log(low), math.log(close) - math.log(open_)    # finite, any prices
        v = bounded(max(0.5 * log_range * log_range - GK * drift * drift, floor))
        self._push(v, float(volume or 0.0), float(count or 0), math.log(close), 1)
        self.start_ms, self.close = start_ms, close
        if self.windows < HISTORY:
            return None
        if not features:                                     # what the EWMA needs, at a third of the cost
            return {"start_ms": start_ms, "close": close, "floor": floor, "ewma": self.num / self.den}
        return self._row(floor, log_range)

    def _flat(self, missing: int) -> None:
        """`missing` windows without a trade: the price stood at the last close."""
        if missing > 0:
            self._push(self.floor(self.close), 0.0, 0.0, math.log(self.close), missing)

    def _push(self, v: float, volume: float, count: float, log_close: float, times: int) -> None:
        decay = LAMBDA ** times
        weight = (1 - decay) / (1 - LAMBDA)                 # 1 + λ + … + λ^(times−1)
        self.num = v * weight + decay * self.num
        self.den = weight + decay * self.den
        for _ in range(min(times, HISTORY)):
            self.v.append(v)
            self.volume.append(volume)
            self.count.append(count)
        for _ in range(min(times, self.log_close.maxlen)):
            self.log_close.append(log_close)
        self.windows += times

    def _row(self, floor: float, log_range: float) -> dict:
        v = self.v[-1]
        day = sum(self.v) / len(self.v)
        week = sum(list(self.v)[-5:]) / min(5, len(self.v))
        row = {"start_ms": self.start_ms, "close": self.close, "floor": floor, "v": v, "day": day, "week": week,
               "ewma": self.num / self.den, "last_vs_day": math.log(v / day), "week_vs_day": math.log(week / day),
               "range_vs_day": math.log(max(log_range ** 2, floor) / day),
               "volume_vs_day": math.log((self.volume[-1] + 1) / (sum(self.volume) / len(self.volume) + 1)),
               "count_vs_day": math.log((self.count[-1] + 1) / (sum(self.count) / len(self.count) + 1)),
               "time_of_day": ((self.start_ms + self.size_ms) % DAY_MS) / DAY_MS}
        for n in RETURNS:
            row[f"return_{n}"] = (self.log_close[-1] - self.log_close[-1 - n]) / math.sqrt(n * day)
        return row


@dataclass
class Live:
    """The forecaster one window size uses live: its band and range ratios, and the fitted
    forecaster when it is not the EWMA (which has nothing fitted)."""
    name: str
    band_ratio: float
    range_ratio: float
    source: str
    fitted: object | None = None         # a forecast.Forecaster

    @property
    def label(self) -> str:
        return f"{self.name} ({self.source})"

    @property
    def needs_features(self) -> bool:
        """Whether `forecast` reads the rows' features (the EWMA reads only `ewma` and `close`)."""
        return self.fitted is not None

    def forecast(self, rows: list[dict]) -> list[tuple]:
        """FORECAST_COLUMNS for each row of ForecastState.update (each with its `symbol`)."""
        if not rows:
            return []
        if self.fitted is None:
            variances = [r["ewma"] for r in rows]
        else:
            import pandas as pd      # only a trained model other than the EWMA needs it

            variances = list(self.fitted.variance(pd.DataFrame(rows)))
        out = []
        for row, variance in zip(rows, variances):
            sigma = math.sqrt(variance)
            width = self.band_ratio * sigma
            out.append((sigma, self.range_ratio * sigma, scaled(row["close"], -width), scaled(row["close"], width),
                        self.label))
        return out


UNTRAINED = Live("ewma", 1.96, 2 * math.sqrt(2 / math.pi), "untrained")


class Forecasters(dict):
    """The Live forecaster per window size label; a size training skipped uses UNTRAINED."""

    def __missing__(self, label: str) -> Live:
        return UNTRAINED


def load(directory: Path) -> Forecasters:
    """The forecasters of the latest `forecast-vN` in `directory` (UNTRAINED for every size when
    there is none). The EWMA is read from the .json alone; only a model needs its .joblib (and
    pandas, scikit-learn)."""
    path = versions.latest(directory, "forecast")
    found = Forecasters()
    if path is None:
        log.info("no trained forecaster in %s: the EWMA with Brownian ratios for every size", directory)
        return found
    meta = json.loads(path.with_suffix(".json").read_text())
    sizes = {label: s for label, s in meta["sizes"].items() if "chosen" in s}
    if any(s["chosen"] != "ewma" for s in sizes.values()):
        from tradewatch.detect import forecast

        fitted, _ = forecast.load(path)
        found.update({label: Live(s["chosen"], c.band_ratio, c.range_ratio, f"forecast-{meta['version']}", c.forecaster)
                      for label, s in sizes.items() for c in [fitted[label]]})
    else:
        found.update({label: Live("ewma", s["band_ratio"], s["range_ratio"], f"forecast-{meta['version']}")
                      for label, s in sizes.items()})
    log.info("forecasters from %s: %s", path.name, {label: f.name for label, f in found.items()} or "none trained")
    return found
