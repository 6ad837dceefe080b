"""The running maxima the whale rule and the simulator share (tradewatch/extremes.py)."""
import json
import random

import pytest

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


def test_the_largest_of_a_part_of_the_span_is_scaled_to_a_whole_spans():
    """A value beyond 2.8x the largest of those before it comes about 1 / (2.8² n) of the time for
    sizes with an x^-2 tail: while a span fills, n grows and such values come far more often.
    Scaled by `understatement`, the first span raises them no more often than the later ones."""
    rng = random.Random(7)
    first = later = 0
    for _ in range(150):
        span, count = SpanMax(24 * HOUR), 0
        for i in range(2 * 24 * 120):                       # two days, a value every 30 s
            ms, u = i * 30_000, rng.random()
            value = (u / (1 - u)) ** 0.5                     # log-logistic, shape 2 (the simulator's)
            bar = 2.8 * span.max_at(ms) * span.understatement(ms)
            if count >= 200 and value > bar:
                first += ms < 24 * HOUR
                later += ms >= 24 * HOUR
            else:
                span.push(ms, value)                          # what is beyond stays out, as whales do
            count += 1
    assert 0.4 * later <= first <= 1.3 * later, (first, later)     # 20 and 29 (unscaled: 60 and 30)
    assert 150 * 0.1 <= later <= 150 * 0.3, "about 1 / 2.8² a span"


def test_the_part_of_the_span_seen_survives_a_round_trip():
    span = SpanMax(24 * HOUR)
    assert span.understatement(0) == 1.0 and span.seen_ms(0) is None
    span.push(5 * HOUR, 3.0, "a")
    span.push(7 * HOUR, 1.0, "b")
    assert span.seen_ms(8 * HOUR) == 3 * HOUR and span.understatement(8 * HOUR) == pytest.approx(8 ** 0.5)
    restored = SpanMax.from_list(24 * HOUR, json.loads(json.dumps(span.to_list())))
    assert restored.since_ms == 5 * HOUR and restored.queue == span.queue
    assert restored.understatement(29 * HOUR) == 1.0
    older = SpanMax.from_list(24 * HOUR, [7 * HOUR, [5 * HOUR, 3.0, "a"], [7 * HOUR, 1.0, "b"]])
    assert older.understatement(8 * HOUR) == 1.0, "kept before the first value's time was: as before"
    assert older.max_at(8 * HOUR) == 3.0
