"""The trade rules learn the spread (tradewatch/detect/features.py `SymbolState.learn`): a trade
that only crosses a wide spread is not a move; a move beyond `spike_spreads` spreads is."""
from __future__ import annotations

import json

import pytest

from tradewatch.alerts import Deduplicator, alerts_for
from tradewatch.detect.evaluate import ALERT_COOLDOWNS_S, score_pumps
from tradewatch.detect.features import SymbolState
from tradewatch.detect.rules import RuleDetector
from tradewatch.events import Trade
from tradewatch.market.simulator import IlliquidProfile

START = 1_767_225_600_000
TICK = 1e-8
BID, ASK = 800, 850            # in ticks: a 50-tick spread, 6.25 % of the bid


def trade(n: int, ticks: int, side: str, how: str) -> Trade:
    """A trade at `ticks`; `how` says what it tells of the spread: "quoted" (it carries the
    bid and ask), "sided" (its aggressor side only) or "unknown" (neither)."""
    quote = {"bid": BID * TICK, "ask": ASK * TICK} if how == "quoted" else {}
    return Trade(f"t{n}", "WIDE-BTC", START + n * 60_000, round(ticks * TICK, 12), 1000.0,
                 side if how != "unknown" else "unknown", "X", **quote)


def bouncing_then_one_sided(how: str) -> list[Trade]:
    """Two sells a tick apart (the tick), 40 trades bouncing between bid and ask, then 60 sells at
    the bid: the rolling window holds one price, its standard deviation is nothing, and the spread
    is all there is to go by."""
    trades = [trade(0, BID + 1, "sell", how), trade(1, BID, "sell", how)]
    trades += [trade(i, ASK if i % 2 else BID, "buy" if i % 2 else "sell", how) for i in range(2, 42)]
    return trades + [trade(i, BID, "sell", how) for i in range(42, 100)]


def alerts_of(trades: list[Trade]) -> list:
    rules, dedup = RuleDetector(), Deduplicator(ALERT_COOLDOWNS_S)
    return [a for t in trades for a in alerts_for(rules.process(t)) if dedup.allow(a)]


@pytest.mark.parametrize("how", ["quoted", "sided", "unknown"])
def test_the_spread_is_learned_from_quotes_bounces_or_reversals(how):
    state = SymbolState(50, 200)
    for t in bouncing_then_one_sided(how)[:42]:
        state.learn(t)
    assert state.spread() == pytest.approx((ASK - BID) * TICK)
    assert state.tick == pytest.approx(TICK)
    # a real move (the bid lifted 300 ticks) is one observation among many: the median holds
    for i, ticks in enumerate([BID + 300, BID + 350, BID + 300]):
        state.learn(trade(100 + i, ticks, "sell" if i % 2 == 0 else "buy", how))
    assert state.spread() == pytest.approx((ASK - BID) * TICK)


@pytest.mark.parametrize("how", ["quoted", "sided", "unknown"])
def test_a_buy_across_a_wide_spread_is_not_a_move_but_three_spreads_are(how):
    quiet = bouncing_then_one_sided(how)
    crossed = quiet + [trade(100, ASK, "buy", how)]          # +6.25 %: over the 5 %, 6 ticks and 5 σ lines
    assert alerts_of(crossed) == []
    moved = crossed + [trade(101, BID + 4 * (ASK - BID), "buy", how)]    # +25 %: four spreads over the bid
    alerts = alerts_of(moved)
    assert {a.alert_type for a in alerts} == {"PRICE_SPIKE"}, alerts        # the breaker is at twice the line
    spike = next(a for a in alerts if a.alert_type == "PRICE_SPIKE")
    ev = spike.evidence
    assert ev["params"]["spike_spreads"] == 3.0 and ev["extra"]["spread"] == pytest.approx(50 * TICK)
    assert ev["threshold"] == pytest.approx(3 * 50 / BID * 100, rel=0.02)     # three spreads over the mean (the bid)
    assert "3 spreads of 5e-07" in ev["threshold_how"]


def test_without_the_spread_the_same_buy_raised_alerts():
    """What the rules did before they learned the spread (spike_spreads 0 and no quote or side to
    widen the z-score's σ): the crossing of the spread alone was a 'spike'."""
    from tradewatch.detect.rules import DetectorConfig
    rules = RuleDetector(DetectorConfig(spike_spreads=0.0))
    kinds = {k for t in bouncing_then_one_sided("sided") + [trade(100, ASK, "buy", "sided")]
             for k in rules.process(t).types}
    assert "PRICE_SPIKE" in kinds


def test_the_learned_spread_survives_a_checkpoint():
    trades = bouncing_then_one_sided("sided")
    rules = RuleDetector()
    for t in trades[:30]:
        rules.process(t)
    restored = RuleDetector()
    restored.restore(json.loads(json.dumps(rules.export({"WIDE-BTC"}))))
    assert restored.symbols["WIDE-BTC"].spread() == pytest.approx((ASK - BID) * TICK)
    later = [trade(100, ASK, "buy", "sided"), trade(101, BID + 4 * (ASK - BID), "buy", "sided")]
    whole = RuleDetector()
    expected = [whole.process(t).types for t in trades + later][30:]
    assert [restored.process(t).types for t in trades[30:] + later] == expected


def test_calm_days_of_wide_spread_pairs_stay_calm_and_their_pumps_are_caught():
    """Ten pairs over two days with a 25-tick spread (about 3 %), five of them pumped on the second:
    ordinary bursts sweep up to two spreads past the touch. With the one-tick rules alone that was
    1.25 alerts per symbol-day."""
    result = score_pumps([1, 2], profile=IlliquidProfile(tick=TICK, spread_ticks=25))
    assert result["pumps"] == 10
    assert result["recall_5min"] >= 0.95 and result["delay_s_median"] <= 5, result
    assert result["alerts_per_symbol_day_ordinary"] <= 0.5, result
