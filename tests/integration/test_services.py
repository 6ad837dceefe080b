"""The demo's watch over Kafka and PostgreSQL (demo.ServiceWatch) against the real services, in a
home of their own: each killed with SIGKILL (as the out-of-memory killer does) is named and back
within 30 s without a person; a PostgreSQL that cannot come back (another program took its port) is
said "failed" with the cause from its own log, in the state file the page reads, in `doctor` and in
the API's `/health` (a 503 naming it), and comes back once the port is free."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import time

from tests.conftest import free_port, wait_for
from tests.integration.test_api import call, serve_api
from tests.integration.test_stack import lock_home
from tradewatch import bus, doctor, services, stack
from tradewatch.demo import ServiceWatch
from tradewatch.store import db

BACK_WITHIN_S = 30


def watched_until(watch: ServiceWatch, service: str, status: str, timeout: float) -> services.ServiceState:
    """Run the watch as the supervisor does (once a second) until `service` is `status`."""
    def reached() -> bool:
        watch.check()
        return watch.states[service].status == status
    wait_for(reached, timeout=timeout, interval=0.5, message=f"{service} {status}")
    return watch.states[service]


def answers(settings) -> int:
    with db.connect(settings) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM trades")
        count = cur.fetchone()[0]
    conn.close()
    return count


def test_killed_services_come_back_named_and_one_that_cannot_says_why(tmp_path):
    settings = lock_home("watch").with_overrides(api_port=free_port())
    stack.start(settings)
    watch = ServiceWatch(settings)
    try:
        assert answers(settings) == 0
        watch.check()
        _, base = serve_api(settings, tmp_path / "api.log")
        status, health = call(base, "/health")
        assert status == 200 and {name: s["status"] for name, s in health["services"].items()} == \
            {"postgres": "up", "kafka": "up"}
        for service in ("postgres", "kafka"):
            victim = stack.postgres_pid(settings) if service == "postgres" else stack.kafka_pids(settings)[1]
            os.kill(victim, signal.SIGKILL)
            killed_at = time.monotonic()
            state = watched_until(watch, service, "down", timeout=5)
            assert state.cause == "killed (a kill -9, or the out-of-memory killer), nothing in its log"
            assert services.read_states(settings)[service].status == "down", "the page sees it"
            state = watched_until(watch, service, "up", timeout=BACK_WITHIN_S)
            assert state.restarts == 1 and time.monotonic() - killed_at < BACK_WITHIN_S
            print(f"{service}: back {time.monotonic() - killed_at:.1f}s after kill -9")
        assert answers(settings) == 0 and bus.kafka_reachable(settings)

        # PostgreSQL killed again, and another program listens on its port meanwhile
        os.kill(stack.postgres_pid(settings), signal.SIGKILL)
        watched_until(watch, "postgres", "down", timeout=5)
        with socket.socket() as squatter:
            squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            squatter.bind((settings.postgres_host, settings.postgres_port))
            squatter.listen()
            state = watched_until(watch, "postgres", "failed", timeout=BACK_WITHIN_S)
            assert state.cause == f"port {settings.postgres_port} is taken by another program", state
            assert "Address already in use" in state.evidence and "POSTGRES_PORT" in state.fix
            [check] = doctor.check_postgres(settings)
            assert not check.ok and f"failed · port {settings.postgres_port} is taken" in check.detail
            assert "POSTGRES_PORT" in check.fix
            status, health = call(base, "/health")        # the API says it too, while it cannot read a table
            assert status == 503 and health["database"] == "down", health
            assert health["cause"] == state.cause and health["services"]["postgres"]["status"] == "failed"
        state = watched_until(watch, "postgres", "up", timeout=BACK_WITHIN_S + 5)
        assert state.restarts == 2 and answers(settings) == 0
        wait_for(lambda: call(base, "/health")[0] == 200, timeout=10, message="the API to read its tables again")
        assert call(base, "/health")[1]["services"]["postgres"]["restarts"] == 2
    finally:
        watch.close()
        stack.stop(settings)
        shutil.rmtree(settings.home, ignore_errors=True)


def test_a_full_disk_is_waited_out_not_a_reason_to_stop(settings):
    """PostgreSQL that cannot extend a table for want of disk answers SQLSTATE 53100 and stays up:
    a stage once took that for a refusal no retry can fix and stopped; freeing space fixes it, so
    the stage waits like for any outage (issue 40). Likewise out of memory (53200)."""
    import psycopg2

    for code in ("disk_full", "out_of_memory"):
        with db.connect(settings) as conn, conn.cursor() as cur:
            try:
                cur.execute(f"DO $$ BEGIN RAISE EXCEPTION 'could not extend file: No space left on device'"
                            f" USING ERRCODE = '{code}'; END $$")
            except psycopg2.OperationalError as error:
                assert db.is_outage(error), f"{error.pgcode}: a stage would stop"
            else:
                raise AssertionError("the server raised nothing")
        conn.close()
