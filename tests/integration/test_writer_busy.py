"""The consumer stores batch n on its writer thread while its main thread decodes batch n+1
(tradewatch/runtime.py, `overlap`). psycopg2 feeds COPY from a file in chunks, taking the GIL for
each; with the default chunk (8 KiB) every chunk waited for the busy thread's switch interval,
and one batch took seconds where it takes tens of milliseconds (issue 39: the consumer used one
of the two cores). On the real PostgreSQL: storing while another thread runs Python takes about
as long as storing alone. The same wait follows every statement: a batch takes few of them, and an
overlap stage shortens the wait (runtime.WRITER_SWITCH_S)."""
from __future__ import annotations

import sys
import threading
import time
from datetime import datetime, timezone

import psycopg2.extensions

from tradewatch import runtime
from tradewatch.events import Trade
from tradewatch.stages.consumer import Ingest
from tradewatch.stages.detector import Detect
from tradewatch.store import db
from tradewatch.store.writer import copy_row, write_batch

NOW_MS = int(datetime.now(timezone.utc).timestamp() * 1000)


def batch(first: int, n: int) -> list[bytes]:
    return [copy_row(Trade(f"busy-{i}", f"S{i % 7}", NOW_MS - i, 10.0 + i % 100 / 100, 1.0, "buy", "X"), 0, i)
            for i in range(first, first + n)]


def store(settings, first: int, n: int) -> float:
    """Seconds to write and commit trades first..first+n as one batch."""
    rows = batch(first, n)
    conn = db.connect(settings)
    try:
        started = time.perf_counter()
        with conn.cursor() as cur:
            result = write_batch(cur, rows, [])
        conn.commit()
        elapsed = time.perf_counter() - started
    finally:
        conn.close()
    assert result.trades_inserted == n
    return elapsed


def beside_a_busy_thread(work):
    """Run `work` on a thread of its own while another thread runs pure Python (the stage's thread
    decoding the next batch); its seconds."""
    stop, took = threading.Event(), []

    def decode_next_batch():
        while not stop.is_set():
            sum(range(200))

    def timed():
        started = time.perf_counter()
        work()
        took.append(time.perf_counter() - started)

    busy, writer = threading.Thread(target=decode_next_batch), threading.Thread(target=timed)
    busy.start()
    try:
        writer.start()
        writer.join()
    finally:
        stop.set()
        busy.join()
    return took[0]


class CountingCursor(psycopg2.extensions.cursor):
    """Counts the statements (round trips) sent through it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.statements = 0

    def execute(self, query, vars=None):
        self.statements += 1
        return super().execute(query, vars)

    def copy_expert(self, sql, file, size=8192):
        self.statements += 1
        return super().copy_expert(sql, file, size)


def test_a_batch_of_new_trades_is_stored_in_five_statements(settings):
    """Partitions held and checked (one round trip), a savepoint, the COPY, its release, the
    latest_trades upsert. It took eight: a second savepoint for the duplicate path and the
    partition lock apart from the check (issue 39: a tenth of the consumer's speed)."""
    store(settings, 0, 10)                          # the day's partition exists, as in steady state
    conn = db.connect(settings)
    try:
        with conn.cursor(cursor_factory=CountingCursor) as cur:
            result = write_batch(cur, batch(10, 1_000), [])
            statements = cur.statements
        conn.commit()
    finally:
        conn.close()
    assert result.trades_inserted == 1_000
    assert statements <= 5


def test_an_overlap_stage_lets_its_writer_thread_back_in_soon_after_each_statement(settings):
    """Beside a thread running Python, each statement ended with a wait for the GIL of up to the
    switch interval, about 7 ms a round trip at Python's default (100 `SELECT 1` beside a busy
    thread: 1.4-1.5 s at 5 ms, 0.22-0.26 s at 1 ms on a quiet machine); an overlap stage's runtime
    shortens it, and only an overlap stage's. (Timed here once, that ratio failed on a loaded
    machine: the busy thread, descheduled, held the GIL less, and Python's default came out fast.)"""
    before = sys.getswitchinterval()
    try:
        sys.setswitchinterval(0.005)                # Python's default
        runtime.Runtime(settings, Detect(settings), settings.detector_group, settings.trades_topic, lambda: False)
        assert sys.getswitchinterval() == 0.005, "a stage without a writer thread keeps Python's default"
        runtime.Runtime(settings, Ingest(settings), settings.consumer_group, settings.trades_topic, lambda: False)
        assert sys.getswitchinterval() == runtime.WRITER_SWITCH_S == 0.001
    finally:
        sys.setswitchinterval(before)


def test_a_batch_is_stored_as_fast_while_another_thread_runs_python(settings):
    store(settings, 0, 1_000)                         # the day's partition exists, the connection path warm
    alone = min(store(settings, 1_000 + k * 40_000, 40_000) for k in range(2))
    meanwhile = beside_a_busy_thread(lambda: store(settings, 81_000, 40_000))
    # chunked by 8 KiB it took ~15x as long (megabytes of COPY data, a 5 ms wait per chunk); a busy
    # machine's noise stays well inside 3x
    assert meanwhile < 3 * alone + 0.5, f"alone {alone:.2f}s, beside a busy thread {meanwhile:.2f}s"
