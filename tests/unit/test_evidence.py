"""Every alert type's evidence, re-derived here from the trades it names (numpy over the input
trades, not the detector's rolling sums): the baseline, the measured change, the threshold and
how it was set, the tick, the window's trades."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from tests.unit.test_detect import calm_stream, heavy_tailed_stream
from tests.unit.test_pump import quiet_then_pump
from tradewatch.alerts import alerts_for
from tradewatch.detect import forest, pump
from tradewatch.detect.features import FEATURE_NAMES
from tradewatch.detect.pipeline import DetectionPipeline
from tradewatch.detect.rules import DetectorConfig, RuleDetector
from tradewatch.events import Trade

C = DetectorConfig()


def detect(trades, model=None):
    return DetectionPipeline(RuleDetector(), model).process(trades)


def learned_tick(trades) -> float:
    prices = np.array([t.price for t in trades])
    steps = np.abs(np.diff(prices))
    return float(steps[steps > prices[1:] * 1e-9].min())


def evidence_of(detection, kind) -> dict:
    """The evidence as the alert carries it (through JSON, as stored and sent)."""
    alert = next(a for a in alerts_for(detection) if a.alert_type == kind)
    assert alert.evidence["sentence"] in alert.message
    return json.loads(json.dumps(alert.evidence))


def after(trades, price, qty=100.0, trade_id="probe"):
    return Trade(trade_id, trades[-1].symbol, trades[-1].timestamp_ms + 1000, price, qty, "buy", "X")


@pytest.mark.parametrize("price, kinds", [(106.0, ["PRICE_SPIKE", "PRICE_ZSCORE"]), (94.0, ["PRICE_DROP"]),
                                          (88.0, ["CIRCUIT_BREAKER", "PRICE_DROP", "PRICE_ZSCORE"])])
def test_price_rules_name_their_window_and_its_values_follow_from_it(price, kinds):
    trades = calm_stream(120)
    early = trades[100]
    trades[100] = Trade("early", "AAPL", early.timestamp_ms, 108.0, 100.0, "buy", "X")    # an earlier spike
    trades.append(after(trades, price))
    d = detect(trades)[-1]
    assert set(kinds) <= set(d.types)
    normal = [t for t in trades[:-1] if t.trade_id != "early"]
    tick = learned_tick(trades[:-1])
    for kind in kinds:
        ev = evidence_of(d, kind)
        assert ev["rule"] == kind and ev["version"] == 1 and ev["trades"]["trade_id"] == "probe"
        ids = ev["trades"]["ids"]
        assert ids == [t.trade_id for t in normal[-C.price_window:]], "the last 50 normal trades, the spike left out"
        window = [t for t in normal if t.trade_id in set(ids)]
        assert (ev["trades"]["first_ms"], ev["trades"]["last_ms"]) == (window[0].timestamp_ms, window[-1].timestamp_ms)
        prices = np.array([t.price for t in window])
        mean, std = prices.mean(), prices.std()
        assert ev["value"] == price and ev["baseline"] == pytest.approx(mean, rel=1e-12)
        assert ev["tick"] == pytest.approx(tick, rel=1e-3)
        spike = max(C.spike_pct, C.spike_ticks * tick / mean, C.spike_sigmas * std / mean)
        if kind == "PRICE_ZSCORE":
            sigma = max(std, 0.002 * mean, tick)
            assert ev["change"] == pytest.approx((price - mean) / sigma, rel=1e-6) and ev["threshold"] == 8.0
            assert ev["level"] == pytest.approx(mean + math.copysign(8.0 * sigma, price - mean), rel=1e-9)
            continue
        line = max(C.circuit_pct, 2 * spike) if kind == "CIRCUIT_BREAKER" else spike
        assert ev["unit"] == "%" and ev["change"] == pytest.approx((price / mean - 1) * 100, rel=1e-9)
        assert ev["threshold"] == pytest.approx(line * 100, rel=1e-6) and abs(ev["change"]) > ev["threshold"]
        assert ev["level"] == pytest.approx(mean * (1 + math.copysign(line, price - mean)), rel=1e-9)
        assert f"{(price / mean - 1) * 100:+.2f} %" in ev["sentence"] and f"{line * 100:.2f} %" in ev["sentence"]


def test_a_whale_names_the_largest_trade_it_was_measured_against():
    stream = heavy_tailed_stream(1100, gap_ms=90_000)         # a whole day seen
    previous = stream[-1000:]
    largest = max(t.quantity for t in previous)
    named = [t for t in previous if t.quantity == largest][-1]
    stream.append(after(stream, 100.0, qty=4 * largest))
    ev = evidence_of(detect(stream)[-1], "VOLUME_SPIKE")
    assert ev["baseline"] == largest and ev["trades"]["ids"] == [named.trade_id] and ev["trades"]["count"] == 1000
    assert ev["change"] == pytest.approx(4.0) and ev["threshold"] == C.whale_factor
    assert ev["level"] == pytest.approx(C.whale_factor * largest)


def test_a_momentum_run_names_the_trade_it_started_from():
    trades = calm_stream(100)
    for k, price in enumerate([100.5, 101.0, 101.5, 102.0, 102.6]):
        trades.append(after(trades, price, trade_id=f"run{k}"))
    detections = detect(trades)
    d = detections[-1]
    # an earlier trade of the run told this move already: the run's flag keeps its evidence, its alert is held
    assert [k for x in detections[-5:-1] for k in x.types if k not in x.held] and d.held == {"MOMENTUM_RUN"}
    ev = json.loads(json.dumps(d.evidence["MOMENTUM_RUN"].to_dict()))
    (start_id,) = ev["trades"]["ids"]
    at = next(i for i, t in enumerate(trades) if t.trade_id == start_id)
    run = [t.price for t in trades[at:]]
    assert all(b >= a for a, b in zip(run, run[1:])) and trades[at - 1].price >= trades[at].price
    assert ev["extra"]["moves"] == sum(b > a for a, b in zip(run, run[1:]))
    assert ev["baseline"] == trades[at].price and ev["change"] == pytest.approx((102.6 / trades[at].price - 1) * 100)
    tick = learned_tick(trades[:-1])
    mean = np.mean([t.price for t in trades[-51:-1]])
    assert ev["threshold"] == pytest.approx(max(C.run_move_pct, C.run_ticks * ev["extra"]["moves"] * tick / mean) * 100)


def test_the_forest_names_the_features_that_drove_its_score():
    calm = heavy_tailed_stream(3000)
    rows = np.array([d.features.vector() for d in detect(calm) if d.features.history >= C.min_history])
    model = forest.train(rows, {"source": "test"}, n_estimators=50)
    odd = Trade("odd", "AAPL", calm[-1].timestamp_ms + 600_000, 103.5, 40_000.0, "sell", "X")
    d = detect(calm + [odd], model)[-1]
    ev = evidence_of(d, "ISOLATION_FOREST")
    vector = np.array([ev["extra"]["features"][name] for name in FEATURE_NAMES])
    assert ev["value"] == pytest.approx(model.score(vector[None, :])[0]) and ev["value"] > ev["threshold"] == 1.0
    medians = np.median(rows, axis=0)
    without = []
    for j in range(len(FEATURE_NAMES)):
        probe = vector.copy()
        probe[j] = medians[j]
        without.append(model.score(probe[None, :])[0])
    expected = [FEATURE_NAMES[j] for j in np.argsort(without) if without[j] < ev["value"]][:3]
    assert [x["feature"] for x in ev["extra"]["drivers"]] == expected and expected
    for x in ev["extra"]["drivers"]:
        j = FEATURE_NAMES.index(x["feature"])
        assert x["typical"] == pytest.approx(medians[j]) and x["score_without"] == pytest.approx(without[j])
    assert expected[0] in ev["sentence"]


def test_each_pump_phase_follows_from_the_trades():
    trades = quiet_then_pump()
    detections = detect(trades)
    phases = {}
    for t, d in zip(trades, detections):
        if "PUMP_AND_DUMP" in d.types:
            phases.setdefault(d.phase, (t, evidence_of(d, "PUMP_AND_DUMP")))
    assert list(phases) == ["pump", "peak", "dump", "over"]
    trigger, ev = phases["pump"]
    first, last = ev["trades"]["first_ms"], ev["trades"]["last_ms"]
    burst = [t for t in trades if first <= t.timestamp_ms <= last]
    before = [t for t in trades if t.timestamp_ms < first]
    assert last == trigger.timestamp_ms and ev["value"] == len(burst) == ev["trades"]["count"]
    assert last - first <= pump.BURST_S * 1000 and before[-1].timestamp_ms < last - pump.BURST_S * 1000
    # the baseline: no 20 s before had MIN_TRADES trades (a trade a minute), so the burst had to pass
    # MIN_TRADES - 1; its rate of the last hour: the trades before it, each decayed by its age, over
    # the span they cover
    assert ev["baseline"] == pump.MIN_TRADES - 1 and ev["change"] == len(burst) / (pump.MIN_TRADES - 1)
    assert ev["extra"]["busiest_day"] == 0
    tau, age_s = pump.BASELINE_TAU_S, (last - trades[0].timestamp_ms) / 1000 - pump.BURST_S
    decayed = sum(math.exp(-(last - t.timestamp_ms) / 1000 / tau) for t in before)
    expected = decayed / (tau * (1 - math.exp(-age_s / tau))) * pump.BURST_S
    assert ev["extra"]["expected"] == pytest.approx(expected, rel=1e-9)
    start_price = before[-1].price
    assert ev["extra"]["start_price"] == start_price
    assert ev["extra"]["gain_pct"] == pytest.approx((trigger.price / start_price - 1) * 100)
    buys = sum(t.price * t.quantity for t in burst if t.side == "buy") / sum(t.price * t.quantity for t in burst)
    assert ev["extra"]["buy_share"] == pytest.approx(buys, abs=1e-4)
    for phase, line in (("peak", pump.PEAK_RETRACE), ("dump", pump.DUMP_RETRACE), ("over", pump.OVER_RETRACE)):
        trade, ev = phases[phase]
        since = [t for t in trades if first <= t.timestamp_ms <= trade.timestamp_ms]
        peak = max(since, key=lambda t: t.price)      # the first trade at the highest price
        assert ev["baseline"] == peak.price == ev["extra"]["peak_price"]
        if ev["unit"] == "s":         # went quiet: the time since the peak (or the start) passed its limit
            origin = peak.timestamp_ms if phase == "peak" else first
            assert ev["change"] == (trade.timestamp_ms - origin) / 1000 >= ev["threshold"]
        else:
            given_back = (peak.price - trade.price) / (peak.price - start_price)
            assert ev["change"] == pytest.approx(given_back * 100) and ev["threshold"] == line * 100
            assert given_back >= line


def test_state_checkpointed_before_evidence_restores_and_names_only_what_it_knows():
    """A detector resuming from a checkpoint written before trades were named: its alerts still
    carry evidence, naming only the trades seen since."""
    trades = calm_stream(120)
    detector = RuleDetector()
    for t in trades[:100]:
        detector.process(t)
    old = detector.export({"AAPL"})
    for key in ("price_trades", "largest_ids", "last_trade", "run_start_trade"):
        del old["AAPL"][key]
    resumed = RuleDetector()
    resumed.restore(json.loads(json.dumps(old)))
    for t in trades[100:]:
        resumed.process(t)
    d = resumed.process(after(trades, 106.0))
    ev = d.evidence["PRICE_SPIKE"].to_dict()
    assert ev["trades"]["ids"] == [t.trade_id for t in trades[100:]] and ev["trades"]["count"] == 20
    assert ev["trades"]["first_ms"] == trades[100].timestamp_ms
    assert ev["baseline"] == pytest.approx(np.mean([t.price for t in trades[-50:]]), rel=1e-12)
