"""Connections and schema. Every process connects through here."""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable

import psycopg2
import psycopg2.extensions

from tradewatch.config import Settings

SCHEMA_FILE = Path(__file__).with_name("schema.sql")
# Errors that mean "the server is gone for now": wait and retry, never crash.
CONNECTION_ERRORS = (psycopg2.OperationalError, psycopg2.InterfaceError)


class DatabaseUnavailable(RuntimeError):
    pass


def unavailable_message(settings: Settings) -> str:
    return (f"cannot reach PostgreSQL at {settings.postgres_host}:{settings.postgres_port} — "
            "start it with `make services` (or check POSTGRES_HOST/POSTGRES_PORT)")


def connect(settings: Settings, database: str | None = None) -> psycopg2.extensions.connection:
    dsn = settings.postgres_dsn
    if database:
        dsn = dsn.replace(f"dbname={settings.postgres_db}", f"dbname={database}")
    try:
        return psycopg2.connect(dsn)
    except psycopg2.OperationalError as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise DatabaseUnavailable(f"{unavailable_message(settings)}: {first_line}") from None


def connect_waiting(settings: Settings, log: logging.Logger, retry_s: float = 2.0) -> psycopg2.extensions.connection:
    """Connect, or log one line and keep retrying until the server answers."""
    waiting = False
    while True:
        try:
            conn = connect(settings)
            if waiting:
                log.info("PostgreSQL reachable again")
            return conn
        except DatabaseUnavailable as error:
            if not waiting:
                log.warning("%s; retrying every %.0fs", error, retry_s)
                waiting = True
            time.sleep(retry_s)


def commit_retrying(get_conn: Callable[[], psycopg2.extensions.connection],
                    write: Callable[[psycopg2.extensions.connection, psycopg2.extensions.cursor], None],
                    log: logging.Logger, on_lost: Callable[[], None], retry_s: float = 2.0) -> None:
    """Run `write` and commit in one transaction; while the server is gone, log, call `on_lost`
    (the caller drops its connection and whatever it derived from it), wait and retry."""
    while True:
        conn = get_conn()
        try:
            with conn.cursor() as cur:
                write(conn, cur)
            conn.commit()
            return
        except CONNECTION_ERRORS as error:
            log.warning("PostgreSQL unavailable (%s); retrying every %.0fs",
                        str(error).strip().splitlines()[0], retry_s)
            on_lost()
            time.sleep(retry_s)


def apply_schema(settings: Settings) -> None:
    with connect(settings) as conn, conn.cursor() as cur:
        cur.execute("SELECT pg_advisory_xact_lock(7427)")  # two processes starting together
        cur.execute(SCHEMA_FILE.read_text())
    conn.close()
