"""The running maxima the whale rule and the simulator share (tradewatch/extremes.py)."""
import json
import random

from tradewatch.extremes import RecentMax, SpanMax

HOUR = 3_600_000


def test_span_max_is_the_largest_of_the_last_span_of_event_time():
    rng = random.Random(3)
    span, now, seen = SpanMax(24 * HOUR), 0, []
    for i in range(5000):
        now += rng.randrange(0, 60_000)
        ms = now - rng.randrange(0, 2 * HOUR) if i % 7 == 0 else now      # some out of order
        value = rng.paretovariate(1.5)
        span.push(ms, value, f"t{i}")
        latest = max([ms] + [m for m, _, _ in seen])
        if ms >= latest - 24 * HOUR:
            seen.append((latest, value, f"t{i}"))
        for at in (latest, latest + 5 * HOUR):
            inside = [(v, t) for m, v, t in seen if m >= at - 24 * HOUR]      # m: the time it counts from
            expected = max(inside) if inside else (0.0, None)
            entry = span.first_at(at)
            assert ((entry[1], entry[2]) if entry else (0.0, None)) == expected
        assert len(span.queue) < 60, "about ln n suffix maxima for values in random order"
    restored = SpanMax.from_list(24 * HOUR, json.loads(json.dumps(span.to_list())))
    for ms, value in ((now + 1, 0.5), (now + 30 * HOUR, 0.25)):
        span.push(ms, value)
        restored.push(ms, value)
        assert restored.queue == span.queue and restored.max_at(ms) == span.max_at(ms)


def test_span_max_stays_bounded_on_ever_smaller_values():
    span, recent = SpanMax(24 * HOUR), RecentMax(1000)
    for i in range(3 * SpanMax.MAX_ENTRIES):
        span.push(i * 1000, 1e9 - i)
        recent.push(1e9 - i)
    assert len(span.queue) == SpanMax.MAX_ENTRIES, "the oldest (largest) went first"
    assert span.max_at(i * 1000) == 1e9 - (i - SpanMax.MAX_ENTRIES + 1) < 1e9 - i + SpanMax.MAX_ENTRIES
    assert recent.max == 1e9 - (i - 999) and len(recent.queue) == 1000


def test_a_value_older_than_the_span_is_already_out_of_it():
    span = SpanMax(HOUR)
    span.push(10 * HOUR, 5.0)
    span.push(8 * HOUR, 50.0)           # two hours out of order: not the last hour's
    assert span.max_at(10 * HOUR) == 5.0 and len(span.queue) == 1
    span.push(int(9.5 * HOUR), 7.0)      # half an hour out of order: inside, counted from its arrival
    assert span.max_at(10 * HOUR) == 7.0 and span.max_at(int(10.9 * HOUR)) == 7.0
    assert span.max_at(int(11.1 * HOUR)) == 0.0
