#!/usr/bin/env python3
"""Report benchmark: `report.py --date` for the first day of the database of bench/dashboard.py
(--trades, 10 million by default, all in that day; with 100 million the other 90 are in later days;
loaded once, kept in .tradewatch/bench), timed as a user runs it (a fresh
process), beside the ceiling of one pass over the same trades: PostgreSQL grouping them by symbol
with the same exact decimal sums, the least any per-symbol figure of that day can cost."""
from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

from common import bench_settings, load_trades, query, report

from tradewatch.config import PROJECT_ROOT


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--trades", type=int, default=10_000_000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    settings = bench_settings()
    present = query(settings, "SELECT count(*) FROM trades")[0][0]
    loading = load_trades(settings, args.trades) if present != args.trades else {"reused": present}
    first = query(settings, "SELECT min(ts) FROM trades")[0][0]
    day = first.replace(hour=0, minute=0, second=0, microsecond=0)
    in_day = query(settings, "SELECT count(*) FROM trades WHERE ts >= %s AND ts < %s", day, day + timedelta(days=1))[0][0]
    started = time.perf_counter()
    query(settings, "SELECT symbol, count(*), sum(quantity::numeric), sum(price::numeric * quantity::numeric)"
                    " FROM trades WHERE ts >= %s AND ts < %s GROUP BY symbol", day, day + timedelta(days=1))
    ceiling = time.perf_counter() - started
    runs = []
    with tempfile.TemporaryDirectory() as out:
        for _ in range(args.runs):
            started = time.perf_counter()
            subprocess.run([sys.executable, str(PROJECT_ROOT / "report.py"), "--date", f"{day:%Y-%m-%d}", "--out", out],
                           cwd=PROJECT_ROOT, env={**os.environ, **settings.as_env()}, check=True,
                           stdout=subprocess.DEVNULL)
            runs.append(time.perf_counter() - started)
        page = next(Path(out).glob("report-*.html"))
        size = page.stat().st_size
    best = min(runs)
    report({"benchmark": "report", "trades_stored": args.trades, "trades_in_day": in_day, "loading": loading,
            "report_py_s": [round(r, 2) for r in runs], "one_pass_ceiling_s": round(ceiling, 2),
            "ratio_to_ceiling": round(best / ceiling, 2), "html_bytes": size,
            "max_rss_mb_of_report_py": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1)})


if __name__ == "__main__":
    main()
