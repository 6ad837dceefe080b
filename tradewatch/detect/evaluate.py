"""Scores detectors against ground truth: the simulator's injected labels, and NAB's windows.

Simulated data: for each injected kind, precision/recall/F1 of the detector types meant for it.
A flash crash is one event over its consecutive trades of one symbol (found when any of them is
flagged: its first and last steps are only 3–4 % moves); the other kinds are one trade each.
A trade of another injected kind flagged with that type is not counted against precision (it is a
real anomaly, named differently, e.g. a flash crash's −9 % trade flagged PRICE_DROP); flags on
unlabelled trades are false alerts, reported per 10,000 normal trades.

Real recorded trades (../shared/data/lean): known anomalies injected into a real day by
tradewatch/detect/inject.py, scored with recall per kind and false alarms per 10,000 normal
trades. The rules were tuned on the SPY day; the IBM day (another symbol) is only scored.

Simulated order books (tradewatch/market/books.py): spoofing and quote-stuffing episodes injected
into the books, watched by tradewatch/detect/book_rules.py; recall per kind and false alarms per
10,000 book updates, on the run the thresholds were chosen on and on runs with other seeds, book
noise, depth and trade rates (scored only); and the same runs with nothing injected (calm).

Forecasts of the next window's volatility, range and 90 % band (tradewatch/detect/forecast.py),
walk-forward on the recorded SPY and IBM day and on a simulated day, beside the naive baselines.

NAB: the series detectors run point by point over each file and are scored with NAB's own rules
(standard profile, see nab_raw_score), normalised to NAB's 0–100 scale; the same rules score them
on generated daily-cycle series with known anomalies (daily_cycle_series), a kind of series no
detector setting was chosen on, and on generated series of other shapes, rates and units
(other_shape_series: hourly, minute and 5-minute points, counts, walks, values from 0.01 to 10,000,
series with no anomaly), on seeds no setting was chosen on.
"""
from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import replace
from itertools import islice
from pathlib import Path

import numpy as np
import pandas as pd

from tradewatch.detect import forecast, forest
from tradewatch.detect.pipeline import DetectionPipeline
from tradewatch.detect.rules import DetectorConfig, RuleDetector
from tradewatch.detect.series import SERIES_DETECTORS
from tradewatch.market.simulator import IlliquidProfile, MarketSimulator, illiquid_market

LABEL_TYPES = {
    "price_spike": {"PRICE_SPIKE"},
    "price_drop": {"PRICE_DROP"},
    "volume_spike": {"VOLUME_SPIKE"},
    "flash_crash": {"CIRCUIT_BREAKER", "PRICE_DROP"},
}
NAB_PROBATION = 0.15


def simulated_stream(seed: int, count: int, anomaly_rate: float, rate: float = 50.0):
    return list(islice(MarketSimulator(seed=seed, rate=rate, anomaly_rate=anomaly_rate,
                                       start_ms=1_767_225_600_000), count))


def train_on_simulation(seed: int, count: int, anomaly_rate: float, config: DetectorConfig) -> forest.ForestModel:
    rules = RuleDetector(config)
    detections = [rules.process(t) for t in simulated_stream(seed, count, anomaly_rate)]
    rows = np.array([d.features.vector() for d in detections if d.features.history >= config.min_history])
    return forest.train(rows, {"source": "simulator", "seed": seed, "trades": count})


def score_simulated(seeds: list[int], count: int = 50_000, anomaly_rate: float = 0.005,
                    config: DetectorConfig = DetectorConfig(), model: forest.ForestModel | None = None) -> dict:
    totals = {label: Counter() for label in LABEL_TYPES}
    per_type_normal: Counter = Counter()
    per_type_anomalous: Counter = Counter()
    normal = flagged_normal = 0
    labelled: Counter = Counter()
    for seed in seeds:
        pipeline = DetectionPipeline(RuleDetector(config), model)
        crashes: dict[str, bool] = {}            # symbol -> crash in progress found so far
        for d in pipeline.process(simulated_stream(seed, count, anomaly_rate)):
            label = d.trade.injected_anomaly
            types = set(d.types)
            symbol = d.trade.symbol
            if label == "flash_crash":
                crashes[symbol] = crashes.get(symbol, False) or bool(types & LABEL_TYPES["flash_crash"])
                continue
            if symbol in crashes:                # the crash of this symbol is over: one event
                totals["flash_crash"]["tp" if crashes.pop(symbol) else "fn"] += 1
                labelled["flash_crash"] += 1
            for t in types:
                (per_type_anomalous if label else per_type_normal)[t] += 1
            if label is None:
                normal += 1
                flagged_normal += bool(types)
            else:
                labelled[label] += 1
            for kind, wanted in LABEL_TYPES.items():
                hit = bool(types & wanted)
                if label == kind:
                    totals[kind]["tp" if hit else "fn"] += 1
                elif label is None and hit:
                    totals[kind]["fp"] += 1
    result = {"seeds": seeds, "trades_per_seed": count, "anomaly_rate": anomaly_rate, "per_type": {}}
    for kind, c in totals.items():
        precision = c["tp"] / (c["tp"] + c["fp"]) if c["tp"] + c["fp"] else 0.0
        recall = c["tp"] / (c["tp"] + c["fn"]) if c["tp"] + c["fn"] else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        result["per_type"][kind] = {"injected": labelled[kind], "precision": round(precision, 4),
                                    "recall": round(recall, 4), "f1": round(f1, 4)}
    result["normal_trades"] = normal
    result["false_alerts_per_10k_normal"] = round(flagged_normal / normal * 1e4, 3) if normal else 0.0
    result["per_detector"] = {t: {"on_anomalies": per_type_anomalous[t], "on_normal": per_type_normal[t]}
                              for t in sorted(set(per_type_anomalous) | set(per_type_normal))}
    return result


REAL_DAYS = {"tuning": ("spy_20131007_trades.csv.gz", (1, 2), 25),
             "scoring": ("ibm_20131007_trades.csv.gz", (11, 12, 13), 8)}


def score_real(lean_dir: Path, config: DetectorConfig = DetectorConfig(),
               model: forest.ForestModel | None = None) -> dict:
    """Per role (tuning, scoring): the day's trades with `per_kind` injected events of each kind per
    seed, through the detection pipeline; recall and false alarms summed over the seeds."""
    from tradewatch.detect import inject
    from tradewatch.market import replay
    result = {}
    for role, (name, seeds, per_kind) in REAL_DAYS.items():
        background = replay.load(lean_dir / name).trades
        natural = inject.natural_whales(background)
        flags, events, offset = [], [], 0
        for seed in seeds:
            changed, injected = inject.inject(background, seed, per_kind)
            flags += [set(d.types) for d in DetectionPipeline(RuleDetector(config), model).process(changed)]
            events += [inject.Event(e.kind, e.first + offset, e.last + offset, e.size) for e in injected]
            offset += len(changed)
        natural_all = {i + k * len(background) for k in range(len(seeds)) for i in natural}
        result[role] = {"day": name, "seeds": list(seeds), **inject.score(flags, events, natural_all)}
    return result


JUMP_SIZES = (0.0025, 0.005, 0.01, 0.02)
JUMP_SEEDS, JUMPS_PER_DAY = (1, 2, 3), 8
PRICE_RULES = {"PRICE_SPIKE", "PRICE_DROP", "CIRCUIT_BREAKER", "PRICE_ZSCORE", "MOMENTUM_RUN"}


def score_out_of_range(lean_dir: Path, config: DetectorConfig = DetectorConfig(),
                       excluded_conditions: frozenset[str] = frozenset(), sizes: tuple = JUMP_SIZES,
                       seeds: tuple = JUMP_SEEDS, days: tuple = ("spy", "ibm")) -> dict:
    """OUT_OF_RANGE on the recorded SPY and IBM day (tradewatch/detect/band.py): the alerts a user
    gets on each day as recorded, every type (deduplicated as the live detector does); and lasting
    jumps of the price by JUMP_SIZES injected JUMPS_PER_DAY times a day (inject.jumps), each found
    when a flag lands on a trade of its first minute — by OUT_OF_RANGE, and by the fixed price rules
    beside it."""
    from tradewatch.alerts import Deduplicator, alerts_for
    from tradewatch.detect import inject
    from tradewatch.market import replay
    result = {}
    for name in (f"{d}_20131007_trades.csv.gz" for d in days):
        day = replay.load(lean_dir / name).trades
        dedup = Deduplicator(ALERT_COOLDOWNS_S)
        calm = Counter(a.alert_type for d in DetectionPipeline(RuleDetector(config, excluded=excluded_conditions))
                       .process(day) for a in alerts_for(d) if dedup.allow(a))
        found = {}
        for size in sizes:
            by_band = by_rules = total = 0
            for seed in seeds:
                changed, starts = inject.jumps(day, seed, JUMPS_PER_DAY, size)
                detections = DetectionPipeline(RuleDetector(config, excluded=excluded_conditions)).process(changed)
                for i in starts:
                    end = changed[i].timestamp_ms + 60_000
                    types = set().union(*(d.types for d in detections[i:] if d.trade.timestamp_ms < end))
                    total += 1
                    by_band += "OUT_OF_RANGE" in types
                    by_rules += bool(types & PRICE_RULES)
            found[f"{size:.2%}"] = {"jumps": total, "out_of_range": round(by_band / total, 4),
                                    "price_rules": round(by_rules / total, 4)}
        result[name] = {"alerts_as_recorded": dict(calm.most_common()),
                        "out_of_range_as_recorded": calm["OUT_OF_RANGE"], "jumps_found_within_a_minute": found}
    return result


FORECAST_SIZES_MS = {"1m": 60_000, "5m": 300_000}
# a simulated day for the forecasts: ten symbols at 4 trades/s (a few trades per symbol a minute, like
# a quiet listing), nothing injected
FORECAST_SIMULATED = {"seed": 7, "rate": 4.0, "start_ms": 1_767_225_600_000, "days": 1}


def score_forecasts(lean_dir: Path, excluded_conditions: frozenset[str] = frozenset()) -> dict:
    """Per data set (the recorded SPY and IBM day, candles built with `excluded_conditions` as the
    aggregator builds them; a simulated day) and window size: the walk-forward scores of every
    forecaster and the one the product would use."""
    from tradewatch.market import replay
    from tradewatch.windows import aggregate

    recorded = [t for name in ("spy_20131007_trades.csv.gz", "ibm_20131007_trades.csv.gz")
                for t in replay.load(lean_dir / name).trades]
    recorded.sort(key=lambda t: t.timestamp_ms)
    sim = FORECAST_SIMULATED
    simulated = list(MarketSimulator(seed=sim["seed"], rate=sim["rate"], start_ms=sim["start_ms"])
                     .trades_until(sim["start_ms"] + sim["days"] * 86_400_000))
    result = {}
    for data, trades, excluded in (("recorded SPY, IBM 2013-10-07", recorded, excluded_conditions),
                                   (f"simulated, {sim['rate']:g} trades/s, {sim['days']} day", simulated,
                                    frozenset())):
        windows, _ = aggregate(trades, tuple(FORECAST_SIZES_MS.values()), ohlc_exclude_conditions=excluded)
        candles = forecast.candle_frame(windows)
        for label, size in FORECAST_SIZES_MS.items():
            table = forecast.rows(candles[candles["size_ms"] == size])
            scores = forecast.score(forecast.walk_forward(table))
            result[f"{data} · {label}"] = {"symbols": int(table["symbol"].nunique()), "windows": len(table),
                                           "forecasters": scores, "chosen": forecast.chosen(scores)}
    return result


def load_nab(data_dir: Path) -> dict[str, tuple[str, pd.Series, list[tuple[pd.Timestamp, pd.Timestamp]]]]:
    """Every file of every category folder: name -> (category, series, anomaly windows)."""
    windows = json.loads((data_dir / "combined_windows.json").read_text())
    files = {}
    for path in sorted(data_dir.glob("*/*.csv")):
        category = path.parent.name
        frame = pd.read_csv(path, parse_dates=["timestamp"])
        series = pd.Series(frame["value"].to_numpy(dtype=float), index=frame["timestamp"])
        spans = [(pd.Timestamp(a), pd.Timestamp(b)) for a, b in windows.get(f"{category}/{path.name}", [])]
        files[f"{category}/{path.stem}"] = (category, series, spans)
    return files


NAB_WEIGHTS = {"tp": 1.0, "fp": 0.11, "fn": 1.0}      # NAB's standard profile


def _scaled_sigmoid(position: float) -> float:
    """NAB's reward curve: ~+1 at a window's left edge, 0 at its right edge, towards -1 after it."""
    return -1.0 if position >= 3.0 else 2.0 / (1.0 + math.exp(5.0 * position)) - 1.0


def nab_raw_score(flagged: list[bool], timestamps: pd.Index, spans) -> tuple[float, int, dict]:
    """One file under NAB's rules (standard profile): every window not hit costs 1; a hit window
    earns the best (earliest) of its detections' sigmoid rewards; a detection outside windows costs
    0.11 × its sigmoid penalty (smaller just after a window). The probation (15 % of the points, at
    most 750) is not scored, nor is a window entirely inside it. Returns (raw score, windows
    scored, counts)."""
    n = len(flagged)
    probation = min(math.floor(NAB_PROBATION * n), NAB_PROBATION * 5000)
    index = [(int(timestamps.searchsorted(a)), int(timestamps.searchsorted(b, side="right")) - 1) for a, b in spans]
    windows = {w: -NAB_WEIGHTS["fn"] for w in index if w[1] >= probation}
    best_tp = _scaled_sigmoid(-1.0)
    false_cost, outside = 0.0, 0
    current = previous = None
    upcoming = list(index)
    for i in range(n):
        if current is None and upcoming and i == upcoming[0][0]:
            current = upcoming.pop(0)
        if flagged[i] and i >= probation:
            if current is not None:
                width = current[1] - current[0] + 1
                reward = _scaled_sigmoid(-(current[1] - i + 1) / width) * NAB_WEIGHTS["tp"] / best_tp
                windows[current] = max(windows[current], reward)
            else:
                position = 3.0 if previous is None else abs(previous[1] - i) / (previous[1] - previous[0])
                false_cost += _scaled_sigmoid(position) * NAB_WEIGHTS["fp"]
                outside += 1
        if current is not None and i == current[1]:
            previous, current = current, None
    hit = sum(1 for score in windows.values() if score > -NAB_WEIGHTS["fn"])
    return sum(windows.values()) + false_cost, len(windows), {"windows": len(windows), "detected": hit,
                                                              "outside": outside}


def _normalised(raw: float, windows: float) -> float | None:
    return round(100 * (raw + windows) / (2 * windows), 1) if windows else None


def score_nab(data_dir: Path, detectors: dict | None = None) -> dict:
    """Every series detector (run causally, point by point) on every NAB file, scored by NAB's
    standard profile and normalised like NAB over all files together: 100 × (raw − null) /
    (perfect − null), where the null detector finds nothing (−1 per window) and the perfect one hits
    every window at its start; the same per category (a category with no window, such as
    artificialNoAnomaly, has no score of its own: its false detections count in the total)."""
    files = load_nab(data_dir)
    result: dict = {"files": {}, "score": {}, "per_category": {}}
    for det, fn in (detectors or SERIES_DETECTORS).items():
        totals: dict[str, list[float]] = {}
        for name, (category, series, spans) in files.items():
            detections = fn(series)
            flagged = series.index.isin(detections.index)
            file_raw, file_windows, counts = nab_raw_score(list(flagged), series.index, spans)
            for key in ("all", category):
                total = totals.setdefault(key, [0.0, 0.0, 0])
                total[0], total[1], total[2] = total[0] + file_raw, total[1] + file_windows, total[2] + counts["outside"]
            result["files"].setdefault(name, {})[det] = {**counts, "raw_score": round(file_raw, 3)}
        result["score"][det] = _normalised(*totals.pop("all")[:2])
        result["per_category"][det] = {c: {"score": _normalised(raw, w), "files": sum(1 for f in files.values()
                                                                                 if f[0] == c),
                                           "windows": int(w), "detections_outside_windows": outside}
                                       for c, (raw, w, outside) in sorted(totals.items())}
    return result


DAILY_CYCLE_KINDS = ("peak_up", "peak_down", "flat_day", "missing_peak", "spike_train", "level_shift")


def daily_cycle_series(kind: str, seed: int, days: int = 14) -> tuple[pd.Series, list]:
    """A generated series (not NAB's files) of 5-minute points with one anomaly and its NAB-style
    window (10 % of the points, centred on the anomaly's start): a daily cycle — a low level and a
    plateau of random height, start and length, noise-free on odd seeds, with noise on even ones —
    where, on a day between the 8th and 12th, the plateau rises by 60 % of the cycle's amplitude
    (peak_up) or drops by half (peak_down), the whole day stays flat at mid-height (flat_day), the
    plateau does not come (missing_peak) or a spike every hour rides on the cycle (spike_train);
    level_shift is a noisy sine with no plateau whose level rises by four noise deviations for good.
    What a detector of "the same time yesterday" must find and a plain z-score cannot."""
    rng = np.random.default_rng(seed)
    per_day = 288
    low, high = 20.0 + rng.uniform(-5, 5), 80.0 + rng.uniform(-10, 10)
    start, length = int(rng.integers(60, 160)), int(rng.integers(60, 120))
    day = np.full(per_day, low)
    day[start:start + length] = high
    noise = 1.5 if seed % 2 == 0 else 0.0
    values = np.tile(day, days) + rng.normal(0, noise, per_day * days)
    first = int(rng.integers(7, 12)) * per_day + start
    if kind == "peak_up":
        values[first:first + length] += 0.6 * (high - low)
    elif kind == "peak_down":
        values[first:first + length] -= 0.5 * (high - low)
    elif kind == "flat_day":
        first -= start
        values[first:first + per_day] = (low + high) / 2 + rng.normal(0, noise / 5, per_day)
    elif kind == "missing_peak":
        values[first:first + length] = low + rng.normal(0, noise, length)
    elif kind == "spike_train":
        values[first:first + per_day:12] += high - low
    elif kind == "level_shift":
        values = rng.normal(10, 1.5, len(values)) + 3 * np.sin(np.arange(len(values)) * 2 * np.pi / per_day)
        values[first:] += 6
    else:
        raise ValueError(f"unknown kind {kind!r}")
    times = pd.date_range("2020-01-01", periods=len(values), freq="5min")
    half = len(values) // 20
    return pd.Series(values, index=times), [(times[first - half], times[min(first + half, len(values) - 1)])]


OTHER_SHAPE_KINDS = ("hourly_shift", "hourly_spike", "hourly_missing_day", "walk_jump", "variance_burst",
                     "slope_change", "count_burst", "spike_density", "stuck_sensor",
                     "none_sine", "none_walk", "none_counts")


def other_shape_series(kind: str, seed: int) -> tuple[pd.Series, list]:
    """A generated series unlike NAB's five categories here, with one anomaly and its NAB-style
    window (10 % of the points, centred on its start) at 35–85 % of the way, or none (none_*):
    - hourly_*: 1,200–2,400 hourly points, a daily and a weekly cycle, 12 % multiplicative noise;
      the level × 0.5 or 1.7 for 2–10 days (shift), one point × 3 or 0.15 (spike), a day at 40 %
      of the same day a week before (missing_day)
    - walk_jump, variance_burst, slope_change, none_walk: 3,000–8,000 minute points, a slow random
      walk under noise; a jump of 8 noise deviations for good, two hours of six times the steps, a
      new trend of 0.02 a point
    - count_burst, none_counts: 5-minute Poisson counts of 2–8; four times the rate for two hours
    - spike_density: rare spikes (0.2 %) on noise, then 8 % of points spiking for a day
    - stuck_sensor: a noisy daily sine that repeats one value for 200 points
    Every series is multiplied by a power of ten from 0.01 to 10,000 (units are not the shape)."""
    rng = np.random.default_rng(10_000 + seed)
    unit = 10.0 ** int(rng.integers(-2, 5))
    if kind.startswith("hourly"):
        n, freq = int(rng.integers(1200, 2400)), "1h"
        t = np.arange(n)
        cycle = 1 + 0.4 * np.sin(2 * np.pi * t / 24 + rng.uniform(0, 6)) + 0.2 * np.sin(2 * np.pi * t / 168)
        values = cycle * np.exp(rng.normal(0, 0.12, n))
    elif kind in ("walk_jump", "variance_burst", "slope_change", "none_walk"):
        n, freq = int(rng.integers(3000, 8000)), "1min"
        values = np.zeros(n)
    elif kind in ("count_burst", "none_counts"):
        n, freq = int(rng.integers(3000, 6000)), "5min"
        values = np.zeros(n)
    elif kind in ("spike_density", "stuck_sensor", "none_sine"):
        n, freq = 4032, "5min"
        values = np.zeros(n)
    else:
        raise ValueError(f"unknown kind {kind!r}")
    first = int(rng.integers(int(0.35 * n), int(0.85 * n)))
    if kind == "hourly_shift":
        values[first:first + int(rng.integers(48, 240))] *= rng.choice([0.5, 1.7])
    elif kind == "hourly_spike":
        values[first] *= rng.choice([3.0, 0.15])
    elif kind == "hourly_missing_day":
        values[first:first + 24] = values[first - 168:first - 144] * 0.4
    elif kind in ("walk_jump", "variance_burst", "slope_change", "none_walk"):
        steps = rng.normal(0, 1, n)
        if kind == "variance_burst":
            steps[first:first + 120] *= 6
        values = 110 + np.cumsum(steps) * 0.06 + rng.normal(0, 1, n)
        if kind == "walk_jump":
            values[first:] += rng.choice([-1, 1]) * 8
        elif kind == "slope_change":
            values[first:] += np.arange(n - first) * 0.02
    elif kind in ("count_burst", "none_counts"):
        rate = np.full(n, rng.uniform(2, 8))
        if kind == "count_burst":
            rate[first:first + 24] *= 4
        values = rng.poisson(rate).astype(float)
    elif kind == "spike_density":
        spikes = rng.random(n) < 0.002
        spikes[first:first + 288] = rng.random(288) < 0.08
        values = rng.normal(10, 1, n) + 30 * spikes
    elif kind in ("stuck_sensor", "none_sine"):
        values = 40 + 10 * np.sin(np.arange(n) * 2 * np.pi / 288) + rng.normal(0, 1.5, n)
        if kind == "stuck_sensor":
            values[first:first + 200] = values[first]
    times = pd.date_range("2021-03-01", periods=n, freq=freq)
    series = pd.Series(values * unit, index=times)
    if kind.startswith("none"):
        return series, []
    half = n // 20
    return series, [(times[max(first - half, 0)], times[min(first + half, n - 1)])]


def score_generated(make, kinds, seeds, detectors: dict | None = None) -> dict:
    """The series detectors on generated series (`make(kind, seed)`, every kind × seed), scored
    like NAB: the score over all, and per kind how many of its series had a detection in the
    window, and how many detections fell outside (for a kind with no anomaly, every detection)."""
    result: dict = {}
    for det, fn in (detectors or SERIES_DETECTORS).items():
        raw = windows = 0.0
        per_kind = {}
        for kind in kinds:
            found = outside = 0
            for seed in seeds:
                series, spans = make(kind, seed)
                file_raw, file_windows, counts = nab_raw_score(list(series.index.isin(fn(series).index)),
                                                              series.index, spans)
                raw, windows = raw + file_raw, windows + file_windows
                found, outside = found + counts["detected"], outside + counts["outside"]
            per_kind[kind] = {"series": len(seeds), "detected": found, "detections_outside_windows": outside}
        result[det] = {"score": _normalised(raw, windows), "per_kind": per_kind}
    return result


def score_daily_cycles(seeds=range(4), detectors: dict | None = None) -> dict:
    return score_generated(daily_cycle_series, DAILY_CYCLE_KINDS, seeds, detectors)


OTHER_SHAPE_SEEDS = range(10, 15)       # seeds 0-2 were looked at while changing the detector


def score_other_shapes(seeds=OTHER_SHAPE_SEEDS, detectors: dict | None = None) -> dict:
    return score_generated(other_shape_series, OTHER_SHAPE_KINDS, seeds, detectors)


BOOK_KINDS = {"spoofing": "SPOOFING", "quote_stuffing": "QUOTE_STUFFING"}
BOOK_MATCH_MS = 1_000       # an alert this soon after an episode's last message is about that episode
# (seed, book noise: updates per trade, depth, trades per second): the thresholds were chosen on
# "tuning"; "scoring" changes everything they could have been fitted to
BOOK_RUNS = {"tuning": [(1, 8.0, 10, 20.0)],
             "scoring": [(11, 4.0, 10, 50.0), (12, 20.0, 20, 20.0), (13, 8.0, 15, 5.0)]}


def book_detections(events) -> tuple[list, int]:
    """The book messages among `events` through a BookWatch: (its detections, updates applied)."""
    from tradewatch.book import BookMessage, OrderBook
    from tradewatch.detect.book_rules import BookWatch
    books, watch, found, applied = {}, BookWatch(), [], 0
    for e in events:
        if isinstance(e, BookMessage):
            book = books.get(e.symbol) or books.setdefault(e.symbol, OrderBook(e.symbol))
            ok, detections = watch.apply(book, e)
            applied += ok
            found += detections
    return found, applied


def score_book(trades: int = 20_000, anomaly_rate: float = 0.005, runs: dict = BOOK_RUNS) -> dict:
    """Per role, summed over its runs: episodes injected and caught per kind (an alert of its type
    on its symbol from its first message to BOOK_MATCH_MS after its last), false alarms (alerts in
    no episode) per 10,000 book updates, and the alerts of the same runs with nothing injected."""
    from tradewatch.market.books import with_books
    result = {}
    for role, specs in runs.items():
        injected, caught, false, updates, calm_alerts, calm_updates = Counter(), Counter(), Counter(), 0, Counter(), 0
        for seed, noise, depth, rate in specs:
            def events(rate_of_anomalies: float, episodes: list):
                sim = MarketSimulator(seed=seed, rate=rate, start_ms=1_767_225_600_000)
                return with_books(islice(sim, trades), depth, noise, seed=seed, anomaly_rate=rate_of_anomalies,
                                  episodes=episodes)
            episodes: list = []
            found, n = book_detections(events(anomaly_rate, episodes))
            updates += n
            matched = set()
            for e in episodes:
                injected[e.kind] += 1
                mine = [i for i, d in enumerate(found) if d.kind == BOOK_KINDS[e.kind] and d.symbol == e.symbol
                        and e.first_ms <= d.timestamp_ms <= e.last_ms + BOOK_MATCH_MS]
                caught[e.kind] += bool(mine)
                matched.update(mine)
            for i, d in enumerate(found):
                if i not in matched:
                    false[d.kind] += 1
            calm, n = book_detections(events(0.0, []))
            calm_updates += n
            calm_alerts.update(d.kind for d in calm)
        result[role] = {
            "runs": [{"seed": s, "noise": n, "depth": d, "rate": r} for s, n, d, r in specs],
            "book_updates": updates,
            "per_kind": {kind: {"injected": injected[kind], "caught": caught[kind],
                                "recall": round(caught[kind] / injected[kind], 4) if injected[kind] else None,
                                "false_alarms_per_10k_updates": round(false[alert] / updates * 1e4, 3)}
                         for kind, alert in BOOK_KINDS.items()},
            "calm": {"book_updates": calm_updates,
                     "alerts": {alert: calm_alerts[alert] for alert in BOOK_KINDS.values()}},
        }
    return result


PUMP_RECALL_WINDOW_MS = 300_000        # a pump counts as caught by a PUMP_AND_DUMP alert this soon after its start
ALERT_COOLDOWNS_S = {"CRITICAL": 300.0, "HIGH": 60.0, "MEDIUM": 30.0, "LOW": 30.0}   # the .env defaults


def score_pumps(seeds: list[int], symbols: int = 10, days: float = 2.0, pump_symbols: int = 5,
                config: DetectorConfig = DetectorConfig(), model: forest.ForestModel | None = None,
                profile: IlliquidProfile = IlliquidProfile()) -> dict:
    """Simulated illiquid pairs (tradewatch.market.simulator.illiquid_market), some with a pump on
    their last day, through the detection pipeline and the alert deduplication a user gets:
    recall of pumps by a PUMP_AND_DUMP alert within 5 minutes of the start, the delay, the phases
    each event's alerts went through, and alerts per symbol-day (every type) on ordinary days —
    every day of a pump-free symbol, and the first day of the others — and on the first day alone
    (every symbol starts cold: its references fill from its first trade)."""
    from tradewatch.alerts import Deduplicator, alerts_for
    caught, delays, phases, ordinary_alerts, ordinary_days, pumps_total = 0, [], Counter(), Counter(), 0.0, 0
    first_alerts = first_days = 0
    for seed in seeds:
        trades, pumps = illiquid_market(symbols, days, seed=seed, pump_symbols=pump_symbols, profile=profile)
        start = trades[0].timestamp_ms
        pumped = {p.symbol: p for p in pumps}
        dedup = Deduplicator(ALERT_COOLDOWNS_S)
        alerts = [a for d in DetectionPipeline(RuleDetector(config), model).process(trades)
                  for a in alerts_for(d) if dedup.allow(a)]
        last_day, first_day = start + int((days - 1) * 86_400_000), start + 86_400_000
        for a in alerts:
            if a.symbol not in pumped or a.timestamp_ms < last_day:
                ordinary_alerts[a.alert_type] += 1
                first_alerts += a.timestamp_ms < first_day
        ordinary_days += (symbols - len(pumped)) * days + len(pumped) * (days - 1)
        first_days += symbols if days > 1 else symbols - len(pumped)
        for p in pumps:
            pumps_total += 1
            mine = [a for a in alerts if a.symbol == p.symbol and a.alert_type == "PUMP_AND_DUMP"
                    and p.start_ms - 60_000 <= a.timestamp_ms]
            first = [a for a in mine if a.timestamp_ms <= p.start_ms + PUMP_RECALL_WINDOW_MS]
            if first:
                caught += 1
                delays.append((first[0].timestamp_ms - p.start_ms) / 1000)
            phases[" → ".join(a.details["phase"] for a in mine)] += 1
    return {"seeds": seeds, "symbols": symbols, "days": days, "pumps": pumps_total,
            "recall_5min": round(caught / pumps_total, 4) if pumps_total else None,
            "delay_s_median": round(float(np.median(delays)), 2) if delays else None,
            "delay_s_max": round(max(delays), 2) if delays else None,
            "phases": dict(phases.most_common()),
            "ordinary_symbol_days": ordinary_days,
            "alerts_per_symbol_day_ordinary": round(sum(ordinary_alerts.values()) / ordinary_days, 3)
            if ordinary_days else None,
            "by_type_ordinary": {k: round(v / ordinary_days, 3) for k, v in ordinary_alerts.most_common()},
            "alerts_per_symbol_first_day": round(first_alerts / first_days, 3) if first_days else None}


# Ordinary days unlike the ones the thresholds were set on (IlliquidProfile's defaults): what a rule
# whose false alarms grow with the trade count, the bursts or the quiet spells would show
CONDITIONS = {"sparse_5_trades_an_hour": {"trades_per_hour": 5.0},
              "busy_400_trades_an_hour": {"trades_per_hour": 400.0},
              "bursty_40_bursts_a_day": {"bursts_per_day": 40.0},
              "quiet_spells_2_a_day": {"quiet_spells_per_day": 2.0}}


def score_conditions(seeds: list[int], config: DetectorConfig = DetectorConfig(),
                     conditions: dict = CONDITIONS) -> dict:
    """`score_pumps` on illiquid pairs under each of CONDITIONS: pumps caught, and the alerts per
    ordinary symbol-day, in all and by type."""
    out = {}
    for name, changes in conditions.items():
        r = score_pumps(seeds, config=config, profile=replace(IlliquidProfile(), **changes))
        out[name] = {k: r[k] for k in ("pumps", "recall_5min", "delay_s_median", "alerts_per_symbol_day_ordinary",
                                       "by_type_ordinary", "alerts_per_symbol_first_day")}
    return out


SPREADS_TICKS = (4, 10, 25, 50)     # spreads of 0.5–6 % on pairs of a few hundred ticks (a tick ≈ 0.12 %)


def score_spreads(seeds: list[int], config: DetectorConfig = DetectorConfig(), spreads: tuple = SPREADS_TICKS) -> dict:
    """`score_pumps` on illiquid pairs whose spread is `spreads` ticks wide (of 1e-8 at prices near
    8.1e-6): ordinary bursts sweep up to two spreads past the touch, so the one-tick rules alone
    would call every sweep a move."""
    out = {}
    for ticks in spreads:
        r = score_pumps(seeds, config=config, profile=IlliquidProfile(tick=1e-8, spread_ticks=ticks))
        out[f"spread_{ticks}_ticks"] = {k: r[k] for k in ("pumps", "recall_5min", "delay_s_median",
                                                           "alerts_per_symbol_day_ordinary")}
    return out
