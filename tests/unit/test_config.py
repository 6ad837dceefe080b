import os
import re
import subprocess

import pytest
import yaml
from dotenv import dotenv_values

from tradewatch.config import PROJECT_ROOT, Settings


def test_environment_overrides_env_file(monkeypatch, tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text("POSTGRES_PORT=6000\nTRADES_TOPIC=from-file\n")
    monkeypatch.setenv("TRADES_TOPIC", "from-env")
    settings = Settings.load(env_file)
    assert settings.postgres_port == 6000 and settings.trades_topic == "from-env"
    assert Settings.load(env_file, trades_topic="explicit").trades_topic == "explicit"


def test_bad_numbers_in_settings_are_named(monkeypatch, tmp_path):
    monkeypatch.setenv("POSTGRES_PORT", "fivefourthreetwo")
    try:
        Settings.load(tmp_path / "missing.env")
    except ValueError as error:
        assert "POSTGRES_PORT must be a whole number" in str(error)
    else:
        raise AssertionError("a non-numeric port must be refused")


def test_docker_compose_agrees_with_env_file():
    env = dotenv_values(PROJECT_ROOT / ".env")
    compose_text = (PROJECT_ROOT / "docker-compose.yml").read_text()
    # every ${VAR} the compose file uses is defined in .env, so `docker compose` fills the same values
    used = set(re.findall(r"\$\{(\w+)\}", compose_text))
    assert used and used <= set(env), used - set(env)
    compose = yaml.safe_load(compose_text)
    services = compose["services"]
    settings = Settings.load()
    kafka_host_port = settings.kafka_bootstrap_servers.rsplit(":", 1)[1]
    assert f"127.0.0.1:{kafka_host_port}:9092" in services["kafka"]["ports"]
    assert "HOST://127.0.0.1:9092" in services["kafka"]["environment"]["KAFKA_ADVERTISED_LISTENERS"]
    assert "127.0.0.1:${POSTGRES_PORT}:5432" in services["postgres"]["ports"]
    pg_env = services["postgres"]["environment"]
    assert (pg_env["POSTGRES_DB"], pg_env["POSTGRES_USER"]) == ("${POSTGRES_DB}", "${POSTGRES_USER}")
    assert pg_env["POSTGRES_PASSWORD"].startswith("${POSTGRES_PASSWORD:?"), "required: no default that works"
    apps = [name for name, spec in services.items() if "build" in spec]
    assert {"producer", "consumer", "aggregator", "detector", "dashboard", "api", "reports", "flink-job"} <= set(apps)
    assert "127.0.0.1:${API_PORT}:${API_PORT}" in services["api"]["ports"]
    assert {"jobmanager", "taskmanager"} <= set(services)
    assert services["flink-job"]["command"].endswith("--jobmanager jobmanager:8081")
    for name in apps:
        spec = services[name]
        assert spec["env_file"] == ".env"
        assert set(spec["environment"]) == {"KAFKA_BOOTSTRAP_SERVERS", "POSTGRES_HOST", "POSTGRES_PORT",
                                            "METRICS_ADDRESS"} | ({"API_KEY", "API_ALLOWED_HOSTS"} if name == "api"
                                                                 else set())
        assert spec["environment"]["KAFKA_BOOTSTRAP_SERVERS"].split(":")[0] == "kafka"


def test_kafka_cluster_ids_never_look_like_an_option():
    # 1 in 64 random ids starts with '-', which kafka-storage's parser took for an option
    from tradewatch.stack import _new_cluster_id

    ids = [_new_cluster_id() for _ in range(5000)]
    assert not any(i.startswith("-") for i in ids)
    assert len(set(ids)) == len(ids) and all(len(i) == 22 for i in ids)


def test_log_format_json_gives_one_object_per_line():
    import json
    import subprocess
    import sys

    from tradewatch.config import PROJECT_ROOT
    code = ("import logging; from tradewatch.cli import setup_logging; setup_logging(); "
            "logging.getLogger('tradewatch.consumer').warning('dead letter %s', 'x', extra={'partition': 3, 'offset': 7})")
    for fmt in ("json", "text"):
        out = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True, text=True,
                             env={"LOG_FORMAT": fmt, "PATH": "/usr/bin:/bin"}, timeout=60).stderr.strip()
        if fmt == "json":
            entry = json.loads(out)
            assert entry["level"] == "WARNING" and entry["stage"] == "consumer" and entry["message"] == "dead letter x"
            assert entry["partition"] == 3 and entry["offset"] == 7 and entry["timestamp"].endswith("+00:00")
        else:
            assert out.endswith("WARNING tradewatch.consumer: dead letter x")


def test_prometheus_and_grafana_files_match_the_stages_metrics():
    """infra/ for Docker users: the scrape targets are the stages' metrics ports from .env, and every
    Grafana query names a metric the stages export."""
    import json

    from prometheus_client.metrics import MetricWrapperBase

    from tradewatch import prometheus
    env = dotenv_values(PROJECT_ROOT / ".env")
    scrape = yaml.safe_load((PROJECT_ROOT / "infra" / "prometheus" / "prometheus.yml").read_text())
    targets = {t for job in scrape["scrape_configs"] for group in job["static_configs"] for t in group["targets"]}
    assert targets == {f"consumer:{env['CONSUMER_METRICS_PORT']}", f"aggregator:{env['AGGREGATOR_METRICS_PORT']}",
                       f"detector:{env['DETECTOR_METRICS_PORT']}", f"api:{env['API_PORT']}"}
    exported = {m._name + suffix for m in vars(prometheus).values() if isinstance(m, MetricWrapperBase)
                for suffix in ("", "_total", "_bucket", "_count", "_sum")}
    dashboard = json.loads((PROJECT_ROOT / "infra" / "grafana" / "dashboards" / "tradewatch.json").read_text())
    used = {name for panel in dashboard["panels"] for t in panel["targets"]
            for name in re.findall(r"tradewatch_\w+", t["expr"])}
    assert used and used <= exported, used - exported
    services = yaml.safe_load((PROJECT_ROOT / "docker-compose.yml").read_text())["services"]
    assert {"prometheus", "grafana"} <= set(services)
    # the rule file sits beside the configuration that names it
    mounts = dict(v.rsplit(":", 1)[0].split(":") for v in services["prometheus"]["volumes"])
    assert mounts == {f"./infra/prometheus/{name}": f"/etc/prometheus/{name}"
                      for name in ("prometheus.yml", *scrape["rule_files"])}
    assert services["consumer"]["environment"]["METRICS_ADDRESS"] == "0.0.0.0"


def test_docker_compose_file_is_valid_compose_with_the_env_values():
    """Debian's docker-compose (the Compose file parser and validator; no engine needed) accepts the
    file, and the configuration it resolves carries .env's ports and settings into every service."""
    compose = ["docker-compose", "-f", str(PROJECT_ROOT / "docker-compose.yml"), "config"]
    chosen = {"POSTGRES_PASSWORD": "chosen-by-the-user", "API_KEY": "another-one"}
    for missing in chosen:        # no default that works: each must be set
        unset = subprocess.run(compose, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=60,
                               env={**{k: v for k, v in os.environ.items() if k not in chosen},
                                    **{k: v for k, v in chosen.items() if k != missing}})
        assert unset.returncode != 0 and f"set {missing} in .env" in unset.stderr, unset.stderr
    result = subprocess.run(compose, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=60,
                            env={**os.environ, **chosen})
    assert result.returncode == 0, result.stderr
    resolved = yaml.safe_load(result.stdout)["services"]
    env = dotenv_values(PROJECT_ROOT / ".env")
    assert set(resolved) >= {"kafka", "postgres", "consumer", "producer", "aggregator", "detector", "dashboard", "api",
                             "reports", "jobmanager", "taskmanager", "flink-job", "prometheus", "grafana"}
    assert resolved["postgres"]["ports"] == [f"127.0.0.1:{env['POSTGRES_PORT']}:5432/tcp"]
    published = [p for spec in resolved.values() for p in spec.get("ports", [])]
    assert published and all(isinstance(p, str) and p.startswith("127.0.0.1:") for p in published), published
    assert "web.submit.enable: false" in resolved["jobmanager"]["environment"]["FLINK_PROPERTIES"]
    dockerfile = (PROJECT_ROOT / "Dockerfile").read_text().splitlines()
    users = [line.split()[1] for line in dockerfile if line.startswith("USER ")]
    assert users and users[-1] not in ("root", "0"), "the app image runs as an unprivileged user"
    assert resolved["api"]["ports"] == [f"127.0.0.1:{env['API_PORT']}:{env['API_PORT']}/tcp"]
    for name, spec in resolved.items():
        if "build" in spec:
            assert spec["environment"]["POSTGRES_HOST"] == "postgres" and spec["environment"]["TRADES_TOPIC"] == \
                env["TRADES_TOPIC"], name
        else:
            assert ":" in spec["image"] and not spec["image"].endswith(":latest"), f"{name}: a pinned image tag"


def test_a_three_node_cluster_gets_every_node_address_ports_and_replication(tmp_path):
    from tradewatch import stack

    settings = Settings.load(tradewatch_home=str(tmp_path), kafka_brokers=3,
                             kafka_bootstrap_servers="127.0.0.1:9092", kafka_controller_port=9093)
    assert settings.kafka_bootstrap_servers == "127.0.0.1:9092,127.0.0.1:9192,127.0.0.1:9292"
    assert settings.with_overrides(trades_topic="t").kafka_bootstrap_servers == settings.kafka_bootstrap_servers
    assert Settings.load(kafka_brokers=3, **{k.lower(): v for k, v in settings.as_env().items()
                                            if k == "KAFKA_BOOTSTRAP_SERVERS"}).kafka_nodes == settings.kafka_nodes
    config = stack._write_kafka_config(settings, 2).read_text()
    assert "node.id=2\n" in config
    assert "controller.quorum.voters=1@127.0.0.1:9093,2@127.0.0.1:9193,3@127.0.0.1:9293\n" in config
    assert "listeners=PLAINTEXT://127.0.0.1:9192,CONTROLLER://127.0.0.1:9193\n" in config
    for line in ("default.replication.factor=3", "min.insync.replicas=2", "offsets.topic.replication.factor=3",
                 "transaction.state.log.min.isr=2"):
        assert line + "\n" in config
    single = stack._write_kafka_config(Settings.load(tradewatch_home=str(tmp_path / "one")), 1).read_text()
    assert "default.replication.factor=1\n" in single and "min.insync.replicas=1\n" in single


def test_a_home_made_for_one_broker_refuses_a_cluster_of_three_with_a_clear_message(tmp_path):
    import pytest

    from tradewatch import stack

    single = Settings.load(tradewatch_home=str(tmp_path))
    stack._cluster_id(single)                                   # a new home: made for one broker
    data = stack.kafka_paths(single)[0]
    data.mkdir(parents=True)
    (data / "meta.properties").write_text("cluster.id=abc\nnode.id=1\n")
    assert stack._cluster_id(single) == "abc"
    with pytest.raises(stack.StackError, match="holds a Kafka cluster of 1 broker.*KAFKA_BROKERS=3"):
        stack._cluster_id(single.with_overrides(kafka_brokers=3, kafka_bootstrap_servers="127.0.0.1:9092"))


def test_acknowledging_beyond_this_machine_needs_the_api_key():
    from tradewatch.access import key_matches, may_acknowledge
    assert may_acknowledge("127.0.0.1", "", None) == (True, "")
    allowed, note = may_acknowledge("0.0.0.0", "", None)
    assert not allowed and "API_KEY is not set" in note
    assert may_acknowledge("", "k3y", "wrong")[0] is False
    assert may_acknowledge("", "k3y", "k3y") == (True, "")
    assert not key_matches("anything", "") and not key_matches(None, "k3y") and key_matches("k3y", "k3y")


def test_dead_letter_labels_come_from_a_fixed_list_and_their_log_lines_are_bounded(caplog):
    """10,000 distinct malformed messages: at most len(REASON_KINDS) + 1 label values, and at most
    20 WARNING lines a minute plus one summary of the rest."""
    import logging

    from tradewatch.events import InvalidTrade, parse_trade
    from tradewatch.stages.consumer import DeadLetterLog
    from tradewatch.prometheus import REASON_KINDS, reason_kind
    from tradewatch.store.writer import DeadLetter

    reasons = []
    for i in range(10_000):
        raw = [b"{", b'{"schema_version": 1, "trade_id": "x%d!", "symbol": "A"}' % i, bytes([i % 256]) * (i % 7 + 1),
               b'{"schema_version": 1, "trade_id": "t", "symbol": "S%d", "timestamp_ms": 1, "price": "p%d"}' % (i, i),
               b'{"schema_version": 1, "trade_id": "t%d", "symbol": "%s", "timestamp_ms": 1767225600000,'
               b' "price": 1, "quantity": 1, "side": "hold%d", "exchange": "X"}' % (i, b"Z" * (i % 9 + 1), i)][i % 5]
        try:
            parse_trade(raw, 1767225600000)
        except InvalidTrade as error:
            reasons.append(str(error))
    assert len(set(reasons)) > 3_000, "distinct reasons, many with the sender's words in them"
    kinds = {reason_kind(r) for r in reasons}
    assert kinds <= {k for k, _ in REASON_KINDS} | {"other"} and "other" not in kinds, kinds

    now = [0.0]
    say = DeadLetterLog(clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="tradewatch.consumer"):
        for n, reason in enumerate(reasons):
            now[0] = n * 0.012                     # 10,000 in two minutes
            say(DeadLetter("trades", 0, n, None, b"", reason, None))
        say.flush()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) <= 3 * 20 + 3, len(lines)
    assert sum(int(line.split()[0]) for line in lines if "more dead letters" in line) + \
        sum(line.startswith("dead letter ") for line in lines) == len(reasons)


def test_report_lists_are_capped_with_the_rest_summed():
    from tradewatch.report import capped
    rows = [[f"reason {i}", 10 - i % 10] for i in range(10_000)]
    shown = capped(rows, 20, "reasons")
    assert len(shown) == 21 and shown[:2] == [["reason 0", "10"], ["reason 1", "9"]]
    assert shown[-1] == ["… and 9,980 more reasons", f"{sum(n for _, n in rows[20:]):,}"]
    assert capped(rows[:3], 20, "reasons") == [["reason 0", "10"], ["reason 1", "9"], ["reason 2", "8"]]


def test_window_sizes_are_read_once_smallest_first_in_the_tables_labels():
    settings = Settings.load(window_sizes="15m, 1m,5m,60s,1h")
    assert settings.window_sizes_ms == (60_000, 300_000, 900_000, 3_600_000)
    assert settings.window_labels == ("1m", "5m", "15m", "1h")


def test_alert_routes_map_each_severity_to_its_channels():
    """ALERT_ROUTES (#27): unnamed severities and `log` deliver nowhere but the log; empty keeps the
    old behaviour (every alert to the webhook when one is set); secrets stay out of repr()."""
    settings = Settings.load(alert_routes=" critical=webhook+EMAIL , HIGH=webhook,MEDIUM=log",
                             alert_webhook_url="https://hooks.example/T0KEN", smtp_host="mail.example",
                             alert_email_to="desk@example.org", smtp_password="pw-S3cret")
    assert settings.routes == {"CRITICAL": {"webhook", "email"}, "HIGH": {"webhook"}, "MEDIUM": set(), "LOW": set()}
    assert Settings.load(alert_webhook_url="https://hooks.example/x").routes["MEDIUM"] == {"webhook"}
    assert set().union(*Settings.load(alert_webhook_url="").routes.values()) == set()
    assert "T0KEN" not in repr(settings) and "pw-S3cret" not in repr(settings)
    with pytest.raises(ValueError, match="SMTP_HOST or ALERT_EMAIL_TO is empty"):
        Settings.load(alert_routes="CRITICAL=email")
