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


def heavy_tailed_stream(n=1000, median=100.0, seed=3):
    """Sizes like the market's (log-logistic, the simulator's fit): 20x the median is common."""
    rng = np.random.default_rng(seed)
    u = rng.uniform(0.001, 0.999, n)
    sizes = np.round(median * (u / (1 - u)) ** 0.5)
    return [Trade(f"h{i}", "AAPL", T0 + i * 1000, round(100.0 + rng.normal(0, 0.02), 2), float(max(s, 1)),
                  "buy", "X") for i, s in enumerate(sizes)]


def test_whale_rule_on_heavy_tailed_sizes():
    stream = heavy_tailed_stream()
    largest = max(t.quantity for t in stream)
    assert largest > 20 * 100, "the stream has trades beyond 20x the median"
    later = [Trade(f"w{i}", "AAPL", T0 + 2_000_000 + i * 1000, 100.0, q, "buy", "X")
             for i, q in enumerate([2000.0, 3.0 * largest])]
    _, detections = run(stream + later)
    assert not any(d.is_anomaly for d in detections[:-2]), "no alarm on the heavy tail itself"
    assert detections[-2].types == [], "20x the median, inside the normal range: no alarm"
    assert detections[-1].types == ["VOLUME_SPIKE"] and detections[-1].severity == "MEDIUM"
    assert detections[-1].details["times_recent_max"] == 3.0


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
    assert "move -12.00% vs rolling average" in critical.message


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


def test_training_with_too_little_data_says_how_much_is_needed():
    with pytest.raises(forest.NotEnoughData, match="have 999 trades with features, need at least 1000"):
        forest.train(np.zeros((999, 10)), {})


def test_targets_on_seeds_not_used_for_tuning():
    result = evaluate.score_simulated([201, 202], count=40_000, anomaly_rate=0.005)
    for kind in ("price_spike", "price_drop", "volume_spike"):
        assert result["per_type"][kind]["injected"] > 50
        assert result["per_type"][kind]["f1"] >= 0.9, (kind, result["per_type"][kind])
    assert result["false_alerts_per_10k_normal"] < 1.0


def test_nab_episode_detector_beats_the_plain_zscore_baseline():
    totals = evaluate.score_nab(SHARED_DATA / "nab")["totals"]
    ours, baseline = totals["episode_zscore"], totals["zscore_baseline"]
    assert ours["window_recall"] >= baseline["window_recall"] and ours["window_recall"] >= 0.9
    assert ours["outside"] * 10 < baseline["outside"]


def test_analyze_csv_on_a_nab_file_prints_flagged_timestamps():
    path = SHARED_DATA / "nab" / "realTweets" / "Twitter_volume_AMZN.csv"
    out = subprocess.run([sys.executable, str(PROJECT_ROOT / "anomaly_detector.py"), "analyze", "--csv", str(path),
                          "--time-column", "timestamp", "--value-column", "value"],
                         capture_output=True, text=True, check=True, cwd=PROJECT_ROOT)
    report = json.loads(out.stdout)
    assert report["points"] == 15831
    flags = report["detectors"]["episode_zscore"]
    assert 3 <= len(flags) < 60 and all(f["score"] > 1 for f in flags)
    assert any(f["timestamp"].startswith("2015-03-11") for f in flags)   # inside a labelled NAB window
    assert report["detectors"]["isolation_forest"]


def test_analyze_csv_with_wrong_columns_is_a_clear_error(tmp_path):
    path = tmp_path / "x.csv"
    path.write_text("a,b\n1,2\n")
    out = subprocess.run([sys.executable, str(PROJECT_ROOT / "anomaly_detector.py"), "analyze", "--csv", str(path)],
                         capture_output=True, text=True, cwd=PROJECT_ROOT)
    assert out.returncode == 2 and "cannot read" in out.stderr and "Traceback" not in out.stderr
