"""The local stack: idempotent start, status, stale PID files."""
from pathlib import Path

from tradewatch import stack
from tradewatch.config import Settings


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
