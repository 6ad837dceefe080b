"""Safe by default (issue 24) on the real local stack: PostgreSQL asks every connection for a
password (SCRAM; generated at the first start and kept 0600, or POSTGRES_PASSWORD), a data folder
made before passwords is switched over at its next start, and a start as root never hands the
service user a file through a link it planted."""
from __future__ import annotations

import os
import stat
import subprocess
import tempfile
from pathlib import Path

import psycopg2
import pytest

from tests.conftest import free_port
from tradewatch import stack
from tradewatch.config import Settings


def refused(settings: Settings, password: str | None) -> str:
    """The server's answer to a connection with `password` (None: none given), '' if it was let in."""
    kwargs = dict(host=settings.postgres_host, port=settings.postgres_port, user=settings.postgres_user,
                  dbname="postgres", connect_timeout=5)
    if password is not None:
        kwargs["password"] = password
    try:
        psycopg2.connect(**kwargs).close()
        return ""
    except psycopg2.OperationalError as error:
        return str(error)


def test_postgresql_asks_every_connection_for_its_password(services):
    assert "password" in refused(services, None)
    assert "password authentication failed" in refused(services, "tradewatch")
    assert refused(services, services.database_password) == ""
    # generated at the first start (.env leaves POSTGRES_PASSWORD empty): only whoever runs the stack reads it
    assert services.password_file.read_text().strip() == services.database_password
    assert stat.S_IMODE(services.password_file.stat().st_mode) == 0o600
    assert services.password_file.stat().st_uid == os.geteuid()


@pytest.fixture
def own_home():
    """A stack home of its own, which the service user can enter (pytest's tmp folders are private)."""
    with tempfile.TemporaryDirectory(dir="/tmp") as top:
        Path(top).chmod(0o755)
        settings = Settings.load(tradewatch_home=str(Path(top) / "home"), postgres_port=free_port(),
                                 postgres_password="")
        try:
            yield settings
        finally:
            stack.stop_postgres(settings)


@pytest.mark.skipif(os.geteuid() != 0, reason="the attack needs a root start (make demo and CI run as root)")
def test_a_link_the_service_user_plants_does_not_hand_it_a_file_at_the_next_root_start(own_home):
    settings = own_home
    stack.start_postgres(settings)
    target = Path(tempfile.mkstemp(dir="/tmp")[1])
    try:
        service = stack.pwd.getpwnam(stack.SERVICE_USER)
        for link in (settings.home / "postgres" / "planted", settings.home / "postgres" / "data" / "planted"):
            link.symlink_to(target)
            os.chown(link, service.pw_uid, service.pw_gid, follow_symlinks=False)
        stack.stop_postgres(settings)
        stack.start_postgres(settings)
        assert target.stat().st_uid == 0, "the root start followed the link and gave the file away"
        assert refused(settings, settings.database_password) == ""
    finally:
        target.unlink()


def test_a_data_folder_made_before_passwords_asks_for_one_after_its_next_start(own_home):
    settings = own_home
    data = settings.home / "postgres" / "data"
    data.mkdir(parents=True, mode=0o700)
    as_user = stack._run_as()
    for folder in (data.parent, data):
        stack._give_to_service_user(folder)
    subprocess.run([stack._pg_bin("initdb"), "-D", str(data), "-U", settings.postgres_user, "--auth=trust",
                    "--no-locale"], check=True, capture_output=True, **as_user)     # as the old code did
    stack.start_postgres(settings)
    assert "password" in refused(settings, None)
    assert refused(settings, settings.database_password) == ""
    assert "trust" not in [line.split()[-1] for line in (data / "pg_hba.conf").read_text().splitlines()
                           if line.strip() and not line.startswith("#")]


@pytest.mark.skipif(os.geteuid() != 0, reason="started as root only (make demo and CI run as root)")
def test_started_as_root_kafka_runs_as_the_service_user_owning_only_its_data(services):
    service = stack.pwd.getpwnam(stack.SERVICE_USER)
    for node, pid in stack.kafka_pids(services).items():
        uids = next(line.split()[1:] for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                    if line.startswith("Uid:"))
        assert set(map(int, uids)) == {service.pw_uid}, f"Kafka node {node} runs as uid {uids}"
        data, config, _, _ = stack.kafka_paths(services, node)
        assert data.stat().st_uid == service.pw_uid and config.stat().st_uid == 0, "its configuration stays root's"
