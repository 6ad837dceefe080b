"""runtime.Symbols (the partition of each symbol a stage holds, and which it may evict: issue 23) and
runtime.Pending (effects awaiting a checkpoint, by partition: issue 25)."""
from tradewatch.runtime import Pending, Symbols


def test_symbols_idle_for_longer_than_the_bound_in_their_partitions_event_time_are_returned_once():
    idle = Symbols(after_s=10)
    for n in range(100):                      # partition 0: symbol n trades at n seconds
        idle.touch(0, f"S{n}", n * 1000)
    idle.touch(1, "OTHER", 0)                 # partition 1's own clock: nothing newer there
    idle.touch(0, "S5", 99_500)               # traded again: not idle
    gone = idle.idle()
    assert gone == {f"S{n}" for n in range(90) if n != 5}      # newest 99.5 s: before 89.5 s is idle
    assert idle.idle() == set() and len(idle) == 11 + 1
    assert "S5" in idle and "S3" not in idle and idle.partition_of("S3") == -1
    idle.touch(1, "LATER", 20_000)
    assert idle.idle() == {"OTHER"}
    assert idle.drop([0]) == {"S5", *(f"S{n}" for n in range(90, 100))}
    assert len(idle) == 1 and idle.partition_of("LATER") == 1


def test_a_symbol_that_moves_partition_is_held_by_its_new_one_only():
    symbols = Symbols(after_s=10)
    symbols.touch(0, "AAPL", 1_000)
    symbols.touch(1, "AAPL", 2_000)           # its key now hashes elsewhere (partitions added)
    assert symbols.partition_of("AAPL") == 1 and len(symbols) == 1
    assert symbols.drop([0]) == set() and symbols.drop([1]) == {"AAPL"} and len(symbols) == 0


def test_a_restored_symbol_without_a_time_counts_from_its_partitions_newest_trade():
    symbols = Symbols(after_s=10)
    symbols.touch(0, "NEW", 50_000)
    symbols.touch(0, "RESTORED", None)
    symbols.touch(0, "NEW", 55_000)
    assert symbols.idle() == set()
    symbols.touch(0, "NEW", 61_000)
    assert symbols.idle() == {"RESTORED"}


def test_pending_effects_are_kept_in_order_replaced_by_key_and_dropped_by_partition():
    pending = Pending()
    pending.add(0, "a")
    pending.add(1, "window v1", key=("AAPL", 60_000, 0))
    pending.add(0, "b")
    pending.add(1, "window v2", key=("AAPL", 60_000, 0))       # changed again before the checkpoint
    assert pending.items() == ["a", "window v2", "b"] and len(pending) == 3
    assert pending.tagged() == [(0, "a"), (1, "window v2"), (0, "b")]
    pending.pop(("AAPL", 60_000, 0))
    pending.pop(("GONE", 1, 2))                                # not there: nothing happens
    pending.add(2, "c")
    pending.drop([0])
    assert pending.items() == ["c"]
    pending.clear()
    assert not pending and pending.items() == []
