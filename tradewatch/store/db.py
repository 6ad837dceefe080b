"""Connections and schema. Every process connects through here."""
from __future__ import annotations

from pathlib import Path

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


def apply_schema(settings: Settings) -> None:
    with connect(settings) as conn, conn.cursor() as cur:
        cur.execute("SELECT pg_advisory_xact_lock(7427)")  # two processes starting together
        cur.execute(SCHEMA_FILE.read_text())
    conn.close()
