"""Detectors for a plain time series (timestamp, value), e.g. the NAB tweet-volume files.

    zscore_baseline   rolling mean/std of the previous `window` points, flag |z| > 3 at every
                      point beyond the threshold — the textbook baseline
    episode_zscore    the same z-score over a week of history (2016 five-minute points), plus a
                      z-score of the 3-hour moving average (sustained surges), then one detection
                      per episode: quiet for `refractory` points after each detection
    isolation_forest  Isolation Forest over [value, change, z, smoothed z], the `flag_quantile` most
                      isolated points above normal, with the same refractory period
Each returns a Series of strengths (> 1 = beyond the threshold) indexed by the flagged timestamps.
"""
from __future__ import annotations

import pandas as pd
from sklearn.ensemble import IsolationForest


def _z(values: pd.Series, window: int) -> pd.Series:
    history = values.shift(1).rolling(window, min_periods=window // 4)
    return (values - history.mean()) / history.std(ddof=0)


def _smoothed_z(values: pd.Series, window: int, smooth: int) -> pd.Series:
    smoothed = values.rolling(smooth).mean()
    history = smoothed.shift(smooth).rolling(window, min_periods=window // 4)
    return (smoothed - history.mean()) / history.std(ddof=0)


def _one_per_episode(candidates: pd.Series, refractory: int, index: pd.Index) -> pd.Series:
    """Keep the first candidate of each episode: drop those within `refractory` points of a kept one."""
    kept, last = {}, -10**12
    for pos, (label, score) in zip(index.get_indexer(candidates.index), candidates.items()):
        if pos - last > refractory:
            kept[label] = score
            last = pos
    return pd.Series(kept, dtype=float)


def zscore_baseline(values: pd.Series, window: int = 288, threshold: float = 3.0) -> pd.Series:
    z = _z(values, window).abs()
    return (z.where(z > threshold) / threshold).dropna()


def episode_zscore(values: pd.Series, window: int = 2016, threshold: float = 8.0, smooth: int = 36,
                   smooth_threshold: float = 5.0, refractory: int = 288) -> pd.Series:
    score = pd.concat([_z(values, window) / threshold,
                       _smoothed_z(values, window, smooth) / smooth_threshold], axis=1).max(axis=1)
    return _one_per_episode(score.where(score > 1).dropna(), refractory, values.index)


def isolation_forest(values: pd.Series, window: int = 2016, flag_quantile: float = 0.002,
                     refractory: int = 288, seed: int = 0) -> pd.Series:
    z = _z(values, window).fillna(0.0)
    frame = pd.DataFrame({"value": values, "change": values.diff().fillna(0.0), "z": z,
                          "smoothed_z": _smoothed_z(values, window, 36).fillna(0.0)})
    forest = IsolationForest(n_estimators=200, random_state=seed).fit(frame)
    raw = pd.Series(-forest.score_samples(frame), index=values.index)
    threshold = raw.quantile(1 - flag_quantile)
    candidates = (raw.where((raw > threshold) & (z > 0)) / threshold).dropna()
    return _one_per_episode(candidates, refractory, values.index)


SERIES_DETECTORS = {"zscore_baseline": zscore_baseline, "episode_zscore": episode_zscore,
                    "isolation_forest": isolation_forest}
