"""`make demo`: the whole pipeline in one terminal, supervised. Ctrl-C stops every process it started.

Starts Kafka and PostgreSQL (unless already running), then each stage as its own process, exactly
as the four-terminal walkthrough in the README does by hand. The supervisor keeps them alive:

- a stage that exits unexpectedly is restarted after 1 s, 2 s, 4 s … (at most `MAX_BACKOFF_S`;
  back to 1 s once it has run for `STABLE_AFTER_S`), and its last output lines are logged in one
  block so the cause is readable;
- a stage that died `LOUD_AFTER_DEATHS` times within `LOUD_WINDOW_S` is reported in a banner;
- Kafka and PostgreSQL are watched too (`ServiceWatch`): one whose process is gone is named down
  with its cause, read from its own log, and started again with the same back-off; their states
  go to TRADEWATCH_HOME/services.json, which the health strip, `/health` and `doctor` read;
- Ctrl-C (SIGINT) or SIGTERM stops every stage (SIGINT, then SIGKILL after `STOP_GRACE_S`) and
  the services when this run started them, all within about 10 s.

Each stage's own heartbeat (tradewatch/runtime.py) is what the dashboard's health strip shows.
"""
from __future__ import annotations

import logging
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

from tradewatch import services, stack
from tradewatch.cli import load_settings, setup_logging
from tradewatch.config import PROJECT_ROOT, Settings
from tradewatch.store import db, health

log = logging.getLogger("tradewatch.demo")

FIRST_BACKOFF_S = 1.0
MAX_BACKOFF_S = 30.0
STABLE_AFTER_S = 60.0
# a service is "full" (its log said a write found no space) until that has not been said for this
# long: a stage retries a refused write every 2 s, so a disk still full says it again well before
FULL_CLEARS_S = 10.0
LOUD_AFTER_DEATHS = 3
LOUD_WINDOW_S = 300.0
STOP_GRACE_S = 6.0
TAIL_LINES = 25
DEMO_FIRST_ANOMALY_S = 1.0       # producer --first-anomaly-after: once a symbol is warm (~8 s at 20/s)
LATER_S = 20.0
# ... and once the stages on the way to the page have caught up (a slow machine's start still reading
# the simulated past is not slowed further), though never later than this
LATER_MAX_S = 120.0
# the simulated book's spoofing and quote-stuffing episodes, per trade, as a share of DEMO_ANOMALY_RATE:
# at the default 20 trades/s and 0.005, one every ~50 s, beside about six trade anomalies a minute
DEMO_BOOK_ANOMALY_SHARE = 0.2


@dataclass
class Child:
    """One process the demo supervises (a stage, the dashboard, the API, …), restarted with back-off."""
    name: str
    command: list[str]
    process: subprocess.Popen | None = None
    started_at: float = 0.0
    restart_at: float | None = None
    backoff_s: float = FIRST_BACKOFF_S
    deaths: deque[float] = field(default_factory=lambda: deque(maxlen=50))
    tail: deque[str] = field(default_factory=lambda: deque(maxlen=TAIL_LINES))
    start_after_s: float = 0.0      # what the first minute does not need starts later, off the busy start
    first_start_only: list[str] = field(default_factory=list)   # arguments of the first start, not of a restart

    def start(self) -> None:
        self.tail.clear()
        command = self.command + (self.first_start_only if not self.deaths else [])
        self.process = subprocess.Popen(command, cwd=PROJECT_ROOT, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.started_at = time.monotonic()
        self.restart_at = None
        threading.Thread(target=self._relay, args=(self.process,), daemon=True, name=f"out-{self.name}").start()

    def _relay(self, process: subprocess.Popen) -> None:
        """Copy the stage's output to ours, prefixed with its name, keeping the last lines."""
        assert process.stdout is not None
        for raw in process.stdout:
            line = raw.decode("utf-8", "replace").rstrip()
            self.tail.append(line)
            sys.stdout.write(f"[{self.name}] {line}\n")
            sys.stdout.flush()


def stages(settings: Settings, history_s: float = 0.0) -> list[Child]:
    """`history_s`: seconds of simulated past the producer sends first (its first start only: a
    restarted producer must not send a second past over the first)."""
    python = sys.executable
    consumers = settings.consumers                          # CONSUMERS=3 make demo: a group of three
    commands = [(f"consumer-{i + 1}" if consumers > 1 else "consumer", [python, "consumer.py"])
                for i in range(consumers)]
    # DEMO_LIVE=coinbase|binance: real trades instead of the simulator (DEMO_LIVE_URL: another
    # endpoint, e.g. a classroom's `python -m tradewatch.market.replay_server coinbase --loop`)
    # the first anomaly as soon as the rules can see one: at the default rates a random one may take a minute
    producer = [python, "producer.py", "--rate", f"{settings.demo_rate:g}", "--anomaly-rate",
                f"{settings.demo_anomaly_rate:g}", "--first-anomaly-after", f"{DEMO_FIRST_ANOMALY_S:g}"]
    if settings.demo_live:
        producer = [python, "producer.py", "--live", settings.demo_live]
        if settings.demo_live_url:
            producer += ["--url", settings.demo_live_url]
    if settings.demo_book:      # the simulator's book, or the venue's own
        producer.append("--book")
        if not settings.demo_live:
            producer += ["--book-anomaly-rate", f"{settings.demo_anomaly_rate * DEMO_BOOK_ANOMALY_SHARE:g}"]
    commands += [
        ("producer", producer),
        ("aggregator", [python, "aggregator.py"]),
        ("detector", [python, "anomaly_detector.py", "run"]),
        ("api", [python, "api.py"]),
        ("reports", [python, "report.py", "--every", "1h", "--out", str(settings.home / "reports")]),
        ("maintain", [python, "-m", "tradewatch", "maintain", "--every", "3600"]),
        ("dashboard", [python, "-m", "streamlit", "run", "dashboard.py", "--server.headless", "true",
                       "--server.address", settings.dashboard_address, "--server.port", str(settings.dashboard_port),
                       "--browser.gatherUsageStats", "false"]),
    ]
    if settings.demo_book:
        commands.append(("quotes", [python, "consumer.py", "--quotes"]))
    if settings.run_flink_in_demo:
        commands.append(("flink", [python, "flink_job.py"]))
    # on two cores, eight interpreters importing pandas at once delay the first anomaly by seconds:
    # the API, the quotes stage, the reports and maintenance start once the path to the page is up
    # and caught up (Supervisor.watch)
    later = {"api": LATER_S, "quotes": LATER_S, "reports": LATER_S, "maintain": LATER_S}
    children = [Child(name, command, start_after_s=later.get(name, 0.0)) for name, command in commands]
    if history_s and not settings.demo_live:
        next(c for c in children if c.name == "producer").first_start_only = ["--history", f"{history_s:g}"]
    return children


def history_seconds(settings: Settings) -> float:
    """DEMO_HISTORY_MINUTES of simulated past, into a data folder that holds no trade yet (a
    second run opens on the first one's data instead)."""
    if not settings.demo_history_minutes or settings.demo_live:
        return 0.0
    with db.connect(settings) as conn, conn.cursor() as cur:
        cur.execute("SELECT EXISTS (SELECT 1 FROM trades)")
        empty = not cur.fetchone()[0]
    conn.close()
    return settings.demo_history_minutes * 60 if empty else 0.0


def caught_up(settings: Settings) -> bool:
    """Every stage on the way to the page (consumer, aggregator, detector) is "up" on the health
    strip: beating, holding partitions, within health.LATE_LAG_RECORDS of the log's end."""
    try:
        conn = db.connect(settings)
    except (db.DatabaseUnavailable, db.DatabaseRefused):
        return False
    try:
        with conn.cursor() as cur:
            rows = health.read(cur)
    finally:
        conn.close()
    statuses = {s.stage: s.status for s in health.stage_statuses(rows)}
    return all(statuses.get(stage) == "up" for stage in health.EXPECTED_STAGES)


class ServiceWatch:
    """Kafka and PostgreSQL, watched like the stages. A service whose process is gone is named down
    with its cause — what its log said since it was last seen up (services.read_cause), else how it
    was killed — and started again by `start` (stack.start: whatever is not running, then the
    database, schema and topics) after the stages' back-off. A start that does not bring it up
    leaves it "failed" with the cause and what to do, and is tried again after a longer wait. The
    states go to TRADEWATCH_HOME/services.json at every change and every WRITE_EVERY_S."""

    WRITE_EVERY_S = 3.0

    def __init__(self, settings: Settings, start: Callable[[Settings], None] = stack.start,
                 clock: Callable[[], float] = time.time):
        self.settings = settings
        self.start = start
        self.clock = clock
        now = clock()
        self.states = {name: services.ServiceState(name, since=now) for name in services.SERVICES}
        self.backoff = dict.fromkeys(services.SERVICES, FIRST_BACKOFF_S)
        self.seen = self._pids()
        self.offsets = self._log_sizes()
        self.scanned = dict(self.offsets)      # how far the logs of running services were read
        self.full_at = dict.fromkeys(services.SERVICES, 0.0)
        self.starting: Future | None = None
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="start-services")
        self.written = 0.0

    def _nodes(self, name: str) -> list[int]:
        return [1] if name == "postgres" else [node for node, _, _ in self.settings.kafka_nodes]

    def _pids(self) -> dict[str, dict[int, int]]:
        """service -> node -> PID of each running process"""
        postgres = stack.postgres_pid(self.settings)
        return {"postgres": {1: postgres} if postgres else {}, "kafka": stack.kafka_pids(self.settings)}

    def _log_sizes(self) -> dict[tuple[str, int], int]:
        return {(name, node): services.log_size(services.log_file(self.settings, name, node))
                for name in services.SERVICES for node in self._nodes(name)}

    def check(self) -> None:
        now = self.clock()
        changed = self.starting is not None and self.starting.done() and self._started(now)
        pids = self._pids()
        for name, state in self.states.items():
            missing = [node for node in self._nodes(name) if node not in pids[name]]
            if state.status in ("up", "full") and missing:
                self._died(state, missing[0], now)
                changed = True
            elif state.status in ("up", "full"):
                changed |= self._refusing(state, now)
        due = [s for s in self.states.values() if s.status in ("down", "failed") and now >= s.next_try]
        if due and self.starting is None:
            for state in due:
                state.status, state.since = "starting", now
                log.info("starting %s again", services.NAMES[state.service])
            self.starting = self.pool.submit(self.start, self.settings)
            changed = True
        if changed or now - self.written >= self.WRITE_EVERY_S:
            services.write_states(self.settings, self.states)
            self.written = now

    def _refusing(self, state: services.ServiceState, now: float) -> bool:
        """A running service whose log says since the last look that a write found no space (PostgreSQL
        stays up and refuses each write that needs a new block) is "full" until that has not been said
        for FULL_CLEARS_S; whether its status changed."""
        name, said = state.service, ""
        for node in self._nodes(name):
            path = services.log_file(self.settings, name, node)
            size = services.log_size(path)
            if size != self.scanned.get((name, node), 0):
                said = next((line for line in reversed(services.log_lines(path, self.scanned.get((name, node), 0)))
                             if services.NO_SPACE.search(line)), "") or said
                self.scanned[(name, node)] = size
        if said:
            self.full_at[name] = now
            if state.status == "up":
                state.cause, state.fix = services.explain("no space left on device", self.settings, name)
                state.status, state.since, state.evidence, state.down_at = "full", now, said.strip(), now
                log.error("%s refuses writes: %s (its log: %s) — %s", services.NAMES[name], state.cause,
                          state.evidence[:300], state.fix)
                return True
        elif state.status == "full" and now - self.full_at[name] >= FULL_CLEARS_S:
            state.status, state.since, state.down_s = "up", now, now - state.down_at
            log.info("%s writes again after %.0f s", services.NAMES[name], state.down_s)
            return True
        return False

    def _cause(self, state: services.ServiceState, node: int, pid: int | None) -> None:
        name = state.service
        lines = services.log_lines(services.log_file(self.settings, name, node), self.offsets[(name, node)])
        cause, state.evidence = services.read_cause(lines, name) or (services.killed_how(pid), "")
        state.cause, state.fix = services.explain(cause, self.settings, name)

    def _died(self, state: services.ServiceState, node: int, now: float) -> None:
        name = state.service
        if now - state.since >= STABLE_AFTER_S:
            self.backoff[name] = FIRST_BACKOFF_S
        self._cause(state, node, self.seen[name].get(node))
        state.status, state.since, state.down_at = "down", now, now
        self._retry_later(state, now)
        log.error("%s stopped: %s%s; starting it again in %.0f s", services.NAMES[name], state.cause,
                  f" (its log: {state.evidence[:300]})" if state.evidence else "", state.next_try - now)

    def _retry_later(self, state: services.ServiceState, now: float) -> None:
        state.next_try = now + self.backoff[state.service]
        self.backoff[state.service] = min(self.backoff[state.service] * 2, MAX_BACKOFF_S)

    def _started(self, now: float) -> bool:
        """The start in flight finished: each service it was for is up, or failed with its cause."""
        future, self.starting = self.starting, None
        error = future.exception()
        pids = self._pids()
        for state in self.states.values():
            if state.status != "starting":
                continue
            name = state.service
            missing = [node for node in self._nodes(name) if node not in pids[name]]
            if not missing:
                state.status, state.since, state.next_try = "up", now, 0.0
                state.down_s, state.restarts = now - state.down_at, state.restarts + 1
                self.seen[name], self.offsets = pids[name], {**self.offsets, **{
                    key: size for key, size in self._log_sizes().items() if key[0] == name}}
                self.scanned.update({key: size for key, size in self.offsets.items() if key[0] == name})
                log.info("%s is back after %.0f s", services.NAMES[name], state.down_s)
                continue
            self._cause(state, missing[0], None)
            if state.cause.startswith("killed") and error is not None:     # its start said why
                state.cause, state.evidence, state.fix = str(error).splitlines()[0], "", ""
            state.status, state.since = "failed", now
            self._retry_later(state, now)
            log.error("%s did not start: %s%s; trying again in %.0f s", services.NAMES[name], state.cause,
                      f" — {state.fix}" if state.fix else "", state.next_try - now)
        if error is not None:
            log.warning("starting the services: %s", str(error).splitlines()[0] if str(error) else error)
        return True

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        services.remove_states(self.settings)


class Supervisor:
    """`caught_up`: whether what starts later (Child.start_after_s) may start now; asked at most
    once a second while one waits, and no longer after `later_max_s`. `services`: Kafka and
    PostgreSQL, checked once a second."""

    def __init__(self, stages: list[Child], caught_up: Callable[[], bool] = lambda: True,
                 later_max_s: float = LATER_MAX_S, services: ServiceWatch | None = None):
        self.stages = stages
        self.stopping = False
        self.caught_up = caught_up
        self.later_max_s = later_max_s
        self.started_at = time.monotonic()
        self.services = services
        self.services_checked = 0.0

    def request_stop(self, *_: object) -> None:
        self.stopping = True

    def start_all(self) -> None:
        self.started_at = time.monotonic()
        for stage in self.stages:
            if stage.start_after_s:
                log.info("starting %s in %.0f s, once the pipeline has caught up: %s", stage.name, stage.start_after_s,
                         " ".join(stage.command[1:]))
                stage.restart_at = time.monotonic() + stage.start_after_s
            else:
                log.info("starting %s: %s", stage.name, " ".join(stage.command[1:]))
                stage.start()

    def watch(self) -> None:
        """Until asked to stop: start what waited, restart what died, with backoff."""
        while not self.stopping:
            now = time.monotonic()
            if self.services is not None and now - self.services_checked >= 1.0:
                self.services_checked = now
                try:
                    self.services.check()
                except Exception as error:  # noqa: BLE001 - a failed look must not stop the supervisor
                    log.warning("could not check Kafka and PostgreSQL: %s", error)
            waiting = [s for s in self.stages if s.start_after_s and s.process is None and not s.deaths
                       and s.restart_at is not None and now >= s.restart_at]
            if waiting and not self._later_may_start(now):
                for stage in waiting:
                    stage.restart_at = now + 1.0        # asked again in a second
            for stage in self.stages:
                if stage.process is not None and stage.process.poll() is not None and not self.stopping:
                    self._died(stage, now)
                elif stage.process is None and stage.restart_at is not None and now >= stage.restart_at:
                    log.info("%s %s", "restarting" if stage.deaths else "starting", stage.name)
                    stage.start()
            time.sleep(0.2)

    def _later_may_start(self, now: float) -> bool:
        if now - self.started_at >= self.later_max_s:
            return True
        try:
            return self.caught_up()
        except Exception as error:  # noqa: BLE001 - a failed look must not stop the supervisor
            log.warning("could not tell whether the pipeline caught up: %s", error)
            return False

    def _died(self, stage: Child, now: float) -> None:
        assert stage.process is not None
        code = stage.process.returncode
        ran_s = now - stage.started_at
        stage.process.wait()
        time.sleep(0.1)  # let the relay thread take the last lines
        stage.process = None
        stage.deaths.append(now)
        if ran_s >= STABLE_AFTER_S:
            stage.backoff_s = FIRST_BACKOFF_S
        lines = "\n".join(f"    | {line}" for line in stage.tail) or "    | (no output)"
        log.error("%s exited with code %s after %.0fs; restarting in %.0fs. Its last lines:\n%s",
                  stage.name, code, ran_s, stage.backoff_s, lines)
        recent = [t for t in stage.deaths if now - t <= LOUD_WINDOW_S]
        if len(recent) >= LOUD_AFTER_DEATHS:
            banner = "!" * 78
            log.error("\n%s\n!!  %s KEEPS DYING: %d exits in the last %.0f minutes — it is shown down on the\n"
                      "!!  dashboard's health strip; read its last lines above and fix the cause.\n%s",
                      banner, stage.name.upper(), len(recent), LOUD_WINDOW_S / 60, banner)
        stage.restart_at = now + stage.backoff_s
        stage.backoff_s = min(stage.backoff_s * 2, MAX_BACKOFF_S)

    def stop_all(self) -> None:
        running = [s for s in self.stages if s.process is not None and s.process.poll() is None]
        for stage in running:
            stage.process.send_signal(signal.SIGINT)
        deadline = time.monotonic() + STOP_GRACE_S
        for stage in running:
            try:
                stage.process.wait(timeout=max(deadline - time.monotonic(), 0.01))
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop within %.0fs, killing it", stage.name, STOP_GRACE_S)
                stage.process.kill()
                stage.process.wait()


def main() -> int:
    setup_logging()
    settings = load_settings()
    try:
        stack.check_home(settings)
        with stack.home_lock(settings, "demo"):      # one demo per home, held until it ends
            return _run(settings)
    except stack.StackError as error:
        log.error("%s", error)
        return 1


def _run(settings: Settings) -> int:
    already_up = stack.status(settings)
    we_started_services = not (already_up["kafka"].startswith("up") and already_up["postgres"].startswith("up"))
    supervisor = Supervisor([], caught_up=lambda: caught_up(settings))
    signal.signal(signal.SIGINT, supervisor.request_stop)
    signal.signal(signal.SIGTERM, supervisor.request_stop)
    try:
        stack.start(settings)
        supervisor.stages = stages(settings, history_seconds(settings))
    except (stack.StackError, db.DatabaseUnavailable, db.DatabaseRefused) as error:
        log.error("%s", error)
        return 1
    supervisor.services = ServiceWatch(settings)
    try:
        if not supervisor.stopping:
            supervisor.start_all()
            log.info("demo running — dashboard at http://%s:%d — press Ctrl-C to stop everything",
                     settings.dashboard_address, settings.dashboard_port)
            supervisor.watch()
    finally:
        log.info("stopping the demo")
        supervisor.stop_all()
        supervisor.services.close()
        if we_started_services:
            stack.stop(settings)
        log.info("demo stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
