"""The database module: the embedded server's life cycle, the schema, the error helpers."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import psycopg2
import pytest

from ingest.simulator import SimulatorConfig, start_simulator
from ingest.sink import db
from tests.e2e import PROGRAM, ingest_env


def test_embedded_server_from_nothing_then_from_its_existing_directory(tmp_path: Path) -> None:
    pgdata = tmp_path / "pg"
    server = db.EmbeddedPostgres.start(pgdata)
    try:
        assert (pgdata / "PG_VERSION").exists()
        with psycopg2.connect(server.dsn) as conn, conn.cursor() as cur:
            cur.execute("CREATE TABLE kept (v int); INSERT INTO kept VALUES (42)")
    finally:
        server.stop()
    again = db.EmbeddedPostgres.start(pgdata)  # same process: the library's cached handle
    try:
        with psycopg2.connect(again.dsn) as conn, conn.cursor() as cur:
            cur.execute("SELECT v FROM kept")
            assert cur.fetchone() == (42,)
    finally:
        again.stop()


def test_run_and_status_use_the_embedded_default_across_processes(tmp_path: Path) -> None:
    """No DATABASE_URL: `run` starts PostgreSQL in <data-dir>/pg and stops it at exit; a
    later `status` process finds the same data there."""
    sim = start_simulator(SimulatorConfig(events=3_000, latency="none", rate_limits=False, chaos="none"))
    try:
        env = ingest_env(sim, "", tmp_path / "data")
        del env["DATABASE_URL"]
        run = subprocess.run(PROGRAM, env=env, capture_output=True, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
        assert (tmp_path / "data" / "pg" / "PG_VERSION").exists()
        status = subprocess.run([*PROGRAM, "status"], env=env, capture_output=True, timeout=300, check=True)
        assert json.loads(status.stdout)["database"]["events"] == 3_000
    finally:
        sim.stop()


def test_schema_is_idempotent_and_quotes_the_table_name(pg_conn: psycopg2.extensions.connection) -> None:
    for _ in range(2):
        db.ensure_schema(pg_conn, "MyEvents")
    with pg_conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM \"MyEvents\"")
        assert cur.fetchone() == (0,)
        cur.execute(
            "SELECT column_name, data_type FROM information_schema.columns"
            " WHERE table_name = 'MyEvents' ORDER BY ordinal_position"
        )
        assert cur.fetchall() == [
            ("id", "text"), ("occurred_at", "timestamp with time zone"), ("type", "text"), ("name", "text"),
            ("user_id", "text"), ("session_id", "text"), ("payload", "jsonb"),
            ("ingested_at", "timestamp with time zone"),
        ]
    assert db.totals(pg_conn, "MyEvents")["events"] == 0


@pytest.mark.parametrize(
    "pgcode, base, action",
    [
        (None, psycopg2.OperationalError, db.Action.RETRY),  # connection lost: libpq gives no SQLSTATE
        (None, psycopg2.InterfaceError, db.Action.RETRY),  # connection already closed
        (None, psycopg2.ProgrammingError, db.Action.FAIL),
        ("57P01", psycopg2.OperationalError, db.Action.RETRY),  # admin shutdown
        ("08006", psycopg2.OperationalError, db.Action.RETRY),  # connection failure
        ("53100", psycopg2.DatabaseError, db.Action.RETRY),  # disk full
        ("40P01", psycopg2.DatabaseError, db.Action.RETRY),  # deadlock detected
        ("42P01", psycopg2.DatabaseError, db.Action.FAIL),  # undefined table
        ("42501", psycopg2.OperationalError, db.Action.FAIL),  # insufficient privilege
        ("22P02", psycopg2.DatabaseError, db.Action.FAIL),  # invalid text representation, not as a DataError
        ("22P02", psycopg2.DataError, db.Action.REJECT),  # the same, as psycopg2 raises it
        ("23505", psycopg2.IntegrityError, db.Action.REJECT),  # unique violation
        (None, psycopg2.DataError, db.Action.REJECT),
    ],
)
def test_database_outcomes(pgcode: str | None, base: type[psycopg2.Error], action: db.Action) -> None:
    class Fake(base):  # type: ignore[misc, valid-type]
        pass

    error = Fake("boom")
    Fake.pgcode = pgcode  # type: ignore[attr-defined]
    assert db.classify(error) is action
