"""Connections and schema. Every process connects through here."""
from __future__ import annotations

import hashlib
import io
from pathlib import Path

import psycopg2
import psycopg2.errorcodes
import psycopg2.extensions

from tradewatch.config import Settings

SCHEMA_FILE = Path(__file__).with_name("schema.sql")
# Errors that may mean "the server is gone for now" (is_outage tells): wait and retry, never crash.
CONNECTION_ERRORS = (psycopg2.OperationalError, psycopg2.InterfaceError)
# SQLSTATEs an OperationalError carries when the server is away or busy for a while: connection
# exceptions (class 08), a shutting-down or starting server (57P01-57P03), too many connections,
# a full disk or no memory (53100, 53200: the server stays up, and freeing space fixes it).
# Class 40 (a deadlock, a serialization failure) rolls the transaction back: running it again works.
_OUTAGE_STATES = ("57P01", "57P02", "57P03", "53300", "53100", "53200")
# what libpq says when a connection is refused for good: retrying cannot fix these
_REFUSED = ("password authentication failed", "no password supplied", "does not exist",
            "no pg_hba.conf entry", "SSL is required")


class DatabaseUnavailable(RuntimeError):
    pass


class DatabaseRefused(RuntimeError):
    """PostgreSQL answered, and no retry will change its answer (bad credentials, a limit, a
    cancelled statement …): the stage stops with this message."""


def is_outage(error: BaseException) -> bool:
    """True when `error` (from psycopg2) means the server is away or busy for now, or the
    transaction lost a race it will win when run again."""
    if isinstance(error, psycopg2.InterfaceError):
        return True          # our connection is closed: the server went away under it
    code = getattr(error, "pgcode", None)
    if code is None:         # libpq lost or could not open the connection
        return not any(words in str(error) for words in _REFUSED)
    return code.startswith(("08", "40")) or code in _OUTAGE_STATES


def refused_message(error: BaseException) -> str:
    code = getattr(error, "pgcode", None)
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    name = psycopg2.errorcodes.lookup(code).lower() if code and psycopg2.errorcodes.lookup(code) else ""
    return (f"PostgreSQL refused it (SQLSTATE {code}{' ' + name if name else ''}): {first}" if code
            else f"PostgreSQL refused the connection: {first}") + "; retrying cannot fix this, stopping"


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
        if not is_outage(error):
            raise DatabaseRefused(refused_message(error)) from None
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise DatabaseUnavailable(f"{unavailable_message(settings)}: {first_line}") from None


COPY_CHUNK = 1 << 24


def copy_in(cur, sql: str, data: str | bytes) -> None:
    """`COPY … FROM STDIN` of `data` (text lines, or bytes of the binary format) in one piece. psycopg2
    reads its file in chunks (8 KiB by default), taking the GIL for each; while another thread of
    the process runs Python (the consumer decodes its next batch while this one is stored), every
    chunk waited for the GIL's switch interval, and storing 10,000 trades took about a second where
    it takes 35 ms."""
    cur.copy_expert(sql, io.BytesIO(data) if isinstance(data, bytes) else io.StringIO(data), size=COPY_CHUNK)


def apply_schema(settings: Settings) -> None:
    """Create or upgrade the tables — only when schema.sql changed since it was last applied: its
    ALTERs take exclusive table locks, which a stage starting beside running ones must not take
    (a checkpoint holding one table and waiting for another deadlocked with it)."""
    text = SCHEMA_FILE.read_text()
    digest = hashlib.sha256(text.encode()).hexdigest()
    with connect(settings) as conn, conn.cursor() as cur:
        cur.execute("SELECT pg_advisory_xact_lock(7427)")  # two processes starting together
        cur.execute("CREATE TABLE IF NOT EXISTS schema_applied (digest text PRIMARY KEY,"
                    " applied_at timestamptz NOT NULL DEFAULT now())")
        cur.execute("SELECT 1 FROM schema_applied WHERE digest = %s", (digest,))
        if cur.fetchone() is None:
            cur.execute(text)
            cur.execute("INSERT INTO schema_applied (digest) VALUES (%s)", (digest,))
    conn.close()
