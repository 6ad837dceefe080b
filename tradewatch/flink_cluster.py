"""A Flink standalone cluster on this machine, from the distribution PyFlink ships (its
`bin/jobmanager.sh` and `bin/taskmanager.sh`): a JobManager and N TaskManagers, each its own JVM,
with a configuration generated under `$TRADEWATCH_HOME/flink/conf` (ports from .env, small memory,
one slot per TaskManager so a job of parallelism N spreads over all of them).

    python -m tradewatch.flink_cluster start [--taskmanagers 2]     (make flink-cluster)
    python -m tradewatch.flink_cluster stop                         (make flink-stop)
    python -m tradewatch.flink_cluster status

Then `python flink_job.py --jobmanager 127.0.0.1:$FLINK_REST_PORT --parallelism 2` submits the job;
the web UI is http://127.0.0.1:$FLINK_REST_PORT.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pyflink

from tradewatch.cli import setup_logging
from tradewatch.config import Settings

log = logging.getLogger("tradewatch.flink")
FLINK_HOME = Path(pyflink.__file__).resolve().parent


def _dirs(settings: Settings) -> dict[str, Path]:
    base = settings.home / "flink"
    return {"conf": base / "conf", "log": base / "log", "run": base / "run"}


def write_config(settings: Settings) -> Path:
    dirs = _dirs(settings)
    for path in dirs.values():
        path.mkdir(parents=True, exist_ok=True)
    for name in ("log4j.properties", "log4j-console.properties", "log4j-cli.properties", "logback.xml"):
        shutil.copy(FLINK_HOME / "conf" / name, dirs["conf"] / name)
    shipped = (FLINK_HOME / "conf" / "config.yaml").read_text()
    java_opts = next(line.split("all:", 1)[1].strip() for line in shipped.splitlines() if line.strip().startswith("all:"))
    config = {
        "env.java.opts.all": java_opts,
        "jobmanager.bind-host": "127.0.0.1",
        "jobmanager.rpc.address": "127.0.0.1",
        "jobmanager.rpc.port": settings.flink_rpc_port,
        "jobmanager.memory.process.size": "768m",
        "jobmanager.execution.failover-strategy": "region",
        "taskmanager.bind-host": "127.0.0.1",
        "taskmanager.host": "127.0.0.1",
        "taskmanager.numberOfTaskSlots": 1,
        "taskmanager.memory.process.size": "1024m",
        "rest.address": "127.0.0.1",
        "rest.bind-address": "127.0.0.1",
        "rest.port": settings.flink_rest_port,
        "parallelism.default": 1,
        # a killed TaskManager is noticed within seconds, and the job waits for a slot again. The
        # interval must stay well below the timeout: at Flink's default interval (10 s) one late
        # beat on a busy machine timed the TaskManagers out, and the job restarted every ~15 s
        "heartbeat.interval": 2000,
        "heartbeat.timeout": 10000,
        "restart-strategy.type": "fixed-delay",
        "restart-strategy.fixed-delay.attempts": 1000,
        "restart-strategy.fixed-delay.delay": "2 s",
        "slot.request.timeout": 60000,
    }
    (dirs["conf"] / "config.yaml").write_text("".join(f"{k}: {json.dumps(v) if isinstance(v, str) else v}\n"
                                                      for k, v in config.items()))
    return dirs["conf"]


def _env(settings: Settings) -> dict[str, str]:
    dirs = _dirs(settings)
    return {**os.environ, "FLINK_CONF_DIR": str(dirs["conf"]), "FLINK_LOG_DIR": str(dirs["log"]),
            "FLINK_PID_DIR": str(dirs["run"]), "FLINK_HOME": str(FLINK_HOME)}


def _script(settings: Settings, name: str, *args: str, check: bool = True) -> None:
    subprocess.run(["bash", str(FLINK_HOME / "bin" / name), *args], env=_env(settings), check=check,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=120)


def overview(settings: Settings, timeout_s: float = 2.0) -> dict | None:
    """The REST API's /overview (TaskManagers, slots, jobs), or None when nothing answers."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{settings.flink_rest_port}/overview", timeout=timeout_s) as r:
            return json.loads(r.read())
    except (OSError, ValueError):
        return None


def start_taskmanager(settings: Settings) -> None:
    _script(settings, "taskmanager.sh", "start")


def start(settings: Settings, taskmanagers: int = 2, timeout_s: float = 120.0) -> dict:
    write_config(settings)
    if overview(settings) is None:
        _script(settings, "jobmanager.sh", "start")
    running = (overview(settings, 5) or {}).get("taskmanagers", 0)
    for _ in range(max(taskmanagers - running, 0)):
        start_taskmanager(settings)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state = overview(settings)
        if state and state.get("taskmanagers", 0) >= taskmanagers:
            log.info("Flink cluster up: %d TaskManagers, %d slots, web UI http://127.0.0.1:%d",
                     state["taskmanagers"], state["slots-total"], settings.flink_rest_port)
            return state
        time.sleep(0.5)
    raise RuntimeError(f"the Flink cluster did not come up within {timeout_s:.0f}s; see {_dirs(settings)['log']}")


def stop(settings: Settings) -> None:
    if not _dirs(settings)["conf"].exists():
        return
    for name in ("taskmanager.sh", "jobmanager.sh"):
        _script(settings, name, "stop-all", check=False)      # a killed one's pid is gone already
    log.info("Flink cluster stopped")


def taskmanager_pids(settings: Settings) -> list[int]:
    pid_files = _dirs(settings)["run"].glob("*taskexecutor*.pid")
    return [int(line) for f in pid_files for line in f.read_text().split() if line.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="A local Flink standalone cluster (JobManager + TaskManagers).")
    parser.add_argument("command", choices=("start", "stop", "status"))
    parser.add_argument("--taskmanagers", type=int, default=2)
    args = parser.parse_args(argv)
    setup_logging()
    settings = Settings.load()
    if args.command == "start":
        start(settings, args.taskmanagers)
    elif args.command == "stop":
        stop(settings)
    else:
        state = overview(settings)
        print(json.dumps(state, indent=2) if state else f"no Flink cluster on port {settings.flink_rest_port}")
        return 0 if state else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
