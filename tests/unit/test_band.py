"""OUT_OF_RANGE (tradewatch/detect/band.py): a trade far outside the band forecast for its minute
fires, with its evidence; a calm day, a sparse tape and a print whose sale condition sets no
price do not; the state goes through a restart exactly."""
from __future__ import annotations

import json
import math
import random

import pytest

from tradewatch.alerts import alerts_for
from tradewatch.detect.band import WINDOW_MS, BandWatch
from tradewatch.detect.rules import DetectorConfig, RuleDetector
from tradewatch.events import Trade
from tradewatch.volatility import UNTRAINED, Live

T0 = 1_767_225_600_000          # 2026-01-01T00:00:00Z
MINUTE_SIGMA = 0.0005           # σ of a minute's log price: 0.05 %


def gbm_day(seed: int, per_minute: int = 30, minutes: int = 1440, sigma: float = MINUTE_SIGMA,
            tick: float = 0.01, symbol: str = "AAPL") -> list[Trade]:
    """A day of trades on a random walk with a known σ per minute, prices on a 1-cent tick."""
    rng = random.Random(seed)
    step = sigma / math.sqrt(per_minute)
    log_price, out = math.log(100.0), []
    for i in range(minutes * per_minute):
        log_price += rng.gauss(0.0, step)
        out.append(Trade(f"{symbol}-{i}", symbol, T0 + i * WINDOW_MS // per_minute, round(math.exp(log_price) / tick) *
                         tick, float(rng.randint(1, 300)), rng.choice(("buy", "sell")), "X"))
    return out


def jumped(trades: list[Trade], at: int, share: float) -> list[Trade]:
    return trades[:at] + [Trade(t.trade_id, t.symbol, t.timestamp_ms, round(t.price * (1 + share), 2), t.quantity,
                                t.side, t.exchange, condition=t.condition) for t in trades[at:]]


def run(trades, detector=None):
    detector = detector or RuleDetector()
    return [detector.process(t) for t in trades]


def fired(detections) -> list:
    return [d for d in detections if "OUT_OF_RANGE" in d.types]


@pytest.mark.parametrize("seed", [1, 2])
def test_a_calm_day_raises_no_out_of_range_and_the_band_covers_what_it_should(seed):
    trades = gbm_day(seed)
    detector = RuleDetector()
    inside = judged = 0
    for t in trades:
        assert not detector.process(t).types
        watch = detector.symbols[t.symbol].band
        band = watch.band(watch.window[0])
        if band is not None:
            judged += 1
            inside += band.low <= t.price <= band.high
    assert judged > 0.95 * len(trades)
    assert 0.9 < inside / judged < 0.999, "the 90 % band of the whole minute holds most single trades"


def test_a_jump_far_outside_the_band_fires_once_with_its_evidence():
    """A 0.5 % jump at noon, ten σ of a calm minute and far under the price rules' 5 % line."""
    trades = jumped(gbm_day(3), 720 * 30 + 7, 0.005)
    detections = run(trades)
    (d,) = fired(detections)
    assert d.trade.trade_id == "AAPL-21607" and d.types == ["OUT_OF_RANGE"] and d.severity == "HIGH"
    (alert,) = alerts_for(d)
    e = json.loads(json.dumps(alert.evidence))
    # the centre: the last price of the minute before the jump's, and σ as the evidence states it
    minute = d.trade.timestamp_ms - d.trade.timestamp_ms % WINDOW_MS
    before = [t for t in trades if minute - WINDOW_MS <= t.timestamp_ms < minute]
    assert e["baseline"] == before[-1].price and e["trades"]["count"] == len(before)
    assert e["trades"]["first_ms"] == minute - WINDOW_MS and e["extra"]["horizon_windows"] == 1
    sigma = e["extra"]["sigma"]
    assert sigma == max(e["extra"]["band_sigma"], e["extra"]["step_sigma"])
    assert 0.5 * MINUTE_SIGMA < sigma < 2 * MINUTE_SIGMA, "σ near the walk's own"
    assert e["change"] == pytest.approx(math.log(d.trade.price / e["baseline"]) / sigma)
    assert e["threshold"] == pytest.approx(1.96 * 3) and e["change"] > e["threshold"]
    assert e["level"] == pytest.approx(e["baseline"] * math.exp(e["threshold"] * sigma))
    assert e["extra"]["band_low"] < e["baseline"] < e["extra"]["band_high"] < e["level"] < d.trade.price
    assert e["extra"]["forecaster"] == "ewma (untrained)" and e["params"]["range_widths"] == 1.0
    assert "σ above the 11:59 UTC close" in e["sentence"] and "ewma (untrained)" in e["sentence"]


def test_range_widths_moves_the_line_and_a_trained_forecasters_ratio_is_used():
    trades = jumped(gbm_day(3), 720 * 30 + 7, 0.005)
    assert not fired(run(trades, RuleDetector(DetectorConfig(range_widths=4.0))))
    trained = Live("ewma", 2.5, 1.6, "forecast-v3")
    (d,) = fired(run(trades, RuleDetector(forecaster=trained)))
    e = d.evidence["OUT_OF_RANGE"]
    assert e.threshold == pytest.approx(2.5 * 3) and e.extra["forecaster"] == "ewma (forecast-v3)"


def test_the_band_waits_for_a_past_of_22_minutes():
    trades = jumped(gbm_day(4, minutes=30), 21 * 30, 0.01)       # a jump in minute 21: no band yet
    assert not fired(run(trades))
    trades = jumped(gbm_day(4, minutes=30), 23 * 30, 0.01)
    assert len(fired(run(trades))) == 1


def test_a_sparse_tape_is_judged_by_the_step_between_minutes_not_by_ranges_it_never_showed():
    """One trade a minute: every window's range is nil, the band's σ falls to half a tick, and
    each next trade three ticks away would be a 6 σ move; the steps between minutes' closes are
    the symbol's real movement. (Buys only: no spread is learned to hold the line up.)"""
    rng = random.Random(5)
    price, trades = 50.0, []
    for i in range(1440):
        price = round(price + rng.randint(-3, 3) * 0.01, 2)
        trades.append(Trade(f"s{i}", "ILLQ", T0 + i * WINDOW_MS + 1000, price, 10.0, "buy", "X"))
    detector = RuleDetector()
    assert not fired(run(trades, detector))
    watch = detector.state_for("ILLQ").band
    band = watch.band(watch.window[0])
    assert band.sigma < 0.2 * band.step_sigma, "the band alone knows nothing of this tape's moves"


THIN_TICK = 1e-7                # a thin pair near 1e-5: a tick is 1 % of the price, the spread one tick


def thin_pair(minutes: int = 60, seed: int = 11) -> tuple[list[Trade], int]:
    """A sell at the bid and a buy at the ask twice a minute, the bid (100 ticks) walking a tick one
    minute in five; the trades and the bid at the end, in ticks."""
    rng, bid, out = random.Random(seed), 100, []
    for m in range(minutes):
        if rng.random() < 0.2:
            bid += rng.choice((-1, 1))
        for k, (side, at) in enumerate([("sell", bid), ("buy", bid + 1)] * 2):
            out.append(Trade(f"th{m}-{k}", "THIN-BTC", T0 + m * WINDOW_MS + k * 9_000, round(at * THIN_TICK, 12),
                             1000.0, side, "X"))
    return out, bid


def sweep(minute: int, side: str, ticks: list[int]) -> list[Trade]:
    """A market order sweeping the book at `ticks`, one print a second from the minute's 40th."""
    return [Trade(f"sw{minute}-{i}", "THIN-BTC", T0 + minute * WINDOW_MS + 40_000 + i * 1000,
                  round(at * THIN_TICK, 12), 1000.0, side, "X") for i, at in enumerate(ticks)]


def test_on_a_thin_pair_a_sweep_after_a_close_on_the_far_sides_sweep_is_not_out_of_range():
    """An ordinary market order prints up to two spreads past the touch: a minute that closes on a
    buy sweep two ticks over the ask, then a sell sweep two ticks under the bid, are five ticks (5 %)
    apart — beyond 5.9 σ of this pair's calm minutes, yet each print lies within three spreads of
    the mid, and the price rules (measured from the rolling mean, an estimate of the mid) see
    nothing. The band is centred on a print, not the mid: a move from the close counts only beyond
    six ticks and twice three spreads, as the close and the trade each lie up to three from the mid.
    A drop of eight ticks from the close still fires."""
    calm, bid = thin_pair()
    swept = calm + sweep(60, "buy", [bid + 1, bid + 2, bid + 3]) + sweep(61, "sell", [bid, bid - 1, bid - 2])
    detector = RuleDetector()
    detections = run(swept, detector)
    assert not [d.types for d in detections if d.types]
    state = detector.state_for("THIN-BTC")
    assert state.spread() == pytest.approx(THIN_TICK) and state.tick == pytest.approx(THIN_TICK)
    watch = state.band
    band = watch.band(watch.window[0])
    assert math.log((bid + 3) / (bid - 2)) > 5.88 * band.unit, "the sweeps are beyond 5.9 σ of the calm minutes"
    dropped = calm + sweep(60, "buy", [bid + 1, bid + 2, bid + 3]) + sweep(61, "sell", [bid - 5])
    (d,) = fired(run(dropped))
    e = d.evidence["OUT_OF_RANGE"]
    assert d.trade.price == pytest.approx((bid - 5) * THIN_TICK) and e.baseline == pytest.approx((bid + 3) * THIN_TICK)
    assert "6 ticks of 1e-07 and twice 3 spreads of 1e-07" in e.threshold_how, e.threshold_how
    assert e.threshold == pytest.approx(math.log1p(6 * THIN_TICK / e.baseline) / e.extra["sigma"])


def test_a_print_whose_condition_sets_no_price_is_not_judged_and_moves_no_band():
    trades = gbm_day(6, minutes=60)
    odd = trades[45 * 30 + 3]
    off = Trade(odd.trade_id, odd.symbol, odd.timestamp_ms, round(odd.price * 1.01, 2), odd.quantity, odd.side,
                odd.exchange, condition="20")
    trades[45 * 30 + 3] = off
    assert [d.trade for d in fired(run(trades))] == [off]
    assert not fired(run(trades, RuleDetector(excluded=frozenset({"20"}))))


def test_after_a_restart_the_band_goes_on_exactly():
    trades = jumped(gbm_day(7, minutes=120), 90 * 30 + 11, 0.006)
    running, restarted = RuleDetector(), RuleDetector()
    for t in trades[:60 * 30 + 13]:
        running.process(t)
        restarted.process(t)
    stored = json.loads(json.dumps(restarted.export({"AAPL"})))
    restarted = RuleDetector()
    restarted.restore(stored)
    a = run(trades[60 * 30 + 13:], running)
    b = run(trades[60 * 30 + 13:], restarted)
    assert [(x.types, x.evidence.get("OUT_OF_RANGE")) for x in a] == [(y.types, y.evidence.get("OUT_OF_RANGE"))
                                                                       for y in b]
    assert len(fired(a)) == 1


def test_a_state_stored_before_the_band_restores_and_starts_one():
    detector = RuleDetector()
    run(gbm_day(8, minutes=5), detector)
    stored = json.loads(json.dumps(detector.export({"AAPL"})))
    del stored["AAPL"]["band"]
    restored = RuleDetector()
    restored.restore(stored)
    assert isinstance(restored.state_for("AAPL").band, BandWatch) and restored.state_for("AAPL").band.window is None


def test_absurd_prices_raise_nothing_and_leave_a_finite_state():
    """What the fuzz test sends (prices from 1e-300 to 1e12 on one symbol): the detector and the
    aggregator's forecast state go on, every number they store stays finite (orjson writes inf as
    null, and JSON has no NaN)."""
    import orjson

    from tradewatch.volatility import ForecastState

    rng = random.Random(9)
    trades = [Trade(f"x{i}", "ODD", T0 + i * 7_000, 10 ** rng.uniform(-300, 12), 10 ** rng.uniform(-300, 15),
                    rng.choice(("buy", "sell", "unknown")), "X") for i in range(600)]
    detector = RuleDetector()
    detections = run(trades, detector)
    assert len(detections) == 600
    stored = json.loads(orjson.dumps(detector.export({"ODD"})))
    assert "null" not in json.dumps(stored["ODD"]["band"]) and stored["ODD"]["band"]["forecast"] is not None
    state = ForecastState(WINDOW_MS)
    for k in range(60):
        prices = [10 ** rng.uniform(-300, 12) for _ in range(3)]
        row = state.update(T0 + k * WINDOW_MS, prices[0], max(prices), min(prices), prices[-1], 1e15, 3)
    assert all(math.isfinite(v) for k, v in row.items() if k != "start_ms")
    assert all(math.isfinite(v) for v in UNTRAINED.forecast([{"symbol": "ODD", **row}])[0][:4])
