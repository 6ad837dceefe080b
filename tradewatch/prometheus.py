"""Prometheus metrics of the stages (prometheus-client), one place for all of them.

Each stage process serves its metrics on its own port (`CONSUMER_METRICS_PORT`,
`AGGREGATOR_METRICS_PORT`, `DETECTOR_METRICS_PORT`, `QUOTES_METRICS_PORT`; 0 = off); a second process of the same stage
(scale-out) takes the next free port and logs it. Every series carries the label `stage`.

    tradewatch_messages_in_total            messages read from Kafka
    tradewatch_checkpoint_records           histogram: records per checkpoint (batch size)
    tradewatch_checkpoint_seconds           histogram: duration of a checkpoint's transaction
    tradewatch_lag_records{partition}       records between the stage's position and the log end
    tradewatch_rows_written_total{table}    rows the stage wrote (trades, stock_metrics, alerts …)
    tradewatch_dead_letters_total{reason}   consumer: dead letters by kind of reason
    tradewatch_late_trades_total{reason}    aggregator: trades left out of windows (late, clock_skew)
    tradewatch_alerts_total{type,severity}  detector: alerts raised
    tradewatch_latency_seconds{path}        histogram: Kafka append time → row committed
                                            (trade_to_row) and → alert committed (trade_to_alert)
    tradewatch_stage_starts_total           process starts (a supervisor restart counts one more)
    tradewatch_book_gaps_total              quotes: sequence gaps in the book messages (a book is
                                            stale until its next snapshot)
    tradewatch_disk_free_bytes{folder}      free and total bytes of the disk holding TRADEWATCH_HOME,
    tradewatch_disk_size_bytes{folder}      measured when scraped (tradewatch/disk.py)

The Prometheus alert rules on these are in infra/prometheus/alerts.yml.

producer.py --live (PRODUCER_METRICS_PORT), labelled by venue:
    tradewatch_live_trades_total            trades received (after repeats are dropped)
    tradewatch_live_gaps_total{symbol}      jumps in a symbol's trade-id sequence
    tradewatch_live_missing_trades_total{symbol}  trade ids those jumps skipped
    tradewatch_live_duplicates_total        trades received again (after a reconnect), dropped
    tradewatch_live_unexpected_messages_total  messages of an unexpected shape, skipped
    tradewatch_live_reconnects_total        connections lost and opened again
"""
from __future__ import annotations

import logging
import re

from prometheus_client import Counter, Gauge, Histogram, start_http_server

from tradewatch import disk

log = logging.getLogger("tradewatch.metrics")

MESSAGES_IN = Counter("tradewatch_messages_in", "Messages read from Kafka", ["stage"])
CHECKPOINT_RECORDS = Histogram("tradewatch_checkpoint_records", "Records per checkpoint", ["stage"],
                               buckets=(1, 10, 100, 500, 1000, 2500, 5000, 10000, 25000, 50000))
CHECKPOINT_SECONDS = Histogram("tradewatch_checkpoint_seconds", "Duration of a checkpoint's transaction", ["stage"],
                               buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))
LAG = Gauge("tradewatch_lag_records", "Records between the stage's position and the log end", ["stage", "partition"])
ROWS = Counter("tradewatch_rows_written", "Rows written", ["stage", "table"])
DEAD_LETTERS = Counter("tradewatch_dead_letters", "Dead letters by kind of reason", ["stage", "reason"])
LATE = Counter("tradewatch_late_trades", "Trades left out of windows", ["stage", "reason"])
ALERTS = Counter("tradewatch_alerts", "Alerts raised", ["stage", "type", "severity"])
LATENCY = Histogram("tradewatch_latency_seconds", "From the Kafka append time of a trade to its effect committed",
                    ["stage", "path"], buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5,
                                                5, 10, 30, 60))
SYMBOLS = Gauge("tradewatch_symbols_held", "Symbols whose state the stage holds (idle ones are evicted)", ["stage"])
BOOK_GAPS = Counter("tradewatch_book_gaps", "Sequence gaps in the book messages (the quotes stage)")
STARTS = Counter("tradewatch_stage_starts", "Process starts", ["stage"])
DISK_FREE = Gauge("tradewatch_disk_free_bytes", "Free bytes of the disk holding TRADEWATCH_HOME", ["stage", "folder"])
DISK_SIZE = Gauge("tradewatch_disk_size_bytes", "Size of the disk holding TRADEWATCH_HOME", ["stage", "folder"])
LIVE_TRADES = Counter("tradewatch_live_trades", "Trades received from a live venue", ["venue"])
LIVE_GAPS = Counter("tradewatch_live_gaps", "Jumps in a symbol's trade-id sequence", ["venue", "symbol"])
LIVE_MISSING = Counter("tradewatch_live_missing_trades", "Trade ids skipped by those jumps", ["venue", "symbol"])
LIVE_DUPLICATES = Counter("tradewatch_live_duplicates", "Trades received again (dropped)", ["venue"])
LIVE_UNEXPECTED = Counter("tradewatch_live_unexpected_messages", "Messages of an unexpected shape (skipped)", ["venue"])
LIVE_RECONNECTS = Counter("tradewatch_live_reconnects", "Connections lost and opened again", ["venue"])
LIVE_BOOK_MESSAGES = Counter("tradewatch_live_book_messages", "Book messages sent on from a live venue", ["venue"])
LIVE_BOOK_SNAPSHOTS = Counter("tradewatch_live_book_snapshots", "Venue book snapshots taken in", ["venue"])
LIVE_BOOK_GAPS = Counter("tradewatch_live_book_gaps", "Jumps in a book's update ids (the book fetched again)",
                         ["venue", "symbol"])

# A dead letter's reason (its detail, with words from the message, stays in its row) as one of a
# fixed list of label values: a sender cannot make new Prometheus series.
REASON_KINDS = (
    ("empty", re.compile(r"^empty message")),
    ("too large", re.compile(r"-byte limit")),
    ("not utf-8", re.compile(r"^not UTF-8")),
    ("not json", re.compile(r"^not JSON")),
    ("not an object", re.compile(r"^expected a JSON object")),
    ("missing field", re.compile(r"^missing field")),
    ("timestamp", re.compile(r"timestamp")),
    ("wrong type", re.compile(r"must be (a string|a number|an integer)")),
    ("bad characters", re.compile(r"characters outside|NUL character|only printable ASCII")),
    ("not finite", re.compile(r"must be finite")),
    ("out of range", re.compile(r"must be > 0|must be at most|must have 1\.\.")),
    ("not an allowed value", re.compile(r"must be one of|is not one of")),
    ("bid above ask", re.compile(r"is above ask")),
    ("schema version", re.compile(r"schema_version")),
)


def reason_kind(reason: str) -> str:
    """One of REASON_KINDS' names (or "other") for a dead letter's reason."""
    return next((kind for kind, pattern in REASON_KINDS if pattern.search(reason)), "other")


def latency_buckets(stage: str) -> dict[float, float]:
    """The stage's latency histogram so far (every path it measures): each bucket's upper bound
    (seconds, the last one infinite) -> observations at or below it."""
    counts: dict[float, float] = {}
    for family in LATENCY.collect():
        for sample in family.samples:
            if sample.name.endswith("_bucket") and sample.labels["stage"] == stage:
                bound = float(sample.labels["le"])
                counts[bound] = counts.get(bound, 0.0) + sample.value
    return counts


def quantile(q: float, buckets: dict[float, float]) -> float | None:
    """The q-quantile (0..1) of cumulative `buckets` (upper bound -> count) as Prometheus'
    histogram_quantile estimates it: linear within the bucket the rank falls in, the last finite
    bound when it falls in the infinite one; None without observations."""
    bounds = sorted(buckets)
    total = buckets[bounds[-1]] if bounds else 0.0
    if total <= 0:
        return None
    rank, below, lower = q * total, 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank and count > below:
            if bound == float("inf"):
                return lower
            return lower + (bound - lower) * (rank - below) / (count - below)
        below, lower = count, bound
    return lower


def serve(settings, stage: str, tries: int = 20) -> int | None:
    """Serve the default registry on the stage's port (or the next free one); the port used, None
    when off."""
    STARTS.labels(stage).inc()
    port = getattr(settings, f"{stage}_metrics_port", 0)
    if not port:
        return None
    folder = str(disk.usage(settings.home).folder)
    DISK_FREE.labels(stage, folder).set_function(lambda: disk.usage(folder).free)
    DISK_SIZE.labels(stage, folder).set_function(lambda: disk.usage(folder).total)
    for candidate in range(port, port + tries):
        try:
            start_http_server(candidate, addr=settings.metrics_address)
        except OSError:
            continue
        log.info("metrics of the %s on http://%s:%d/metrics", stage, settings.metrics_address, candidate)
        return candidate
    log.warning("no free port for the %s's metrics in %d..%d: metrics are off", stage, port, port + tries - 1)
    return None
