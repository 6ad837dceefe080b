"""Scaling out ingestion: consumers in one group share the default symbols' partitions."""
from __future__ import annotations

import signal

from tests.conftest import query, run_script, start_script, wait_for

N = 30_000


def test_three_consumers_each_store_a_fair_share_and_the_total_is_exact(settings, tmp_path):
    consumers = [start_script(settings, "consumer.py", log=tmp_path / f"consumer-{i}.log") for i in range(3)]
    pids = [c.pid for c in consumers]

    def all_assigned():
        held = query(settings, "SELECT pid, partitions FROM stage_health WHERE stage = 'consumer' AND pid = ANY(%s)"
                               " AND state = 'running'", (pids,))
        return len(held) == 3 and all(p for _, p in held) and \
            sorted(x for _, p in held for x in p) == list(range(settings.trades_partitions))
    wait_for(all_assigned, timeout=60, message="the group to give each of the 3 consumers partitions")
    run_script(settings, "producer.py", "--count", str(N), "--rate", "max", "--seed", "21")
    wait_for(lambda: query(settings, "SELECT count(*) FROM trades")[0][0] == N, timeout=120,
             message=f"{N} trades stored")
    for consumer in consumers:
        consumer.send_signal(signal.SIGTERM)
    for consumer in consumers:
        assert consumer.wait(timeout=30) == 0
    assert query(settings, "SELECT count(DISTINCT trade_id) FROM trades")[0][0] == N, "each trade once"
    stored = dict(query(settings, "SELECT pid, processed FROM stage_health WHERE stage = 'consumer'"
                                  " AND pid = ANY(%s)", (pids,)))
    shares = sorted(stored[p] / N for p in pids)
    print({"consumer_shares": [round(s, 3) for s in shares]})
    assert sum(stored.values()) == N
    assert shares[0] >= 0.20, f"every consumer stores a fair share: {shares}"
