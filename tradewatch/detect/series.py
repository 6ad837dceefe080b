"""Detectors for a plain time series (timestamp, value), e.g. the NAB tweet-volume files.

    zscore_baseline   rolling mean/std of the previous `window` points, flag |z| > 3 at every
                      point beyond the threshold — the textbook baseline
    episode_zscore    the same z-score over a week of history (2016 five-minute points), plus a
                      z-score of the 3-hour moving average (sustained surges), then one detection
                      per episode: quiet for `refractory` points after each detection
    likelihood        the default: anomaly likelihood of a sustained z-score over its own recent
                      distribution (an adaptive threshold), against the same time on earlier days
                      when the series has a daily cycle, one detection per episode (see Likelihood)
The defaults of `episode_zscore` were tuned on the tweet-volume files only (76.8 there, 37.5 over
all NAB categories); `likelihood`'s across all five (bench/nab.py scores each category with the
setting chosen on the others).
Every detector is causal: a point's verdict uses only the points before it (and itself), so it runs
live and its detections on a prefix never change when later points arrive (a test checks). Each
returns a Series of strengths (> 1 = beyond the threshold) indexed by the flagged timestamps.
"""
from __future__ import annotations

import math
from collections import deque

import numpy as np
import pandas as pd


def _z(values: pd.Series, window: int) -> pd.Series:
    history = values.shift(1).rolling(window, min_periods=window // 4)
    return (values - history.mean()) / history.std(ddof=0)


def _smoothed_z(values: pd.Series, window: int, smooth: int) -> pd.Series:
    smoothed = values.rolling(smooth).mean()
    history = smoothed.shift(smooth).rolling(window, min_periods=window // 4)
    return (smoothed - history.mean()) / history.std(ddof=0)


def _one_per_episode(score: pd.Series, refractory: int) -> pd.Series:
    """Keep the first point beyond the threshold (> 1) of each episode: drop those within
    `refractory` points of a kept one. By position: a series may repeat a timestamp."""
    kept, last = [], -10**12
    for pos in (score.to_numpy() > 1).nonzero()[0]:
        if pos - last > refractory:
            kept.append(pos)
            last = pos
    return score.iloc[kept].astype(float)


def zscore_baseline(values: pd.Series, window: int = 288, threshold: float = 3.0) -> pd.Series:
    z = _z(values, window).abs()
    return (z.where(z > threshold) / threshold).dropna()


def episode_zscore(values: pd.Series, window: int = 2016, threshold: float = 8.0, smooth: int = 36,
                   smooth_threshold: float = 5.0, refractory: int = 288) -> pd.Series:
    score = pd.concat([_z(values, window) / threshold,
                       _smoothed_z(values, window, smooth) / smooth_threshold], axis=1).max(axis=1)
    return _one_per_episode(score, refractory)


class _Window:
    """A bounded window of floats with its running mean and standard deviation."""

    def __init__(self, size: int):
        self.items: deque = deque(maxlen=size)
        self.s1 = self.s2 = 0.0

    def __len__(self) -> int:
        return len(self.items)

    def push(self, value: float) -> None:
        if len(self.items) == self.items.maxlen:
            old = self.items[0]
            self.s1, self.s2 = self.s1 - old, self.s2 - old * old
        self.items.append(value)
        self.s1, self.s2 = self.s1 + value, self.s2 + value * value

    def mean_std(self) -> tuple[float, float]:
        n = len(self.items)
        mean = self.s1 / n
        return mean, math.sqrt(max(self.s2 / n - mean * mean, 1e-12))


MAX_PERIOD = 10_000     # points per day beyond which no daily cycle is looked for (finer than ~9 s)
RAW_CAP = 10.0          # a point's |z| counts up to this in the average; a point at it is a detection
CAP_TAIL = 0.5 * math.erfc(RAW_CAP / math.sqrt(2))      # the normal's tail beyond it, 7.6e-24


class Likelihood:
    """Anomaly likelihood over a recent score distribution, one point at a time (only the past).

    1. Raw score: |z| of the point against the previous `base` points (a week of 5-minute points),
       capped at 10, on sign(v)·log(1 + |v|) (counts and sizes are heavy-tailed; negative values
       keep their sign). A series with a strong daily cycle is judged by its residual instead: the
       point minus the median of the same time on the previous three days, against the previous
       `base` residuals — so the daily peak is not an anomaly, and a missing peak, a flat day or a
       peak out of line is. "Strong": the autocorrelation at one day (`period` points, from the
       sampling interval) is at least `season_acf` over the last four days, checked once a day;
       once found, kept.
    2. The mean of the last `short` raw scores (a sustained change outweighs one odd point).
    3. Its tail probability under the normal fitted to that mean's last `history` values (30 days):
       a detection when it is below `tail` — the threshold adapts to how noisy the series is. A point
       at the cap (10 σ from its baseline) is a detection by itself, its tail the normal's beyond
       10 σ: the average is there to find changes too small to see in one point, not to hide one
       that large. It did: once a daily cycle is found the raw scores are residuals, far smaller
       than the z-scores of the cycle before it, while the averages' history still holds those for
       30 days, so a spike of 60 σ every hour for a day averaged to an ordinary value and went
       unseen (evaluate.daily_cycle_series "spike_train", 1 series of 4 found). Refilling that
       history from the residuals when the cycle is found made it too short to be calm on noisy
       cycles (false detections on a noisy sine; NAB 63.1 -> 62.0); the cap costs NAB 0.1.
    4. One detection per episode: after a detection, the next needs the episode to be over — the
       average back within the threshold for `short` points in a row (as long as the average
       spans) — and `refractory` points (6 hours of 5-minute points) to have passed. A change that
       lasts is one detection however long it lasts; the refractory span alone fired once a span.
    The shape of the anomaly likelihood used by NAB's best detectors (HTM, CAD OSE), over a z-score
    instead of a learned model's prediction error.

    Tuned across NAB's categories, not per file; `bench/nab.py` scores every category with the
    setting best on the others, and `evaluate` scores daily-cycle series with anomalies that are
    generated here, not NAB's (evaluate.daily_cycle_series)."""

    def __init__(self, base: int = 2016, short: int = 12, history: int = 8640, tail: float = 1e-2,
                 refractory: int = 72, learning: int = 150, period: int | None = None, season_acf: float = 0.7):
        self.short, self.tail, self.refractory, self.learning = short, tail, refractory, learning
        self.values, self.residuals, self.means = _Window(base), _Window(base), _Window(history)
        self.raws: deque = deque(maxlen=short)
        self.period = period if period and 2 <= period <= MAX_PERIOD else None
        self.recent: deque = deque(maxlen=4 * self.period + 1 if self.period else 1)
        self.season_acf, self.seasonal = season_acf, False
        self.position, self.last_detection = 0, -10**12
        self.calm = short        # points in a row with the average within the threshold

    def update(self, value: float) -> float:
        """Take the next point; its strength (> 1 = a detection, 0 = none)."""
        raw = self._raw(math.copysign(math.log1p(abs(value)), value))
        self.raws.append(raw)
        average = sum(self.raws) / len(self.raws)
        strength = 0.0
        if len(self.means) >= self.learning:
            mu, sigma = self.means.mean_std()
            tail = 0.5 * math.erfc((average - mu) / sigma / math.sqrt(2))
            if raw >= RAW_CAP:
                tail = min(tail, CAP_TAIL)
            over = self.calm >= self.short and self.position - self.last_detection > self.refractory
            self.calm = 0 if tail < self.tail else self.calm + 1
            if tail < self.tail and over:
                strength = math.log(max(tail, 1e-300)) / math.log(self.tail)   # > 1 beyond the threshold
                self.last_detection = self.position
        self.means.push(average)
        self.position += 1
        return strength

    def _raw(self, y: float) -> float:
        window, x = self.values, y
        if self.period:
            p, recent = self.period, self.recent
            recent.append(y)
            if not self.seasonal and len(recent) == recent.maxlen and self.position % p == 0:
                days = np.fromiter(recent, float)
                with np.errstate(invalid="ignore", divide="ignore"):
                    self.seasonal = bool(np.corrcoef(days[p:], days[:-p])[0, 1] >= self.season_acf)
            if len(recent) > 3 * p:
                residual = y - sorted((recent[-1 - p], recent[-1 - 2 * p], recent[-1 - 3 * p]))[1]
                if self.seasonal:
                    window, x = self.residuals, residual
                else:
                    self.residuals.push(residual)
        raw = 0.0
        if len(window) >= 20:
            mean, std = window.mean_std()
            raw = min(abs(x - mean) / std, RAW_CAP)
        window.push(x)
        return raw


def daily_period(index: pd.Index) -> int | None:
    """Points per day of a series sampled at a regular interval (the median of its first steps)."""
    if not isinstance(index, pd.DatetimeIndex) or len(index) < 3:
        return None
    step = pd.Series(index[:1000]).diff().dt.total_seconds().median()
    return int(round(86_400 / step)) if step and step > 0 else None


def likelihood(values: pd.Series, **settings: float) -> pd.Series:
    detector = Likelihood(**{"period": daily_period(values.index), **settings})
    strengths = [detector.update(float(v)) for v in values.to_numpy(dtype=float)]
    flagged = [i for i, s in enumerate(strengths) if s > 0]
    return pd.Series([strengths[i] for i in flagged], index=values.index[flagged], dtype=float)


SERIES_DETECTORS = {"likelihood": likelihood, "episode_zscore": episode_zscore, "zscore_baseline": zscore_baseline}
DEFAULT_SERIES_DETECTOR = "likelihood"
