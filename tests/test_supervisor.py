"""The supervisor: its restart policy as a table, and the real Supervisor driven in this
process against the simulator and a real PostgreSQL."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from ingest.config import Config
from ingest.run.children import Kind
from ingest.run.exits import ChildExit, ExitCode
from ingest.run.supervisor import Restart, Supervisor, restart_action
from ingest.source import checkpoint
from ingest.source.checkpoint import Checkpoint, PartitionState
from tests.e2e import assert_exact

MAX = 3


@pytest.mark.parametrize(
    ("kind", "code", "restarts", "fetch_done", "stopping", "action"),
    [
        ("fetcher", ChildExit.DONE, 0, False, False, Restart.DONE),  # drained its walk
        ("fetcher", ChildExit.DONE, 0, False, True, Restart.DONE),  # stopped on request
        ("loader", ChildExit.DONE, 0, True, False, Restart.DONE),  # ready/ empty after the fetchers
        ("loader", ChildExit.DONE, 0, False, False, Restart.RESTART),  # gone while segments may still come
        ("loader", ChildExit.DONE, MAX, False, False, Restart.GIVE_UP),
        ("fetcher", ChildExit.RETRYABLE, 0, False, False, Restart.RESTART),
        ("fetcher", ChildExit.RETRYABLE, MAX - 1, False, False, Restart.RESTART),
        ("fetcher", ChildExit.RETRYABLE, MAX, False, False, Restart.GIVE_UP),
        ("loader", ChildExit.CRASHED, 0, False, False, Restart.RESTART),
        ("loader", -9, 1, True, False, Restart.RESTART),  # SIGKILLed
        ("fetcher", None, 0, False, False, Restart.RESTART),  # exit code unknown: treated as a crash
        ("fetcher", ChildExit.FATAL, 0, False, False, Restart.FAIL),  # a refused key
        ("loader", ChildExit.FATAL, 0, True, True, Restart.FAIL),  # fatal wins over stopping
        ("fetcher", ChildExit.RETRYABLE, 0, False, True, Restart.LET_GO),  # the run is stopping
        ("loader", ChildExit.CRASHED, MAX, True, True, Restart.LET_GO),
    ],
)
def test_restart_policy(kind: Kind, code: int | None, restarts: int, fetch_done: bool, stopping: bool,
                        action: Restart) -> None:
    assert restart_action(kind, code, restarts, MAX, fetch_done, stopping) is action


def config_for(sim: Any, data_dir: Path, dsn: str, **fields: Any) -> Config:
    return Config(api_url=sim.base_url, api_key=sim.api_key, data_dir=data_dir, database_url=dsn, pacing="off",
                  log_format="text", workers=2, **fields)


@pytest.mark.sim(events=6_000)
def test_the_supervisor_runs_to_done(simulator: Any, pg_dsn: str, data_dir: Path) -> None:
    supervisor = Supervisor(config_for(simulator, data_dir, pg_dsn, page_limit=1000), pg_dsn)
    assert supervisor.health() == "ready"
    assert supervisor.run() == ExitCode.OK
    assert supervisor.health() == "done"
    assert_exact(pg_dsn, simulator.truth())
    assert supervisor.summary["events_loaded"] == len(simulator.truth().storable_ids)


@pytest.mark.sim(events=2_000, p5xx=1.0)
def test_a_fetcher_that_keeps_failing_is_restarted_then_fails_the_run(
    simulator: Any, pg_dsn: str, data_dir: Path
) -> None:
    """Every request answers 5xx: each fetcher gives up after one attempt (RETRYABLE), is
    restarted --max-restarts times, then fails the run with the count and the reason."""
    config = config_for(simulator, data_dir, pg_dsn, source="events", max_attempts=1, max_restarts=1)
    plan = Checkpoint(generation="feedf00d", mode="events", total=None, newest_ms=None,
                      partitions=[PartitionState(index=0, lane="events", lower_ms=0, upper_ms=2**62)])
    checkpoint.write(config.state_path, plan)
    supervisor = Supervisor(config, pg_dsn)
    assert supervisor.run() == ExitCode.FAILED
    assert supervisor.health() == "failed"
    assert supervisor.failure is not None and "fetcher 0 failed 2 times" in supervisor.failure
    assert "gave up after 1 attempts" in supervisor.failure
    assert supervisor.summary["restarts"] == 1
