#!/usr/bin/env python3
"""Dashboard memory over time: streamlit serving one headless-Chromium page that refreshes every
second (the fastest setting) against the benchmark database; prints the server's RSS at the start,
the end and its peak, sampled every 10 s. Default one hour; --minutes to shorten."""
from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

from common import bench_settings, report
from playwright.sync_api import sync_playwright

from tradewatch.config import PROJECT_ROOT


def rss_mb(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--minutes", type=float, default=60)
    args = parser.parse_args()
    settings = bench_settings()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "streamlit", "run", str(PROJECT_ROOT / "dashboard.py"),
                               "--server.headless", "true", "--server.port", str(port),
                               "--browser.gatherUsageStats", "false"], cwd=PROJECT_ROOT,
                              env={**os.environ, **settings.as_env(), "DASHBOARD_REFRESH_SECONDS": "1"},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(120):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2)
            break
        except OSError:
            time.sleep(0.5)
    try:
        samples = watch(port, server.pid, args.minutes)
    finally:
        server.terminate()
        server.wait(timeout=30)
    half = len(samples) // 2
    report({"benchmark": "dashboard_memory", "minutes": args.minutes, "refresh_s": 1,
            "rss_mb": {"start": round(samples[0], 1), "end": round(samples[-1], 1), "peak": round(max(samples), 1),
                       "first_half_mean": round(sum(samples[:half]) / max(half, 1), 1),
                       "second_half_mean": round(sum(samples[half:]) / max(len(samples) - half, 1), 1)}})


def watch(port: int, pid: int, minutes: float) -> list[float]:
    """Open the page in headless Chromium and sample the server's RSS every 10 s."""
    samples = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium") or "/usr/bin/chromium",
                                    args=["--headless", "--no-sandbox", "--disable-gpu",
                                          "--disable-background-networking"])
        page = browser.new_page()
        page.goto(f"http://127.0.0.1:{port}")
        page.wait_for_selector('[data-testid="stMetricValue"]', timeout=120_000)
        end = time.monotonic() + minutes * 60
        while time.monotonic() < end:
            samples.append(rss_mb(pid))
            time.sleep(10)
        browser.close()
    return samples


if __name__ == "__main__":
    main()
