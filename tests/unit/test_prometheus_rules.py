"""The pipeline's Prometheus alert rules (infra/prometheus/alerts.yml) checked and unit-tested by
promtool, the way Prometheus itself loads them (issue 27)."""
from __future__ import annotations

import re
import shutil
import subprocess

import pytest
import yaml

from tests.conftest import prometheus_tool
from tradewatch import prometheus
from tradewatch.config import PROJECT_ROOT

RULES = PROJECT_ROOT / "infra" / "prometheus"


def promtool(*args: str, cwd=RULES) -> subprocess.CompletedProcess:
    return subprocess.run([str(prometheus_tool("promtool")), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=60)


def alert_names() -> list[str]:
    groups = yaml.safe_load((RULES / "alerts.yml").read_text())["groups"]
    return [rule["alert"] for group in groups for rule in group["rules"]]


def test_config_and_rules_are_valid():
    checked = promtool("check", "config", "prometheus.yml")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(alert_names())} rules found" in checked.stdout


def test_every_rule_fires_and_stays_quiet_as_its_unit_tests_say():
    tested = promtool("test", "rules", "alerts.test.yml")
    assert tested.returncode == 0, tested.stdout + tested.stderr
    cases = yaml.safe_load((RULES / "alerts.test.yml").read_text())["tests"]
    fired = {case["alertname"] for test in cases for case in test["alert_rule_test"] if case["exp_alerts"]}
    quiet = {case["alertname"] for test in cases for case in test["alert_rule_test"] if not case["exp_alerts"]}
    assert fired == set(alert_names()), "every rule has a case where it fires"
    assert quiet == set(alert_names()) - {"TradeWatchDiskLow"}, "and one where it stays quiet"
    # (the disk cases are in one test: the folders that stay quiet are absent from its expected alerts)


@pytest.mark.parametrize("change", [
    ("> 30 * sum", "> 300 * sum"),                      # lag: 30 s of reading became 300 s
    ("0.10 * max", "0.05 * max"),                       # disk: 10 % became 5 %
    ("> 0.01 * sum", "> 0.03 * sum"),                   # dead letters: 1 % became 3 %
    ("[10m])) == 0", "[5m])) == 0"),                    # no trades: 10 minutes became 5
    ("for: 1m", "for: 10s"),                            # stage down: a minute became 10 s
    (" offset 10m)", ")"),                              # no trades: judged before 10 minutes were seen
])
def test_the_unit_tests_catch_a_changed_threshold(tmp_path, change):
    """The cases sit on each threshold's both sides: moving one makes promtool's test fail."""
    shutil.copy(RULES / "alerts.test.yml", tmp_path)
    text = (RULES / "alerts.yml").read_text()
    assert change[0] in text
    (tmp_path / "alerts.yml").write_text(text.replace(change[0], change[1], 1))
    tested = promtool("test", "rules", "alerts.test.yml", cwd=tmp_path)
    assert tested.returncode == 1 and "FAILED" in tested.stdout + tested.stderr, tested.stdout + tested.stderr


def test_rules_name_only_metrics_the_stages_export():
    from prometheus_client.metrics import MetricWrapperBase
    exported = {m._name + suffix for m in vars(prometheus).values() if isinstance(m, MetricWrapperBase)
                for suffix in ("", "_total", "_bucket", "_count", "_sum")} | {"up"}
    used = set(re.findall(r"\b(tradewatch_\w+|up)\{?", (RULES / "alerts.yml").read_text()))
    assert {"up", "tradewatch_lag_records", "tradewatch_disk_free_bytes"} <= used <= exported, used - exported


def test_doctor_and_the_health_strip_draw_the_disk_line_where_the_rule_does():
    """The folders of alerts.test.yml's disk case: /data and /laptop fire there, /big and /small not."""
    from tradewatch.disk import Disk
    cases = {"/data": (8e9, 100e9), "/laptop": (1.5e9, 10e9), "/big": (12e9, 100e9), "/small": (2.5e9, 10e9)}
    assert {name for name, (free, total) in cases.items() if Disk(name, free, total).low} == {"/data", "/laptop"}
    text = (RULES / "alerts.test.yml").read_text()
    assert all(f'folder="{name}"' in text for name in cases)
