"""Volatility forecasts (tradewatch/detect/forecast.py, issue 28): walk-forward code never sees the
future, the 90 % band covers about 90 % of windows when the volatility is known, and the model is
used only where it beats the EWMA — on made-up series and, through `anomaly_detector.py evaluate
--forecasts`, on the recorded SPY and IBM day."""
import json
import re
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from tradewatch.config import PROJECT_ROOT
from tradewatch.detect import forecast, versions

MINUTE = 60_000
KNOWN = ["close", "floor", "v", "day", "week", "ewma", *forecast.FEATURES]


def gbm_candles(sigmas, symbol="GBM", steps=60, seed=0, tick=0.0001, volumes=None) -> pd.DataFrame:
    """1-minute candles of a geometric Brownian motion sampled `steps` times a minute; `sigmas`:
    the standard deviation of each minute's log return (the known volatility)."""
    rng = np.random.default_rng(seed)
    sigmas = np.asarray(sigmas, dtype=float)
    log_price = np.log(100.0) + np.cumsum(rng.normal(0, 1, len(sigmas) * steps)
                                          * np.repeat(sigmas / np.sqrt(steps), steps))
    p = (np.round(np.exp(log_price) / tick) * tick).reshape(len(sigmas), steps)
    return pd.DataFrame({"symbol": symbol, "size_ms": MINUTE, "start_ms": np.arange(len(sigmas)) * MINUTE,
                         "open": p[:, 0], "high": p.max(1), "low": p.min(1), "close": p[:, -1],
                         "volume": 100.0 * steps if volumes is None else volumes, "trade_count": steps})


def changed_after(candles: pd.DataFrame, cut_ms: int) -> pd.DataFrame:
    """The same candles with every window after `cut_ms` wilder: higher highs, lower lows, ten
    times the volume (the times stay: only what happened after the cut differs)."""
    later = candles.copy()
    after = later["start_ms"] > cut_ms
    later.loc[after, "high"] *= 1.03
    later.loc[after, "low"] *= 0.97
    later.loc[after, "volume"] *= 10
    return later


def test_a_row_never_uses_the_window_it_forecasts():
    candles = pd.concat([gbm_candles([0.001] * 300, "A", seed=1), gbm_candles([0.002] * 300, "B", seed=2)])
    cut = 150 * MINUTE
    before, after = forecast.rows(candles), forecast.rows(changed_after(candles, cut))
    known = before["start_ms"] <= cut
    pd.testing.assert_frame_equal(before.loc[known, KNOWN], after.loc[known, KNOWN])
    # ... while what the row at the cut is scored against did change: the test would see a leak
    at_cut = before["start_ms"] == cut
    assert (before.loc[at_cut, "next_v"].to_numpy() != after.loc[at_cut, "next_v"].to_numpy()).all()
    assert (before.loc[~known, "v"].to_numpy() != after.loc[~known, "v"].to_numpy()).any()


def test_a_window_without_trades_did_not_move_and_leading_windows_without_a_price_are_left_out():
    candles = gbm_candles([0.001] * 60, "A", seed=11)
    candles.loc[0, ["open", "high", "low", "close"]] = np.nan          # every trade had an excluded condition
    quiet = 40 * MINUTE
    table = forecast.rows(candles[candles["start_ms"] != quiet])       # no trade in minute 40
    assert table["start_ms"].min() == MINUTE * forecast.HISTORY       # counted from minute 1
    assert table["start_ms"].tolist() == list(range(MINUTE * forecast.HISTORY, 60 * MINUTE, MINUTE))
    at = table.set_index("start_ms")
    assert at.loc[quiet, "close"] == at.loc[quiet - MINUTE, "close"]
    assert at.loc[quiet, "v"] == at.loc[quiet, "floor"] > 0           # below a tick, not zero
    assert at.loc[quiet - MINUTE, "next_excursion"] == 0
    # the floor: half the smallest price step the candles have shown so far, against the price
    seen = candles[(candles["start_ms"] < quiet) & candles["close"].notna()]
    step = min((seen["high"] - seen["low"]).replace(0, np.nan).min(),
               seen["close"].diff().abs().replace(0, np.nan).min())
    assert at.loc[quiet, "floor"] == pytest.approx((step / 2 / at.loc[quiet, "close"]) ** 2, rel=1e-6)


def test_walk_forward_forecasts_do_not_change_when_the_future_does():
    candles = pd.concat([gbm_candles([0.001] * 600, "A", seed=3), gbm_candles([0.003] * 600, "B", seed=4)])
    cut = 450 * MINUTE
    before = forecast.walk_forward(forecast.rows(candles))
    after = forecast.walk_forward(forecast.rows(changed_after(candles, cut)))
    assert set(before["forecaster"]) == set(forecast.FORECASTERS)
    known = before["next_start_ms"] <= cut
    assert known.sum() > 0 and (~known).sum() > 0
    columns = ["forecaster", "symbol", "next_start_ms", "variance", "range", "band"]
    pd.testing.assert_frame_equal(before.loc[known, columns], after.loc[known, columns])
    assert not np.allclose(before.loc[~known, "variance"], after.loc[~known, "variance"])


def test_the_band_covers_about_90_percent_and_the_variance_follows_a_known_volatility():
    calm, wild = gbm_candles([0.001] * 3000, "CALM", seed=5), gbm_candles([0.003] * 3000, "WILD", seed=6)
    forecasts = forecast.walk_forward(forecast.rows(pd.concat([calm, wild])))
    scores = forecast.score(forecasts)
    for name, s in scores.items():
        assert abs(s["coverage_90"] - 0.90) <= 0.03, (name, s)
    ewma = forecasts[forecasts["forecaster"] == "ewma"].groupby("symbol")["variance"].median()
    assert ewma["WILD"] / ewma["CALM"] == pytest.approx(9, rel=0.15)        # (0.003 / 0.001)²
    # a volatility that doubles: the forecast follows it
    doubling = forecast.walk_forward(forecast.rows(gbm_candles([0.001] * 1500 + [0.002] * 1500, seed=7)))
    e = doubling[doubling["forecaster"] == "ewma"]
    early = e[e["next_start_ms"] < 1500 * MINUTE]["variance"].median()
    late = e[e["next_start_ms"] > 2000 * MINUTE]["variance"].median()
    assert late / early == pytest.approx(4, rel=0.15)


def test_the_model_is_chosen_where_it_beats_the_ewma_and_not_where_it_cannot():
    # a market where a busy minute (ten times the volume) is followed by a wild one: the EWMA cannot
    # see it coming, the model's volume feature can
    rng = np.random.default_rng(8)
    busy = rng.random(4000) < 0.1
    sigmas = np.where(np.roll(busy, 1), 0.004, 0.001)
    volumes = np.where(busy, 6000.0, 600.0)
    scores = forecast.score(forecast.walk_forward(forecast.rows(gbm_candles(sigmas, seed=9, volumes=volumes))))
    assert scores["model"]["qlike"] < scores["ewma"]["qlike"] - 0.1, scores
    assert forecast.chosen(scores) == "model"
    # constant volatility: nothing to learn, and the model does not beat the EWMA by more than noise
    flat = forecast.score(forecast.walk_forward(forecast.rows(gbm_candles([0.001] * 4000, seed=10))))
    assert flat["model"]["qlike"] > flat["ewma"]["qlike"] - 0.02, flat


def test_evaluate_prints_every_forecaster_on_the_recorded_and_simulated_days():
    out = subprocess.run([sys.executable, "anomaly_detector.py", "evaluate", "--forecasts"], cwd=PROJECT_ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    blocks = re.findall(r"\n(\S.*?): (\d+) symbol\(s\), ([\d,]+) windows — the product uses (\w+)\n.*?\n"
                        r"((?:  \w+ .*\n?){4})", out.stdout)
    assert [b[0] for b in blocks] == ["recorded SPY, IBM 2013-10-07 · 1m", "recorded SPY, IBM 2013-10-07 · 5m",
                                      "simulated, 4 trades/s, 1 day · 1m", "simulated, 4 trades/s, 1 day · 5m"]
    for data, symbols, windows, used, table in blocks:
        rows = {line.split()[0]: line.split() for line in table.strip().splitlines()}
        assert list(rows) == list(forecast.FORECASTERS), data
        qlike = {name: float(r[2]) for name, r in rows.items()}
        assert used == ("model" if qlike["model"] < qlike["ewma"] else "ewma"), data
        coverage = {name: float(r[6].rstrip("%")) for name, r in rows.items()}
        if data.startswith("simulated"):      # GBM with a known, constant volatility
            assert all(abs(c - 90) <= 3 for c in coverage.values()), (data, coverage)
        else:
            assert 80 <= coverage["ewma"] <= 97, (data, coverage)
        assert qlike["last"] > qlike["ewma"], data          # the last window alone is the noisiest forecast


def test_train_saves_a_versioned_forecaster_per_size_with_its_scores_and_skips_a_size_too_short(tmp_path):
    candles = pd.concat([gbm_candles([0.001] * 150 + [0.003] * 150, "A", seed=21),
                         gbm_candles([0.002] * 300, "B", seed=22)])
    five = gbm_candles([0.002] * 40, "A", seed=23).assign(size_ms=5 * MINUTE, start_ms=lambda f: f["start_ms"] * 5)
    fitted, report = forecast.train(pd.concat([candles, five]))
    assert list(fitted) == ["1m"] and report["1m"]["chosen"] in ("ewma", "model")
    assert report["1m"]["windows"] == 300 - forecast.HISTORY and report["1m"]["symbols"] == 2
    assert list(report["1m"]["walk_forward"]) == list(forecast.FORECASTERS)
    assert report["5m"] == {"windows": 40 - forecast.HISTORY,
                            "skipped": f"18 windows after a past of 22; training needs {forecast.MIN_WINDOWS}"}
    first, v1 = forecast.save(fitted, report, {"symbols": ["A", "B"]}, tmp_path)
    second, v2 = forecast.save(fitted, report, {"symbols": ["A", "B"]}, tmp_path)
    assert (first.name, v1, second.name, v2) == ("forecast-v1.joblib", "v1", "forecast-v2.joblib", "v2")
    meta = json.loads(second.with_suffix(".json").read_text())
    assert meta["version"] == "v2" and meta["sizes"]["1m"]["chosen"] == report["1m"]["chosen"]
    ewma = report["1m"]["walk_forward"]["ewma"]
    assert meta["sizes"]["1m"]["walk_forward"]["ewma"]["coverage_90"] == ewma["coverage_90"]
    loaded, _ = forecast.load(second)
    table = forecast.rows(candles)
    pd.testing.assert_frame_equal(loaded["1m"].forecast(table), fitted["1m"].forecast(table))
    # the band follows the storm: A's last windows (σ 0.003) get a band about three times B's early ones
    band = loaded["1m"].forecast(table)["band"]
    a_late = band[(table["symbol"] == "A") & (table["start_ms"] > 250 * MINUTE)].median()
    a_early = band[(table["symbol"] == "A") & (table["start_ms"] < 140 * MINUTE)].median()
    assert 2 < a_late / a_early < 4.5


def test_a_forecaster_trained_on_other_features_is_refused(tmp_path):
    path, _ = versions.save(tmp_path, "forecast", {"sizes": {}}, {"features": ["return_1"], "sizes": {}})
    with pytest.raises(ValueError, match="trained on features"):
        forecast.load(path)
