"""OUT_OF_RANGE: a trade far outside the band forecast for its window (issue 28) — a threshold
that follows the market's own calm and storm.

Per symbol the detector cuts its trades into the 1-minute windows of the aggregator (the windows of
the band on the chart) and, when a window ends, folds it into a volatility.ForecastState as the
aggregator folds its final candles; the forecaster the aggregator uses (the trained one, else the
EWMA with Brownian ratios) then forecasts σ for the next window, and the band is
close·exp(±ratio·σ): the prices the whole next window stays inside 90 % of the time.

The band's σ measures how far prices move *inside* a window. A trade is judged by its distance from
the last close, which also holds the step from one window to the next; where trades are sparse (a
pre-market, an illiquid pair) most of the movement is in those steps, and windows of one or two
trades show almost no range: σ falls to its floor of half a tick and every next trade looks like a
10 σ move (the recorded IBM day: 15 minutes beyond 5.9 σ by the band's σ alone, none with the
step's). So the rule's σ is the larger of the band's and the *step σ*, an EWMA (the band's λ) of
the squared log change between the closes of consecutive windows that had a price, per window
between them (a window without a trade is a price not seen, not a price that stood still).

A trade fires when it lies more than `range_widths` band widths beyond the band's edge, that is when
|ln(price / close)| > ratio·σ·√h·(1 + 2·range_widths), h the windows from that close to the end of
the trade's (a symbol without trades for minutes may have moved meanwhile: variances add up over
windows); and when the move from the close is also more than `spike_ticks` ticks and twice
`spike_spreads` spreads (the instrument's own units, as for the price rules; twice, as the close is
itself a print: on a thin pair a minute may close on a sweep two spreads past the ask and the next
trade be a sweep two spreads under the bid, five spreads apart and both ordinary). The default,
one band width, is 3 × 1.96 = 5.9 σ: a move Brownian motion makes in about one window in 10⁸, so
what fires is a fat tail — a jump the recent minutes give no hint of. Once per window: a price
that jumped stays outside the band until the window ends, and its first trade out tells it.

The detector's windows differ from the aggregator's in two ways, both on purpose: a trade the price
rules flagged does not set a price (one bad print must not widen the band and blind the rule for
the next half hour), and a trade with an excluded sale condition (OHLC_EXCLUDE_CONDITIONS) sets no
price and is not judged, as the aggregator leaves it out of its candles.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from tradewatch.candles import BASE_SIZE
from tradewatch.volatility import LAMBDA, ForecastState, Live, bounded, scaled
from tradewatch.windows import parse_size

WINDOW_MS = parse_size(BASE_SIZE)


@dataclass(frozen=True)
class Band:
    """The band of the window starting at `start_ms`, forecast at the close of the window starting
    at `close_ms` (`horizon` windows before this one's end)."""
    start_ms: int
    close_ms: int
    close: float
    sigma: float            # of one window's log price, a fraction of the price
    step_sigma: float       # of the change from one window's close to the next (0: not known yet)
    ratio: float            # the band's half-width in σ
    forecaster: str
    size_ms: int
    trades: int             # in the window whose close is the centre

    @property
    def horizon(self) -> int:
        return (self.start_ms - self.close_ms) // self.size_ms

    @property
    def half(self) -> float:
        """The band's half-width in log price."""
        return self.ratio * self.sigma * math.sqrt(self.horizon)

    @property
    def unit(self) -> float:
        """The rule's σ over the windows since the centre's close: the larger of the band's and the step's."""
        return max(self.sigma, self.step_sigma) * math.sqrt(self.horizon)

    @property
    def low(self) -> float:
        return scaled(self.close, -self.half)

    @property
    def high(self) -> float:
        return scaled(self.close, self.half)


class BandWatch:
    """One symbol's windows as the detector sees them, and the band of the current one."""

    def __init__(self, size_ms: int = WINDOW_MS):
        self.size_ms = size_ms
        self.state = ForecastState(size_ms)
        self.window: list | None = None      # [start_ms, open, high, low, close, volume, count]
        self.forecast: list | None = None    # [close_ms, close, sigma, ratio, forecaster, trades]
        self.fired_ms: int | None = None     # the window of the last OUT_OF_RANGE
        self.step: list = [0.0, 0.0, None, None]   # the step σ's EWMA [num, den], the last priced window [ms, close]
        self.lines: tuple[float, float] | None = None   # OUT_OF_RANGE's lines as prices, for the window
        self.lines_for: int | None = None                # starting then (worked out again after a restore)

    def to_dict(self) -> dict:
        return {"state": self.state.to_dict(), "window": self.window, "forecast": self.forecast,
                "fired_ms": self.fired_ms, "step": self.step}

    @classmethod
    def from_dict(cls, data: dict) -> "BandWatch":
        watch = cls(data["state"]["size_ms"])
        watch.state = ForecastState.from_dict(data["state"])
        watch.window, watch.forecast, watch.fired_ms = data["window"], data["forecast"], data["fired_ms"]
        watch.step = data["step"]
        return watch

    def outside(self, symbol: str, ts_ms: int, price: float | None, forecaster: Live, widths: float) -> Band | None:
        """The band of the window holding `ts_ms` when `price` lies more than `widths` band widths
        beyond its edge; None while inside, before the symbol has a forecast, for a trade older
        than the current window (late: its band has gone), when OUT_OF_RANGE already fired in this
        window, or for `price` None (a trade not judged). A trade of a new window first closes the
        one before (forecasting with `forecaster`). The line is worked out once a window."""
        start = ts_ms - ts_ms % self.size_ms
        w = self.window
        if w is None or start > w[0]:
            if w is not None:
                self._close(symbol, forecaster)
            self.window = [start, None, None, None, None, 0.0, 0]
        elif start < w[0]:
            return None
        if self.lines_for != start:
            band = self.band(start)
            line = band.ratio * band.unit * (1 + 2 * widths) if band else 0.0
            self.lines = (scaled(band.close, -line), scaled(band.close, line)) if band else None
            self.lines_for = start
        lines = self.lines
        if price is None or lines is None or lines[0] <= price <= lines[1] or self.fired_ms == start:
            return None
        return self.band(start)

    def band(self, start: int) -> Band | None:
        """The band of the window starting at `start` (after the window before it closed)."""
        if self.forecast is None:
            return None
        close_ms, close, sigma, ratio, label, trades = self.forecast
        num, den = self.step[:2]
        return Band(start, close_ms, close, sigma, math.sqrt(num / den) if den else 0.0, ratio, label, self.size_ms,
                    trades)

    def fold(self, ts_ms: int, price: float | None, quantity: float) -> None:
        """Add a trade to its window (after `outside`); `price` None: it sets no price."""
        w = self.window
        if w is None or ts_ms - ts_ms % self.size_ms != w[0]:
            return                                           # late: its window is closed
        w[5] += quantity
        w[6] += 1
        if price is not None:
            if w[1] is None:
                w[1] = w[2] = w[3] = price
            elif price > w[2]:
                w[2] = price
            elif price < w[3]:
                w[3] = price
            w[4] = price

    def fired(self, start_ms: int) -> None:
        self.fired_ms = start_ms

    def _close(self, symbol: str, forecaster: Live) -> None:
        start, open_, high, low, close, volume, count = self.window
        self.window = None
        num, den, last_ms, last_close = self.step
        if close is not None:
            if last_close is not None:
                step = math.log(close) - math.log(last_close)
                change = bounded(step * step / ((start - last_ms) // self.size_ms))
                num, den = change + LAMBDA * num, 1 + LAMBDA * den
            self.step = [num, den, start, close]
        row = self.state.update(start, open_, high, low, close, volume, count, forecaster.needs_features)
        if row is None:
            return                                           # no price yet, or a past too short
        sigma, _, _, _, label = forecaster.forecast([{"symbol": symbol, **row}])[0]
        self.forecast = [start, self.state.close, sigma, forecaster.band_ratio, label, count]
