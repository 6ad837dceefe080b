"""The live volatility forecast (tradewatch/volatility.py): the state the aggregator folds one
final candle at a time equals what training and scoring compute over the whole history."""
from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from tests.unit.test_forecast import MINUTE, gbm_candles
from tradewatch.config import PROJECT_ROOT
from tradewatch.detect import forecast
from tradewatch.volatility import FEATURES, UNTRAINED, ForecastState, load

INPUTS = ["close", "floor", "v", "day", "week", "ewma", *FEATURES]


def folded(candles: pd.DataFrame) -> pd.DataFrame:
    """Each symbol's candles through a ForecastState, as the aggregator sees them (in start order)."""
    out = []
    for (symbol, size), g in candles.groupby(["symbol", "size_ms"], sort=True):
        state = ForecastState(int(size))
        for c in g.sort_values("start_ms").itertuples():
            row = state.update(int(c.start_ms), *(None if pd.isna(x) else float(x)
                                                  for x in (c.open, c.high, c.low, c.close)), c.volume, c.trade_count)
            if row is not None:
                out.append({"symbol": symbol, "size_ms": size, **row})
    return pd.DataFrame(out)


def test_the_live_state_computes_what_training_does_through_gaps_and_windows_without_a_price():
    a = gbm_candles([0.001] * 120 + [0.004] * 60 + [0.001] * 120, "A", seed=31)
    a.loc[0:2, ["open", "high", "low", "close"]] = np.nan            # no price yet: left out
    a.loc[50, ["open", "high", "low", "close"]] = np.nan             # trades all excluded: kept volume
    a = a.drop(index=[70, 71, 72] + list(range(100, 140)))          # 3 quiet minutes, then 40 (> HISTORY)
    b = gbm_candles([0.002] * 200, "B", seed=32, tick=0.01)         # a coarse tick: the floor matters
    b = b.drop(index=range(10, 200, 7))
    five = gbm_candles([0.002] * 80, "A", seed=33).assign(size_ms=5 * MINUTE, start_ms=lambda f: f["start_ms"] * 5)
    candles = pd.concat([a, b, five], ignore_index=True)
    want = forecast.rows(candles).set_index(["symbol", "size_ms", "start_ms"])
    got = folded(candles).set_index(["symbol", "size_ms", "start_ms"])
    # the live state returns the windows that had a candle (the aggregator writes those)
    assert set(got.index) <= set(want.index) and len(got) > 300
    assert {("A", MINUTE, 50 * MINUTE), ("A", MINUTE, 140 * MINUTE)} <= set(got.index)
    np.testing.assert_allclose(got[INPUTS].to_numpy(float), want.loc[got.index, INPUTS].to_numpy(float),
                               rtol=1e-9, atol=1e-12)


def test_a_window_folded_twice_or_out_of_order_changes_nothing():
    candles = gbm_candles([0.001] * 30, "A", seed=34)
    state = ForecastState(MINUTE)
    rows = [state.update(int(c.start_ms), c.open, c.high, c.low, c.close, c.volume, c.trade_count)
            for c in candles.itertuples()]
    ewma = state.num / state.den
    again = candles.iloc[-2]
    assert state.update(int(again.start_ms), again.open, again.high * 2, again.low, again.close, 1, 1) is None
    assert state.num / state.den == ewma and rows[-1] is not None and rows[20] is None


def test_the_untrained_band_is_the_ewma_with_brownian_ratios(tmp_path):
    forecasters = load(tmp_path)                                    # nothing trained yet
    assert forecasters["1m"] is UNTRAINED and forecasters["1d"] is UNTRAINED
    row = {"symbol": "A", "close": 100.0, "ewma": 0.001 ** 2}
    sigma, expected_range, low, high, name = UNTRAINED.forecast([row])[0]
    assert sigma == pytest.approx(0.001) and expected_range == pytest.approx(0.001596, rel=1e-3)
    assert (low, high) == pytest.approx((100 * math.exp(-0.00196), 100 * math.exp(0.00196)))
    assert name == "ewma (untrained)"
    # on densely sampled GBM, the whole next minute stays inside it about 90 % of the time
    candles = gbm_candles([0.002] * 3000, "G", seed=35, steps=300)
    table = forecast.rows(candles).dropna(subset=["next_v"])
    table = table[table["start_ms"] >= 200 * MINUTE]               # the EWMA has settled
    bands = np.array([f[2:4] for f in UNTRAINED.forecast(table.to_dict("records"))])
    start = table["start_ms"].to_numpy() // MINUTE + 1
    inside = (candles["low"].to_numpy()[start] >= bands[:, 0]) & (candles["high"].to_numpy()[start] <= bands[:, 1])
    assert 0.87 <= inside.mean() <= 0.93, inside.mean()


def test_a_trained_forecaster_is_used_live_and_the_ewma_needs_no_pandas(tmp_path):
    rng = np.random.default_rng(36)
    candles = pd.concat([gbm_candles([0.001] * 150 + [0.003] * 150, "A", seed=21),
                         gbm_candles([0.002] * 300, "B", seed=22)])
    # volumes and counts that vary, as real ones do (a constant one is 0 here and ±1e-16 after pandas' rolling mean,
    # and the trees may split on that noise)
    candles["volume"] = rng.lognormal(8, 0.5, len(candles))
    candles["trade_count"] = rng.integers(20, 100, len(candles))
    fitted, report = forecast.train(candles)
    table = forecast.rows(candles)
    # a model, as if it had won; fitted on the first half and compared on the second (on a row it was fitted
    # on, a feature can sit exactly on a split and one ulp of rolling-sum noise decide the side)
    fitted["1m"] = forecast.fit("model", table[table["start_ms"] < 150 * MINUTE].dropna(subset=["next_v"]))
    report["1m"]["chosen"] = "model"
    forecast.save(fitted, report, {}, tmp_path / "model")
    live = load(tmp_path / "model")
    assert live["1m"].label == "model (forecast-v1)" and live["5m"] is UNTRAINED
    rows = folded(candles).query("start_ms >= 150 * @MINUTE").to_dict("records")
    got = np.array([f[:4] for f in live["1m"].forecast(rows)])
    want = fitted["1m"].forecast(table.set_index(["symbol", "start_ms"]).loc[[(r["symbol"], r["start_ms"])
                                                                           for r in rows]].reset_index())
    np.testing.assert_allclose(got[:, 0], np.sqrt(want["variance"]), rtol=1e-9)
    np.testing.assert_allclose(got[:, 1], want["range"], rtol=1e-9)
    np.testing.assert_allclose(np.log(got[:, 3] / [r["close"] for r in rows]), want["band"], rtol=1e-9)

    report["1m"]["chosen"] = "ewma"
    forecast.save({"1m": forecast.fit("ewma", table.dropna(subset=["next_v"]))}, report, {}, tmp_path / "ewma")
    code = ("import sys; from pathlib import Path; from tradewatch.volatility import load; "
            f"f = load(Path({str(tmp_path / 'ewma')!r}))['1m']; "
            "print(f.label, f.band_ratio, 'pandas' in sys.modules, sep='|')")
    out = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True, text=True, check=True)
    label, ratio, pandas_loaded = out.stdout.strip().split("|")
    assert label == "ewma (forecast-v1)" and float(ratio) == report["1m"]["band_ratio"] and pandas_loaded == "False"


def test_the_ewma_alone_needs_no_features_and_gets_the_same_inputs():
    candles = gbm_candles([0.001] * 60, "A", seed=37)
    full, light = ForecastState(MINUTE), ForecastState(MINUTE)
    for c in candles.itertuples():
        args = (int(c.start_ms), c.open, c.high, c.low, c.close, c.volume, c.trade_count)
        a, b = full.update(*args), light.update(*args, features=False)
        assert (a is None) == (b is None)
        if b is not None:
            assert b == {k: a[k] for k in ("start_ms", "close", "floor", "ewma")}
            assert UNTRAINED.forecast([b]) == UNTRAINED.forecast([a])
    assert not UNTRAINED.needs_features and b is not None
