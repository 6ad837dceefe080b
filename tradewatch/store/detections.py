"""Writes of the detector: trade flags, alerts, circuit-breaker states; and their reads at start.
The one module that writes `alerts`: the detector's and the quotes stage's (each row says its
`source`, and each stage's outboxes deliver only their own), the acknowledgement and disposition
from the dashboard and the API included."""
from __future__ import annotations

import json

import orjson

import psycopg2.extensions
from psycopg2.extras import execute_values
from sqlalchemy import Engine, text

from tradewatch.alerts import Alert
from tradewatch.detect.rules import BreakerTransition, Detection
from tradewatch.store import partitions

Cursor = psycopg2.extensions.cursor
_MS = "timestamptz 'epoch' + %s * interval '1 millisecond'"


def write_flags(cur: Cursor, flagged: list[Detection], version: str) -> None:
    """Upsert the detector's verdict per flagged trade into `trade_flags` (never into `trades`:
    only the consumer stores trades, so a flag cannot stand in for a trade that was never stored)."""
    if not flagged:
        return
    partitions.ensure(cur, "trade_flags", {partitions.day_of(d.trade.timestamp_ms) for d in flagged})
    execute_values(
        cur,
        "INSERT INTO trade_flags (trade_id, symbol, ts, anomaly_types, anomaly_score, anomaly_severity,"
        " detector_version) VALUES %s"
        " ON CONFLICT (trade_id, ts) DO UPDATE SET anomaly_types = EXCLUDED.anomaly_types,"
        " anomaly_score = EXCLUDED.anomaly_score, anomaly_severity = EXCLUDED.anomaly_severity,"
        " detector_version = EXCLUDED.detector_version",
        [(d.trade.trade_id, d.trade.symbol, d.trade.timestamp_ms, d.types, d.score, d.severity, version)
         for d in flagged],
        template=f"(%s, %s, {_MS}, %s, %s, %s, %s)")


# the delivery channels of ALERT_ROUTES and the column that says an alert still awaits each
DUE_COLUMNS = {"webhook": "webhook_due", "email": "email_due"}


# the stages that raise alerts: the detector (trades) and the quotes stage (the book)
SOURCES = ("detector", "quotes")


def write_alerts(cur: Cursor, alerts: list[tuple[int, Alert]], routes: dict[str, frozenset[str]] | None = None,
                 source: str = "detector") -> None:
    """Store (source partition, alert) pairs unpublished: the outbox (tradewatch/outbox.py) of the
    `source` stage holding that partition sends each to Kafka and to the channels `routes` gives its
    severity, and marks each delivery done."""
    if alerts:
        assert source in SOURCES, source
        routes = routes or {}
        partitions.ensure(cur, "alerts", {partitions.day_of(a.timestamp_ms) for _, a in alerts})
        execute_values(
            cur,
            "INSERT INTO alerts (alert_id, ts, symbol, alert_type, severity, message, details, evidence, trade_id,"
            " kafka_partition, source, webhook_due, email_due) VALUES %s ON CONFLICT (alert_id, ts) DO NOTHING",
            [(a.alert_id, a.timestamp_ms, a.symbol, a.alert_type, a.severity, a.message,
              json.dumps(a.details, default=str), None if a.evidence is None else json.dumps(a.evidence, default=str),
              a.trade_id, p, source, *(channel in routes.get(a.severity, ()) for channel in DUE_COLUMNS))
             for p, a in alerts],
            template=f"(%s, {_MS}, %s, %s, %s, %s, %s::jsonb, %s::jsonb, %s, %s, %s, %s, %s)")


def write_events(cur: Cursor, events: list[dict]) -> None:
    """Upsert pump-and-dump events (pump.Event dicts, the newest snapshot of each) into
    `manipulation_events`; a snapshot older than the stored one (a re-delivered batch) changes nothing."""
    if events:
        execute_values(
            cur,
            "INSERT INTO manipulation_events (event_id, symbol, state, started_at, start_price, peak_at, peak_price,"
            " gain_pct, volume_multiple, burst_trades, buy_share, dump_depth_pct, dump_seconds, ended_at, updated_at)"
            " VALUES %s ON CONFLICT (event_id) DO UPDATE SET state = EXCLUDED.state, peak_at = EXCLUDED.peak_at,"
            " peak_price = EXCLUDED.peak_price, gain_pct = EXCLUDED.gain_pct, burst_trades = EXCLUDED.burst_trades,"
            " dump_depth_pct = EXCLUDED.dump_depth_pct, dump_seconds = EXCLUDED.dump_seconds,"
            " ended_at = EXCLUDED.ended_at, updated_at = EXCLUDED.updated_at"
            " WHERE manipulation_events.updated_at <= EXCLUDED.updated_at",
            [(e["event_id"], e["symbol"], e["state"], e["started_ms"], e["start_price"], e["peak_ms"], e["peak_price"],
              e["gain_pct"], e["volume_multiple"], e["burst_trades"], e["buy_share"], e["dump_depth_pct"],
              e["dump_seconds"], e["ended_ms"], e["updated_ms"]) for e in events],
            template=f"(%s, %s, %s, {_MS}, %s, {_MS}, %s, %s, %s, %s, %s, %s, %s, {_MS}, {_MS})")


def write_breakers(cur: Cursor, transitions: list[BreakerTransition]) -> None:
    latest = {t.symbol: t for t in transitions}  # the last transition of each symbol is its state
    if latest:
        execute_values(
            cur, "INSERT INTO breaker_transitions (symbol, state, at) VALUES %s ON CONFLICT DO NOTHING",
            [(t.symbol, t.state, t.timestamp_ms) for t in transitions], template=f"(%s, %s, {_MS})")
        execute_values(
            cur,
            "INSERT INTO circuit_breakers (symbol, state, since) VALUES %s ON CONFLICT (symbol) DO UPDATE"
            " SET state = EXCLUDED.state, since = EXCLUDED.since, updated_at = now()",
            [(t.symbol, t.state, t.timestamp_ms) for t in latest.values()], template=f"(%s, %s, {_MS})")


def write_symbols(cur: Cursor, group: str, topic: str, states: list[tuple[str, int, dict]],
                  evicted: set[str]) -> None:
    """The state of the symbols that changed (symbol, partition, state), and forget the evicted."""
    if states:
        execute_values(
            cur,
            "INSERT INTO detector_symbols (consumer_group, topic, symbol, kafka_partition, state) VALUES %s"
            " ON CONFLICT (consumer_group, topic, symbol) DO UPDATE SET kafka_partition = EXCLUDED.kafka_partition,"
            " state = EXCLUDED.state, updated_at = now()",
            [(group, topic, s, p, orjson.dumps(state).decode()) for s, p, state in states],
            template="(%s, %s, %s, %s, %s::json)")
    if evicted:
        cur.execute("DELETE FROM detector_symbols WHERE consumer_group = %s AND topic = %s AND symbol = ANY(%s)",
                    (group, topic, sorted(evicted)))


def load_symbols(cur: Cursor, group: str, topic: str, partition: int) -> dict[str, dict]:
    """The stored rolling state of the symbols of `partition`."""
    cur.execute("SELECT symbol, state::text FROM detector_symbols WHERE consumer_group = %s AND topic = %s"
                " AND kafka_partition = %s", (group, topic, partition))
    return {symbol: orjson.loads(state) for symbol, state in cur.fetchall()}


_ALERT_COLUMNS = ("alert_id, (extract(epoch FROM ts) * 1000)::bigint, symbol, alert_type, severity, message,"
                  " trade_id, details, evidence")
# a stage's own: its source, of its partitions (NULL: stored before the column, the detector's)
_OURS = "source = %s AND (kafka_partition = ANY(%s) OR kafka_partition IS NULL)"


def _alerts(cur: Cursor) -> list[Alert]:
    return [Alert(alert_id, int(ms), symbol, kind, severity, message, trade_id or "", details or {}, evidence)
            for alert_id, ms, symbol, kind, severity, message, trade_id, details, evidence in cur.fetchall()]


def unpublished_alerts(cur: Cursor, partitions: list[int], limit: int, source: str = "detector") -> list[Alert]:
    """The Kafka outbox of a `source` stage holding `partitions`: their alerts not yet acknowledged
    on the topic, oldest first."""
    cur.execute(f"SELECT {_ALERT_COLUMNS} FROM alerts WHERE published_at IS NULL AND {_OURS}"
                " ORDER BY created_at, alert_id LIMIT %s", (source, partitions, limit))
    return _alerts(cur)


def mark_published(cur: Cursor, alert_ids: list[str]) -> None:
    cur.execute("UPDATE alerts SET published_at = now() WHERE alert_id = ANY(%s) AND published_at IS NULL",
                (alert_ids,))


def due(cur: Cursor, channel: str, partitions: list[int], limit: int, source: str = "detector") -> list[Alert]:
    """The `channel` outbox (webhook, email) of a `source` stage holding `partitions`, oldest first."""
    cur.execute(f"SELECT {_ALERT_COLUMNS} FROM alerts WHERE {DUE_COLUMNS[channel]} AND {_OURS}"
                " ORDER BY created_at, alert_id LIMIT %s", (source, partitions, limit))
    return _alerts(cur)


def mark_delivered(cur: Cursor, channel: str, alert_id: str) -> None:
    cur.execute(f"UPDATE alerts SET {DUE_COLUMNS[channel]} = false WHERE alert_id = %s", (alert_id,))


DISPOSITIONS = ("true_positive", "false_positive", "needs_review")


def set_disposition(engine: Engine, alert_id: str, disposition: str, note: str | None, by_whom: str,
                    via: str) -> dict | None:
    """Record an analyst's verdict on an alert (the dashboard's and the API's): the alert's current
    disposition changes and the change is added to its history, in one transaction (the alert row
    locked, so two analysts at once each see the other's as `previous`). None: no such alert."""
    if disposition not in DISPOSITIONS:
        raise ValueError(f"disposition must be one of {', '.join(DISPOSITIONS)}, not {disposition!r}")
    with engine.begin() as conn:
        found = conn.execute(text("SELECT ts, disposition FROM alerts WHERE alert_id = :alert_id ORDER BY ts"
                                  " LIMIT 1 FOR UPDATE"), {"alert_id": alert_id}).first()
        if found is None:
            return None
        ts, previous = found
        conn.execute(text("UPDATE alerts SET disposition = :disposition WHERE alert_id = :alert_id AND ts = :ts"),
                     {"disposition": disposition, "alert_id": alert_id, "ts": ts})
        at = conn.execute(text(
            "INSERT INTO alert_dispositions (alert_id, alert_ts, previous, disposition, note, by_whom, via)"
            " VALUES (:alert_id, :ts, :previous, :disposition, :note, :by_whom, :via) RETURNING at"),
            {"alert_id": alert_id, "ts": ts, "previous": previous, "disposition": disposition,
             "note": note or None, "by_whom": by_whom, "via": via}).scalar_one()
    return {"alert_id": alert_id, "disposition": disposition, "previous": previous, "at": at.isoformat()}


def acknowledge_alert(engine: Engine, alert_id: str) -> bool:
    """Mark an alert acknowledged (the dashboard's button, the API's POST); False if it was already."""
    with engine.begin() as conn:
        result = conn.execute(text("UPDATE alerts SET acknowledged = true, acknowledged_at = now()"
                                   " WHERE alert_id = :alert_id AND NOT acknowledged"), {"alert_id": alert_id})
        return result.rowcount == 1
