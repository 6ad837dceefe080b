"""`python -m tradewatch doctor` against the real services: it says what is up, what is not, and
how to fix it, and exits 1 when anything failed."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

from tests.conftest import query, start_script, wait_for
from tradewatch import bus
from tradewatch.config import PROJECT_ROOT


def doctor(settings) -> tuple[int, dict[str, str]]:
    result = subprocess.run([sys.executable, "-m", "tradewatch", "doctor"], cwd=PROJECT_ROOT, capture_output=True,
                            text=True, timeout=120, env={**os.environ, **settings.as_env()})
    assert "Traceback" not in result.stdout + result.stderr, result.stderr
    lines = {}
    for line in result.stdout.splitlines():
        if line[:1] in "✔✘":
            name = line[2:].split(":", 1)[0]
            lines[name] = line
        elif line.strip().startswith("fix:"):
            lines[name] += "\n" + line.strip()
    return result.returncode, lines


def test_doctor_reports_services_and_stages(settings, tmp_path):
    bus.ensure_topic(settings, settings.alerts_topic, 1)
    code, lines = doctor(settings)
    assert code == 1, "no stage runs yet"
    for name in ("Java", "Kafka jars", "Kafka", f"topic {settings.trades_topic}", f"topic {settings.alerts_topic}",
                 "PostgreSQL", "schema"):
        assert lines[name].startswith("✔"), lines[name]
    assert lines["stage consumer"].startswith("✘ stage consumer: down · not started")
    assert "fix: start it: `python consumer.py`" in lines["stage consumer"]
    assert lines["API port"].startswith("✘ API port") and "`python api.py`" in lines["API port"]
    assert re.match(r"✔ database: \d+\.\d\d GiB; no trades yet; oldest partition none; archive 0\.00 GiB in \S+/archive$",
                    lines["database"]), lines["database"]
    assert re.match(r"[✔✘] free disk: \d+\.\d GiB free \(\d+ %\) at ", lines["free disk"]), lines["free disk"]

    consumer = start_script(settings, "consumer.py", log=tmp_path / "consumer.log")
    wait_for(lambda: query(settings, "SELECT 1 FROM stage_health WHERE pid = %s AND state = 'running'"
                                     " AND cardinality(partitions) > 0", (consumer.pid,)), message="consumer up")
    # up once a beat has said lag 0 (beats are at most a second apart)
    wait_for(lambda: doctor(settings)[1]["stage consumer"].startswith("✔ stage consumer: up · lag 0"), timeout=30,
             message="doctor to show the consumer up with lag 0")
    consumer.send_signal(signal.SIGTERM)
    assert consumer.wait(timeout=30) == 0
    _, lines = doctor(settings)
    assert lines["stage consumer"].startswith("✘ stage consumer: stopped"), lines["stage consumer"]


def test_doctor_reports_a_stopped_kafka_and_postgres_with_the_fix(settings):
    nothing = settings.with_overrides(kafka_bootstrap_servers="127.0.0.1:1", postgres_port=1)
    started = time.monotonic()
    code, lines = doctor(nothing)
    assert code == 1 and time.monotonic() - started < 60
    assert lines["Kafka"].startswith("✘ Kafka: cannot reach Kafka at 127.0.0.1:1")
    assert "fix: start it with `make services`" in lines["Kafka"]
    assert lines["PostgreSQL"].startswith("✘ PostgreSQL") and "make services" in lines["PostgreSQL"]
    assert lines["stages"].startswith("✘ stages: cannot read their heartbeats")
