"""Fresh `make demo` starts at the user's defaults, measured the way a user sees them: for each run,
an empty data folder, the demo runner (an hour of simulated past first), and headless Chromium
polling the dashboard until it shows that hour of candles, a live anomaly marker, an alert and a
green health strip. Beside each time: how long the services alone
took to answer (the floor no stage can beat) and how long Ctrl-C took to stop everything.

    ../.venv/bin/python demo_start.py --runs 10
"""
from __future__ import annotations

import argparse
import re
import statistics
import sys
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from playwright.sync_api import sync_playwright  # noqa: E402

from common import report  # noqa: E402
from tests.e2e.demo_driver import (FIRST_ANOMALY_BUDGET_S, Demo, launch_browser, open_dashboard,  # noqa: E402
                                   wait_for_everything)


def services_ready_s(log: str, launched_wall: float) -> float | None:
    """Seconds from launch to the demo's first 'starting consumer' line (services answered)."""
    match = re.search(r"^(\S+ \S+),(\d+) INFO tradewatch.demo: starting consumer", log, re.MULTILINE)
    if not match:
        return None
    stamp = datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S").timestamp() + int(match.group(2)) / 1000
    return round(stamp - launched_wall, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    runs = []
    with sync_playwright() as p:
        browser = launch_browser(p)
        for attempt in range(1, args.runs + 1):
            page = browser.new_page(viewport={"width": 1600, "height": 2400})
            demo = Demo(f"bench{attempt}")
            launched_wall = time.time()
            demo.start()
            run: dict = {"run": attempt}
            try:
                open_dashboard(page, demo)
                wait_for_everything(page, demo, FIRST_ANOMALY_BUDGET_S - (time.monotonic() - demo.started_at))
                run["first_anomaly_on_page_s"] = round(time.monotonic() - demo.started_at, 2)
                run["services_ready_s"] = services_ready_s(demo.output(), launched_wall)
                run["stage_died"] = "exited with code" in demo.output()
                run["stop_s"] = round(demo.interrupt_and_wait(), 2)
                run["ok"] = not run["stage_died"]
            except AssertionError as error:
                run["ok"] = False
                run["error"] = str(error).splitlines()[0]
            finally:
                demo.kill_everything()
                page.close()
            print(run, file=sys.stderr)
            runs.append(run)
        browser.close()
    times = [r["first_anomaly_on_page_s"] for r in runs if r.get("ok")]
    ready = [r["services_ready_s"] for r in runs if r.get("services_ready_s")]
    report({
        "benchmark": "fresh make-demo starts (empty data folder, headless Chromium)",
        "runs": len(runs), "ok": sum(1 for r in runs if r.get("ok")),
        "first_anomaly_on_page_s": {"p50": statistics.median(times) if times else None,
                                    "max": max(times) if times else None},
        "floor_services_ready_s": {"p50": statistics.median(ready) if ready else None},
        "budget_s": FIRST_ANOMALY_BUDGET_S,
        "ctrl_c_stop_s_max": max((r["stop_s"] for r in runs if "stop_s" in r), default=None),
        "per_run": runs,
    })


if __name__ == "__main__":
    main()
