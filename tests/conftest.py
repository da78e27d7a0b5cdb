"""Shared fixtures: a real PostgreSQL for every test that needs one.

`DATABASE_URL` set: that server is used. Unset: one embedded PostgreSQL is started for the
whole session in a temporary directory. Either way each test gets a database of its own,
created empty and dropped afterwards, so tests never see each other's rows.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg2
import pytest

from ingest.sink.db import EmbeddedPostgres, dsn_for_database


@pytest.fixture(scope="session")
def pg_server_dsn() -> Iterator[str]:
    """DSN of the server (maintenance database); started once per session when embedded."""
    url = os.environ.get("DATABASE_URL")
    if url:
        yield url
        return
    # Not under pytest's basetemp: a concurrent pytest session prunes old basetemps, and
    # would delete the data directory of a server that is still running.
    root = Path(tempfile.mkdtemp(prefix="datasync-test-pg-"))
    server = EmbeddedPostgres.start(root / "data")
    try:
        yield server.dsn
    finally:
        server.stop(mode="immediate")
        shutil.rmtree(root, ignore_errors=True)


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


# ---------------------------------------------------------------------------------------
# Simulator fixtures (ingest.simulator): an in-process DataSync API on a free loopback port.

SIM_KEY = "ds_" + "0123456789abcdef" * 2
SIM_KEY_2 = "ds_" + "fedcba9876543210" * 2


@pytest.fixture
def sim_factory():
    """Start simulators with `sim_factory(**config_fields)`; all are stopped after the test.

    Defaults: 2,000 events, no latency, no rate limits, no chaos, two known keys.
    """
    from ingest.simulator import SimulatorConfig, start_simulator

    started = []

    def make(**fields):
        values = {"events": 2000, "seed": 3, "latency": "none", "rate_limits": False, "chaos": "none",
                  "api_keys": (SIM_KEY, SIM_KEY_2), **fields}
        sim = start_simulator(SimulatorConfig(**values))
        started.append(sim)
        return sim

    yield make
    for sim in started:
        sim.stop()


@pytest.fixture
def clean_simulator(sim_factory):
    """20,000 events, clean and unthrottled: for client tests that need a plain, fast source."""
    return sim_factory(events=20_000, seed=1)


@pytest.fixture
def simulator(request: pytest.FixtureRequest) -> Iterator[Any]:
    """A clean, unthrottled simulator for end-to-end tests. The test module's SIM_DEFAULTS,
    then the test's `sim` marker (SimulatorConfig keyword arguments), change it."""
    from ingest.simulator import SimulatorConfig, start_simulator

    options: dict[str, Any] = {"events": 20_000, "latency": "none", "rate_limits": False, "chaos": "none", "seed": 3}
    options.update(getattr(request.module, "SIM_DEFAULTS", {}))
    marker = request.node.get_closest_marker("sim")
    options.update(marker.kwargs if marker else {})
    sim = start_simulator(SimulatorConfig(**options))
    try:
        yield sim
    finally:
        sim.stop()
