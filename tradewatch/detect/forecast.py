"""Forecasts of how much a price will move in the next window, scored walk-forward against naive
baselines (issue 28). Pure code: candles in, forecasts and scores out.

Direction is close to a coin flip, but volatility clusters: how much a symbol moved in the last
windows says how much it will move in the next. Forecast per symbol and window size, from the
candles alone (what the aggregator stores). A window that did not move has a variance below what
one tick can show, not none: every variance is floored at (half a tick / price)², the tick being
the smallest price step the symbol's candles have shown so far.
- **variance**: the next window's Garman–Klass variance of the log price,
  0.5·ln(H/L)² − (2 ln 2 − 1)·ln(C/O)² — its realized variance estimated from open, high, low and
  close (about seven times as efficient as the squared return);
- **range**: the next window's high–low range ln(H/L), forecast as `range_ratio`·σ;
- **band**: the prices c·exp(±w) around the last close c that the whole next window (its high and
  its low) stays inside 90 % of the time: w = `band_ratio`·σ, with `band_ratio` the 90 % quantile of
  (farthest excursion from c) / σ over calibration windows the forecaster was not fitted on (split
  conformal), so the band's coverage is measured, not assumed.

Forecasters (σ² = the variance forecast):
- `last`: the last window's variance;
- `ewma`: RiskMetrics' exponentially weighted average of the past variances, λ = 0.94 (its
  published value: no fitting, nothing to overfit);
- `har`: Corsi's HAR in logs, per symbol: least squares of the next log variance on the logs of the
  means of the last 1, 5 and 22 windows (the classic model's day, week and month), with Duan's
  smearing to turn a log forecast into a variance;
- `model`: scikit-learn's HistGradientBoostingRegressor: the next variance as a multiple of the
  EWMA's forecast (it learns when to leave the EWMA), from scale-free features (the last variance,
  the last 5 windows', the range and the returns over 1, 5 and 15 windows, each against the
  symbol's own mean variance of the last 22 windows; volume and trade count against their own
  22-window means; the predicted window's time of day), fitted with the gamma deviance, which is
  QLIKE up to constants, the loss it is scored on. Scale-free, so one model serves every symbol of
  a size, and a symbol with a short past borrows from the others.

Scored walk-forward (`walk_forward`): the timeline is cut into blocks; each block is forecast by
forecasters fitted only on windows that ended before it starts. QLIKE, ln σ² + v/σ² (Patton 2011:
with MSE, a loss that ranks forecasts correctly when the variance itself is measured with noise),
the MSE of σ and of the range, and the band's coverage. A model that does not beat the EWMA on the
held-out blocks has not earned its place: `chosen` names the EWMA then.

`train` does all that per window size for `anomaly_detector.py train` and fits the chosen
forecaster on every window; `save` writes it as `forecast-vN.joblib` beside the forest's files,
with its scores in `forecast-vN.json`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from tradewatch.detect import versions
# the live state's definitions (the aggregator folds candles with them, without pandas)
from tradewatch.volatility import FEATURES, FLOOR, GK, HISTORY, LAMBDA, RETURNS
from tradewatch.windows import size_label

COVERAGE = 0.90
CALIBRATION = 0.25           # the share of a block's past (its latest) kept out of fitting to set the ratios
FORECASTERS = ("last", "ewma", "har", "model")
# windows with a known next one a size needs before it is trained: walk-forward scores the last two
# thirds in 8 blocks (5 windows each at the least), and the band is set on the latest quarter of each past
MIN_WINDOWS = 60


def candle_frame(windows) -> pd.DataFrame:
    """The candles of aggregator windows (tradewatch/windows.py) as a frame: symbol, size_ms,
    start_ms, open, high, low, close, volume, trade_count."""
    return pd.DataFrame([(w.symbol, w.size_ms, w.start_ms, w.open, w.high, w.low, w.close, w.sum_quantity,
                          w.trade_count) for w in windows],
                        columns=["symbol", "size_ms", "start_ms", "open", "high", "low", "close", "volume",
                                 "trade_count"])


def rows(candles: pd.DataFrame) -> pd.DataFrame:
    """One row per symbol and window t with a past of HISTORY windows: what is known at the end of
    t (the features, the baselines' inputs) and, as `next_*`, what the forecast of window t + 1 is
    scored against. Windows without a trade (or whose trades all had excluded conditions) are
    filled in: the price stood at the last close, nothing moved."""
    out = []
    for (symbol, size), g in candles.groupby(["symbol", "size_ms"], sort=True):
        g = g.set_index("start_ms").sort_index()
        if g["close"].isna().all():
            continue
        g = g.loc[g["close"].first_valid_index():]      # (from the first window that set a price)
        grid = np.arange(g.index[0], g.index[-1] + size, size)
        g = g.reindex(grid)
        close = g["close"].ffill()
        o, h, lo = (g[c].fillna(close) for c in ("open", "high", "low"))
        volume, count = g["volume"].fillna(0.0), g["trade_count"].fillna(0)
        steps = pd.concat([h - lo, close.diff().abs()], axis=1).min(axis=1, skipna=True)
        tick = steps.where(steps > close * 1e-9).cummin().ffill()       # (below 1e-9: float noise)
        floor = ((tick / (2 * close)) ** 2).fillna(FLOOR)
        v = np.maximum(0.5 * np.log(h / lo) ** 2 - GK * np.log(close / o) ** 2, floor)
        rng = np.log(h / lo)
        day = v.rolling(HISTORY, min_periods=1).mean()
        logc = np.log(close)
        f = pd.DataFrame({"symbol": symbol, "size_ms": size, "start_ms": grid, "close": close.to_numpy(),
                          "floor": floor.to_numpy(), "v": v.to_numpy(), "day": day.to_numpy(),
                          "week": v.rolling(5, min_periods=1).mean().to_numpy(),
                          "ewma": v.ewm(alpha=1 - LAMBDA).mean().to_numpy()})
        f["last_vs_day"] = np.log(v / day).to_numpy()
        f["week_vs_day"] = np.log(f["week"] / f["day"])
        f["range_vs_day"] = np.log(np.maximum(rng.to_numpy() ** 2, f["floor"]) / f["day"])
        for n in RETURNS:
            f[f"return_{n}"] = (logc - logc.shift(n)).to_numpy() / np.sqrt(n * f["day"])
        f["volume_vs_day"] = np.log((volume + 1) / (volume.rolling(HISTORY, min_periods=1).mean() + 1)).to_numpy()
        f["count_vs_day"] = np.log((count + 1) / (count.rolling(HISTORY, min_periods=1).mean() + 1)).to_numpy()
        f["time_of_day"] = ((grid + size) % 86_400_000) / 86_400_000
        # what the forecast of t + 1 is scored against
        f["next_start_ms"] = grid + size
        f["next_v"] = np.maximum(v.shift(-1), floor).to_numpy()      # (a later tick is not known at t)
        f["next_range"] = rng.shift(-1).to_numpy()
        f["next_excursion"] = np.maximum(np.log(h.shift(-1) / close), np.log(close / lo.shift(-1))).clip(lower=0.0)\
            .to_numpy()
        out.append(f.iloc[HISTORY - 1:])
    if not out:
        return pd.DataFrame(columns=["symbol", "size_ms", "start_ms", *FEATURES])
    return pd.concat(out, ignore_index=True)


class Forecaster:
    """A variance forecast for the window after each row; `fit` sees only rows whose next window
    is known (training), `variance` any rows."""
    name = ""

    def fit(self, train: pd.DataFrame) -> None:
        pass

    def variance(self, at: pd.DataFrame) -> np.ndarray:
        raise NotImplementedError


class Last(Forecaster):
    name = "last"

    def variance(self, at):
        return at["v"].to_numpy()


class Ewma(Forecaster):
    name = "ewma"

    def variance(self, at):
        return at["ewma"].to_numpy()


class Har(Forecaster):
    """Least squares per symbol; a symbol with too little training falls back to the EWMA."""
    name = "har"

    def __init__(self):
        self.coef: dict[str, tuple[np.ndarray, float]] = {}

    @staticmethod
    def _x(frame: pd.DataFrame) -> np.ndarray:
        return np.column_stack([np.ones(len(frame)), np.log(frame["v"]), np.log(frame["week"]), np.log(frame["day"])])

    def fit(self, train):
        for symbol, g in train.groupby("symbol"):
            if len(g) >= 4 * HISTORY:
                x, y = self._x(g), np.log(g["next_v"].to_numpy())
                coef = np.linalg.lstsq(x, y, rcond=None)[0]
                self.coef[symbol] = coef, float(np.mean(np.exp(y - x @ coef)))

    def variance(self, at):
        out = Ewma().variance(at).copy()
        for symbol, index in at.groupby("symbol").indices.items():
            if symbol in self.coef:
                coef, smear = self.coef[symbol]
                out[index] = np.exp(self._x(at.iloc[index]) @ coef) * smear
        return np.maximum(out, at["floor"].to_numpy())


class Model(Forecaster):
    """Gradient-boosted trees on the scale-free FEATURES; the target is the next variance as a
    multiple of the EWMA's forecast, so a $3 and a $90,000 instrument share one model."""
    name = "model"
    PARAMS = {"loss": "gamma", "max_iter": 150, "learning_rate": 0.05, "max_leaf_nodes": 15,
              "min_samples_leaf": 40, "early_stopping": False, "random_state": 0}

    def __init__(self):
        self.trees = None

    def fit(self, train):
        from sklearn.ensemble import HistGradientBoostingRegressor     # loaded only when a model is fitted

        self.trees = HistGradientBoostingRegressor(**self.PARAMS)
        self.trees.fit(train[list(FEATURES)].to_numpy(), (train["next_v"] / train["ewma"]).to_numpy())

    def variance(self, at):
        return np.maximum(self.trees.predict(at[list(FEATURES)].to_numpy()) * at["ewma"].to_numpy(),
                          at["floor"].to_numpy())


MAKERS = {"last": Last, "ewma": Ewma, "har": Har, "model": Model}


@dataclass
class Calibrated:
    """A fitted forecaster with its band and range ratios (set on calibration rows it was not
    fitted on)."""
    forecaster: Forecaster
    band_ratio: float
    range_ratio: float

    def forecast(self, at: pd.DataFrame) -> pd.DataFrame:
        variance = self.forecaster.variance(at)
        sigma = np.sqrt(variance)
        return pd.DataFrame({"variance": variance, "range": self.range_ratio * sigma,
                             "band": self.band_ratio * sigma}, index=at.index)


def fit(name: str, past: pd.DataFrame) -> Calibrated:
    """`name` fitted on the earlier part of `past` (rows whose next window is known), its ratios set
    on the latest CALIBRATION share, by time."""
    past = past.sort_values("next_start_ms", kind="stable")
    cut = int(len(past) * (1 - CALIBRATION))
    forecaster = MAKERS[name]()
    forecaster.fit(past.iloc[:cut])
    held = past.iloc[cut:]
    sigma = np.sqrt(forecaster.variance(held))
    band = float(np.quantile(held["next_excursion"].to_numpy() / sigma, COVERAGE)) if len(held) else 0.0
    ratio = float(np.mean(held["next_range"].to_numpy() / sigma)) if len(held) else 0.0
    return Calibrated(forecaster, band, ratio)


def walk_forward(table: pd.DataFrame, blocks: int = 8, first: float = 1 / 3,
                 names: tuple[str, ...] = FORECASTERS) -> pd.DataFrame:
    """Each forecaster's forecast of every window after the first `first` of the timeline, in
    `blocks` blocks of time: a block is forecast by forecasters fitted and calibrated only on
    windows that ended before it starts. One row per forecast: the row's index, the forecaster, its
    variance, range and band, and what happened (next_v, next_range, next_excursion)."""
    table = table.dropna(subset=["next_v"])
    times = np.sort(table["next_start_ms"].unique())
    if len(times) < 8:
        raise ValueError(f"{len(times)} windows: too few to fit on some and score on the rest")
    start = times[int(len(times) * first)]
    edges = np.linspace(start, times[-1] + 1, blocks + 1)
    out = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        past = table[table["next_start_ms"] < lo]      # its next window started before lo, so ended by lo
        block = table[(table["next_start_ms"] >= lo) & (table["next_start_ms"] < hi)]
        if block.empty:
            continue
        for name in names:
            f = fit(name, past).forecast(block)
            f["forecaster"] = name
            out.append(f.join(block[["symbol", "next_start_ms", "next_v", "next_range", "next_excursion"]]))
    return pd.concat(out)


def score(forecasts: pd.DataFrame) -> dict[str, dict]:
    """Per forecaster: QLIKE (lower is better), the MSE of σ and of the range, the band's coverage,
    and each against the EWMA's."""
    result = {}
    for name, f in forecasts.groupby("forecaster", sort=False):
        v, actual = f["variance"].to_numpy(), f["next_v"].to_numpy()
        result[name] = {"forecasts": len(f),
                        "qlike": float(np.mean(np.log(v) + actual / v)),
                        "mse_sigma": float(np.mean((np.sqrt(v) - np.sqrt(actual)) ** 2)),
                        "mse_range": float(np.mean((f["range"] - f["next_range"]) ** 2)),
                        "coverage_90": float(np.mean(f["next_excursion"] <= f["band"]))}
    if "ewma" in result:
        base = result["ewma"]
        for s in result.values():
            s["qlike_vs_ewma"] = s["qlike"] - base["qlike"]
            s["mse_sigma_vs_ewma"] = s["mse_sigma"] / base["mse_sigma"]
            s["mse_range_vs_ewma"] = s["mse_range"] / base["mse_range"]
    return result


def chosen(scores: dict[str, dict]) -> str:
    """The model if it beat the EWMA on QLIKE over the held-out blocks; otherwise the EWMA."""
    return "model" if scores["model"]["qlike"] < scores["ewma"]["qlike"] else "ewma"


def train(candles: pd.DataFrame) -> tuple[dict[str, Calibrated], dict[str, dict]]:
    """Per window size (by label): the walk-forward scores of every forecaster, the choice, and the
    chosen forecaster fitted and calibrated on every window. A size with fewer than MIN_WINDOWS
    windows is reported with the reason and left out."""
    table = rows(candles)
    fitted, report = {}, {}
    for size in sorted(candles["size_ms"].unique()):
        label = size_label(int(size))
        known = table[table["size_ms"] == size].dropna(subset=["next_v"])
        windows = int(known["next_start_ms"].nunique())
        if windows < MIN_WINDOWS:
            report[label] = {"windows": windows, "skipped": f"{windows} windows after a past of {HISTORY}; "
                                                            f"training needs {MIN_WINDOWS}"}
            continue
        scores = score(walk_forward(known))
        name = chosen(scores)
        fitted[label] = fit(name, known)
        report[label] = {"windows": windows, "symbols": int(known["symbol"].nunique()), "chosen": name,
                         "band_ratio": fitted[label].band_ratio, "range_ratio": fitted[label].range_ratio,
                         "walk_forward": scores}
    return fitted, report


def save(fitted: dict[str, Calibrated], report: dict[str, dict], training: dict, directory: Path) -> tuple[Path, str]:
    """forecast-vN.joblib (+ .json with the scores and the choice per size), N one above the highest."""
    meta = {"features": list(FEATURES), "sizes": report, "training": training}
    return versions.save(directory, "forecast", {"sizes": fitted}, meta)


def load(path: Path) -> tuple[dict[str, Calibrated], dict]:
    """The fitted forecaster per size label, and the metadata `save` wrote."""
    data = versions.load(path)
    if tuple(data["meta"]["features"]) != FEATURES:
        raise ValueError(f"{path} was trained on features {data['meta']['features']}, this code computes "
                         f"{list(FEATURES)}; train again")
    return data["sizes"], data["meta"]
