"""The pipeline's alert rules (infra/prometheus/alerts.yml) in a real Prometheus scraping real
stages: every rule evaluates without error on what the stages export, each series a rule reads is
there with the labels the rule groups by, and a stage killed with `kill -9` is reported down
(issue 27). The thresholds themselves are unit-tested by promtool (tests/unit/test_prometheus_rules.py)."""
from __future__ import annotations

import json
import signal
import subprocess
import urllib.parse
import urllib.request

import yaml

from tests.conftest import (PROJECT_ROOT, free_port, metrics_url, prometheus_tool, run_script, start_script,
                            wait_for)
from tradewatch import bus, disk

STAGES = {"consumer": ("consumer.py",), "aggregator": ("aggregator.py",), "detector": ("anomaly_detector.py", "run")}


def api(base: str, path: str, **params) -> dict:
    url = f"{base}/api/v1/{path}" + ("?" + urllib.parse.urlencode(params) if params else "")
    answer = json.loads(urllib.request.urlopen(url, timeout=5).read())
    assert answer["status"] == "success", answer
    return answer["data"]


def series(base: str, expr: str) -> list[dict]:
    return api(base, "query", query=expr)["result"]


def test_rules_run_on_the_stages_metrics_and_a_killed_stage_is_reported_down(settings, tmp_path):
    logs = {name: tmp_path / f"{name}.log" for name in STAGES}
    running = {name: start_script(settings, *STAGES[name], log=logs[name]) for name in STAGES}
    targets = {name: metrics_url(logs[name], name).split("/")[2] for name in STAGES}

    # the shipped configuration with the stages' local ports for the Docker service names, and
    # scraped and evaluated every second (the rules' own durations stay as they are)
    config = yaml.safe_load((PROJECT_ROOT / "infra" / "prometheus" / "prometheus.yml").read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config["rule_files"] = [str(PROJECT_ROOT / "infra" / "prometheus" / "alerts.yml")]
    for group in config["scrape_configs"][0]["static_configs"]:
        service = group["labels"]["service"]
        group["targets"] = [targets[service] if service in targets else f"127.0.0.1:{free_port()}"]  # api: none
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([str(prometheus_tool("prometheus")), f"--config.file={tmp_path / 'prometheus.yml'}",
                               f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                              stdout=open(tmp_path / "prometheus.log", "wb"), stderr=subprocess.STDOUT)

    def log() -> str:
        return (tmp_path / "prometheus.log").read_text()[-2000:]

    def ready() -> bool:      # a loaded machine can take seconds to start it: wait, never assume
        assert server.poll() is None, f"prometheus exited with {server.returncode}:\n{log()}"
        try:
            return urllib.request.urlopen(f"{base}/-/ready", timeout=5).status == 200
        except OSError:       # not listening yet, or 503 while it starts
            return False
    try:
        run_script(settings, "producer.py", "--count", "2000", "--rate", "max", "--seed", "3")
        publisher = bus.publisher(settings)
        publisher.send(settings.trades_topic, b"AAPL", b"not json")      # a dead letter: its series appears
        assert publisher.flush(30)
        publisher.close()
        wait_for(ready, timeout=120, message="prometheus ready")

        # every series a rule reads, with the labels it groups by
        wait_for(lambda: len(series(base, "sum by (service, stage) (tradewatch_messages_in_total) >= 2001")) == 3,
                 timeout=120, message="every stage's messages scraped")
        assert {s["metric"]["stage"] for s in series(base, "sum by (service, stage) (tradewatch_lag_records)")} \
            == set(STAGES)
        wait_for(lambda: series(base, "sum by (service, stage) (tradewatch_dead_letters_total)"),
                 message="the dead letter counted")
        assert [s["metric"] for s in series(base, "sum by (service, stage) (tradewatch_dead_letters_total)")] \
            == [{"service": "consumer", "stage": "consumer"}]
        home = disk.usage(settings.home)
        free = series(base, "min by (folder) (tradewatch_disk_free_bytes)")
        assert [s["metric"] for s in free] == [{"folder": str(home.folder)}]
        assert abs(float(free[0]["value"][1]) - home.free) < 0.01 * home.total
        # each target is first scraped at its own offset within the interval: the stages' counters
        # can be complete at their first scrape, before the api's (nothing listens there) has run
        wait_for(lambda: len(series(base, "up")) == 4, timeout=30, message="every target scraped once")
        assert {s["metric"]["service"]: s["value"][1] for s in series(base, "up")} \
            == {"consumer": "1", "aggregator": "1", "detector": "1", "api": "0"}

        # a stage killed as an OOM killer would: down at the next scrape, the alert pending (it
        # fires after the rule's minute), and every rule evaluated without error
        running["detector"].send_signal(signal.SIGKILL)
        running["detector"].wait(timeout=30)

        def pending_down() -> set[str]:
            return {a["labels"]["service"] for a in api(base, "alerts")["alerts"]
                    if a["labels"]["alertname"] == "TradeWatchStageDown" and a["state"] == "pending"}
        wait_for(lambda: pending_down() == {"detector", "api"}, timeout=30, message="the detector reported down")
        rules = [r for g in api(base, "rules")["groups"] for r in g["rules"]]
        assert len(rules) == 5 and all(r["health"] == "ok" for r in rules), \
            [(r["name"], r.get("lastError")) for r in rules]
        active = {a["labels"]["alertname"] for a in api(base, "alerts")["alerts"]}
        assert active == {"TradeWatchStageDown"}, active     # a healthy pipeline raises nothing else
    finally:
        server.terminate()
        stopped = server.wait(timeout=30)
    assert stopped == 0, log()      # after the test's own failure, if any, so that it is the one reported
    for name in ("consumer", "aggregator"):
        running[name].send_signal(signal.SIGTERM)
        assert running[name].wait(timeout=60) == 0, name
