"""Repeated runs on one data directory, as a batch host makes them: top-ups of what the
source gained, `run --follow`, and the guard against a changed target. The real program,
the simulator over loopback HTTP (live, with arrivals, where the case needs them) and a
real PostgreSQL."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import orjson
import psycopg2
import pytest

from ingest.sink.db import dsn_for_database
from ingest.source import checkpoint
from tests.e2e import assert_exact, ingest_env, run_to_end


def summary_of(log: str) -> dict[str, Any]:
    for line in reversed(log.splitlines()):
        if '"summary"' in line:
            return dict(orjson.loads(line)["summary"])
    raise AssertionError("no summary line in the log")


def error_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if '"ERROR"' in line or "| ERROR" in line]


def tables_in(dsn: str) -> set[str]:
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        return {row[0] for row in cur.fetchall()}


def requests_served(sim: Any) -> int:
    return sum(sim.stats()["requests"].values())


@pytest.mark.sim(events=5_000)
def test_a_second_run_on_a_drained_directory_costs_a_few_requests(
    simulator: Any, pg_dsn: str, data_dir: Path
) -> None:
    env = ingest_env(simulator, pg_dsn, data_dir, INGEST_PAGE_LIMIT=1000)
    code, log = run_to_end(env, data_dir / "run1.log")
    assert code == 0, log[-3000:]
    first = requests_served(simulator)
    code, log = run_to_end(env, data_dir / "run2.log")
    assert code == 0, log[-3000:]
    assert "drained" in log
    assert_exact(pg_dsn, simulator.truth())
    summary = summary_of(log)
    assert summary["events_loaded"] == 0, "nothing new: nothing loaded twice"
    assert summary["events_fetched"] <= 1000, "at most the newest page again"
    assert requests_served(simulator) - first <= 4, "a look at the newest end, a token, a page"
    state = checkpoint.read(data_dir / "ingestion.state")
    assert state is not None and state.drained and state.loaded_newest_ms == state.newest_ms
    assert state.topped_up_at is not None


@pytest.mark.sim(events=5_000)
def test_a_changed_target_exits_2_with_one_line_and_writes_nothing(
    simulator: Any, sim_factory: Any, pg_dsn: str, pg_server_dsn: str, data_dir: Path
) -> None:
    env = ingest_env(simulator, pg_dsn, data_dir)
    code, log = run_to_end(env, data_dir / "run.log")
    assert code == 0, log[-3000:]
    state_before = (data_dir / "ingestion.state").read_bytes()
    tables_before = tables_in(pg_dsn)
    other_sim = sim_factory(events=100)
    other_db = "t_" + uuid.uuid4().hex[:12]
    admin = psycopg2.connect(pg_server_dsn)
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{other_db}"')
    other_dsn = dsn_for_database(pg_server_dsn, other_db)
    try:
        changes = {
            "--table": {"INGEST_TABLE": "other_events"},
            "--database-url": {"DATABASE_URL": other_dsn},
            "--api-url": {"DATASYNC_API_URL": other_sim.base_url, "DATASYNC_API_KEY": other_sim.api_key},
            "--source": {"INGEST_SOURCE": "events"},
        }
        for flag, change in changes.items():
            code, log = run_to_end({**env, **change}, data_dir / f"changed{flag}.log")
            assert code == 2, (flag, log[-2000:])
            [line] = error_lines(log)
            assert "another target" in line and flag in line and "reset" in line and "--data-dir" in line
        assert (data_dir / "ingestion.state").read_bytes() == state_before
        assert tables_in(pg_dsn) == tables_before and "other_events" not in tables_in(pg_dsn)
        assert tables_in(other_dsn) == set(), "nothing created in the other database"
        assert requests_served(other_sim) == 0, "not a request to the other API"
    finally:
        with admin.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{other_db}" WITH (FORCE)')
        admin.close()
    code, log = run_to_end(env, data_dir / "same.log")
    assert code == 0, "the original target still runs"
