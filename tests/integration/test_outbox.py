"""The alert outbox (step 2 of the commit protocol) against the real Kafka and PostgreSQL: an alert
is marked published only once Kafka acknowledged it, each detector publishes the alerts of its own
partitions, the webhook gets every alert at least once however long it is down (issue 22), and
ALERT_ROUTES sends each severity to its channels, e-mail included (issue 27)."""
from __future__ import annotations

import base64
import email
import json
import signal
import socketserver
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
from confluent_kafka.admin import AlterConfigOpType, ConfigEntry, ConfigResource, NewTopic

from tests.conftest import query, run_script, start_script, wait_for
from tradewatch import bus


def examined(settings) -> int:
    return sum(c for c, _ in bus.group_lag(settings, settings.detector_group, settings.trades_topic).values())


def alert_ids(settings) -> set[str]:
    return {r[0] for r in query(settings, "SELECT alert_id FROM alerts")}


def on_topic(settings, expected: int = 0, timeout_s: float = 5) -> Counter:
    """How many times each alert id is on the alerts topic (read from the beginning)."""
    messages = bus.read_topic(settings, settings.alerts_topic, lambda got: expected and len(got) >= expected,
                              timeout_s=timeout_s)
    return Counter(json.loads(m.value)["alert_id"] for m in messages)


def test_alerts_kafka_refuses_stay_in_the_outbox_until_it_accepts_them(settings, tmp_path):
    """Item 2: an alerts topic whose max.message.bytes is smaller than an alert refuses every one;
    none may be marked published, and once the limit is raised every alert reaches the topic."""
    admin = bus.admin_client(settings)
    admin.create_topics([NewTopic(settings.alerts_topic, 1, 1, config={
        "message.timestamp.type": "LogAppendTime", "max.message.bytes": "200"})])[settings.alerts_topic].result(10)
    log = tmp_path / "detector.log"
    detector = start_script(settings, "anomaly_detector.py", "run", log=log)
    run_script(settings, "producer.py", "--count", "3000", "--rate", "max", "--seed", "5", "--anomaly-rate", "0.02")
    wait_for(lambda: examined(settings) == 3000, timeout=120, message="every trade examined")
    stored = wait_for(lambda: alert_ids(settings), message="alerts stored")
    wait_for(lambda: "refused" in log.read_text() or "did not accept" in log.read_text(), timeout=30,
             message="the refusal in the log")
    assert query(settings, "SELECT count(*) FROM alerts WHERE published_at IS NOT NULL")[0][0] == 0, \
        "an alert Kafka refused was marked published"
    assert not on_topic(settings)

    resource = ConfigResource("topic", settings.alerts_topic, incremental_configs=[
        ConfigEntry("max.message.bytes", "1048588", incremental_operation=AlterConfigOpType.SET)])
    admin.incremental_alter_configs([resource])[resource].result(10)
    wait_for(lambda: query(settings, "SELECT count(*) FROM alerts WHERE published_at IS NULL")[0][0] == 0,
             timeout=60, message="the outbox to empty once Kafka accepts alerts")
    assert set(on_topic(settings, len(stored), 30)) == alert_ids(settings) >= stored
    detector.send_signal(signal.SIGTERM)
    assert detector.wait(timeout=30) == 0
    text = log.read_text()
    assert text.count("refused") <= 10, "one line per retry round, not one per alert"


def test_two_detectors_each_publish_their_own_partitions_alerts(settings, tmp_path):
    """Item 2: with two detectors in one group, each alert is published by the detector that owns
    its partition — once, not once per detector."""
    bus.ensure_topic(settings, settings.alerts_topic, 1)
    detectors = [start_script(settings, "anomaly_detector.py", "run", log=tmp_path / f"detector{n}.log")
                 for n in (1, 2)]
    wait_for(lambda: len({o for (o,) in query(settings, "SELECT DISTINCT owner FROM partition_owners"
                                                         " WHERE consumer_group = %s",
                                              (settings.detector_group,))}) == 2,
             timeout=60, message="both detectors to hold partitions")
    for hour, seed in enumerate((11, 12, 13), start=10):     # an hour apart: past every alert cooldown
        run_script(settings, "producer.py", "--count", "4000", "--rate", "max", "--seed", str(seed),
                   "--anomaly-rate", "0.03", "--start", f"2026-01-05T{hour}:00:00Z")
    wait_for(lambda: examined(settings) == 12000, timeout=120, message="every trade examined")
    wait_for(lambda: query(settings, "SELECT count(*) FROM alerts WHERE published_at IS NULL")[0][0] == 0,
             timeout=60, message="every alert published")
    ids = alert_ids(settings)
    assert len(ids) > 60
    counts = on_topic(settings, len(ids), 30)
    assert set(counts) == ids
    doubled = {i: c for i, c in counts.items() if c > 1}
    assert not doubled, f"{len(doubled)} alerts published more than once in an undisturbed run"
    assert query(settings, "SELECT count(*) FROM alerts WHERE kafka_partition IS NULL")[0][0] == 0
    for detector in detectors:
        detector.send_signal(signal.SIGTERM)
        assert detector.wait(timeout=30) == 0


class Webhook:
    """A local Slack-style endpoint that can be down (HTTP 503) and up again."""

    def __init__(self):
        self.received: list[dict] = []
        self.refused = 0
        self.up = False
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if hook.up:
                    hook.received.append(body)
                else:
                    hook.refused += 1
                self.send_response(200 if hook.up else 503)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook/T0KEN-s3cret-9f8e7d"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def ids(self) -> Counter:
        return Counter(post["alert"]["alert_id"] for post in self.received)


@pytest.fixture
def webhook():
    hook = Webhook()
    yield hook
    hook.server.shutdown()


def test_webhook_down_across_a_restart_gets_every_alert_once_it_is_up(settings, webhook, tmp_path):
    """Item 3: the webhook is at least once — alerts raised while it is down are posted when it is
    up again, even after the detector was restarted meanwhile; its URL (a secret) is never logged."""
    settings = settings.with_overrides(alert_webhook_url=webhook.url)
    logs = [tmp_path / "detector1.log", tmp_path / "detector2.log"]
    detector = start_script(settings, "anomaly_detector.py", "run", log=logs[0])
    run_script(settings, "producer.py", "--count", "3000", "--rate", "max", "--seed", "5", "--anomaly-rate", "0.02")
    wait_for(lambda: examined(settings) == 3000, timeout=120, message="every trade examined")
    wait_for(lambda: query(settings, "SELECT count(*) FROM alerts WHERE published_at IS NULL")[0][0] == 0
             and alert_ids(settings), timeout=60, message="alerts on the Kafka topic")
    wait_for(lambda: webhook.refused >= 3, timeout=60, message="the webhook tried while down")
    detector.send_signal(signal.SIGTERM)
    assert detector.wait(timeout=30) == 0, "a webhook that is down does not hold up the stop"
    assert not webhook.received

    webhook.up = True
    detector = start_script(settings, "anomaly_detector.py", "run", log=logs[1])
    ids = alert_ids(settings)
    wait_for(lambda: set(webhook.ids()) >= ids, timeout=90, message="every alert at the webhook once it is up")
    # the outbox clears webhook_due after the endpoint's reply, so the last one clears just after its POST
    wait_for(lambda: query(settings, "SELECT count(*) FROM alerts WHERE webhook_due")[0][0] == 0, timeout=10,
             message="every delivered alert no longer due")
    detector.send_signal(signal.SIGTERM)
    assert detector.wait(timeout=30) == 0
    for log in logs:
        text = log.read_text()
        assert "T0KEN-s3cret" not in text and "/hook" not in text, "the webhook URL is a secret"
    assert "webhook" in logs[0].read_text(), "the outage is reported"


class SmtpSink:
    """A local SMTP server (EHLO, AUTH PLAIN, MAIL, RCPT, DATA) that keeps what it is sent, and
    can be down (421 at connect, as a server that is not taking mail answers)."""

    def __init__(self):
        self.messages: list[email.message.Message] = []
        self.logins: list[str] = []
        self.refused = 0
        self.up = False
        sink = self

        class Handler(socketserver.StreamRequestHandler):
            def reply(self, line: str) -> None:
                self.wfile.write(f"{line}\r\n".encode())

            def handle(self):
                if not sink.up:
                    sink.refused += 1
                    self.reply("421 not taking mail now")
                    return
                self.reply("220 sink ESMTP")
                while raw := self.rfile.readline():          # b"": the client hung up
                    line = raw.decode().rstrip("\r\n")
                    verb = line.split(" ", 1)[0].upper()
                    if verb == "EHLO":
                        self.reply("250-sink")
                        self.reply("250 AUTH PLAIN")
                    elif verb == "AUTH":
                        sink.logins.append(base64.b64decode(line.split()[2]).decode().split("\0")[1])
                        self.reply("235 ok")
                    elif verb in ("MAIL", "RCPT", "RSET", "NOOP", "HELO"):
                        self.reply("250 ok")
                    elif verb == "DATA":
                        self.reply("354 go on")
                        body = []
                        while (data := self.rfile.readline()) not in (b".\r\n", b""):
                            body.append(data[1:] if data.startswith(b"..") else data)
                        sink.messages.append(email.message_from_bytes(b"".join(body)))
                        self.reply("250 queued")
                    elif verb == "QUIT":
                        self.reply("221 bye")
                        return
                    else:
                        self.reply("502 no")

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def ids(self) -> Counter:
        return Counter(m["X-TradeWatch-Alert-Id"] for m in self.messages)


def test_alert_routes_deliver_each_severity_to_its_channels_at_least_once(settings, webhook, tmp_path):
    """#27 alert routing: CRITICAL to the webhook and by e-mail, HIGH to the webhook, MEDIUM to the
    log only; an SMTP server that refuses mail at first gets every CRITICAL alert once it takes mail,
    without holding up detection; the SMTP password is never logged."""
    smtp = SmtpSink()
    webhook.up = True
    settings = settings.with_overrides(
        alert_webhook_url=webhook.url, alert_routes="CRITICAL=webhook+email, HIGH=webhook, MEDIUM=log",
        smtp_host="127.0.0.1", smtp_port=smtp.port, smtp_starttls=False, smtp_user="tradewatch",
        smtp_password="p4ss-S3cret-smtp", alert_email_to="desk@example.org, lead@example.org")
    log = tmp_path / "detector.log"
    detector = start_script(settings, "anomaly_detector.py", "run", log=log)
    try:
        run_script(settings, "producer.py", "--count", "6000", "--rate", "max", "--seed", "5", "--anomaly-rate", "0.02")
        wait_for(lambda: examined(settings) == 6000, timeout=120, message="every trade examined, with SMTP down")
        by_severity = {s: {r[0] for r in query(settings, "SELECT alert_id FROM alerts WHERE severity = %s", (s,))}
                       for s in ("CRITICAL", "HIGH", "MEDIUM")}
        assert all(by_severity.values()), {s: len(ids) for s, ids in by_severity.items()}
        wait_for(lambda: smtp.refused >= 2, timeout=60, message="the e-mail outbox to retry while SMTP is down")
        assert not smtp.messages

        smtp.up = True
        wait_for(lambda: set(smtp.ids()) >= by_severity["CRITICAL"], timeout=90,
                 message="every CRITICAL alert mailed once the server takes mail")
        wait_for(lambda: set(webhook.ids()) >= by_severity["CRITICAL"] | by_severity["HIGH"], timeout=60,
                 message="every CRITICAL and HIGH alert at the webhook")
    finally:
        detector.send_signal(signal.SIGTERM)
        assert detector.wait(timeout=30) == 0
        smtp.server.shutdown()
    assert set(smtp.ids()) == by_severity["CRITICAL"], "only CRITICAL alerts are mailed"
    assert not set(webhook.ids()) & by_severity["MEDIUM"], "MEDIUM alerts go to the log only"
    assert query(settings, "SELECT count(*) FROM alerts WHERE email_due OR webhook_due")[0][0] == 0
    mail = smtp.messages[0]
    assert mail["To"] == "desk@example.org, lead@example.org" and mail["Subject"].startswith("[TradeWatch CRITICAL]")
    assert set(smtp.logins) == {"tradewatch"}, "SMTP_USER logged in"
    text = log.read_text()
    assert "p4ss-S3cret-smtp" not in text, "the SMTP password is a secret"
    assert "email at smtp://127.0.0.1" in text and "unavailable" in text, "the outage is reported"
