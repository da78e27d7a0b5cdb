"""Shared fixtures: a real PostgreSQL for every test that needs one.

`DATABASE_URL` set: that server is used. Unset: one embedded PostgreSQL is started for the
whole session in a temporary directory. Either way each test gets a database of its own,
created empty and dropped afterwards, so tests never see each other's rows.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Iterator

import psycopg2
import pytest

from ingest.db import EmbeddedPostgres, dsn_for_database


@pytest.fixture(scope="session")
def pg_server_dsn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """DSN of the server (maintenance database); started once per session when embedded."""
    url = os.environ.get("DATABASE_URL")
    if url:
        yield url
        return
    server = EmbeddedPostgres.start(tmp_path_factory.mktemp("pg") / "data")
    try:
        yield server.dsn
    finally:
        server.stop(mode="immediate")


@pytest.fixture
def pg_dsn(pg_server_dsn: str) -> Iterator[str]:
    """DSN of a fresh, empty database for this test."""
    name = "t_" + uuid.uuid4().hex[:12]
    admin = psycopg2.connect(pg_server_dsn)
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    try:
        yield dsn_for_database(pg_server_dsn, name)
    finally:
        with admin.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


@pytest.fixture
def pg_conn(pg_dsn: str) -> Iterator[psycopg2.extensions.connection]:
    conn = psycopg2.connect(pg_dsn)
    try:
        yield conn
    finally:
        conn.close()


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    path = tmp_path / "data"
    path.mkdir()
    return path
