"""Technical indicators over a symbol's final candles, updated one close at a time (no I/O).

    SMA 20, 50      mean of the last n closes
    EMA 12, 26      alpha = 2/(n+1), seeded with the first close
    RSI 14          Wilder: gains/losses smoothed with alpha = 1/14 (seeded with the first change),
                    reported from the 14th change on
    MACD 12/26/9    EMA12 - EMA26; signal = EMA9 of MACD; histogram = MACD - signal
    Bollinger 20/2  SMA20 ± 2 population standard deviations of the last 20 closes

Values are None until enough candles exist. `IndicatorState` is constant work per candle.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, fields

SMA_SHORT, SMA_LONG = 20, 50
EMA_FAST, EMA_SLOW, MACD_SIGNAL = 12, 26, 9
RSI_PERIOD = 14
BOLLINGER_PERIOD, BOLLINGER_WIDTH = 20, 2.0


@dataclass(slots=True)
class Indicators:
    sma_20: float | None = None
    sma_50: float | None = None
    ema_12: float | None = None
    ema_26: float | None = None
    rsi_14: float | None = None
    macd: float | None = None
    macd_signal: float | None = None
    macd_histogram: float | None = None
    bollinger_mid: float | None = None
    bollinger_upper: float | None = None
    bollinger_lower: float | None = None


INDICATOR_COLUMNS = tuple(f.name for f in fields(Indicators))


class IndicatorState:
    def __init__(self) -> None:
        self._closes: deque[float] = deque(maxlen=SMA_LONG)
        self._ema_fast: float | None = None
        self._ema_slow: float | None = None
        self._macd_signal: float | None = None
        self._previous_close: float | None = None
        self._avg_gain: float | None = None
        self._avg_loss: float | None = None
        self._changes = 0

    def update(self, close: float) -> Indicators:
        closes = self._closes
        closes.append(close)
        out = Indicators()
        if len(closes) >= SMA_SHORT:
            recent = list(closes)[-SMA_SHORT:]
            mean = sum(recent) / SMA_SHORT
            out.sma_20 = out.bollinger_mid = mean
            sigma = math.sqrt(max(sum((c - mean) ** 2 for c in recent) / SMA_SHORT, 0.0))
            out.bollinger_upper = mean + BOLLINGER_WIDTH * sigma
            out.bollinger_lower = mean - BOLLINGER_WIDTH * sigma
        if len(closes) >= SMA_LONG:
            out.sma_50 = sum(closes) / SMA_LONG
        self._ema_fast = _ema(self._ema_fast, close, EMA_FAST)
        self._ema_slow = _ema(self._ema_slow, close, EMA_SLOW)
        out.ema_12, out.ema_26 = self._ema_fast, self._ema_slow
        out.macd = self._ema_fast - self._ema_slow
        self._macd_signal = _ema(self._macd_signal, out.macd, MACD_SIGNAL)
        out.macd_signal = self._macd_signal
        out.macd_histogram = out.macd - self._macd_signal
        if self._previous_close is not None:
            change = close - self._previous_close
            gain, loss = max(change, 0.0), max(-change, 0.0)
            alpha = 1.0 / RSI_PERIOD
            if self._avg_gain is None:
                self._avg_gain, self._avg_loss = gain, loss
            else:
                self._avg_gain += alpha * (gain - self._avg_gain)
                self._avg_loss += alpha * (loss - self._avg_loss)
            self._changes += 1
            if self._changes >= RSI_PERIOD:
                if self._avg_loss == 0:
                    out.rsi_14 = 100.0 if self._avg_gain > 0 else 50.0
                else:
                    out.rsi_14 = 100.0 - 100.0 / (1.0 + self._avg_gain / self._avg_loss)
        self._previous_close = close
        return out


def _ema(previous: float | None, value: float, period: int) -> float:
    if previous is None:
        return value
    return previous + 2.0 / (period + 1) * (value - previous)


def series(closes: list[float]) -> list[Indicators]:
    state = IndicatorState()
    return [state.update(c) for c in closes]
