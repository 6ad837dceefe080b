"""`stage_positions` (issue 25): the one table of where the aggregator and the detector resume, kept
by the stage runtime. A database from before it keeps every position: the aggregator's
`aggregator_offsets` and the detector's `detector_state` (with the symbols of its one value per
partition, from before `detector_symbols`) become rows of the new tables, once, and go."""
from __future__ import annotations

import os

from tests.conftest import scratch_database
from tradewatch.store import db, positions
from tradewatch.store.detections import load_symbols


def test_positions_of_a_database_from_before_are_kept(settings):
    with scratch_database(settings, f"tw_positions_{os.getpid()}") as old:
        with db.connect(old) as conn, conn.cursor() as cur:      # the tables as they were
            cur.execute("""
                CREATE TABLE aggregator_offsets (consumer_group text NOT NULL, topic text NOT NULL,
                    kafka_partition integer NOT NULL, next_offset bigint NOT NULL, max_event_ms bigint,
                    watermark_ms bigint, updated_at timestamptz NOT NULL DEFAULT now(),
                    PRIMARY KEY (consumer_group, topic, kafka_partition));
                INSERT INTO aggregator_offsets VALUES ('aggregator', 'trades', 0, 1200, 1700000005000, 1700000000000),
                                                      ('aggregator', 'trades', 1, 7, NULL, NULL);
                CREATE TABLE detector_state (consumer_group text NOT NULL, topic text NOT NULL,
                    kafka_partition integer NOT NULL, next_offset bigint NOT NULL, symbols json NOT NULL,
                    updated_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (consumer_group, topic, kafka_partition));
                INSERT INTO detector_state VALUES ('detector', 'trades', 0, 1150, '{"AAPL": {"last_ts": 5, "n": 0.1}}'),
                                                  ('detector', 'trades', 2, 40, '{}');
                CREATE TABLE detector_symbols (consumer_group text NOT NULL, topic text NOT NULL, symbol text NOT NULL,
                    kafka_partition integer NOT NULL, state json NOT NULL,
                    updated_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (consumer_group, topic, symbol));
                INSERT INTO detector_symbols VALUES ('detector', 'trades', 'MSFT', 2, '{"last_ts": 9}');""")
        conn.close()
        db.apply_schema(old)
        with db.connect(old) as conn, conn.cursor() as cur:
            assert positions.load(cur, "aggregator", "trades", [0, 1, 2]) == {
                0: (1200, {"max_event_ms": 1700000005000, "watermark_ms": 1700000000000}),
                1: (7, {"max_event_ms": None, "watermark_ms": None})}
            assert positions.load(cur, "detector", "trades", [0, 1, 2]) == {0: (1150, {}), 2: (40, {})}
            assert load_symbols(cur, "detector", "trades", 0) == {"AAPL": {"last_ts": 5, "n": 0.1}}
            assert load_symbols(cur, "detector", "trades", 2) == {"MSFT": {"last_ts": 9}}
            cur.execute("SELECT to_regclass('aggregator_offsets'), to_regclass('detector_state')")
            assert cur.fetchone() == (None, None)
            positions.rewind(cur, "detector", "trades", [2])         # a topic created again
            assert positions.load(cur, "detector", "trades", [2]) == {2: (0, {})}
        conn.close()
