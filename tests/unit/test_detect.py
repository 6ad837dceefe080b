import json
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import SHARED_DATA
from tradewatch.alerts import Alert, Deduplicator, alerts_for
from tradewatch.config import PROJECT_ROOT
from tradewatch.detect import evaluate, forest
from tradewatch.detect.rules import CircuitBreaker, DetectorConfig, RuleDetector
from tradewatch.detect.series import SERIES_DETECTORS
from tradewatch.events import Trade

T0 = 1_767_225_600_000


def calm_stream(n=60, symbol="AAPL", price=100.0, qty=100.0, seed=0):
    rng = np.random.default_rng(seed)
    return [Trade(f"c{i}", symbol, T0 + i * 1000, round(price + rng.normal(0, 0.02), 2),
                  float(round(qty * np.exp(rng.normal(0, 0.3)))), "buy" if i % 2 else "sell", "X")
            for i in range(n)]


def run(trades, config=DetectorConfig()):
    detector = RuleDetector(config)
    return detector, [detector.process(t) for t in trades]


def probe(i, price=100.0, qty=100.0):
    return Trade(f"p{i}", "AAPL", T0 + 100_000 + i * 1000, price, qty, "buy", "X")


def test_calm_market_raises_nothing():
    _, detections = run(calm_stream(500))
    assert not any(d.is_anomaly for d in detections)


@pytest.mark.parametrize("price, expected, severity", [
    (106.0, ["PRICE_SPIKE"], "HIGH"),
    (94.0, ["PRICE_DROP"], "HIGH"),
    (88.0, ["CIRCUIT_BREAKER", "PRICE_DROP"], "CRITICAL"),
    (104.0, [], None),
])
def test_price_move_rules(price, expected, severity):
    _, detections = run(calm_stream() + [probe(0, price)])
    d = detections[-1]
    assert [t for t in d.types if t != "PRICE_ZSCORE"] == expected
    assert d.severity == (severity if expected else (d.severity if d.types else None))


def heavy_tailed_stream(n=1000, median=100.0, seed=3, gap_ms=1000):
    """Sizes like the market's (log-logistic, the simulator's fit): 20x the median is common."""
    rng = np.random.default_rng(seed)
    u = rng.uniform(0.001, 0.999, n)
    sizes = np.round(median * (u / (1 - u)) ** 0.5)
    return [Trade(f"h{i}", "AAPL", T0 + i * gap_ms, round(100.0 + rng.normal(0, 0.02), 2), float(max(s, 1)),
                  "buy", "X") for i, s in enumerate(sizes)]


def test_whale_rule_on_heavy_tailed_sizes():
    stream = heavy_tailed_stream(gap_ms=100_000)        # over a day: a whole day seen
    largest = max(t.quantity for t in stream)
    assert largest > 20 * 100, "the stream has trades beyond 20x the median"
    later = [Trade(f"w{i}", "AAPL", stream[-1].timestamp_ms + 1000 + i * 1000, 100.0, q, "buy", "X")
             for i, q in enumerate([2000.0, 3.0 * largest])]
    _, detections = run(stream + later)
    assert not any(d.is_anomaly for d in detections[:-2]), "no alarm on the heavy tail itself"
    assert detections[-2].types == [], "20x the median, inside the normal range: no alarm"
    assert detections[-1].types == ["VOLUME_SPIKE"] and detections[-1].severity == "MEDIUM"
    assert detections[-1].details["times_recent_max"] == 3.0


def test_a_whale_is_told_only_when_it_is_a_whale_for_its_day():
    """#26: the largest of the last 1,000 trades is an hour's on a busy pair, and a trade 2.8x that
    comes once in a few thousand trades of heavy-tailed sizes, so whale alerts grew with the trade
    count. The flag stays on such a trade; its alert needs 2.8x the past day's largest too (whales
    left out, so one does not hide the next). Time, not trades: the same size that was small for
    its day is a whale once the day's big trade is a day old. The day survives a checkpoint."""
    rng = np.random.default_rng(5)

    def trade(i, seconds, quantity):
        return Trade(f"t{i}", "AAPL", T0 + seconds * 1000, round(100.0 + rng.normal(0, 0.02), 2), quantity, "buy", "X")

    day = [trade(i, 10 * i, 60.0 if i == 100 else float(rng.integers(1, 11))) for i in range(2500)]
    hidden, told = trade("A", 25_000, 40.0), trade("B", 25_010, 400.0)      # 7 hours in
    rest = [trade(f"r{i}", 25_020 + 10 * i, float(rng.integers(1, 11))) for i in range(1100)]
    next_day = trade("C", 26 * 3600, 40.0)          # the 60 was traded 25.7 hours before
    first, detections = run(day + [hidden, told])
    later = RuleDetector()
    later.restore(json.loads(json.dumps(first.export({"AAPL"}))))
    detections += [later.process(t) for t in rest + [next_day]]
    *ordinary, a, b = detections[:2502]
    c = detections[-1]
    assert not any(d.is_anomaly for d in ordinary + detections[2502:-1]), "a trade of 60 early on is no whale yet"
    assert a.types == b.types == c.types == ["VOLUME_SPIKE"]
    assert a.details["times_recent_max"] == 4.0 and a.details["times_day_max"] == pytest.approx(40 / 60, abs=0.01)
    assert alerts_for(a) == [] and "no alert (not a whale for its day)" in a.evidence["VOLUME_SPIKE"].sentence
    assert "60" in a.evidence["VOLUME_SPIKE"].sentence and "t100" in a.evidence["VOLUME_SPIKE"].sentence
    assert b.details["times_day_max"] == pytest.approx(400 / 60, abs=0.01), "the whale of 40 left out of the day"
    assert [x.alert_type for x in alerts_for(b)] == ["VOLUME_SPIKE"]
    assert c.details["times_day_max"] == c.details["times_recent_max"] == 4.0
    assert [x.alert_type for x in alerts_for(c)] == ["VOLUME_SPIKE"]


def test_a_whale_on_a_symbols_first_day_is_one_for_a_whole_day():
    """#26: on a symbol's first day its past day is the part seen so far, and the largest of two
    hours understates a whole day's: with sizes whose tail falls as x^-2 (the market's) a trade is
    2.8x the largest of the trades before it about 1 / (2.8² n) of the time, so while n grows from
    200 a cold-started pair raised whale alerts 2-4 times as often as on its later days (simulated
    illiquid pairs at 1,600 trades an hour: 0.97 a symbol-day against 0.40). Its alert needs 2.8x
    a whole day's likely largest: 2.8 × √(24 h / 2 h) = 9.7x the largest of two hours. The flag
    stays; the part of the day seen survives a checkpoint; a whole day later 2.8x is enough."""
    stream = heavy_tailed_stream(720, gap_ms=10_000)          # two hours
    largest = max(t.quantity for t in stream)
    end = stream[-1].timestamp_ms

    def probe(quantity, at=end + 10_000, name="w"):
        return Trade(name, "AAPL", at, 100.0, quantity, "buy", "X")

    first, detections = run(stream + [probe(4 * largest)])
    held = detections[-1]
    assert held.types == ["VOLUME_SPIKE"] and held.details["times_day_max"] == 4.0
    assert alerts_for(held) == [], "4x the largest of two hours is not a whale for a day"
    sentence = held.evidence["VOLUME_SPIKE"].sentence
    assert "only 2.0 h of its day seen" in sentence and "3.46×" in sentence and "9.70×" in sentence, sentence
    assert sentence.endswith("no alert (not a whale for its day)")
    told = run(stream + [probe(10 * largest)])[1][-1]
    assert [a.alert_type for a in alerts_for(told)] == ["VOLUME_SPIKE"] and "only 2.0 h" in told.evidence[
        "VOLUME_SPIKE"].sentence

    checkpointed = RuleDetector()                              # restored at two hours: still two hours seen
    checkpointed.restore(json.loads(json.dumps(run(stream)[0].export({"AAPL"}))))
    assert alerts_for(checkpointed.process(probe(4 * largest))) == []

    later = [Trade(f"l{i}", "AAPL", end + 600_000 * (i + 1), 100.0, float(i % 10 + 1), "buy", "X") for i in range(140)]
    whole = run(stream + later + [probe(4 * largest, later[-1].timestamp_ms + 1000)])[1][-1]    # 25 h in
    assert whole.types == ["VOLUME_SPIKE"] and [a.alert_type for a in alerts_for(whole)] == ["VOLUME_SPIKE"]
    assert "of its day seen" not in whole.evidence["VOLUME_SPIKE"].sentence


def test_an_auction_print_is_a_whale_only_against_the_symbols_earlier_auctions():
    """An opening or closing auction gathers a session's orders into one print (the recorded SPY
    close: 3,166,418 shares, 46x the largest of the 1,000 trades before it), so it was a whale alert
    every day. A print with a sale condition of AUCTION_CONDITIONS is judged against the symbol's
    earlier auction prints of its condition: the first has none (no flag), the next day's like-sized
    close is ordinary, one 2.8x the largest close is a whale whose evidence names that close. Auction
    sizes stay out of continuous trading's reference (a block just after the close is still a
    whale), and the auctions seen survive a checkpoint."""
    stream = heavy_tailed_stream(gap_ms=100_000)        # over a day: a whole day seen
    largest, end = max(t.quantity for t in stream), stream[-1].timestamp_ms
    day = 86_400_000

    def auction(name, at, quantity, condition="1000000"):
        return Trade(name, "AAPL", at, 100.0, quantity, "buy", "X", condition=condition)
    auctions = frozenset({"1000000", "4000000"})
    first = RuleDetector(auctions=auctions)
    for t in stream:
        first.process(t)
    close1, block = first.process(auction("C1", end + 100_000, 50 * largest)), first.process(
        Trade("b", "AAPL", end + 200_000, 100.0, 3 * largest, "buy", "X"))
    assert close1.types == [] and block.types == ["VOLUME_SPIKE"], (close1.types, block.types)
    plain = run(stream + [auction("C1", end + 100_000, 50 * largest)])[1][-1]
    assert [a.alert_type for a in alerts_for(plain)] == ["VOLUME_SPIKE"], "as every trade: a whale"
    later = RuleDetector(auctions=auctions)
    later.restore(json.loads(json.dumps(first.export({"AAPL"}))))
    open2 = later.process(auction("O2", end + day - 23_400_000, 20 * largest, "4000000"))
    close2 = later.process(auction("C2", end + day, 60 * largest))
    close3 = later.process(auction("C3", end + 2 * day, 180 * largest))
    assert open2.types == [] and close2.types == [], "the first open; a close 1.2x the one before"
    assert [a.alert_type for a in alerts_for(close3)] == ["VOLUME_SPIKE"]
    evidence = close3.evidence["VOLUME_SPIKE"]
    assert evidence.baseline == 60 * largest and evidence.change == pytest.approx(3.0)
    assert evidence.trades["ids"] == ["C2"] and evidence.trades["count"] == 2
    assert evidence.extra == {"auction": "1000000"}
    assert "an auction print (sale condition 1000000)" in evidence.sentence and "(trade C2)" in evidence.sentence
    assert "previous 2 auction prints of sale condition 1000000" in evidence.sentence, evidence.sentence


def test_the_recorded_spy_days_auctions_raise_no_whale_alert_day_after_day():
    """The recorded SPY day through the rules as the live detector builds them (.env's settings):
    its opening (251,288 shares) and closing (3,166,418) auction prints raise no alert, nor do the
    same prints a day later; a close three times the day's is a whale. Before AUCTION_CONDITIONS
    the open was a whale alert on the first day and the close on every day."""
    import dataclasses

    from tradewatch.config import Settings
    from tradewatch.detect.pipeline import DetectionPipeline
    from tradewatch.market import replay
    from tradewatch.stages.detector import rule_detector
    settings = Settings.load()
    day = replay.load(SHARED_DATA / "lean" / "spy_20131007_trades.csv.gz").trades
    rules = rule_detector(settings)
    detections = DetectionPipeline(rules).process(day)
    auctions = [d for d in detections if d.trade.condition in settings.auctions]
    assert [(d.trade.condition, d.trade.quantity) for d in auctions if d.trade.quantity > 100_000] == [
        ("4000000", 251_288), ("1000000", 3_166_418)]
    assert not any(alerts_for(d) for d in auctions)

    def next_day(d, quantity=None):
        return dataclasses.replace(d.trade, trade_id=d.trade.trade_id + "-2", timestamp_ms=d.trade.timestamp_ms
                                   + 86_400_000, quantity=quantity or d.trade.quantity)
    again = [rules.process(next_day(d)) for d in auctions]
    assert not any(d.types for d in again), [(d.trade.trade_id, d.types) for d in again]
    close = next(d for d in auctions if d.trade.quantity == 3_166_418)
    bigger = rules.process(dataclasses.replace(next_day(close, 3 * 3_166_418), timestamp_ms=close.trade.timestamp_ms
                                               + 2 * 86_400_000))
    assert [a.alert_type for a in alerts_for(bigger)] == ["VOLUME_SPIKE"]


def test_zscore_window_and_threshold_are_configurable():
    trades = calm_stream() + [probe(0, 101.0)]      # 1 % move: z = 5 on the 0.2 % floor of the spread
    assert "PRICE_ZSCORE" in run(trades, DetectorConfig(zscore_threshold=4.0))[1][-1].types
    assert "PRICE_ZSCORE" not in run(trades, DetectorConfig(zscore_threshold=50.0))[1][-1].types


def test_momentum_run_of_same_direction_moves():
    trades = calm_stream() + [probe(i, 100.0 * (1.005 ** (i + 1))) for i in range(6)]
    _, detections = run(trades)
    assert "MOMENTUM_RUN" in detections[-1].types
    assert not any("MOMENTUM_RUN" in d.types for d in detections[:-2])


def test_rules_stay_silent_during_warm_up():
    _, detections = run(calm_stream(10) + [probe(0, 150.0)])
    assert not detections[-1].is_anomaly


def test_circuit_breaker_closed_open_half_open_closed():
    breaker = CircuitBreaker("AAPL", cool_off_s=300)
    assert breaker.observe(T0, big_move=True, normal=False).state == "OPEN"
    assert breaker.observe(T0 + 60_000, big_move=False, normal=True) is None     # still cooling off
    assert breaker.state == "OPEN"
    assert breaker.observe(T0 + 301_000, big_move=False, normal=False) is None   # half-open, not normal yet
    assert breaker.state == "HALF_OPEN"
    assert breaker.observe(T0 + 302_000, big_move=True, normal=False).state == "OPEN"  # re-opens
    assert breaker.observe(T0 + 700_000, big_move=False, normal=True).state == "CLOSED"


def test_detector_records_breaker_transitions():
    detector, _ = run(calm_stream() + [probe(0, 85.0)])
    assert [(t.symbol, t.state) for t in detector.take_transitions()] == [("AAPL", "OPEN")]


def alert(ts, severity="HIGH", kind="PRICE_SPIKE", symbol="AAPL"):
    return Alert(f"{ts}", ts, symbol, kind, severity, "m", "t")


def test_dedup_cooldowns_per_symbol_and_type():
    dedup = Deduplicator({"CRITICAL": 300, "HIGH": 60, "MEDIUM": 30})
    assert dedup.allow(alert(T0))
    assert not dedup.allow(alert(T0 + 59_000))
    assert dedup.allow(alert(T0 + 59_000, symbol="MSFT"))
    assert dedup.allow(alert(T0 + 59_000, kind="PRICE_DROP"))
    assert dedup.allow(alert(T0 + 61_000))
    assert dedup.allow(alert(T0, "MEDIUM", "VOLUME_SPIKE")) and not dedup.allow(alert(T0 + 29_000, "MEDIUM", "VOLUME_SPIKE"))
    assert dedup.allow(alert(T0, "CRITICAL", "CIRCUIT_BREAKER"))
    assert not dedup.allow(alert(T0 + 299_000, "CRITICAL", "CIRCUIT_BREAKER"))
    assert dedup.suppressed == 3


def test_one_alert_per_type_with_a_readable_message():
    _, detections = run(calm_stream() + [probe(0, 88.0)])
    alerts = alerts_for(detections[-1])
    assert {a.alert_type for a in alerts} >= {"CIRCUIT_BREAKER", "PRICE_DROP"}
    critical = next(a for a in alerts if a.alert_type == "CIRCUIT_BREAKER")
    assert critical.severity == "CRITICAL" and critical.alert_id == "p0:CIRCUIT_BREAKER"
    assert "price 88 is -12.00 % under the mean of the previous 50 normal trades" in critical.message
    assert critical.evidence["sentence"] in critical.message and critical.evidence["version"] == 1


THIN_TICK = 1e-7


def bounce(first, n, bid, step_ms=90_000):
    """Trades `first`.. of a thin pair, one every 90 s, bouncing between the bid (`bid` ticks) and
    the ask a tick above: trade i is at T0 + i·90 s, so a gap in `first` is a quiet spell."""
    return [Trade(f"b{first + i}", "THIN-BTC", T0 + (first + i) * step_ms, round((bid + i % 2) * THIN_TICK, 12),
                  1000.0 + (first + i) * 37 % 500, "buy" if i % 2 else "sell", "X") for i in range(n)]


def told(trades):
    """Each trade's detection, and the alerts a user gets (deduplicated as the detector does)."""
    rules, dedup = RuleDetector(), Deduplicator(evaluate.ALERT_COOLDOWNS_S)
    detections = [rules.process(t) for t in trades]
    return detections, [a for d in detections for a in alerts_for(d) if dedup.allow(a)]


def test_a_price_that_moved_and_stays_there_is_told_once_not_by_every_rule_every_minute():
    """Six quiet hours, then the pair trades 5-6 % lower and stays there: the move is alerted on
    its first trade; the next nine (each past the 5 % line until the new level is accepted) keep
    their flags but raise no alert of their own (before: a PRICE_DROP a trade, a z-score, a band)."""
    moved = bounce(0, 200, 156) + bounce(440, 60, 147)
    detections, alerts = told(moved)
    assert {a.trade_id for a in alerts} == {"b440"}, [(a.trade_id, a.alert_type) for a in alerts]
    assert "PRICE_DROP" in {a.alert_type for a in alerts}
    assert sum("PRICE_DROP" in d.types for d in detections[200:]) >= 9       # the flags stay on the trades
    rules = RuleDetector()                  # the episode follows the symbol's state through a checkpoint
    for t in moved[:202]:
        rules.process(t)
    restored = RuleDetector()
    restored.restore(json.loads(json.dumps(rules.export({"THIN-BTC"}))))
    assert not [a for t in moved[202:] for a in alerts_for(restored.process(t))]


def test_a_price_bouncing_across_the_line_is_one_episode():
    """The new level's bid is past the line, its ask just inside but on the far half of it: the
    ask does not end the episode, so the bids after it are not new stories."""
    detections, alerts = told(bounce(0, 200, 100) + bounce(200, 40, 94))
    assert {a.trade_id for a in alerts} == {"b200"}, [(a.trade_id, a.alert_type) for a in alerts]
    assert sum(bool(d.types) for d in detections[200:]) >= 3


def test_an_episode_escalates_ends_and_starts_again():
    """A drop is told; a deeper one in the same episode is told only by what is new (the breaker,
    CRITICAL); the price back at its level ends the episode; the next drop is told again (at a
    price of its own: one at a told print's price is that print again, see the next test)."""
    calm = bounce(0, 200, 200)
    later = [Trade(f"e{i}", "THIN-BTC", T0 + (200 + i) * 90_000, round(ticks * THIN_TICK, 12), 1000.0, side, "X")
             for i, (ticks, side) in enumerate([(188, "sell"), (172, "sell"), (200, "sell"), (201, "buy"),
                                                (187, "sell")])]
    detections, alerts = told(calm + later)
    got = [(a.trade_id, a.alert_type) for a in alerts]
    assert ("e0", "PRICE_DROP") in got and ("e1", "CIRCUIT_BREAKER") in got and ("e4", "PRICE_DROP") in got, got
    assert "PRICE_DROP" in detections[201].types and ("e1", "PRICE_DROP") not in got, got
    assert not [a for a in alerts if a.trade_id in ("e2", "e3")]


def test_a_print_reported_again_is_one_story():
    """#26: the recorded SPY day printed a 1,002,411-share block at 168.90 at 17:07, then again at
    20:01 and three more at that price after hours, 1 % above the market: six alerts of one print.
    A trade at the price of a print whose drop was told in the past day (the market back between
    them) keeps its flags and raises no alert, its evidence naming that print. A new price, the other
    direction or a day later are new stories; what was told survives a checkpoint."""
    def tape(first, steps):
        """Trades every 90 s from `first`: a print (name, ticks, side), or 20 of the market."""
        out = []
        for step in steps:
            for name, ticks, side in [step] if step else [(None, 200 + i % 2, "sb"[i % 2]) for i in range(20)]:
                out.append(Trade(name or f"m{first + len(out)}", "THIN-BTC", T0 + (first + len(out)) * 90_000,
                                 round(ticks * THIN_TICK, 12), 1000.0, "sell" if side == "s" else "buy", "X"))
        return out
    calm = bounce(0, 300, 200)
    dropped = tape(300, [("r0", 188, "s"), None])                  # a drop, then the market back
    later = tape(321, [None, None, ("r1", 188, "s"), None,          # the drop's print again
                       ("r2", 187, "s"), None,                      # a drop to a new price
                       ("r3", 213, "b"), None])                     # a spike
    detections, alerts = told(calm + dropped + later)
    got = {(a.trade_id, a.alert_type) for a in alerts}
    assert {("r0", "PRICE_DROP"), ("r2", "PRICE_DROP"), ("r3", "PRICE_SPIKE")} <= got, got
    assert not [a for a in got if a[0] == "r1"], got
    r1 = next(d for d in detections if d.trade.trade_id == "r1")
    assert {"PRICE_DROP", "OUT_OF_RANGE"} <= set(r1.types) <= r1.held           # the flags stay
    sentence = r1.evidence["PRICE_DROP"].sentence
    assert sentence.endswith("; the same price as trade r0, told 91.5 min before: that print reported again, "
                             "recorded on the trade, no alert"), sentence
    assert r1.evidence["OUT_OF_RANGE"].extra["reported_again"] == "r0"

    rules = RuleDetector()                  # what was told follows the symbol's state through a checkpoint
    for t in calm + dropped + later[:40]:
        rules.process(t)
    restored = RuleDetector()
    restored.restore(json.loads(json.dumps(rules.export({"THIN-BTC"}))))
    r1 = restored.process(later[40])
    assert r1.trade.trade_id == "r1" and "PRICE_DROP" in r1.types and alerts_for(r1) == []

    day = tape(424, [None] * 45 + [("r4", 188, "s")])               # 25.6 h after r0
    _, alerts = told(calm + dropped + later + day)
    assert ("r4", "PRICE_DROP") in {(a.trade_id, a.alert_type) for a in alerts}, "a day later: a new story"


def test_a_whale_reported_again_is_one_story():
    """A trade at a told whale's price and size, over 1,000 trades later (so a whale again), is that
    print reported again; the same size at another price, or another size, is a whale of its own."""
    stream = heavy_tailed_stream(3000, gap_ms=10_000)
    big = 30 * max(t.quantity for t in stream)
    at = stream[-1].timestamp_ms

    def whale(name, after, price, quantity=big):
        return Trade(name, "AAPL", at + after * 10_000, price, quantity, "buy", "X")

    def more(first):
        return [Trade(f"{first}-{i}", "AAPL", at + (first + i) * 10_000, t.price, t.quantity, "buy", "X")
                for i, t in enumerate(stream[:1100])]
    trades = (stream + [whale("w0", 1, 100.0)] + more(2) + [whale("w1", 1102, 100.0)] + more(1103)
              + [whale("w2", 2203, 100.01)] + more(2204) + [whale("w3", 3304, 100.0, big + 1)])
    detections, alerts = told(trades)
    assert [a.trade_id for a in alerts if a.trade_id.startswith("w")] == ["w0", "w2", "w3"], alerts
    w1 = next(d for d in detections if d.trade.trade_id == "w1")
    assert w1.types == ["VOLUME_SPIKE"] and "the same price and size as trade w0" in w1.evidence[
        "VOLUME_SPIKE"].sentence


def test_the_recorded_spy_days_block_printed_five_times_is_told_once_as_a_whale_and_once_off_the_market():
    """The recorded prints: SPY's 1,002,411-share average-price block at 168.90 (17:07), printed
    again after hours at that price (the same size at 20:01, then 501,206, 999,789 and 1,002,150
    shares) while the market traded near 167.3: one whale alert, one OUT_OF_RANGE (before: two
    whales and four OUT_OF_RANGE); every print keeps its flags."""
    from tradewatch.config import Settings
    from tradewatch.detect.pipeline import DetectionPipeline
    from tradewatch.market import replay
    day = replay.load(SHARED_DATA / "lean" / "spy_20131007_trades.csv.gz").trades
    detections = DetectionPipeline(RuleDetector(excluded=Settings.load().ohlc_excluded)).process(day)
    block = [d for d in detections if d.trade.price == 168.9 and d.trade.quantity > 400_000]
    assert [d.trade.quantity for d in block] == [1_002_411, 1_002_411, 501_206, 999_789, 1_002_150]
    assert all(d.types for d in block) and all("OUT_OF_RANGE" in d.types for d in block[1:])
    told = [[a.alert_type for a in alerts_for(d)] for d in block]
    assert told == [["VOLUME_SPIKE"], ["OUT_OF_RANGE"], [], [], []], told
    first = block[1].trade.trade_id
    assert all(d.evidence["OUT_OF_RANGE"].extra["reported_again"] == first for d in block[2:])


def walk(n, bid, seed=0):
    """Trades 0.. of a thin pair, one every 90 s (40 an hour), bouncing between bid and ask while
    the bid walks a tick up or down on one trade in eight."""
    rng, trades = np.random.default_rng(seed), []
    for i in range(n):
        bid += int(rng.choice((-1, 1))) if rng.random() < 1 / 8 else 0
        trades.append(Trade(f"w{i}", "THIN-BTC", T0 + i * 90_000, round((bid + i % 2) * THIN_TICK, 12),
                            1000.0 + i * 37 % 500, "buy" if i % 2 else "sell", "X"))
    return trades, bid


def test_after_a_quiet_spell_the_price_lines_allow_for_the_walk_of_the_time_that_passed():
    """A thin pair whose price walks (40 trades an hour, a tick on one in eight: 5.5 ticks, 3.5 %,
    in six hours) is quiet for six hours, then trades 6 % lower: as far as its own walk goes in that
    time, no alert. The same 6 % a trade after the last is a PRICE_DROP, and so is 30 % after the
    spell, its evidence saying how the line grew with the time. (A pair whose price only bounced
    between bid and ask did not walk: 6 % after six hours is a PRICE_DROP, the test above.)"""
    calm, bid = walk(200, 156)
    for share, at, alerted in ((0.06, 440, False), (0.06, 200, True), (0.30, 440, True)):
        resumed = bounce(at, 12, round(bid * (1 - share)))
        detections, alerts = told(calm + resumed)
        assert {a.trade_id for a in alerts} == ({f"b{at}"} if alerted else set()), (share, at, alerts)
        assert bool(detections[200].types) == alerted
        assert alerted or not any(d.types for d in detections[200:]), "nor the trades after it, the window still old"
    drop = detections[200].evidence["PRICE_DROP"].to_dict()
    assert "6.0 h since its last" in drop["threshold_how"] and drop["extra"]["quiet_ms"] == 241 * 90_000
    span = 49 * 90_000                      # a random walk's variance from the window's mean: quiet + span / 3
    assert drop["extra"]["age_ms"] == pytest.approx(241 * 90_000 + span / 3, rel=0.01)
    assert drop["extra"]["fresh_ms"] == pytest.approx(span / 3, rel=0.03)
    assert drop["extra"]["sigma"] > 3 * drop["extra"]["window_std"]
    assert drop["threshold"] > 5 * 100 * drop["extra"]["window_std"] / drop["baseline"]


def test_model_train_save_load_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    rows = rng.normal(size=(2000, 10))
    model = forest.train(rows, {"source": "test"})
    path = forest.save(model, tmp_path)
    assert path.name == "model-v1.joblib" and forest.save(model, tmp_path).name == "model-v2.joblib"
    loaded = forest.load(forest.latest(tmp_path))
    assert loaded.version == "v2" and loaded.training == {"source": "test"}
    assert np.allclose(loaded.score(rows[:50]), model.score(rows[:50]))
    assert loaded.score(np.full((1, 10), 8.0))[0] > 1.0   # far outside the training cloud


def test_the_forest_scores_every_trade_exactly_as_scikit_learn_does_one_at_a_time_or_in_a_batch(tmp_path):
    rng = np.random.default_rng(1)
    rows = rng.standard_t(3, size=(3000, 10))
    model = forest.load(forest.save(forest.train(rows, {"source": "test"}), tmp_path))
    probes = np.vstack([rows[:500], rng.normal(scale=6.0, size=(300, 10)), np.full((1, 10), 1e6), np.zeros((1, 10)),
                        rows[:20].astype(np.float32).astype(float) + 1e-9,    # either side of a split on float32
                        np.where(rng.random((40, 10)) < 0.2, np.nan, rows[:40])])    # a tree sends NaN its own way
    expected = -model.forest.score_samples(probes) / model.threshold
    assert (expected > 1.0).any() and (expected < 1.0).any()
    assert np.array_equal(model.score(probes), expected)                      # tree by tree
    small = forest.Paths.WALK_ALL_ROWS
    for size in (1, 7, small):                                                  # every tree at once
        assert np.array_equal(np.concatenate([model.score(probes[i:i + size]) for i in range(0, len(probes), size)]),
                              expected), size


def test_training_with_too_little_data_says_how_much_is_needed():
    with pytest.raises(forest.NotEnoughData, match="have 999 trades with features, need at least 1000"):
        forest.train(np.zeros((999, 10)), {})


def test_targets_on_seeds_not_used_for_tuning():
    result = evaluate.score_simulated([201, 202], count=40_000, anomaly_rate=0.005)
    for kind in ("price_spike", "price_drop", "volume_spike"):
        assert result["per_type"][kind]["injected"] > (30 if kind == "volume_spike" else 50)   # <= 1 whale per 1,000
        assert result["per_type"][kind]["f1"] >= 0.9, (kind, result["per_type"][kind])
    assert result["false_alerts_per_10k_normal"] < 1.0


def test_nab_score_of_the_causal_detectors_across_every_category():
    """Issue 26 goal: the default series detector >= 60 under NAB's standard profile over all 41
    files of five categories, scored per category too; the textbook z-score baseline scores far
    below the null detector (it fires on every busy hour)."""
    result = evaluate.score_nab(SHARED_DATA / "nab")
    assert len(result["files"]) == 41
    assert result["score"]["likelihood"] >= 60, result["score"]
    categories = result["per_category"]["likelihood"]
    assert sorted(categories) == ["artificialNoAnomaly", "realAWSCloudwatch", "realKnownCause", "realTraffic",
                                  "realTweets"]
    assert sum(c["files"] for c in categories.values()) == 41
    assert categories["artificialNoAnomaly"]["windows"] == 0 and categories["artificialNoAnomaly"]["score"] is None
    for name, category in categories.items():
        if category["windows"]:
            assert category["score"] >= 50, (name, category)      # no category left behind
    assert result["score"]["zscore_baseline"] < 0


def test_nab_scorer_counts_exactly_on_a_hand_made_series():
    import math

    import pandas as pd
    times = pd.date_range("2015-01-01", periods=2000, freq="5min")
    spans = [(times[100], times[199]),       # inside the probation (300 points): not scored
             (times[1000], times[1099]), (times[1500], times[1599])]
    flagged = [False] * 2000
    for i in (50, 400, 1000, 1050, 1200):
        flagged[i] = True

    def sigmoid_reward(x):
        return 2 / (1 + math.exp(5 * x)) - 1
    raw, windows, counts = evaluate.nab_raw_score(flagged, times, spans)
    expected = (1.0                                   # window 2 hit at its first point: the full reward
                - 1.0                                 # window 3 missed
                + 0.11 * sigmoid_reward(201 / 99)     # 400: after window 1, 201 points past its end
                + 0.11 * sigmoid_reward(101 / 99))    # 1200: 101 points past window 2
    assert raw == pytest.approx(expected, abs=1e-12)
    assert windows == 2 and counts == {"windows": 2, "detected": 1, "outside": 2}


@pytest.mark.parametrize("which", ["tweets", "daily_cycle"])
def test_series_detectors_are_causal(which):
    """The detections on the first k points do not change when later points are appended (on a
    daily cycle: before and after the detector finds the cycle, and across the anomaly)."""
    import pandas as pd
    if which == "tweets":
        frame = pd.read_csv(SHARED_DATA / "nab" / "realTweets" / "Twitter_volume_CRM.csv", parse_dates=["timestamp"])
        series, cuts = pd.Series(frame["value"].to_numpy(dtype=float), index=frame["timestamp"]), (6000, 11000)
    else:
        series, _ = evaluate.daily_cycle_series("missing_peak", 2)
        cuts = (1000, 2900, 3400)
    for name, detect in SERIES_DETECTORS.items():
        full = detect(series)
        for k in cuts:
            prefix = detect(series.iloc[:k])
            assert list(prefix.index) == [t for t in full.index if t < series.index[k]], name
            assert prefix.to_numpy() == pytest.approx(full[full.index < series.index[k]].to_numpy()), name


@pytest.mark.parametrize("kind", ["peak_down", "flat_day", "missing_peak", "spike_train"])
def test_a_series_with_a_daily_cycle_is_judged_against_the_same_time_on_earlier_days(kind):
    """A day whose plateau is too low, flat or missing, or with a spike on every hour of its cycle,
    is within the series' overall range: only a comparison with the same time on the previous days
    finds it. The default detector finds it in its window, with and without noise, and nothing
    before; the same detector without the daily cycle (period=None, as it was) finds none of them."""
    from tradewatch.detect.series import likelihood
    for seed in (0, 1):
        series, [(start, end)] = evaluate.daily_cycle_series(kind, seed)
        found = likelihood(series)
        assert any(start <= t <= end for t in found.index), (kind, seed, list(found.index))
        assert not any(t < start for t in found.index[found.index > series.index[750]]), (kind, seed)
        assert not any(start <= t <= end for t in likelihood(series, period=None).index), (kind, seed)


def test_daily_cycle_series_scored_like_nab():
    """Generated series (not NAB's, no setting chosen on them): the default >= 85, every kind found
    in every series — the spike train too (a spike of 60 noise deviations every hour for a day, with
    and without noise: its average over an hour looked ordinary against a history of averages taken
    before the daily cycle was found; 1 series of 4 was found)."""
    result = evaluate.score_daily_cycles()["likelihood"]
    assert result["score"] >= 85, result
    for kind, counts in result["per_kind"].items():
        assert counts["detected"] == counts["series"], (kind, counts)


def test_series_of_other_shapes_rates_and_units_scored_like_nab():
    """Generated series unlike NAB's categories here (hourly and minute points, counts, walks,
    units from 0.01 to 10,000, series with no anomaly), on seeds no setting was chosen on: the
    default >= 60 (the NAB goal), every kind of change found in every series but the lone hourly
    spike, and nothing on a noisy sine with no anomaly."""
    result = evaluate.score_other_shapes()["likelihood"]
    assert result["score"] >= 60, result
    for kind, counts in result["per_kind"].items():
        if not kind.startswith("none") and kind != "hourly_spike":
            assert counts["detected"] == counts["series"], (kind, counts)
    assert result["per_kind"]["none_sine"]["detections_outside_windows"] == 0, result


def test_other_shape_series_put_the_window_on_the_change():
    """The generator's labels are right: a series and its twin with no anomaly (the same draws up to
    the change) agree until the change, and the first point where they differ is in the window."""
    twins = {"walk_jump": "none_walk", "variance_burst": "none_walk", "count_burst": "none_counts",
             "stuck_sensor": "none_sine"}
    for kind, twin in twins.items():
        for seed in (0, 1, 2):
            series, [(start, end)] = evaluate.other_shape_series(kind, seed)
            plain, no_window = evaluate.other_shape_series(twin, seed)
            assert no_window == [] and len(plain) == len(series), kind
            differs = series.index[~np.isclose(series.to_numpy(), plain.to_numpy(), rtol=1e-12, atol=0)]
            assert len(differs) and start <= differs[0] <= end, (kind, seed, start, list(differs[:3]))


def test_a_negative_series_is_judged_like_its_mirror():
    """Values below zero keep their sign (sign · log(1 + |v|)): a series and its negation give the
    same detections, where clamping at zero saw a flat line in the negated one."""
    import pandas as pd
    from tradewatch.detect.series import likelihood
    frame = pd.read_csv(SHARED_DATA / "nab" / "realKnownCause" / "ambient_temperature_system_failure.csv",
                        parse_dates=["timestamp"])
    series = pd.Series(frame["value"].to_numpy(dtype=float), index=frame["timestamp"])
    found = likelihood(series)
    assert len(found) >= 3
    mirrored = likelihood(-series)
    assert list(mirrored.index) == list(found.index)
    assert mirrored.to_numpy() == pytest.approx(found.to_numpy())


def test_analyze_csv_on_a_nab_file_prints_flagged_timestamps():
    path = SHARED_DATA / "nab" / "realTweets" / "Twitter_volume_AMZN.csv"
    out = subprocess.run([sys.executable, str(PROJECT_ROOT / "anomaly_detector.py"), "analyze", "--csv", str(path),
                          "--time-column", "timestamp", "--value-column", "value"],
                         capture_output=True, text=True, check=True, cwd=PROJECT_ROOT)
    report = json.loads(out.stdout)
    assert report["points"] == 15831
    for name in ("likelihood", "episode_zscore"):
        flags = report["detectors"][name]
        assert 3 <= len(flags) < 60 and all(f["score"] > 1 for f in flags)
    assert any(f["timestamp"].startswith("2015-03-11") for f in report["detectors"]["episode_zscore"])


def test_analyze_csv_with_wrong_columns_is_a_clear_error(tmp_path):
    path = tmp_path / "x.csv"
    path.write_text("a,b\n1,2\n")
    out = subprocess.run([sys.executable, str(PROJECT_ROOT / "anomaly_detector.py"), "analyze", "--csv", str(path)],
                         capture_output=True, text=True, cwd=PROJECT_ROOT)
    assert out.returncode == 2 and "cannot read" in out.stderr and "Traceback" not in out.stderr


def test_real_trades_with_injected_anomalies_on_a_day_not_used_for_tuning():
    """Issue 12 goals on the IBM day (the rules were tuned on SPY): recall >= 0.95 for every kind,
    at most 1 false alarm per 10,000 normal trades besides the background's own whales (real
    trades 3x the largest of the previous 1,000, which meet the injected whale's definition)."""
    result = evaluate.score_real(SHARED_DATA / "lean")
    scoring = result["scoring"]
    assert scoring["day"].startswith("ibm") and result["tuning"]["day"].startswith("spy")
    assert all(r >= 0.95 for r in scoring["recall"].values()), scoring["recall"]
    assert all(n >= 20 for n in scoring["events"].values())
    assert scoring["false_alarms_per_10k_besides_natural_whales"] <= 1.0
    assert scoring["false_alarms_per_10k"] <= 1.5, "every other alarm is a real whale of the background"


def test_out_of_range_finds_jumps_on_a_recorded_day_the_fixed_price_rules_miss_and_is_rare_as_recorded():
    """Issue 28: lasting jumps of 0.5–1 % (10–50 σ of a calm minute, under the price rules' 5 %)
    injected into the recorded IBM day are found within their minute; the day as recorded raises
    at most a couple of OUT_OF_RANGE alerts. (`evaluate` scores the SPY day too.)"""
    from tradewatch.config import Settings

    result = evaluate.score_out_of_range(SHARED_DATA / "lean", excluded_conditions=Settings.load().ohlc_excluded,
                                         sizes=(0.005, 0.01, 0.02), seeds=(1, 2), days=("ibm",))
    (r,) = result.values()
    jumps = r["jumps_found_within_a_minute"]
    assert jumps["1.00%"]["jumps"] == 16
    assert jumps["1.00%"]["out_of_range"] >= 15 / 16 and jumps["1.00%"]["price_rules"] <= 1 / 16, jumps
    assert jumps["0.50%"]["out_of_range"] >= 12 / 16, jumps
    assert jumps["2.00%"]["price_rules"] >= 0.9, "a jump past the z-score's line: the price rules' own"
    assert r["out_of_range_as_recorded"] <= 2, r


def test_one_detection_per_episode_however_long_it_lasts():
    """A change that lasts (here 600 points, over eight refractory spans) is one detection, not one
    every refractory span; once the series is back to normal the next change is found again."""
    import numpy as np
    import pandas as pd
    from tradewatch.detect.series import likelihood
    rng = np.random.default_rng(7)
    values = rng.normal(100, 2, 7000)
    values[3000:3600] += 30                  # an outage-like episode: 15 noise deviations for 50 hours
    values[6400:6412] += 30                  # a separate one an hour long, once the first has left the baseline
    series = pd.Series(values, index=pd.date_range("2022-01-01", periods=len(values), freq="5min"))
    found = [series.index.get_loc(t) for t in likelihood(series, period=None).index]
    assert [p for p in found if 3000 <= p < 3600] == [p for p in found if 3000 <= p < 3012], found
    assert len([p for p in found if 3000 <= p < 3600]) == 1, found
    assert any(6400 <= p < 6412 for p in found), found
