"""Step 2 of the commit protocol (tradewatch/runtime.py): the outboxes.

The aggregator's checkpoint queues each final candle in `candle_outbox`; `CandleOutbox` publishes
them to the `candles` topic as `AlertOutbox` (below) publishes alerts — one `KafkaOutbox`.

The detector's checkpoint stores each alert with the trades partition it came from, unpublished
(`published_at` NULL, and `webhook_due` / `email_due` as ALERT_ROUTES sends its severity); the
quotes stage's stores its book alerts the same way with its `quotes` partition, `source` 'quotes'.
Two deliveries then work from the table, each for the stage's own alerts (`source`) of the
partitions this process holds, so with N detectors each alert is sent by its partition's owner:

Each is a sink of the stage runtime (`Stage.outboxes`): woken when alerts were stored (and on
every assignment: a former owner may have left some), delivered by the runtime after each commit
and while idle, closed when the stage stops.

- **Kafka** (`AlertOutbox`, a `KafkaOutbox`, on the stage's thread after each commit and while
  idle): oldest first, each alert sent and waited for; only those Kafka acknowledged are marked
  published. Refused ones (a topic limit, a broken ACL …) stay, one log line per round, tried
  again every RETRY_S — nothing refused is ever marked sent.
- **Routes** (ALERT_ROUTES: each severity to webhook, email or the log only; a `DeliveryOutbox`
  per channel, each a thread of its own so a slow endpoint never holds up detection): oldest
  first, one at a time; a delivery clears the alert's `webhook_due` / `email_due`; a failure backs
  off (up to WEBHOOK_BACKOFF_MAX_S) and tries the same alert again, for as long as it takes —
  across restarts too, since the table is the queue. `WebhookOutbox` POSTs (the URL is a secret:
  logs name only its host); `EmailOutbox` mails over SMTP (STARTTLS, login from settings; the
  password is never logged).

All are at least once: a crash between the delivery and the mark sends that alert (candle) again
(readers dedupe by alert_id, candle_id).
"""
from __future__ import annotations

import json
import logging
import smtplib
import ssl
import threading
import time
from dataclasses import asdict
from email.message import EmailMessage
from urllib.parse import urlsplit

import psycopg2
import requests

from tradewatch import bus
from tradewatch.config import Settings
from tradewatch.store import candles as candle_store
from tradewatch.store import db
from tradewatch.store import detections as store

log = logging.getLogger("tradewatch.outbox")
BATCH = 1000
RETRY_S = 5.0
WEBHOOK_TIMEOUT_S = 3.0
WEBHOOK_BACKOFF_MAX_S = 30.0


def redact(url: str) -> str:
    """What a log may say about a URL: scheme, host and port (path and query carry tokens)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname or '?'}" + (f":{parts.port}" if parts.port else "")


class KafkaOutbox:
    """Publishes the rows a stage's checkpoint left in an outbox table to a Kafka topic, for the
    partitions the stage holds. Subclasses say where the rows are (`unpublished`: (id, key, value)
    oldest first) and how one is marked published (`mark`)."""
    what = ""

    def __init__(self, settings: Settings, topic: str):
        self.settings, self.topic = settings, topic
        self.waiting = True          # a previous run (or owner) may have left rows unpublished
        self.retry_at = 0.0
        self.sent = 0

    def unpublished(self, cur, partitions: list[int], limit: int) -> list[tuple[object, bytes, bytes]]:
        raise NotImplementedError

    def mark(self, cur, ids: list) -> None:
        raise NotImplementedError

    def wake(self) -> None:
        """Rows were stored (or partitions gained): look in the table at the next delivery."""
        self.waiting = True

    def close(self) -> None:
        """Nothing of its own: the runtime closes its publisher."""

    def deliver(self, rt) -> None:
        """Send this process's unpublished rows to Kafka; called by the runtime after each commit
        and while idle. Returns early (they stay in the outbox) on a stop or a refusal."""
        if not self.waiting or time.monotonic() < self.retry_at or not rt.epochs:
            return
        if rt.publisher is None:
            rt.publisher = rt.wait_for("Kafka", lambda: bus.publisher(self.settings, stop=rt.stop))
        partitions = sorted(rt.epochs)
        while True:
            rows = rt.transaction(lambda _conn, cur: self.unpublished(cur, partitions, BATCH))
            answers: dict[object, str | None] = {}
            for row_id, key, value in rows:
                if not rt.publisher.send(self.topic, key, value,
                                         on_delivery=lambda error, i=row_id: answers.__setitem__(i, error)):
                    break       # asked to stop while Kafka was away
            finished = rt.publisher.flush() if rows else True
            acknowledged = [i for i, error in list(answers.items()) if error is None]
            if acknowledged:
                rt.transaction(lambda _conn, cur: self.mark(cur, acknowledged))
                self.sent += len(acknowledged)
            refused = {i: error for i, error in list(answers.items()) if error is not None}
            if refused:
                log.warning("Kafka refused %d of %d %s on topic %s (%s); they stay in the outbox, tried "
                            "again in %.0f s", len(refused), len(rows), self.what, self.topic,
                            next(iter(refused.values())), RETRY_S)
                self.retry_at = time.monotonic() + RETRY_S
                return
            if not finished:
                return          # stopping: unacknowledged rows stay unpublished
            if len(rows) < BATCH:
                self.waiting = False
                return


class AlertOutbox(KafkaOutbox):
    """A stage's alerts (`alerts.published_at`; `source`: detector or quotes) to the `alerts`
    topic, keyed by symbol."""
    what = "alerts"

    def __init__(self, settings: Settings, source: str = "detector"):
        super().__init__(settings, settings.alerts_topic)
        self.source = source

    def unpublished(self, cur, partitions, limit):
        return [(a.alert_id, a.symbol.encode(), a.to_json_bytes())
                for a in store.unpublished_alerts(cur, partitions, limit, self.source)]

    def mark(self, cur, ids):
        store.mark_published(cur, ids)


class CandleOutbox(KafkaOutbox):
    """The aggregator's final candles (`candle_outbox`) to the `candles` topic, keyed by symbol,
    each with its indicators (tradewatch/candles.py `message`). Published rows are kept a day, for
    a resumed candle stream, then deleted here (at most once an hour)."""
    what = "candles"
    KEPT = "1 day"
    PRUNE_EVERY_S = 3600.0

    def __init__(self, settings: Settings):
        super().__init__(settings, settings.candles_topic)
        self.pruned_at = 0.0

    def unpublished(self, cur, partitions, limit):
        return [(seq, symbol.encode(), value)
                for seq, symbol, value in candle_store.unpublished(cur, partitions, limit)]

    def mark(self, cur, ids):
        candle_store.mark_published(cur, ids)
        if time.monotonic() - self.pruned_at >= self.PRUNE_EVERY_S:
            self.pruned_at = time.monotonic()
            candle_store.forget_published(cur, self.KEPT)


class DeliveryOutbox:
    """Delivers every alert whose `<channel>_due` is set, of the partitions in `partitions` (those
    the stage holds, at each delivery), oldest first, one at a time, on a thread of its own; a
    failure backs off and tries the same alert again, for as long as it takes. Subclasses say how
    one alert is sent (`send`, None when delivered, else a short reason with no secret in it)."""
    channel = ""

    def __init__(self, settings: Settings, where: str, source: str):
        self.settings, self.where, self.source = settings, where, source
        self.partitions: tuple[int, ...] = ()
        self.delivered = 0
        self._wake, self._stopping = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._work, name=self.channel, daemon=True)
        self._thread.start()

    def wake(self) -> None:
        """New alerts were stored."""
        self._wake.set()

    def deliver(self, rt) -> None:
        """The sending runs on its own thread; it follows the partitions the stage holds."""
        self.partitions = tuple(sorted(rt.epochs))

    def send(self, alert) -> str | None:
        raise NotImplementedError

    def _work(self) -> None:
        conn, backoff, down_since = None, 0.0, None
        while not self._stopping.is_set():
            self._wake.clear()
            pause = RETRY_S                 # nothing due: look again then, or when woken
            try:
                if conn is None:
                    conn = db.connect(self.settings)
                    conn.autocommit = True
                with conn.cursor() as cur:
                    due = store.due(cur, self.channel, list(self.partitions), 50, self.source) \
                        if self.partitions else []
                for alert in due:
                    if self._stopping.is_set():
                        break
                    problem = self.send(alert)
                    if problem:
                        if down_since is None:
                            down_since = time.monotonic()
                            log.warning("%s at %s unavailable (%s); alerts wait in the table and are sent "
                                        "when it answers", self.channel, self.where, problem)
                        backoff = pause = min(max(backoff * 2, 1.0), WEBHOOK_BACKOFF_MAX_S)
                        break
                    with conn.cursor() as cur:
                        store.mark_delivered(cur, self.channel, alert.alert_id)
                    self.delivered += 1
                    if down_since is not None:
                        log.info("%s at %s answers again after %.0f s", self.channel, self.where,
                                 time.monotonic() - down_since)
                        down_since, backoff = None, 0.0
                else:
                    if len(due) == 50:
                        pause = 0.0         # a full batch went out: look for more at once
            except (db.DatabaseUnavailable, psycopg2.Error):
                if conn is not None and not conn.closed:
                    conn.close()
                conn = None                 # PostgreSQL away: the stage itself reports that
            if pause:       # while the endpoint is down, new alerts do not cut the back-off short
                (self._stopping if down_since is not None else self._wake).wait(pause)
        if conn is not None:
            conn.close()

    def close(self) -> None:
        """Stops within WEBHOOK_TIMEOUT_S plus a little; what is not sent stays due for the next run."""
        self._stopping.set()
        self._wake.set()
        self._thread.join(WEBHOOK_TIMEOUT_S + 2)


class WebhookOutbox(DeliveryOutbox):
    """Posts Slack-compatible JSON ({"text": …, "alert": …}); a 2xx is delivered."""
    channel = "webhook"

    def __init__(self, settings: Settings, url: str, source: str):
        self.url, self.session = url, requests.Session()
        super().__init__(settings, redact(url), source)

    def send(self, alert) -> str | None:
        payload = {"text": f":rotating_light: {alert.message}", "alert": asdict(alert)}
        try:
            response = self.session.post(self.url, json=payload, timeout=WEBHOOK_TIMEOUT_S)
        except requests.RequestException as error:
            return type(error).__name__
        return None if response.status_code < 300 else f"HTTP {response.status_code}"


class EmailOutbox(DeliveryOutbox):
    """One e-mail per alert over SMTP (the standard library's smtplib): STARTTLS when SMTP_STARTTLS,
    login when SMTP_USER is set. The alert id is in a header, so a reader can drop a repeat."""
    channel = "email"

    def __init__(self, settings: Settings, source: str):
        self.recipients = [a.strip() for a in settings.alert_email_to.split(",") if a.strip()]
        super().__init__(settings, f"smtp://{settings.smtp_host}:{settings.smtp_port}", source)

    def send(self, alert) -> str | None:
        s = self.settings
        message = EmailMessage()
        message["Subject"] = f"[TradeWatch {alert.severity}] {alert.alert_type} {alert.symbol}"
        message["From"], message["To"] = s.alert_email_from, ", ".join(self.recipients)
        message["X-TradeWatch-Alert-Id"] = alert.alert_id
        message.set_content(f"{alert.message}\n\n{json.dumps(asdict(alert), indent=2, default=str)}\n")
        try:
            with smtplib.SMTP(s.smtp_host, s.smtp_port, timeout=WEBHOOK_TIMEOUT_S) as smtp:
                if s.smtp_starttls:
                    smtp.starttls(context=ssl.create_default_context())
                if s.smtp_user:
                    smtp.login(s.smtp_user, s.smtp_password)
                smtp.send_message(message)
        except smtplib.SMTPResponseException as error:
            return f"{type(error).__name__} {error.smtp_code}"      # the code, never the server's text
        except (OSError, smtplib.SMTPException) as error:
            return type(error).__name__
        return None


def delivery_outboxes(settings: Settings, source: str = "detector") -> list[DeliveryOutbox]:
    """One outbox per channel ALERT_ROUTES uses, for the alerts of the `source` stage."""
    used = set().union(*settings.routes.values())
    return ([WebhookOutbox(settings, settings.alert_webhook_url, source)] if "webhook" in used else []) + \
        ([EmailOutbox(settings, source)] if "email" in used else [])
