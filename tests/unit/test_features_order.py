"""Detection state never sees time run backwards as a crash: out-of-order, equal and re-read
timestamps give finite features and never raise; a stored state goes on exactly."""
from __future__ import annotations

import math

from hypothesis import given, settings, strategies as st

from tradewatch.detect.rules import RuleDetector
from tradewatch.events import EARLIEST_TIMESTAMP_MS, Trade

T0 = 1_767_225_600_000


def trade(i: int, ts: int, price: float = 100.0, qty: float = 100.0) -> Trade:
    return Trade(f"t{i}", "AAPL", ts, price, qty, "buy", "X", price - 0.01, price + 0.01)


def test_a_timestamp_earlier_than_the_last_trade_is_no_math_error():
    detector = RuleDetector()
    for i in range(30):
        detector.process(trade(i, T0 + i * 1000))
    # the partition is re-read from its warm-up offset: far earlier than the state's last trade
    detection = detector.process(trade(99, T0 - 3_600_000))
    assert math.isfinite(detection.features.gap_log_ratio)
    assert detection.features.gap_log_ratio <= 0


def test_equal_timestamps_give_zero_gap():
    detector = RuleDetector()
    detections = [detector.process(trade(i, T0)) for i in range(40)]
    assert all(d.features.gap_log_ratio == 0.0 for d in detections)


trades_strategy = st.lists(
    st.tuples(
        st.integers(min_value=EARLIEST_TIMESTAMP_MS, max_value=T0 + 86_400_000),
        st.floats(min_value=1e-8, max_value=1e9, allow_nan=False, allow_infinity=False),
        st.floats(min_value=1e-8, max_value=1e9, allow_nan=False, allow_infinity=False),
        st.sampled_from(["AAPL", "BTC-USD"]),
    ),
    min_size=1, max_size=120)


@settings(max_examples=300, deadline=None)
@given(trades_strategy)
def test_any_sequence_of_valid_trades_gives_finite_features(rows):
    detector = RuleDetector()
    for i, (ts, price, qty, symbol) in enumerate(rows):
        d = detector.process(Trade(f"t{i}", symbol, ts, price, qty, "sell", "X"))
        assert all(math.isfinite(v) for v in d.features.vector()), d.features


def market(n: int, start: int = 0) -> list[Trade]:
    prices = [100 + ((i * 37) % 11 - 5) * 0.01 for i in range(n)]
    prices[start + n // 2] = 113.0          # one crash-sized move in the middle
    return [trade(start + i, T0 + (start + i) * 1000, p, 100 + (i * 13) % 50) for i, p in enumerate(prices)]


def test_a_stored_and_restored_state_goes_on_exactly_like_an_uninterrupted_detector():
    """What a restart does (tradewatch/stages/detector.py): the state of a symbol goes through JSON
    in detector_symbols and on; features, flags and breaker moves equal a run never interrupted."""
    import json
    trades = market(300)
    running, restarted = RuleDetector(), RuleDetector()
    for t in trades[:200]:
        running.process(t)
        restarted.process(t)
    stored = json.loads(json.dumps(restarted.export({"AAPL"})))
    restarted = RuleDetector()
    restarted.restore(stored)
    running.take_transitions()
    for t in trades[200:]:
        a, b = running.process(t), restarted.process(t)
        assert (a.features, a.types, a.score) == (b.features, b.types, b.score)
    assert running.take_transitions() == restarted.take_transitions()
