"""Kafka and PostgreSQL as a person watching them needs to know them: up or down, and when down,
why, in one line — read from the service's own log — and what to do about it.

`make demo` watches both (demo.ServiceWatch) and writes what it sees to TRADEWATCH_HOME/services.json,
which the dashboard's health strip, `/health` and `doctor` read; a file not rewritten for
`FRESH_S` has no demo behind it and is ignored. Without a demo, `doctor` reads a stopped service's
log itself (`last_words`).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from tradewatch import disk, stack
from tradewatch.config import Settings

SERVICES = ("postgres", "kafka")
NAMES = {"postgres": "PostgreSQL", "kafka": "Kafka"}
STATE_FILE = "services.json"
FRESH_S = 15.0          # the demo rewrites the file every few seconds; older, nobody is watching
SHOWN_AFTER_S = 60.0    # a service back up still shows its last outage this long
TAIL_BYTES = 64 * 1024  # of a log, the end that holds the last start and its end
STATE_BYTES = 16 * 1024  # the state file's size, padded: rewritten in place when the disk is full

# (pattern in a log line, the cause in a few words); the first that matches a line wins, the last
# matching line of the log decides. PostgreSQL and Kafka (Java) word these differently.
CAUSES = (
    (r"No space left on device|Disk quota exceeded", "no space left on device"),
    (r"Address already in use|BindException", "port taken"),
    (r"OutOfMemoryError|out of memory|Cannot allocate memory|could not fork", "out of memory"),
    (r"invalid checkpoint record|could not locate a valid checkpoint|invalid magic number|incorrect checksum|"
     r"invalid page in block|database files are incompatible|not a valid data directory|"
     r"CorruptRecordException|InconsistentClusterIdException|InconsistentNodeIdException|"
     r"Invalid cluster\.id|No `meta\.properties`|KafkaStorageException", "corrupted data folder"),
    (r"Permission denied|Operation not permitted", "permission denied"),
)
NO_SPACE = re.compile(CAUSES[0][0])       # said by a running service too: PostgreSQL refuses the write, stays up
# a line that ends a service, though none of the causes above
LAST_WORDS = {"postgres": re.compile(r"\b(PANIC|FATAL):"), "kafka": re.compile(r"\bFATAL\b|Exiting Kafka|[Hh]alting")}
# PostgreSQL logs every failed statement (ERROR:) and refused client (FATAL: password …) too: of its
# lines, only what the server says of itself counts — and once it is up, a FATAL is a client's
SERVER_LINE = {"postgres": re.compile(r"\b(PANIC|FATAL|LOG):"), "kafka": re.compile(r"")}
CLIENT_LINE = {"postgres": re.compile(r"\bFATAL:"), "kafka": re.compile(r"(?!)")}
BENIGN = re.compile(r"the database system is (starting up|shutting down|in recovery)|terminating connection|"
                    r"password authentication|no pg_hba\.conf|does not exist|canceling")
START = {"postgres": "starting PostgreSQL", "kafka": "Starting controller"}
READY = {"postgres": "ready to accept connections", "kafka": "Kafka Server started"}
CLEAN_STOP = {"postgres": "database system is shut down", "kafka": "Kafka Server shut down"}


def log_file(settings: Settings, service: str, node: int = 1) -> Path:
    return stack.pg_paths(settings)[1] if service == "postgres" else stack.kafka_paths(settings, node)[2]


def data_folder(settings: Settings, service: str, node: int = 1) -> Path:
    return stack.pg_paths(settings)[0] if service == "postgres" else stack.kafka_paths(settings, node)[0]


def port(settings: Settings, service: str) -> int:
    return settings.postgres_port if service == "postgres" else settings.kafka_nodes[0][1]


def read_cause(lines: list[str], service: str) -> tuple[str, str] | None:
    """(cause in a few words, the log line that says it) from a service's log lines since its last
    start: the last line naming a known cause, else its last fatal line ("error"), else "stopped"
    after a clean shutdown; None when the lines say nothing of an end."""
    starts = [i for i, line in enumerate(lines) if START[service] in line]
    own, ready = [], False
    for line in lines[starts[-1] if starts else 0:]:
        ready = ready or READY[service] in line
        if SERVER_LINE[service].search(line) and not BENIGN.search(line) \
                and not (ready and CLIENT_LINE[service].search(line)):
            own.append(line)
    for line in reversed(own):
        for pattern, cause in CAUSES:
            if re.search(pattern, line, re.IGNORECASE):
                return cause, line.strip()
    for line in reversed(own):
        if LAST_WORDS[service].search(line):
            return "error", line.strip()
    if own and CLEAN_STOP[service] in own[-1]:
        return "stopped", own[-1].strip()
    return None


def log_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def log_lines(path: Path, since: int = 0) -> list[str]:
    """The lines of `path` written after byte `since` (at most its last TAIL_BYTES)."""
    try:
        with open(path, "rb") as f:
            f.seek(max(since, log_size(path) - TAIL_BYTES))
            return f.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return []


def killed_how(pid: int | None) -> str:
    """What ended a process that left no word in its log: the kernel's out-of-memory killer if its
    log names the PID, else a kill."""
    if pid:
        try:
            kernel = subprocess.run(["dmesg"], capture_output=True, text=True, timeout=5).stdout
        except (OSError, subprocess.TimeoutExpired):
            kernel = ""
        if re.search(rf"Killed process {pid}\b", kernel):
            return "out of memory"
    return "killed"


def explain(cause: str, settings: Settings, service: str) -> tuple[str, str]:
    """(the cause as a sentence, what a person does about it)."""
    name, folder = NAMES[service], data_folder(settings, service)
    if cause == "no space left on device":
        found = disk.usage(settings.home)
        return (f"no space left on device ({found.free / 1024**2:,.0f} MiB free at {found.folder})",
                f"free space on the disk of {settings.home} (or set STORAGE_MAX_GB, lower RETENTION_DAYS_* and "
                f"KAFKA_RETENTION_*); "
                f"{name} goes on once there is room")
    if cause == "port taken":
        setting = "POSTGRES_PORT" if service == "postgres" else "KAFKA_BOOTSTRAP_SERVERS"
        number = port(settings, service)
        return (f"port {number} is taken by another program",
                f"stop the program listening on port {number} (`ss -ltnp | grep :{number}`) or set {setting} in .env")
    if cause == "out of memory":
        return ("out of memory (the kernel's out-of-memory killer, or the service's own limit)",
                "close other programs; the demo starts it again")
    if cause == "corrupted data folder":
        lost = ("the stored trades" if service == "postgres"
                else "what was only in Kafka (PostgreSQL keeps the stored trades)")
        return (f"its data folder {folder} is damaged",
                f"it will not start on it: stop the demo, move {folder} away to start empty ({lost} "
                f"are then gone unless you restore it), and start again")
    if cause == "permission denied":
        return (f"permission denied in {folder.parent}", f"give {folder.parent} back to the user that runs {name}")
    if cause == "killed":
        return "killed (a kill -9, or the out-of-memory killer), nothing in its log", ""
    if cause == "stopped":
        return "stopped by a shutdown request (`make stop`?)", ""
    return cause, f"read {log_file(settings, service)}"


@dataclass
class ServiceState:
    """One service as the demo sees it. `status`: up, full (running, but its log says writes find no
    space: PostgreSQL refuses each one and stays up), down (waiting to be started again), starting,
    or failed (the last start did not come up: `fix` says what to do; the demo tries again)."""
    service: str
    status: str = "up"
    cause: str = ""             # the last outage's cause, one line ("" before any)
    evidence: str = ""          # the log line it was read from
    fix: str = ""
    since: float = 0.0          # epoch seconds: when the status began
    down_at: float = 0.0        # when the last outage began
    down_s: float = 0.0         # how long it lasted, once back up
    restarts: int = 0
    next_try: float = 0.0       # epoch seconds of the next start, while down or failed

    def words(self, now: float | None = None) -> str:
        """The badge's text after the service's name: "up", "down · killed … · starting again in 2 s"."""
        now = time.time() if now is None else now
        if self.status == "up":
            if self.cause and now - self.since < SHOWN_AFTER_S:
                return f"up · back after {self.down_s:.0f} s, was {self.cause}"
            return "up"
        text = f"{self.status} · {self.cause}" if self.cause else self.status
        if self.status in ("down", "failed") and self.next_try:
            text += f" · starting again in {max(self.next_try - now, 0):.0f} s"
        return text


def write_states(settings: Settings, states: dict[str, ServiceState]) -> None:
    """Replace the state file; on a full disk (no block for a new file), overwrite the old one in
    place: it is padded to STATE_BYTES, so what a full disk is doing can still be said."""
    path = settings.home / STATE_FILE
    text = json.dumps({"updated": time.time(), "pid": os.getpid(),
                       "services": {name: asdict(state) for name, state in states.items()}})
    data = text.encode().ljust(STATE_BYTES)
    temporary = path.with_suffix(f".{os.getpid()}.tmp")
    try:
        temporary.write_bytes(data)
        os.replace(temporary, path)
    except OSError:
        temporary.unlink(missing_ok=True)
        with open(path, "r+b") as f:            # raises if there is no file to reuse either
            f.write(data[:max(len(text), os.fstat(f.fileno()).st_size)])


def read_states(settings: Settings) -> dict[str, ServiceState] | None:
    """What a running demo says of its services; None without a demo watching them (no file, or
    one not rewritten for FRESH_S)."""
    try:
        found = json.loads((settings.home / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None
    if time.time() - found.get("updated", 0) > FRESH_S:
        return None
    return {name: ServiceState(**state) for name, state in found.get("services", {}).items()}


def remove_states(settings: Settings) -> None:
    (settings.home / STATE_FILE).unlink(missing_ok=True)


def running(settings: Settings, service: str) -> bool:
    """Whether this home's `service` runs on this machine."""
    return bool(stack.postgres_pid(settings) if service == "postgres" else stack.kafka_pids(settings))


def last_words(settings: Settings, service: str) -> tuple[str, str, str] | None:
    """(cause, the log line, fix) of a stopped local service from the end of its log; None when
    its log says nothing of an end (or there is no local log: the service runs elsewhere)."""
    found = read_cause(log_lines(log_file(settings, service)), service)
    if found is None:
        return None
    sentence, fix = explain(found[0], settings, service)
    return sentence, found[1], fix


def told(settings: Settings, service: str) -> str:
    """An outage of `service` in words, as far as this machine can tell ("PostgreSQL down: no space
    left on device (…)"): what the demo watching it saw, else, when it does not run here, its own
    log's last words; "" when nothing says (a remote server, or no demo yet to name a kill)."""
    watched = (read_states(settings) or {}).get(service)
    if watched is not None and watched.status != "up" and watched.cause:
        return f"{NAMES[service]} {watched.status}: {watched.cause}"
    if watched is None and log_file(settings, service).exists() and not running(settings, service):
        found = last_words(settings, service)
        if found is not None:
            return f"{NAMES[service]} stopped: {found[0]}"
    return ""
