"""`make demo`: the whole pipeline in one terminal. Ctrl-C stops every process it started.

Starts Kafka and PostgreSQL (unless already running), then each stage as its own process, exactly
as the four-terminal walkthrough in the README does by hand.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time

from tradewatch import stack
from tradewatch.cli import setup_logging
from tradewatch.config import PROJECT_ROOT, Settings

log = logging.getLogger("tradewatch.demo")


def stages(settings: Settings) -> list[tuple[str, list[str]]]:
    python = sys.executable
    rate = os.environ.get("DEMO_RATE", "20")
    anomaly_rate = os.environ.get("DEMO_ANOMALY_RATE", "0.005")
    return [
        ("consumer", [python, "consumer.py"]),
        ("producer", [python, "producer.py", "--rate", rate, "--anomaly-rate", anomaly_rate]),
        ("aggregator", [python, "aggregator.py"]),
        ("detector", [python, "anomaly_detector.py", "run"]),
        ("dashboard", [python, "-m", "streamlit", "run", "dashboard.py", "--server.headless", "true",
                       "--browser.gatherUsageStats", "false"]),
    ] + ([("flink", [python, "flink_job.py"])] if settings.run_flink_in_demo.lower() == "true" else [])


def main() -> int:
    setup_logging()
    settings = Settings.load()
    already_up = stack.status(settings)
    we_started_services = not (already_up["kafka"].startswith("up") and already_up["postgres"].startswith("up"))
    try:
        stack.start(settings)
    except stack.StackError as error:
        log.error("%s", error)
        return 1
    processes: list[tuple[str, subprocess.Popen]] = []
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt))
    try:
        for name, command in stages(settings):
            log.info("starting %s: %s", name, " ".join(command[1:]))
            processes.append((name, subprocess.Popen(command, cwd=PROJECT_ROOT)))
        log.info("demo running — dashboard at http://localhost:8501 — press Ctrl-C to stop everything")
        while True:
            for name, process in processes:
                if process.poll() is not None:
                    log.warning("%s exited with code %s", name, process.returncode)
                    processes.remove((name, process))
                    break
            time.sleep(1)
    except KeyboardInterrupt:
        log.info("stopping the demo")
    finally:
        for _, process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGINT)
        for name, process in processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in 20 s, killing it", name)
                process.kill()
        if we_started_services:
            stack.stop(settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
