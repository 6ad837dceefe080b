"""Kafka and PostgreSQL in words (tradewatch/services.py) and watched like the stages
(demo.ServiceWatch): the cause read from what each service writes in its own log, the state file
the page, /health and doctor read, and the watch's restarts with back-off — here with the services'
processes stood in for; tests/integration/test_services.py kills the real ones."""
from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest

from tradewatch import doctor, services, stack
from tradewatch.config import Settings
from tradewatch.demo import FIRST_BACKOFF_S, ServiceWatch

PG = "2026-12-07 06:08:17.984 UTC [8783] "
PG_START = PG + "LOG:  starting PostgreSQL 18.6 on x86_64-pc-linux-gnu, 64-bit"
PG_READY = PG + "LOG:  database system is ready to accept connections"
KAFKA_START = ("[2026-12-07 06:08:18,725] INFO [ControllerServer id=1] Starting controller "
               "(kafka.server.ControllerServer)")

# what each service wrote before it stopped, as they word it (PostgreSQL 18, Kafka 4)
LOGS = {
    "postgres disk full": ("postgres", [
        PG_START, PG_READY,
        PG + 'ERROR:  duplicate key value violates unique constraint "trades_pkey"',
        PG + 'PANIC:  could not write to file "pg_wal/xlogtemp.8812": No space left on device',
        PG + "LOG:  server process (PID 8812) was terminated by signal 6: Aborted"], "no space left on device"),
    "postgres port taken": ("postgres", [
        PG_START, PG + 'LOG:  could not bind IPv4 address "127.0.0.1": Address already in use',
        PG + "HINT:  Is another postmaster already running on port 5432? If not, wait a few seconds and retry.",
        PG + 'WARNING:  could not create listen socket for "127.0.0.1"',
        PG + "FATAL:  could not create any TCP/IP sockets"], "port taken"),
    "postgres corrupted": ("postgres", [
        PG_START, PG + "LOG:  invalid checkpoint record",
        PG + "PANIC:  could not locate a valid checkpoint record at 0/1A2B3C"], "corrupted data folder"),
    "postgres, a client's errors only": ("postgres", [
        PG_START, PG_READY, PG + "ERROR:  permission denied for table trades",
        PG + 'FATAL:  password authentication failed for user "x"',
        PG + 'ERROR:  could not extend file "base/16384/16385": No space left on device',   # a statement's
        PG + "FATAL:  terminating connection due to administrator command"], None),
    "postgres, an old start's cause": ("postgres", [
        PG_START, PG + 'PANIC:  could not write to file "pg_wal/x": No space left on device', PG_START, PG_READY],
        None),
    "postgres stopped": ("postgres", [PG_START, PG_READY, PG + "LOG:  shutting down",
                                      PG + "LOG:  database system is shut down"], "stopped"),
    "kafka port taken": ("kafka", [
        KAFKA_START,
        "[2026-12-07 06:08:19,001] ERROR Exiting Kafka due to fatal exception during startup. (kafka.Kafka$)",
        "org.apache.kafka.common.KafkaException: Socket server failed to bind to 127.0.0.1:22092: "
        "Address already in use."], "port taken"),
    "kafka disk full": ("kafka", [
        KAFKA_START, "[2026-12-07 07:00:00,000] ERROR Error while appending records to trades-3 in dir /h/kafka/data "
        "(org.apache.kafka.storage.internals.log.LogDirFailureChannel)",
        "java.io.IOException: No space left on device"], "no space left on device"),
    "kafka heap": ("kafka", [KAFKA_START, "java.lang.OutOfMemoryError: Java heap space"], "out of memory"),
    "kafka another cluster's data": ("kafka", [
        KAFKA_START, "[2026-12-07 06:08:19,001] ERROR Exiting Kafka due to fatal exception (kafka.Kafka$)",
        "java.lang.RuntimeException: Invalid cluster.id in: /h/kafka/data/meta.properties. Expected abc, but read def"],
        "corrupted data folder"),
    "kafka killed": ("kafka", [KAFKA_START, "[2026-12-07 06:08:19,512] INFO [KafkaRaftServer nodeId=1] Kafka Server "
                                            "started (kafka.server.KafkaRaftServer)"], None),
}


@pytest.mark.parametrize("case", LOGS)
def test_the_cause_is_read_from_what_the_service_wrote_since_its_last_start(case):
    service, lines, cause = LOGS[case]
    found = services.read_cause(lines, service)
    assert (found[0] if found else None) == cause
    if found:
        assert found[1] in lines, "the line it was read from, to quote"


@pytest.fixture
def home(tmp_path) -> Settings:
    return Settings.load(tradewatch_home=str(tmp_path / "home"), postgres_port=1, kafka_bootstrap_servers="127.0.0.1:2")


def test_each_cause_says_what_to_do_in_the_instruments_of_this_machine(home):
    sentence, fix = services.explain("port taken", home, "postgres")
    assert sentence == "port 1 is taken by another program" and "POSTGRES_PORT" in fix and ":1`" in fix
    assert "KAFKA_BOOTSTRAP_SERVERS" in services.explain("port taken", home, "kafka")[1]
    sentence, fix = services.explain("no space left on device", home, "postgres")
    assert sentence.startswith("no space left on device (") and "MiB free at" in sentence
    assert "free space" in fix and "goes on once there is room" in fix
    sentence, fix = services.explain("corrupted data folder", home, "kafka")
    assert str(stack.kafka_paths(home)[0]) in sentence and "PostgreSQL keeps the stored trades" in fix
    assert services.explain("killed", home, "kafka") == ("killed (a kill -9, or the out-of-memory killer), nothing "
                                                         "in its log", "")


def test_a_badge_says_the_outage_its_cause_and_the_next_try_then_the_recovery_for_a_minute():
    state = services.ServiceState("postgres", "down", cause="killed", since=100.0, down_at=100.0, next_try=102.4)
    assert state.words(now=100.0) == "down · killed · starting again in 2 s"
    state.status, state.since, state.down_s = "up", 104.0, 4.0
    assert state.words(now=110.0) == "up · back after 4 s, was killed"
    assert state.words(now=104.0 + services.SHOWN_AFTER_S + 1) == "up"
    assert services.ServiceState("kafka", since=1.0).words(now=2.0) == "up"


def test_the_state_file_is_read_while_fresh_and_rewritten_in_place_on_a_full_disk(home, monkeypatch):
    home.home.mkdir(parents=True)
    assert services.read_states(home) is None, "no demo, no file"
    services.write_states(home, {"kafka": services.ServiceState("kafka", "starting", cause="killed")})
    assert services.read_states(home)["kafka"].status == "starting"
    assert (home.home / services.STATE_FILE).stat().st_size == services.STATE_BYTES

    def disk_full(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(Path, "write_bytes", disk_full)       # no block for a new file
    services.write_states(home, {"kafka": services.ServiceState("kafka", "failed", cause="no space left on device")})
    assert services.read_states(home)["kafka"].cause == "no space left on device"
    assert list(home.home.iterdir()) == [home.home / services.STATE_FILE], "no temporary file left"

    found = json.loads((home.home / services.STATE_FILE).read_text())
    found["updated"] -= services.FRESH_S + 1                  # the demo that wrote it is gone
    (home.home / services.STATE_FILE).write_text(json.dumps(found))
    assert services.read_states(home) is None


class Processes:
    """The services' processes, stood in for: which run, and a start that brings them back or fails."""

    def __init__(self, settings: Settings, monkeypatch):
        self.settings, self.running, self.fail_with = settings, {"postgres": 100, "kafka": 200}, None
        self.starts = 0
        monkeypatch.setattr(stack, "postgres_pid", lambda _s: self.running.get("postgres"))
        monkeypatch.setattr(stack, "kafka_pids",
                            lambda _s: {1: self.running["kafka"]} if "kafka" in self.running else {})

    def start(self, _settings: Settings) -> None:
        self.starts += 1
        if self.fail_with:
            with open(services.log_file(self.settings, "postgres"), "a") as log:
                log.write("\n".join(self.fail_with) + "\n")
            raise stack.StackError("PostgreSQL did not start")
        self.running.setdefault("postgres", 101)
        self.running.setdefault("kafka", 201)


def test_the_watch_names_a_death_restarts_with_back_off_and_says_when_a_start_fails(home, monkeypatch):
    for service in services.SERVICES:
        services.log_file(home, service).parent.mkdir(parents=True)
    services.log_file(home, "postgres").write_text(f"{PG_START}\n{PG_READY}\n")
    processes = Processes(home, monkeypatch)
    now = [1000.0]
    watch = ServiceWatch(home, start=processes.start, clock=lambda: now[0])

    def check(after_s: float = 0.0) -> services.ServiceState:
        now[0] += after_s
        watch.check()
        if watch.starting is not None:          # the start runs beside the supervisor: let it end
            watch.starting.exception()
            watch.check()
        return watch.states["postgres"]
    assert check().status == "up" and processes.starts == 0

    # PostgreSQL dies of a full disk: named from its log, started again after the first back-off
    del processes.running["postgres"]
    with open(services.log_file(home, "postgres"), "a") as log:
        log.write(PG + 'PANIC:  could not write to file "pg_wal/xlogtemp.1": No space left on device\n')
    state = check()
    assert state.status == "down" and state.cause.startswith("no space left on device")
    assert "No space left on device" in state.evidence and "free space" in state.fix
    assert services.read_states(home)["postgres"].status == "down", "the page sees it at once"
    assert check(FIRST_BACKOFF_S / 2).status == "down" and processes.starts == 0, "not before its back-off"

    # its start fails (another program took the port): said, with what to do, and tried again later
    processes.fail_with = [PG_START, PG + 'LOG:  could not bind IPv4 address "127.0.0.1": Address already in use',
                           PG + "FATAL:  could not create any TCP/IP sockets"]
    state = check(FIRST_BACKOFF_S)
    assert processes.starts == 1 and state.status == "failed"
    assert state.cause == "port 1 is taken by another program" and "POSTGRES_PORT" in state.fix
    assert state.next_try == now[0] + 2 * FIRST_BACKOFF_S, "the back-off doubled"
    assert check(FIRST_BACKOFF_S).status == "failed" and processes.starts == 1

    processes.fail_with = None
    state = check(FIRST_BACKOFF_S)
    assert processes.starts == 2 and state.status == "up" and state.restarts == 1
    assert state.down_s == pytest.approx(3.5 * FIRST_BACKOFF_S)
    assert watch.states["kafka"].status == "up" and watch.states["kafka"].restarts == 0

    # Kafka killed without a word: killed, back after one start
    del processes.running["kafka"]
    assert check().status == "up"
    assert watch.states["kafka"].status == "down" and watch.states["kafka"].cause.startswith("killed")
    check(FIRST_BACKOFF_S)
    assert watch.states["kafka"].status == "up" and processes.starts == 3
    watch.close()
    assert services.read_states(home) is None, "no demo, no state file"


def test_a_running_server_refusing_writes_for_want_of_disk_is_full_until_it_stops_saying_so(home, monkeypatch):
    """PostgreSQL stays up on a full disk and refuses each write that needs a new block (ERROR, not
    PANIC): the watch reads the running server's new log lines too, says "full" with the cause and
    what to do (the page, doctor, /health and the stages read it), and "up" once it has not said it
    for FULL_CLEARS_S. A client's other errors are not a full disk."""
    from tradewatch.demo import FULL_CLEARS_S
    for service in services.SERVICES:
        services.log_file(home, service).parent.mkdir(parents=True)
    services.log_file(home, "postgres").write_text(f"{PG_START}\n{PG_READY}\n")
    Processes(home, monkeypatch)
    now = [1000.0]
    watch = ServiceWatch(home, start=lambda _s: None, clock=lambda: now[0])

    def check(after_s: float, *lines: str) -> services.ServiceState:
        with open(services.log_file(home, "postgres"), "a") as log:
            log.write("".join(f"{PG}{line}\n" for line in lines))
        now[0] += after_s
        watch.check()
        return watch.states["postgres"]
    assert check(1, 'ERROR:  duplicate key value violates unique constraint "trades_pkey"').status == "up"
    full = 'ERROR:  could not extend file "base/16384/16799" with FileFallocate(): No space left on device'
    state = check(1, full, "HINT:  Check free disk space.")
    assert state.status == "full" and state.cause.startswith("no space left on device"), state
    assert "could not extend file" in state.evidence and "STORAGE_MAX_GB" in state.fix
    assert services.read_states(home)["postgres"].words().startswith("full · no space left on device")
    assert services.told(home, "postgres").startswith("PostgreSQL full: no space left on device")
    assert check(FULL_CLEARS_S - 2, full).status == "full", "said again: still full"
    assert check(FULL_CLEARS_S - 1).status == "full"
    state = check(1)
    assert state.status == "up" and state.down_s == pytest.approx(2 * FULL_CLEARS_S - 2)
    assert state.words(now[0]).startswith("up · back after")
    watch.close()


def test_doctor_names_a_stopped_servers_cause_from_its_own_log(home):
    log = services.log_file(home, "postgres")
    log.parent.mkdir(parents=True)
    log.write_text(f"{PG_START}\n{PG_READY}\n{PG}PANIC:  could not write to file \"pg_wal/x\": "
                   "No space left on device\n")
    [check] = doctor.check_postgres(home)
    assert not check.ok and "its log says it stopped: no space left on device" in check.detail
    assert "free space" in check.fix


def test_a_stage_is_told_the_cause_the_watch_saw_else_the_stopped_servers_own_log(home, monkeypatch):
    monkeypatch.setattr(stack, "postgres_pid", lambda _s: None)
    assert services.told(home, "postgres") == "", "no log here: a server elsewhere, nothing to tell"
    log = services.log_file(home, "postgres")
    log.parent.mkdir(parents=True)
    log.write_text(f"{PG_START}\n{PG_READY}\n{PG}PANIC:  could not write to file \"pg_wal/x\": "
                   "No space left on device\n")
    assert services.told(home, "postgres").startswith("PostgreSQL stopped: no space left on device (")
    services.write_states(home, {"postgres": services.ServiceState("postgres", "starting", cause="killed (…)")})
    assert services.told(home, "postgres") == "PostgreSQL starting: killed (…)", "the watch knows best"
    services.write_states(home, {"postgres": services.ServiceState("postgres", "up", cause="killed (…)")})
    assert services.told(home, "postgres") == "", "up again: no outage to tell"
