"""Scaling out ingestion: consumers in one group share the default symbols, spread over the default
topic's partitions (TRADES_PARTITIONS, PARTITION_SYMBOLS from .env)."""
from __future__ import annotations

import signal

import pytest

from tests.conftest import query, run_script, start_script, wait_for
from tradewatch import bus
from tradewatch.config import Settings

N = 30_000


@pytest.mark.parametrize("members, fair", [(3, 0.20), (5, 0.15)])
def test_consumers_each_store_a_fair_share_and_the_total_is_exact(settings, tmp_path, members, fair):
    defaults = Settings.load()
    settings = settings.with_overrides(trades_partitions=defaults.trades_partitions,
                                       partition_symbols=defaults.partition_symbols, trades_topic=f"{settings.trades_topic}-d")
    bus.ensure_topic(settings, settings.trades_topic, settings.trades_partitions)
    consumers = [start_script(settings, "consumer.py", log=tmp_path / f"consumer-{i}.log") for i in range(members)]
    pids = [c.pid for c in consumers]

    def all_assigned():
        held = query(settings, "SELECT pid, partitions FROM stage_health WHERE stage = 'consumer' AND pid = ANY(%s)"
                               " AND state = 'running'", (pids,))
        return len(held) == members and all(p for _, p in held) and \
            sorted(x for _, p in held for x in p) == list(range(settings.trades_partitions))
    wait_for(all_assigned, timeout=60, message=f"the group to give each of the {members} consumers partitions")
    run_script(settings, "producer.py", "--count", str(N), "--rate", "max", "--seed", "21")
    wait_for(lambda: query(settings, "SELECT count(*) FROM trades")[0][0] == N, timeout=120,
             message=f"{N} trades stored")
    for consumer in consumers:
        consumer.send_signal(signal.SIGTERM)
    for consumer in consumers:
        assert consumer.wait(timeout=30) == 0
    assert query(settings, "SELECT count(DISTINCT trade_id) FROM trades")[0][0] == N, "each trade once"
    symbols_per_partition = query(settings, "SELECT count(DISTINCT symbol) FROM trades GROUP BY kafka_partition")
    assert sorted(n for n, in symbols_per_partition) == [1] * 10, "the ten default symbols, one per partition"
    stored = dict(query(settings, "SELECT pid, processed FROM stage_health WHERE stage = 'consumer'"
                                  " AND pid = ANY(%s)", (pids,)))
    shares = sorted(stored[p] / N for p in pids)
    print({"consumer_shares": [round(s, 3) for s in shares]})
    assert sum(stored.values()) == N
    assert shares[0] >= fair, f"every consumer stores a fair share: {shares}"
