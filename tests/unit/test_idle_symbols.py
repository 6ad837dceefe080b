"""runtime.IdleSymbols: which symbols a stage may evict (issue 23)."""
from tradewatch.runtime import IdleSymbols


def test_symbols_idle_for_longer_than_the_bound_in_their_partitions_event_time_are_returned_once():
    idle = IdleSymbols(after_s=10)
    for n in range(100):                      # partition 0: symbol n trades at n seconds
        idle.touch(0, f"S{n}", n * 1000)
    idle.touch(1, "OTHER", 0)                 # partition 1's own clock: nothing newer there
    idle.touch(0, "S5", 99_500)               # traded again: not idle
    gone = idle.idle()
    assert gone == {f"S{n}" for n in range(90) if n != 5}      # newest 99.5 s: before 89.5 s is idle
    assert idle.idle() == set() and len(idle) == 11 + 1
    idle.touch(1, "LATER", 20_000)
    assert idle.idle() == {"OTHER"}
    idle.drop([0])
    assert len(idle) == 1
