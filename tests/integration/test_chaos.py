"""Chaos: the recorded IBM day (../shared/data/lean) mixed with simulated trades, replayed while the
consumer, aggregator and detector are killed with SIGKILL at random moments (three times each),
PostgreSQL is restarted once and the Kafka broker once. At the end trades, stock_metrics,
indicators, late_trades, alerts, trade_flags and circuit_breakers equal those of an undisturbed
run on the same input (floats to 1e-9), and every stored alert reached the `alerts` topic."""
from __future__ import annotations

import json
import random
import time
from itertools import islice

import pytest

from tests.conftest import FEED_FLUSH_S, SHARED_DATA, Feeder, query, wait_for, wait_for_progress
from tests.integration.test_commit_protocol import STAGES, alerts_on_topic, start, stop_all, truncate, with_groups
from tradewatch import bus, stack
from tradewatch.events import Trade
from tradewatch.market import replay
from tradewatch.market.simulator import MarketSimulator

IBM_DAY = SHARED_DATA / "lean" / "ibm_20131007_trades.csv.gz"
START_MS = 1_767_225_600_000          # 2026-01-01T00:00:00Z
TABLES = {   # table: (columns, order); symbols on their own partitions (AAPL 0, JPM 1, MSFT 2, IBM 5)
    "trades": ("trade_id, symbol, ts, price, quantity, side, exchange, condition, kafka_partition", "trade_id"),
    "stock_metrics": ("symbol, window_size, window_start, open, high, low, close, volume, traded_value, vwap,"
                      " trade_count, buy_volume, sell_volume, is_final", "1, 2, 3"),
    "indicators": ("symbol, window_size, window_start, close, sma_20, sma_50, ema_12, ema_26, rsi_14, macd,"
                   " macd_signal, macd_histogram, bollinger_mid, bollinger_upper, bollinger_lower", "1, 2, 3"),
    "late_trades": ("trade_id, window_size, reason", "1, 2"),
    "alerts": ("alert_id, ts, symbol, alert_type, severity, message, trade_id", "alert_id"),
    "trade_flags": ("trade_id, anomaly_types, anomaly_score, anomaly_severity", "trade_id"),
    "circuit_breakers": ("symbol, state, since", "symbol"),
    "breaker_transitions": ("symbol, state, at", "1, 3, 2"),
}


OUTAGE_S = 1.0                 # how long PostgreSQL stays down in each restart

def mixed_input() -> list[tuple[bytes, bytes]]:
    """The IBM day (24,292 trades) and 12,000 simulated trades, interleaved two to one."""
    ibm = replay.load(IBM_DAY).trades
    simulated = list(islice(MarketSimulator(["AAPL", "MSFT", "JPM"], rate=20.0, seed=23, anomaly_rate=0.01,
                                            start_ms=START_MS), 12_000))
    out, s = [], iter(simulated)
    for n, trade in enumerate(ibm):
        out.append(trade)
        if n % 2 and (extra := next(s, None)):
            out.append(extra)
    out.extend(s)
    # The day's last IBM trade comes minutes after the one before: the aggregator holds such a trade
    # until the next confirms the jump (or the partition idles, which the test turns off). One
    # closing print per symbol, 1 ms after its last trade, confirms it.
    last = {t.symbol: t for t in out}
    out.extend(Trade(f"close-{s}", s, t.timestamp_ms + 1, t.price, 1.0, "unknown", t.exchange)
               for s, t in sorted(last.items()))
    return [(t.symbol.encode(), t.to_json_bytes()) for t in out]


def publish(settings, messages, per_second: float | None = None) -> None:
    publisher = bus.publisher(settings)
    started = time.monotonic()
    for i, (key, value) in enumerate(messages):
        publisher.send(settings.trades_topic, key, value)
        if per_second and i % 200 == 0:
            time.sleep(max(started + i / per_second - time.monotonic(), 0))
    assert publisher.flush(FEED_FLUSH_S), f"Kafka did not take every trade within {FEED_FLUSH_S}s"
    publisher.close()


PROGRESS: dict = {}


def progress(settings) -> dict:
    """Trades stored, folded by the aggregator and examined by the detector; alerts not yet published."""
    stored = query(settings, "SELECT count(*) FROM trades")[0][0]
    folded = query(settings, "SELECT coalesce(sum(next_offset), 0) FROM stage_positions WHERE consumer_group = %s",
                   (settings.aggregator_group,))[0][0]
    try:
        examined = sum(c for c, _ in bus.group_lag(settings, settings.detector_group, settings.trades_topic).values())
    except bus.KafkaUnavailable:
        examined = PROGRESS.get("examined", 0)
    unpublished = query(settings, "SELECT count(*) FROM alerts WHERE published_at IS NULL")[0][0]
    PROGRESS.update(stored=stored, folded=int(folded), examined=examined, unpublished=unpublished)
    return PROGRESS


def run_to_end(settings, n: int, run: str) -> None:
    """Wait while the stages make progress (a loaded machine is slow, not stuck); fail on a stall."""
    PROGRESS.clear()
    PROGRESS["n"] = n
    done = lambda: sum(progress(settings)[k] for k in ("stored", "folded", "examined"))   # noqa: E731
    wait_for_progress(done, 3 * n, stalled_after=120, interval=1, message=f"{run}",
                      details=lambda: f"last progress {PROGRESS}")
    assert all(PROGRESS[k] == n for k in ("stored", "folded", "examined")), f"{run}: {PROGRESS}"
    wait_for(lambda: progress(settings)["unpublished"] == 0, timeout=120, interval=1,
             message=f"{run}: every alert published ({PROGRESS})")


def snapshot(settings) -> dict[str, list[tuple]]:
    return {table: query(settings, f"SELECT {columns} FROM {table} ORDER BY {order}")
            for table, (columns, order) in TABLES.items()}


def assert_same(got: list[tuple], expected: list[tuple], table: str) -> None:
    assert len(got) == len(expected), f"{table}: {len(got)} rows after the chaos, {len(expected)} without"
    for g, e in zip(got, expected):
        same = all(v == pytest.approx(w, rel=1e-9, abs=1e-12) if isinstance(w, float) else v == w
                   for v, w in zip(g, e))
        assert same, f"{table} differs: {g} != {e}"


def test_chaos_ends_like_an_undisturbed_run(settings, tmp_path):
    messages = mixed_input()
    n = len(messages)

    clean = with_groups(settings, "clean")
    publish(clean, messages)
    processes = [start(clean, stage, tmp_path / f"clean-{stage}.log") for stage in STAGES]
    run_to_end(clean, n, "the undisturbed run")
    stop_all(processes)
    expected = snapshot(clean)
    assert len(expected["trades"]) == n and expected["indicators"] and expected["alerts"]
    assert expected["circuit_breakers"], "the input opens at least one circuit breaker"
    assert any(state == "OPEN" for _, state, _ in expected["breaker_transitions"]), "and its history says so"

    truncate(settings)
    chaos = with_groups(settings.with_overrides(trades_topic=f"{settings.trades_topic}-chaos"), "chaos")
    bus.ensure_topic(chaos, chaos.trades_topic, chaos.trades_partitions)
    logs = {stage: tmp_path / f"chaos-{stage}.log" for stage in STAGES}
    running = {stage: start(chaos, stage, logs[stage]) for stage in STAGES}
    feeder = Feeder(target=publish, args=(chaos, messages, 1800.0))   # ~20 s of replay
    feeder.start()
    rng = random.Random(11)
    schedule = sorted(STAGES) * 3            # every stage three times, in a random order,
    rng.shuffle(schedule)                    # with a PostgreSQL and a Kafka restart among them
    schedule.insert(3, "postgres")
    schedule.insert(7, "kafka")
    done = {"kills": 0, "during_replay": 0, "postgres restarts": 0, "kafka restarts": 0}
    for event in schedule:
        time.sleep(rng.uniform(0.5, 2.0))
        done["during_replay"] += feeder.is_alive()
        if event == "postgres":
            stack.stop_postgres(chaos)
            time.sleep(OUTAGE_S)       # an outage of the database, not a wait for anything
            stack.start_postgres(chaos)
            done["postgres restarts"] += 1
        elif event == "kafka":
            stack.stop_kafka(chaos)
            stack.start_kafka(chaos)
            done["kafka restarts"] += 1
        else:
            running[event].kill()            # SIGKILL: no flush, no commit, no goodbye
            running[event].wait()
            done["kills"] += 1
            running[event] = start(chaos, event, logs[event])
    feeder.join()
    assert done["during_replay"] >= 8, f"only {done['during_replay']} disruptions while trades were arriving"
    run_to_end(chaos, n, "the disturbed run")
    stop_all(running.values())

    got = snapshot(chaos)
    for table in TABLES:
        assert_same(got[table], expected[table], table)
    alert_ids = {a[0] for a in got["alerts"]}
    assert alerts_on_topic(chaos, alert_ids) >= alert_ids, "every stored alert reached the alerts topic"
    for stage, log in logs.items():
        assert "Traceback" not in log.read_text(), f"{stage} crashed"
    print(json.dumps({"messages": n, **done, "tables_equal": {t: len(rows) for t, rows in got.items()}}))
