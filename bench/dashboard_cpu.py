"""What the open dashboard costs the machine, at the user's defaults: a fresh `make demo` (20
trades/s, 3 s refresh), the page open in headless Chromium in a laptop-sized window until
everything is on it, then the CPU the browser, the Streamlit server and the rest of the demo used
over a window of wall time, in cores (CPU seconds per second). The same window is measured again
with the page closed: the floor the pipeline costs without a viewer.

    ../.venv/bin/python dashboard_cpu.py --seconds 60
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from playwright.sync_api import sync_playwright  # noqa: E402

from common import cpu_seconds, report, tree  # noqa: E402
from tests.e2e.demo_driver import (FIRST_ANOMALY_BUDGET_S, Demo, launch_browser, open_dashboard,  # noqa: E402
                                   wait_for_everything)

WARM_UP_S = 20


def measure(demo: Demo, seconds: float) -> dict:
    """Cores used over `seconds` by the browser (every Chromium process), the dashboard's Streamlit
    server and the rest of the demo (stages, Kafka, PostgreSQL)."""
    def groups() -> dict[str, list[psutil.Process]]:
        ours = [p for p in tree(os.getpid())[1:] if "chrom" in p.name() or "headless_shell" in p.name()]
        demo_side = [p for pid in demo.pids() for p in tree(pid)]
        streamlit = [p for p in demo_side if "streamlit" in " ".join(p.cmdline())]
        rest = [p for p in demo_side if p not in streamlit]
        return {"browser": ours, "streamlit": streamlit, "rest_of_demo": rest}
    before = {name: cpu_seconds(processes) for name, processes in groups().items()}
    began = time.monotonic()
    time.sleep(seconds)
    after = {name: cpu_seconds(processes) for name, processes in groups().items()}
    wall = time.monotonic() - began
    # a process that started inside the window counts from zero; one that ended is left out
    return {name: round(sum(t - before[name].get(pid, 0.0) for pid, t in after[name].items()) / wall, 3)
            for name in after}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--width", type=int, default=1440)
    parser.add_argument("--height", type=int, default=900)
    args = parser.parse_args()
    demo = Demo("dashboard-cpu")
    result: dict = {"benchmark": "dashboard_cpu", "seconds": args.seconds,
                    "window": f"{args.width}x{args.height}", "refresh_s": demo.settings.dashboard_refresh_seconds,
                    "trades_per_s": demo.settings.demo_rate, "cores": psutil.cpu_count()}
    with sync_playwright() as p:
        browser = launch_browser(p)
        page = browser.new_page(viewport={"width": args.width, "height": args.height})
        demo.start()
        try:
            open_dashboard(page, demo)
            wait_for_everything(page, demo, FIRST_ANOMALY_BUDGET_S * 2)
            time.sleep(WARM_UP_S)
            result["page_open_cores"] = measure(demo, args.seconds)
            page.close()
            time.sleep(WARM_UP_S)
            result["page_closed_cores"] = measure(demo, args.seconds)
        finally:
            demo.kill_everything()
            browser.close()
    report(result)


if __name__ == "__main__":
    main()
