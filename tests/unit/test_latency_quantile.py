"""Latency quantiles from a stage's Prometheus histogram (tradewatch/prometheus.py), as the
heartbeat's samples of the pipeline record them: estimated the way Prometheus' histogram_quantile
does, within the bucket the true quantile falls in."""
from __future__ import annotations

import bisect
import random

import pytest

from tradewatch import prometheus

INF = float("inf")


def test_linear_within_the_bucket_the_rank_falls_in():
    buckets = {0.01: 50, 0.1: 100, INF: 100}
    assert prometheus.quantile(0.5, buckets) == pytest.approx(0.01)
    assert prometheus.quantile(0.99, buckets) == pytest.approx(0.01 + 0.09 * 49 / 50)
    assert prometheus.quantile(0.25, buckets) == pytest.approx(0.005)


def test_a_rank_in_the_infinite_bucket_is_the_last_finite_bound_and_no_observation_is_none():
    assert prometheus.quantile(0.99, {0.01: 10, 1.0: 10, INF: 100}) == 1.0
    assert prometheus.quantile(0.5, {0.01: 0, INF: 0}) is None
    assert prometheus.quantile(0.5, {}) is None


def test_observed_latencies_read_back_land_in_the_bucket_of_the_exact_quantile():
    histogram = prometheus.LATENCY.labels("quantile-test", "trade_to_row")
    before = prometheus.latency_buckets("quantile-test")
    rng = random.Random(7)
    values = [rng.lognormvariate(-4, 1.2) for _ in range(5000)]     # ms to seconds, a long tail
    for value in values:
        histogram.observe(value)
    after = prometheus.latency_buckets("quantile-test")
    since = {bound: count - before.get(bound, 0) for bound, count in after.items()}
    assert since[INF] == len(values)
    bounds = sorted(b for b in since if b != INF)
    ordered = sorted(values)
    for q in (0.5, 0.9, 0.99):
        exact = ordered[int(q * len(values)) - 1]
        estimate = prometheus.quantile(q, since)
        bucket = bisect.bisect_left(bounds, exact)
        low = bounds[bucket - 1] if bucket else 0.0
        high = bounds[bucket] if bucket < len(bounds) else bounds[-1]
        assert low <= estimate <= high, (q, exact, estimate)
