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
    env = {**os.environ, "TRADEWATCH_HOME": str(locked / "home"), "POSTGRES_PORT": "45432",
           "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:49092", "KAFKA_CONTROLLER_PORT": "49093"}
    for command in (["-m", "tradewatch.stack", "start"], ["-m", "tradewatch.demo"]):
        result = subprocess.run([sys.executable, *command], env=env, cwd=PROJECT_ROOT, capture_output=True,
                                text=True, timeout=60)
        assert result.returncode == 1, command
        output = result.stdout + result.stderr
        if os.geteuid() == 0:
            assert f"which the user 'tradewatch' cannot enter" in output and f"chmod o+x {locked}" in output
        else:
            assert "cannot create TRADEWATCH_HOME" in output
        assert "Traceback" not in output, output
        assert not (locked / "home" / "postgres" / "data" / "PG_VERSION").exists()
