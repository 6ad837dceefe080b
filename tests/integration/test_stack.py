"""The local stack: idempotent start, status, stale PID files, an unusable home."""
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from tradewatch import stack
from tradewatch.config import PROJECT_ROOT, Settings


def test_starting_twice_is_harmless(services):
    before = stack.status(services)
    stack.start(services)
    after = stack.status(services)
    assert before == after
    assert after["kafka"].startswith("up (pid") and after["postgres"].startswith("up")


def test_stale_kafka_pid_file_is_removed(tmp_path):
    settings = Settings.load(tradewatch_home=str(tmp_path), kafka_bootstrap_servers="127.0.0.1:29999",
                             postgres_port=29998)
    pid_file = tmp_path / "kafka" / "kafka.pid"
    pid_file.parent.mkdir(parents=True)
    pid_file.write_text("999999")  # no such process
    assert stack.status(settings)["kafka"] == "down"
    assert not pid_file.exists()
    pid_file.write_text(str(Path("/proc/self").resolve().name))  # alive, but not a Kafka broker
    assert stack.status(settings)["kafka"] == "down"
    assert not pid_file.exists()


def test_a_home_the_service_user_cannot_enter_gives_a_clear_error():
    """Issue 11: a TRADEWATCH_HOME under a folder the PostgreSQL service user cannot enter ended in
    a raw initdb error. `make demo` and `stack start` now say what is wrong and how to fix it."""
    with tempfile.TemporaryDirectory(dir="/tmp") as top:     # pytest's own tmp folders are private
        Path(top).chmod(0o755)
        locked = Path(top) / "locked"
        locked.mkdir(mode=0o700)
        check_locked_home(locked)


def check_locked_home(locked: Path) -> None:
    from tests.conftest import free_port
    env = {**os.environ, "TRADEWATCH_HOME": str(locked / "home"), "POSTGRES_PORT": str(free_port()),
           "KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port()}", "KAFKA_CONTROLLER_PORT": str(free_port())}
    for command in (["-m", "tradewatch.stack", "start"], ["-m", "tradewatch.demo"]):
        result = subprocess.run([sys.executable, *command], env=env, cwd=PROJECT_ROOT, capture_output=True,
                                text=True, timeout=60)
        assert result.returncode == 1, command
        output = result.stdout + result.stderr
        if os.geteuid() == 0:
            assert "which the user 'tradewatch' cannot enter" in output and f"chmod o+x {locked}" in output
        else:
            assert "cannot create TRADEWATCH_HOME" in output
        assert "Traceback" not in output, output
        assert not (locked / "home" / "postgres" / "data" / "PG_VERSION").exists()


def lock_home(name: str) -> Settings:
    """A home of its own inside the project (the service user can reach it), on free ports."""
    import shutil

    from tests.conftest import free_port
    home = PROJECT_ROOT / ".tradewatch" / f"test-{name}-{os.getpid()}"
    shutil.rmtree(home, ignore_errors=True)
    return Settings.load(tradewatch_home=str(home), kafka_bootstrap_servers=f"127.0.0.1:{free_port()}",
                         kafka_controller_port=free_port(), postgres_port=free_port())


def processes_with(needle: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if needle.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


def test_two_starts_at_once_in_one_home_make_one_kafka_and_one_postgresql():
    """Issue 22, item 7: two starts in one TRADEWATCH_HOME at the same moment raced: Kafka's storage
    formatted twice, two brokers on one folder, PostgreSQL's pid file removed under a starting
    server. Starts and stops of one home now take turns (a lock file in the home)."""
    import shutil
    settings = lock_home("twostarts")
    env = {**os.environ, **settings.as_env()}
    try:
        starts = [subprocess.Popen([sys.executable, "-m", "tradewatch.stack", "start"], env=env, cwd=PROJECT_ROOT,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
        outputs = [p.communicate(timeout=180)[0] for p in starts]
        assert [p.returncode for p in starts] == [0, 0], outputs
        assert len(processes_with(str(settings.home / "kafka" / "server.properties"))) == 1, outputs
        assert len([pid for pid in processes_with(str(settings.home / "postgres" / "data"))
                    if Path(f"/proc/{pid}/comm").read_text().strip() == "postgres"
                    and b"-D" in Path(f"/proc/{pid}/cmdline").read_bytes()]) == 1, outputs
        status = stack.status(settings)
        assert status["kafka"].startswith("up") and status["postgres"].startswith("up"), status
    finally:
        stack.stop(settings)
        shutil.rmtree(settings.home, ignore_errors=True)


def test_a_second_demo_in_a_home_says_who_holds_it():
    """Issue 22, item 7: a second `make demo` in a home where one runs shared its services, and its
    Ctrl-C stopped them under the first. Now it stops at once and names the demo that holds it."""
    import shutil
    settings = lock_home("demolock")
    try:
        with stack.home_lock(settings, "demo"):
            result = subprocess.run([sys.executable, "-m", "tradewatch.demo"], env={**os.environ, **settings.as_env()},
                                    cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=60)
        output = result.stdout + result.stderr
        assert result.returncode == 1, output
        assert f"pid {os.getpid()}" in output and str(settings.home) in output and "TRADEWATCH_HOME" in output, output
        assert "Traceback" not in output
        assert stack.status(settings)["kafka"] == "down", "the second demo started nothing"
    finally:
        stack.stop(settings)
        shutil.rmtree(settings.home, ignore_errors=True)


def test_a_kafka_that_cannot_start_is_reported_at_once_with_its_log():
    """A broker that exits while starting (here its port is taken) ended the start only after the
    whole 90 s wait, with nothing said meanwhile (a demo test waited for a dashboard that never came).
    Now the start ends as soon as the process is gone, naming the node and showing its log."""
    import shutil
    import socket
    import time
    settings = lock_home("kafkaport")
    port = int(settings.kafka_bootstrap_servers.rsplit(":", 1)[1])
    taken = socket.socket()
    taken.bind(("127.0.0.1", port))
    taken.listen()
    try:
        began = time.monotonic()
        result = subprocess.run([sys.executable, "-m", "tradewatch.stack", "start"], env={**os.environ, **settings.as_env()},
                                cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)
        took = time.monotonic() - began
        output = result.stdout + result.stderr
        assert result.returncode != 0, output
        assert "Kafka node 1 exited while starting" in output and "server.log" in output, output
        assert "Address already in use" in output, output       # the end of Kafka's own log
        assert took < 60, f"the start took {took:.0f} s to give up (its timeout is 90 s)"
        assert "Traceback" not in output, output
    finally:
        taken.close()
        stack.stop(settings)
        shutil.rmtree(settings.home, ignore_errors=True)
