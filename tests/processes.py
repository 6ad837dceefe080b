"""Which processes this test session started, and who owns them (the suite's process guard).

Every process the suite starts inherits SESSION_MARK in its environment, also daemons (PostgreSQL
after pg_ctl) and orphans (a JVM whose Python parent was killed), so they are found by reading
/proc/<pid>/environ, whoever their parent is now. A process is *owned* by the fixture during whose
set-up it appeared; its children, and a later process with the same command line (a service
restarted by a test), share that owner. `Guard` (a pytest plugin, registered by conftest.py) uses this to fail loudly when a
process outlives the test, module or session that started it."""
from __future__ import annotations

import os
import signal
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

SESSION_MARK = "TRADEWATCH_TEST_SESSION"
# One mark per pytest process: each xdist worker (and a pytester run) guards only its own.
os.environ[SESSION_MARK] = uuid.uuid4().hex
MARK = f"{SESSION_MARK}={os.environ[SESSION_MARK]}".encode()


@dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    command: str

    def __str__(self) -> str:
        return f"pid {self.pid}: {self.command[:300]}"


PF_KTHREAD = 0x00200000


def environment(entry: Path) -> bytes:
    """/proc/<pid>/environ. It reads empty while the process is inside execve (its new memory has
    no environment mapped yet: a child that bash forked is caught there when its parent has just
    exited), so an empty one of a process that is no kernel thread is read again for up to 0.1 s."""
    for _ in range(20):
        env = (entry / "environ").read_bytes()
        if env:
            return env
        fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        if fields[0] == "Z" or int(fields[6]) & PF_KTHREAD:
            return env
        time.sleep(0.005)
    return env


def ours() -> dict[int, Proc]:
    """Live (not zombie) processes of this session, pytest itself left out."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in (1, os.getpid()):    # 1: init, never ours
            continue
        try:
            if MARK not in environment(entry).split(b"\0"):
                continue
            state, ppid = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:2]
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except (OSError, ValueError):
            continue     # gone meanwhile, or not ours to read
        if state != "Z":
            found[int(entry.name)] = Proc(int(entry.name), int(ppid), command)
    return found


class Owners:
    """Which fixture owns which process: pid -> (owner, command line)."""

    def __init__(self) -> None:
        self.by_pid: dict[int, tuple[str, str]] = {}

    def claim(self, procs: list[Proc], owner: str) -> None:
        for proc in procs:
            self.by_pid[proc.pid] = (owner, proc.command)

    def owner(self, proc: Proc, running: dict[int, Proc]) -> str | None:
        """The owner of `proc`: its own, an ancestor's, or that of an owned process with the same
        command line (a service that a test stopped and started again: it is adopted)."""
        walk: Proc | None = proc
        for _ in range(64):
            if walk is None:
                break
            if walk.pid in self.by_pid:
                return self.by_pid[walk.pid][0]
            walk = running.get(walk.ppid)
        twins = sorted(owner for owner, command in self.by_pid.values() if command == proc.command)
        if twins:
            self.by_pid[proc.pid] = (twins[0], proc.command)
            return twins[0]
        return None

    def release(self, owner: str) -> None:
        for pid in [pid for pid, (o, _) in self.by_pid.items() if o == owner]:
            del self.by_pid[pid]


def descendants(pid: int, running: dict[int, Proc]) -> list[int]:
    children = [p for p, proc in running.items() if proc.ppid == pid]
    return children + [d for c in children for d in descendants(c, running)]


def kill(pids: list[int], wait_s: float = 10.0) -> None:
    """SIGKILL `pids` and wait until none of them runs any more (zombies are gone for us)."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline and set(pids) & set(ours()):
        time.sleep(0.05)


def stop_trees(pids: list[int]) -> None:
    running = ours()
    kill([d for pid in pids for d in (pid, *descendants(pid, running))])


def leftovers(procs: list[Proc], what: str) -> str:
    """Kill `procs` (with their children) and say which they were."""
    stop_trees([p.pid for p in procs])
    return f"{len(procs)} process(es) outlived {what} (killed now):\n" + "\n".join(f"  {p}" for p in procs)


class Guard:
    """No process outlives the module or session fixture that started it, nor the session.
    (The per-test check is conftest.py's autouse fixture `no_process_outlives_its_test`.)"""

    def __init__(self, session_owners: set[str]):
        self.owners = Owners()
        self.session_owners = session_owners   # session fixtures allowed to keep processes running

    @staticmethod
    def owner_label(name: str, scope: str) -> str:
        return f"fixture {name!r} ({scope} scope)"

    def _owner(self, fixturedef) -> str:
        return self.owner_label(fixturedef.argname, fixturedef.scope)

    @pytest.hookimpl(wrapper=True)
    def pytest_fixture_setup(self, fixturedef, request):
        """Processes that appear while a module or session fixture sets up are that fixture's."""
        if fixturedef.scope == "function":
            return (yield)
        before = set(ours())
        result = yield
        started = [p for pid, p in ours().items() if pid not in before]
        if started:
            owner = self._owner(fixturedef)
            if fixturedef.scope == "session" and fixturedef.argname not in self.session_owners:
                raise AssertionError(leftovers(started, f"the set-up of {owner}, which would keep them through"
                                                        " every later module; give it scope='module'"))
            self.owners.claim(started, owner)
        return result

    def pytest_fixture_post_finalizer(self, fixturedef, request):
        """When a module or session fixture is torn down, every process it started is gone."""
        if fixturedef.scope == "function" or (fixturedef.scope == "session" and keep_services()):
            return
        owner = self._owner(fixturedef)
        running = ours()
        left = [p for p in running.values() if self.owners.owner(p, running) == owner]
        self.owners.release(owner)
        if left:
            raise AssertionError(leftovers(left, f"the teardown of {owner}"))

    def pytest_sessionfinish(self, session, exitstatus):
        """Nothing the suite started runs after it (TRADEWATCH_KEEP_SERVICES keeps the services)."""
        running = ours()
        left = [p for p in running.values() if not (keep_services() and self.owners.owner(p, running))]
        if left:
            message = leftovers(left, "the test session")
            reporter = session.config.pluginmanager.get_plugin("terminalreporter")
            if reporter is not None:
                reporter.write_line(f"ERROR: {message}", red=True)
            session.exitstatus = pytest.ExitCode.TESTS_FAILED


def keep_services() -> bool:
    return bool(os.environ.get("TRADEWATCH_KEEP_SERVICES"))
