"""The consumer stores batch n on its writer thread while its main thread decodes batch n+1
(tradewatch/runtime.py, `overlap`). psycopg2 feeds COPY from a file in chunks, taking the GIL for
each; with the default chunk (8 KiB) every chunk waited for the busy thread's switch interval,
and one batch took seconds where it takes tens of milliseconds (issue 39: the consumer used one
of the two cores). On the real PostgreSQL: storing while another thread runs Python takes about
as long as storing alone."""
from __future__ import annotations

import threading
import time
from datetime import datetime, timezone

from tradewatch.events import Trade
from tradewatch.store import db
from tradewatch.store.writer import copy_row, write_batch

NOW_MS = int(datetime.now(timezone.utc).timestamp() * 1000)


def store(settings, first: int, n: int) -> float:
    """Seconds to write and commit trades first..first+n as one batch."""
    rows = [copy_row(Trade(f"busy-{i}", f"S{i % 7}", NOW_MS - i, 10.0 + i % 100 / 100, 1.0, "buy", "X"), 0, i)
             for i in range(first, first + n)]
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


def test_a_batch_is_stored_as_fast_while_another_thread_runs_python(settings):
    store(settings, 0, 1_000)                         # the day's partition exists, the connection path warm
    alone = min(store(settings, 1_000 + k * 40_000, 40_000) for k in range(2))
    stop, spins = threading.Event(), [0]

    def decode_next_batch():                          # what the main thread does meanwhile: pure Python
        while not stop.is_set():
            spins[0] += sum(range(200))

    busy = threading.Thread(target=decode_next_batch)
    busy.start()
    try:
        meanwhile = store(settings, 81_000, 40_000)
    finally:
        stop.set()
        busy.join()
    assert spins[0] > 0
    # chunked by 8 KiB it took ~15x as long (megabytes of COPY data, a 5 ms wait per chunk); a busy
    # machine's noise stays well inside 3x
    assert meanwhile < 3 * alone + 0.5, f"alone {alone:.2f}s, beside a busy thread {meanwhile:.2f}s"
