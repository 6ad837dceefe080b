import numpy as np
import pandas as pd
import pytest

from tradewatch.events import Trade
from tradewatch.windows import WindowSet, aggregate, parse_size, size_label

MIN = 60_000
T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z, a minute boundary


def trade(ms, price=100.0, qty=1.0, side="buy", symbol="AAPL", condition=None, n=[0]):
    n[0] += 1
    return Trade(f"t{n[0]}", symbol, ms, price, qty, side, "X", condition=condition)


def test_sizes_parse_and_label():
    assert [parse_size(s) for s in ("30s", "1m", "5m", "15m", "1h", "1d")] == [
        30_000, MIN, 5 * MIN, 15 * MIN, 3_600_000, 86_400_000]
    assert size_label(parse_size("15m")) == "15m" and size_label(3_600_000) == "1h"
    with pytest.raises(ValueError, match="not like"):
        parse_size("5 minutes")


def test_trade_exactly_on_a_boundary_opens_the_next_window():
    windows, _ = aggregate([trade(T0 + MIN - 1, 1.0), trade(T0 + MIN, 2.0)], (MIN,))
    assert [(w.start_ms, w.close, w.trade_count) for w in windows] == [(T0, 1.0, 1), (T0 + MIN, 2.0, 1)]
    assert windows[1].end_ms == T0 + 2 * MIN


def test_late_within_lateness_updates_and_beyond_is_reported():
    ws = WindowSet((MIN,), allowed_lateness_ms=5_000, idle_timeout_s=float("inf"))
    ws.add(trade(T0 + 10_000, 10.0), 0)
    ws.add(trade(T0 + MIN + 3_000, 11.0), 1)     # watermark T0+MIN-2000: first window still open
    assert ws.pop_final() == []
    changed = ws.add(trade(T0 + 5_000, 9.0), 2)  # late but within lateness: updates, becomes open
    assert changed[0].open == 9.0 and changed[0].trade_count == 2
    ws.add(trade(T0 + MIN + 6_000, 12.0), 3)     # watermark T0+MIN+1000 passes the first window's end
    final = ws.pop_final()
    assert [(w.start_ms, w.trade_count, w.is_final) for w in final] == [(T0, 2, True)]
    assert ws.add(trade(T0 + 59_000, 50.0, symbol="AAPL"), 4) == []   # beyond lateness
    late = ws.take_late()
    assert [(l.window_start_ms, l.watermark_ms) for l in late] == [(T0, T0 + MIN + 1_000)]
    assert ws.late_trades_total == 1


def test_out_of_order_input_gives_the_same_windows_as_sorted_input():
    rng = np.random.default_rng(1)
    times = sorted(T0 + int(x) for x in rng.choice(10 * MIN, 500, replace=False))
    trades = [trade(t, float(100 + rng.normal()), float(rng.integers(1, 100)), ["buy", "sell"][i % 2])
              for i, t in enumerate(times)]
    shuffled = trades[:]
    # local disorder inside blocks of 20 trades (~24 s), always within a 60 s lateness
    for i in range(0, len(shuffled), 20):
        block = shuffled[i:i + 20]
        rng.shuffle(block)
        shuffled[i:i + 20] = block
    in_order, _ = aggregate(trades, (MIN, 5 * MIN), allowed_lateness_ms=MIN)
    disordered, late = aggregate(shuffled, (MIN, 5 * MIN), allowed_lateness_ms=MIN)
    assert late == []
    fields = ("start_ms", "open", "high", "low", "close", "trade_count", "buy_volume", "sell_volume")
    assert [[getattr(w, f) for f in fields] for w in in_order] == [[getattr(w, f) for f in fields] for w in disordered]
    assert [w.sum_quantity for w in in_order] == pytest.approx([w.sum_quantity for w in disordered])


def test_idle_partition_closes_its_windows_on_the_wall_clock():
    ws = WindowSet((MIN,), allowed_lateness_ms=5_000, idle_timeout_s=10)
    ws.add(trade(T0 + 30_000), 0)
    ws.advance_when_idle(9.0)
    assert ws.pop_final() == []
    ws.advance_when_idle(31.0)     # 31 s quiet: event time assumed to have moved on by 31 s
    assert [w.start_ms for w in ws.pop_final()] == [T0]


def test_metrics_equal_a_direct_pandas_computation_on_random_trades():
    rng = np.random.default_rng(7)
    n = 3000
    frame = pd.DataFrame({
        "ts": T0 + rng.integers(0, 30 * MIN, n),
        "symbol": rng.choice(["A", "B", "C"], n),
        "price": rng.uniform(10, 20, n).round(2),
        "qty": rng.integers(1, 500, n).astype(float),
        "side": rng.choice(["buy", "sell", "unknown"], n),
    }).sort_values("ts", kind="stable").reset_index(drop=True)
    trades = [trade(int(r.ts), r.price, r.qty, r.side, r.symbol) for r in frame.itertuples()]
    for size in (MIN, 5 * MIN, 15 * MIN):
        got, _ = aggregate(trades, (size,))
        frame["start"] = frame.ts - frame.ts % size
        frame["value"] = frame.price * frame.qty
        g = frame.groupby(["symbol", "start"], sort=True)
        expected = pd.DataFrame({
            "open": g.price.first(), "high": g.price.max(), "low": g.price.min(), "close": g.price.last(),
            "volume": g.qty.sum(), "count": g.size(), "vwap": g.value.sum() / g.qty.sum(),
            "avg_price": g.price.mean(), "avg_qty": g.qty.mean(), "min_qty": g.qty.min(), "max_qty": g.qty.max(),
            "buy": frame[frame.side == "buy"].groupby(["symbol", "start"]).qty.sum(),
            "sell": frame[frame.side == "sell"].groupby(["symbol", "start"]).qty.sum(),
        }).fillna({"buy": 0.0, "sell": 0.0}).reset_index()
        actual = pd.DataFrame([{
            "symbol": w.symbol, "start": w.start_ms, "open": w.open, "high": w.high, "low": w.low,
            "close": w.close, "volume": w.sum_quantity, "count": w.trade_count, "vwap": w.vwap,
            "avg_price": w.sum_price / w.trade_count, "avg_qty": w.sum_quantity / w.trade_count,
            "min_qty": w.min_quantity, "max_qty": w.max_quantity, "buy": w.buy_volume, "sell": w.sell_volume,
        } for w in got])
        pd.testing.assert_frame_equal(actual, expected, check_dtype=False, rtol=1e-12)


def test_excluded_conditions_count_in_volume_but_not_in_ohlc():
    windows, _ = aggregate([trade(T0, 10.0, 5), trade(T0 + 1, 99.0, 7, condition="X"), trade(T0 + 2, 11.0, 1)],
                           (MIN,), ohlc_exclude_conditions=frozenset({"X"}))
    w = windows[0]
    assert (w.open, w.high, w.low, w.close) == (10.0, 11.0, 10.0, 11.0)
    assert w.sum_quantity == 13 and w.trade_count == 3 and w.max_price == 99.0


SKEW = 300_000


def stream(n=50, start=T0):
    return [trade(start + i * 1_000, 100.0 + i) for i in range(n)]


def test_one_trade_far_ahead_never_moves_event_time():
    """Issue 11: one trade stamped 23 h ahead made every later trade late (150 late records from 50
    good trades) and the windows stopped. Now it is held, found alone, reported, and left out."""
    good = stream()
    outlier = trade(T0 + 10_500 + 23 * 3_600_000, 999.0)
    mixed = good[:10] + [outlier] + good[10:]
    sizes = (MIN, 5 * MIN)
    expected, expected_late = aggregate(good, sizes, 5_000, max_skew_ms=SKEW)
    windows, late = aggregate(mixed, sizes, 5_000, max_skew_ms=SKEW)
    assert [(w.start_ms, w.trade_count, w.close) for w in windows] == \
        [(w.start_ms, w.trade_count, w.close) for w in expected]
    assert expected_late == []
    assert {(t.trade_id, t.reason) for t in late} == {(outlier.trade_id, "clock_skew")}
    assert len(late) == len(sizes)          # one audit row per window size, like a late trade
    # without the bound (the old behaviour) the same stream loses every later trade
    _, unbounded_late = aggregate(mixed, sizes, 5_000)
    assert len({t.trade_id for t in unbounded_late}) == 40


def test_a_real_jump_in_event_time_is_confirmed_by_the_next_trade():
    day1 = stream(5)
    day2 = stream(5, start=T0 + 17 * 3_600_000)      # the next session of a replayed file
    windows, late = aggregate(day1 + day2, (MIN,), 5_000, max_skew_ms=SKEW)
    assert late == []
    assert sum(w.trade_count for w in windows) == 10
    assert windows[-1].start_ms == T0 + 17 * 3_600_000


def test_a_held_last_trade_is_folded_once_the_partition_is_idle():
    ws = WindowSet((MIN,), 5_000, idle_timeout_s=10.0, max_skew_ms=SKEW)
    for i, t in enumerate(stream(3)):
        ws.add(t, i)
    last = trade(T0 + 2 * 3_600_000, 50.0)
    assert ws.add(last, 3) == [] and ws.held == (last, 3)
    assert ws.advance_when_idle(4.0) == [] and ws.held is not None     # not quiet long enough
    changed = ws.advance_when_idle(11.0)
    assert ws.held is None and [w.start_ms for w in changed] == [T0 + 2 * 3_600_000]
    assert ws.clock.max_event_ms == last.timestamp_ms
