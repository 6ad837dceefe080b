"""The injector of known anomalies into real trades and its scorer, on a hand-made series."""
import pytest

from tradewatch.detect import inject
from tradewatch.events import Trade

T0 = 1_767_225_600_000


def flat(n=4000):
    return [Trade(f"t{i}", "IBM", T0 + i * 1000, 100.0, 100.0, "unknown", "X") for i in range(n)]


def test_each_kind_is_shaped_as_specified():
    trades = flat()
    changed, events = inject.inject(trades, seed=5, per_kind=1)
    assert sorted(e.kind for e in events) == sorted(inject.KINDS)
    by_kind = {e.kind: e for e in events}
    spike = by_kind["price_spike"]
    level = _level_before(events, spike.first)
    assert changed[spike.first].price == pytest.approx(100 * level * (1 + spike.size)) and 0.06 <= spike.size <= 0.09
    assert changed[spike.first + 1].price == pytest.approx(100.0 * _level_before(events, spike.first + 1))
    drop = by_kind["price_drop"]
    level = _level_before(events, drop.first)
    assert [round(changed[drop.first + k].price / level, 6) for k in range(4)] == \
        [round(100 * (1 - drop.size * (k + 1) / 3), 6) for k in range(3)] + [round(100 * (1 - drop.size), 6)]
    assert changed[-1].price == pytest.approx(100 * _level_before(events, len(changed))), "the drop persists"
    assert _level_before(events, len(changed)) == pytest.approx(1 - drop.size)
    crash = by_kind["flash_crash"]
    level = _level_before(events, crash.first)
    assert changed[crash.first + 2].price == pytest.approx(100 * level * (1 - crash.size))
    assert changed[crash.first + 12].price == pytest.approx(100 * level) and crash.last == crash.first + 12
    whale = by_kind["whale"]
    assert changed[whale.first].quantity == pytest.approx(100 * whale.size) and 3 <= whale.size <= 6
    assert all(t.quantity == 100.0 for i, t in enumerate(changed) if i != whale.first)
    assert all(e.first >= inject.LEAD for e in events)
    assert inject.inject(trades, seed=5, per_kind=1) == (changed, events), "seeded"


def _level_before(events, index):
    level = 1.0
    for e in events:
        if e.kind == "price_drop" and e.first + 2 < index:
            level *= 1 - e.size
    return level


def test_the_score_counts_exactly():
    events = [inject.Event("price_spike", 1000, 1000, 0.07), inject.Event("price_drop", 1600, 1602, 0.12),
              inject.Event("flash_crash", 2200, 2212, 0.15), inject.Event("whale", 2800, 2800, 4.0)]
    flags = [set() for _ in range(3500)]
    flags[1000] = {"PRICE_SPIKE"}
    flags[1605] = {"PRICE_SPIKE"}               # near the drop, wrong type: neither found nor false
    flags[2800] = {"VOLUME_SPIKE"}
    flags[100] = {"PRICE_ZSCORE"}               # a false alarm
    flags[3300] = {"VOLUME_SPIKE"}              # a natural whale: reported apart
    result = inject.score(flags, events, natural={3300})
    assert result["recall"] == {"price_spike": 1.0, "price_drop": 0.0, "flash_crash": 0.0, "whale": 1.0}
    excluded = 101 + 103 + 113 + 101
    assert result["normal_trades"] == 3500 - excluded
    assert result["false_alarms"] == 2
    assert result["false_alarms_per_10k"] == round(2 / (3500 - excluded) * 1e4, 3)
    assert result["natural_whales"] == 1
    assert result["false_alarms_per_10k_besides_natural_whales"] == round(1 / (3500 - excluded - 1) * 1e4, 3)


def test_natural_whales_are_found_in_the_background():
    trades = flat(1500)
    trades[1200] = Trade("big", "IBM", T0, 100.0, 300.0, "unknown", "X")
    trades[1300] = Trade("big2", "IBM", T0, 100.0, 299.0, "unknown", "X")     # < 3x the largest (300)
    assert inject.natural_whales(trades) == {1200}
