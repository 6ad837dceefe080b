import math
import statistics
from itertools import islice

from tradewatch.market.simulator import DEFAULT_SYMBOLS, FLASH_CRASH_PATH, MarketSimulator

START = 1_700_000_000_000


def take(sim, n):
    return list(islice(sim, n))


def test_same_seed_same_stream_and_different_seed_differs():
    a = take(MarketSimulator(seed=42, anomaly_rate=0.01, start_ms=START), 2000)
    b = take(MarketSimulator(seed=42, anomaly_rate=0.01, start_ms=START), 2000)
    c = take(MarketSimulator(seed=43, anomaly_rate=0.01, start_ms=START), 2000)
    assert a == b
    assert [t.price for t in a] != [t.price for t in c]
    assert len({t.trade_id for t in a}) == 2000


def test_trades_are_well_formed_and_cover_default_symbols():
    trades = take(MarketSimulator(seed=1, rate=100, start_ms=START), 5000)
    assert {t.symbol for t in trades} == set(DEFAULT_SYMBOLS)
    for t in trades:
        assert t.bid < t.ask and t.price in (t.bid, t.ask)
        assert t.side == ("buy" if t.price == t.ask else "sell")
        assert t.quantity > 0 and t.injected_anomaly is None
    times = [t.timestamp_ms for t in trades]
    assert times == sorted(times)
    # event time advances at the configured rate: 5000 trades at 100/s ≈ 50 s
    assert 45_000 < times[-1] - START < 55_000


def test_gbm_log_returns_match_the_configured_volatility():
    sim = MarketSimulator(["TSLA"], rate=1.0, seed=5, start_ms=START)
    prices = [t.bid + (t.ask - t.bid) / 2 for t in take(sim, 20000)]
    returns = [math.log(b / a) for a, b in zip(prices, prices[1:])]
    per_second_sigma = 0.60 / math.sqrt(365.25 * 24 * 3600)
    assert abs(statistics.pstdev(returns) / per_second_sigma - 1) < 0.15


def test_injected_anomalies_are_labelled_and_shaped():
    sim = MarketSimulator(["AAPL"], seed=3, anomaly_rate=0.02, start_ms=START)
    trades = take(sim, 20000)
    labels = [t.injected_anomaly for t in trades if t.injected_anomaly]
    assert {"price_spike", "price_drop", "volume_spike", "flash_crash"} <= set(labels)
    normal = [t for t in trades if not t.injected_anomaly]
    median_qty = statistics.median(t.quantity for t in normal)
    for i, t in enumerate(trades):
        reference = trades[i - 1].bid if i else t.bid
        if t.injected_anomaly == "price_spike":
            assert t.price > reference * 1.05
        elif t.injected_anomaly == "price_drop":
            assert t.price < reference * 0.95
        elif t.injected_anomaly == "volume_spike":
            assert t.quantity > median_qty * 5
    # a flash crash is a run of len(FLASH_CRASH_PATH) consecutive labelled trades
    crash_runs = "".join("F" if t.injected_anomaly == "flash_crash" else "." for t in trades).split(".")
    assert {len(run) for run in crash_runs if run} == {len(FLASH_CRASH_PATH)}
    assert sum(sim.injected.values()) == len(labels)
