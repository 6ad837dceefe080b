"""The one writer of `stage_positions`: where a stage that keeps its Kafka position in the database
(the aggregator, the detector) resumes each partition, and the few values it keeps beside that
offset (the aggregator's watermark). The stage runtime (tradewatch/runtime.py) loads them in the
transaction that claims a partition, writes them in every checkpoint's fenced transaction, and
rewinds them when the topic was created again; stages only say what to store."""
from __future__ import annotations

import orjson
from psycopg2.extensions import cursor as Cursor
from psycopg2.extras import execute_values


def load(cur: Cursor, group: str, topic: str, partitions: list[int]) -> dict[int, tuple[int, dict]]:
    """partition -> (next offset, kept values) of the partitions stored (left out: never started)."""
    cur.execute("SELECT kafka_partition, next_offset, kept::text FROM stage_positions"
                " WHERE consumer_group = %s AND topic = %s AND kafka_partition = ANY(%s)", (group, topic, partitions))
    return {p: (offset, orjson.loads(kept)) for p, offset, kept in cur.fetchall()}


def write(cur: Cursor, stage: str, group: str, topic: str, positions: dict[int, tuple[int, dict]]) -> None:
    if positions:
        execute_values(
            cur,
            "INSERT INTO stage_positions (consumer_group, topic, kafka_partition, stage, next_offset, kept) VALUES %s"
            " ON CONFLICT (consumer_group, topic, kafka_partition) DO UPDATE SET next_offset = EXCLUDED.next_offset,"
            " kept = EXCLUDED.kept, updated_at = now()",
            [(group, topic, p, stage, offset, orjson.dumps(kept).decode())
             for p, (offset, kept) in sorted(positions.items())],
            template="(%s, %s, %s, %s, %s, %s::json)")


def rewind(cur: Cursor, group: str, topic: str, partitions: list[int]) -> None:
    """The partitions' topic was created again: their offsets go to its start (the kept values
    stay: they describe trades, not offsets)."""
    cur.execute("UPDATE stage_positions SET next_offset = 0 WHERE consumer_group = %s AND topic = %s"
                " AND kafka_partition = ANY(%s)", (group, topic, partitions))
