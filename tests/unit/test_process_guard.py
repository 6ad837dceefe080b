"""The suite's process guard (tests/processes.py, conftest.py) on a small suite of its own, run by
pytester in a subprocess: a process left by a test, by a module fixture, by a session fixture, or
orphaned by its parent fails the run loudly, named, and is killed."""
from __future__ import annotations

from pathlib import Path

from tradewatch.config import PROJECT_ROOT

pytest_plugins = ["pytester"]

LEAKY_SUITE = '''
import subprocess
import pytest

@pytest.fixture(scope="module")
def leaky_module():
    yield subprocess.Popen(["sleep", "86401"])          # never stopped

@pytest.fixture(scope="module")
def tidy_module():
    process = subprocess.Popen(["sleep", "86402"])
    yield process
    process.kill()
    process.wait()

@pytest.fixture(scope="session")
def session_job():
    process = subprocess.Popen(["sleep", "86403"])      # would outlive every later module
    yield process
    process.kill()
    process.wait()

def test_tidy(tidy_module):
    assert tidy_module.poll() is None

def test_module_fixture(leaky_module):
    assert leaky_module.poll() is None

def test_left_running():
    subprocess.Popen(["sleep", "86404"])

def test_orphan():
    subprocess.run(["bash", "-c", "sleep 86405 & exit 0"], check=True)

def test_session_fixture(session_job):
    pass
'''


def sleeps_running() -> list[str]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if command.startswith("sleep 8640") and state != "Z":
            found.append(command)
    return found


def test_every_leaked_process_fails_the_run_and_is_killed(pytester, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(PROJECT_ROOT))
    pytester.makeconftest("from tests import processes\n"
                          "def pytest_configure(config):\n"
                          "    config.pluginmanager.register(processes.Guard(session_owners=set()))\n"
                          "from tests.conftest import no_process_outlives_its_test\n")
    pytester.makepyfile(test_leaky=LEAKY_SUITE)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    output = result.stdout.str()
    result.assert_outcomes(passed=4, errors=4)
    assert "outlived the teardown of fixture 'leaky_module' (module scope)" in output and "sleep 86401" in output
    assert "sleep 86402" not in output                          # stopped by its own fixture: fine
    assert "outlived the set-up of fixture 'session_job' (session scope)" in output and "sleep 86403" in output
    assert "outlived the test that started them" in output and "sleep 86404" in output and "sleep 86405" in output
    assert not sleeps_running(), "the guard left processes running"
