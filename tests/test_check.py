"""`check`: whether a run could start, what it would do, and that asking writes nothing.

The verdicts are table-tested; the command runs for real against the simulator over HTTP
and a real PostgreSQL."""

from __future__ import annotations

import re
import subprocess
import uuid
from pathlib import Path
from typing import Any

import psycopg2
import pytest

from ingest import locks
from ingest.config import Config
from ingest.ops.check import (
    DirState,
    Finding,
    bytes_needed,
    checkpoint_finding,
    data_dir_finding,
    expected_seconds,
    lane_finding,
    lane_pages,
    lane_unused,
)
from ingest.simulator.server import STREAM_ACCESS_PATH
from ingest.source.api import ApiError, FatalApiError, SourceUnavailable
from ingest.source.checkpoint import Checkpoint, PartitionState
from tests.e2e import NoApi, command, ingest_env, problem_lines, run_to_end

MB = 1 << 20


# ---------------------------------------------------------------------------------------
# Verdicts


@pytest.mark.parametrize(
    ("lane", "failure", "source", "says", "problem"),
    [
        ("feed", None, "auto", "open (a stream token was issued)", False),
        ("feed", SourceUnavailable("403 DASHBOARD_REQUIRED"), "auto", "unavailable (403 DASHBOARD_REQUIRED)", False),
        ("feed", SourceUnavailable("403 DASHBOARD_REQUIRED"), "feed", "unavailable", True),
        ("events_query", SourceUnavailable("HTTP 401"), "auto", "its windows go to /api/v1/events", False),
        ("events_query", None, "events", "open", False),
        ("events", None, "auto", "open", False),
        ("events", FatalApiError("HTTP 401 UNAUTHORIZED"), "auto", "refused: HTTP 401", True),
        ("feed", FatalApiError("HTTP 401"), "auto", "refused", True),
        ("events", ApiError("ConnectionError"), "events", "cannot be reached: ConnectionError", True),
        # a SourceUnavailable where no row expects one is an unreachable lane
        ("events", SourceUnavailable("odd"), "events", "cannot be reached: odd", True),
    ],
)
def test_lane_verdicts(lane: Any, failure: ApiError | None, source: str, says: str, problem: bool) -> None:
    finding = lane_finding(lane, failure, source)
    assert finding.subject == f"lane {lane}" and says in finding.text and finding.problem is problem


@pytest.mark.parametrize(
    ("lane", "source", "query_rate", "unused"),
    [
        ("feed", "events", 5.0, "not used (--source events)"),
        ("feed", "auto", 5.0, None),
        ("events_query", "feed", 5.0, "not used (--source feed)"),
        ("events_query", "auto", 0.0, "off (--query-rate 0)"),
        ("events_query", "events", 5.0, None),
        ("events", "feed", 5.0, None),  # the key is always tested on /events
    ],
)
def test_lanes_a_run_would_not_walk(lane: Any, source: str, query_rate: float, unused: str | None) -> None:
    assert lane_unused(lane, Config(source=source, query_rate=query_rate)) == unused


HERE = Path("/srv/data")


@pytest.mark.parametrize(
    ("state", "needed", "says", "problem"),
    [
        (DirState(HERE, True, True, True, HERE, 10 * MB), MB, "writable; 10.0 MB free, a run needs about 1.0 MB", False),
        (DirState(HERE, False, False, True, Path("/srv"), 10 * MB), MB, "would be created in /srv", False),
        (DirState(HERE, True, True, True, HERE, MB), 10 * MB, "1.0 MB free, a run needs about 10.0 MB", True),
        (DirState(HERE, True, False, True, HERE, MB), 0, "is not a directory", True),
        (DirState(HERE, True, True, False, HERE, MB), 0, "is not writable", True),
        (DirState(HERE, False, False, False, Path("/"), MB), 0, "cannot be created: / is not writable", True),
    ],
)
def test_data_directory_verdicts(state: DirState, needed: int, says: str, problem: bool) -> None:
    finding = data_dir_finding(state, needed)
    assert says in finding.text and finding.problem is problem


@pytest.mark.parametrize(
    ("events", "keep", "embedded", "needed"),
    [
        (1000, False, False, 540 * 1000),
        (10_000_000, False, False, 512 * MB),  # fetchers pause at --ready-max-bytes
        (10_000_000, True, False, 540 * 10_000_000),  # --keep-segments keeps them all
        (1000, False, True, (540 + 700) * 1000),  # the embedded database holds the table
    ],
)
def test_disk_a_run_needs(events: int, keep: bool, embedded: bool, needed: int) -> None:
    assert bytes_needed(events, keep, 512 * MB, embedded) == needed


def plan(*parts: PartitionState, total: int = 100_000) -> Checkpoint:
    return Checkpoint(generation="g", mode="mixed", total=total, newest_ms=100_000, oldest_ms=0, partitions=list(parts))


RATES: dict[Any, float] = {"feed": 40.0, "events": 10.0, "events_query": 0.0}


def test_pages_per_lane_follow_the_windows_and_each_ends_with_a_partial_page() -> None:
    # one event per ms: 80,000 events on the feed, 20,000 on /events, 1,000 a page
    state = plan(PartitionState(0, "feed", 20_000, 100_000), PartitionState(1, "events", 0, 20_000))
    pages = lane_pages(state, 1000, RATES)
    assert pages == pytest.approx({"feed": 80.0 + 1, "events": 20.0 + 1})
    assert expected_seconds(pages, RATES, 60.0) == pytest.approx(max(81 / 40, 21 / 10) * 60)


def test_pages_left_count_from_where_a_walk_stands_and_lanes_without_budget_go_to_events() -> None:
    walked = PartitionState(0, "feed", 50_000, 100_000, done=False)
    done = PartitionState(1, "feed", 20_000, 50_000, done=True)
    query = PartitionState(2, "events_query", 0, 20_000)  # --query-rate 0 on resume
    pages = lane_pages(plan(walked, done, query), 1000, RATES)
    assert pages == pytest.approx({"feed": 50.0 + 1, "events": 20.0 + 1})


def test_a_plan_without_a_measurable_range_costs_a_page_a_partition() -> None:
    state = Checkpoint(generation="g", mode="feed", total=None, newest_ms=None, partitions=[
        PartitionState(0, "feed", 0, 1)])
    assert lane_pages(state, 1000, RATES) == {"feed": 1.0}


@pytest.mark.parametrize(
    ("state", "error", "change", "says", "problem"),
    [
        (None, None, None, "none: a run plans from the start", False),
        (None, "ingestion.state: unreadable", None, "a run would stop", True),
        (None, None, "--table a (this run: b)", "holds the state of another target: --table a", True),
        (plan(PartitionState(0, "feed", 0, 1, done=True, rows=7)), None, None, "drained (7 rows fetched)", False),
        (plan(PartitionState(0, "feed", 0, 1, rows=7), PartitionState(1, "feed", 1, 2, done=True)), None, None,
         "resumes it: 1 of 2 partitions unfinished", False),
    ],
)
def test_checkpoint_verdicts(state: Checkpoint | None, error: str | None, change: str | None, says: str,
                             problem: bool) -> None:
    finding = checkpoint_finding(state, error, change)
    assert says in finding.text and finding.problem is problem


def test_a_finding_is_one_line() -> None:
    assert Finding("lane feed", "open").line() == "lane feed: open"


# ---------------------------------------------------------------------------------------
# The command


def check(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return command(env, "check", *args)


def tables(dsn: str) -> list[str]:
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        return sorted(row[0] for row in cur.fetchall())


def without_stream_access(sim: Any) -> None:
    """The simulator has no switch for it: stream-access answers what the service answers a
    client it will not give a token to."""
    sim.app.routes[("POST", STREAM_ACCESS_PATH)] = lambda req: sim.app.error(
        403, "DASHBOARD_REQUIRED", "Stream access is only available from the dashboard")


def test_a_run_could_start_and_nothing_is_written(simulator: Any, pg_dsn: str, data_dir: Path) -> None:
    fresh = data_dir / "fresh"
    result = check(ingest_env(simulator, pg_dsn, fresh))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for line in ("lane feed: open", "lane events: open", "lane events_query: open", "20000 events reported",
                 "a run may create the tables and COPY into events", f"would be created in {data_dir}"):
        assert line in out, out
    assert "plan: " in out and "partition  0" in out
    assert "pacing off: as fast as the source answers" in out, "an unthrottled source: no time at budgets"
    assert out.rstrip().endswith("a run can start")
    assert problem_lines(result) == []
    assert not fresh.exists() and list(data_dir.iterdir()) == []
    assert tables(pg_dsn) == []  # created and COPYed into inside a transaction rolled back


def test_without_the_stream_endpoint_the_feed_is_unavailable_and_a_run_can_still_start(
        sim_factory: Any, pg_dsn: str, data_dir: Path) -> None:
    sim = sim_factory(events=6000)
    without_stream_access(sim)
    result = check(ingest_env(sim, pg_dsn, data_dir))
    assert result.returncode == 0, result.stderr
    assert "lane feed: unavailable (stream-access refused a token: HTTP 403 DASHBOARD_REQUIRED)" in result.stdout
    assert "a run walks /api/v1/events only" in result.stdout
    assert "feed" not in result.stdout.split("plan: ", 1)[1]  # the plan walks /events lanes only
    assert problem_lines(result) == []


def test_without_the_stream_endpoint_a_feed_only_run_cannot_start(sim_factory: Any, pg_dsn: str,
                                                                   data_dir: Path) -> None:
    sim = sim_factory(events=6000)
    without_stream_access(sim)
    result = check(ingest_env(sim, pg_dsn, data_dir, INGEST_SOURCE="feed"))
    assert result.returncode == 1
    assert problem_lines(result) == [
        "datasync-ingest: check: lane feed: unavailable (stream-access refused a token: HTTP 403"
        " DASHBOARD_REQUIRED); a run walks /api/v1/events only"]


def test_a_query_string_key_refused_is_no_problem(sim_factory: Any, pg_dsn: str, data_dir: Path) -> None:
    result = check(ingest_env(sim_factory(events=6000, query_auth=False), pg_dsn, data_dir))
    assert result.returncode == 0, result.stderr
    assert "lane events_query: refused" in result.stdout
    assert "its windows go to /api/v1/events with the key in the header" in result.stdout


def test_one_line_per_problem(simulator: Any, pg_dsn: str, data_dir: Path) -> None:
    """A wrong key and a data directory that is a file: two problems, two lines."""
    not_a_dir = data_dir / "file"
    not_a_dir.write_text("")
    env = ingest_env(simulator, pg_dsn, not_a_dir, DATASYNC_API_KEY="ds_" + "0" * 32)
    result = check(env)
    assert result.returncode == 1
    lines = problem_lines(result)
    assert len(lines) == 2, lines
    assert lines[0].startswith("datasync-ingest: check: api: ") and "the API key was refused" in lines[0]
    assert lines[1] == f"datasync-ingest: check: data directory {not_a_dir}: is not a directory"
    assert "lane" not in result.stdout and "plan:" not in result.stdout  # nothing to plan with a refused key


def test_an_unreachable_api_is_one_line(pg_dsn: str, data_dir: Path) -> None:
    result = check(ingest_env(NoApi, pg_dsn, data_dir, INGEST_MAX_ATTEMPTS=1))
    assert result.returncode == 1
    [line] = problem_lines(result)
    assert line.startswith("datasync-ingest: check: api: http://127.0.0.1:9/api/v1: ") and "Connection" in line


@pytest.fixture
def restricted_dsn(pg_dsn: str) -> Any:
    """The test database, reached as a role that may connect but not create tables."""
    role = "t_check_" + uuid.uuid4().hex[:8]
    admin = psycopg2.connect(pg_dsn)
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f'CREATE ROLE "{role}" LOGIN PASSWORD %s', (role,))
        cur.execute(f'REVOKE CREATE ON SCHEMA public FROM PUBLIC, "{role}"')
    try:
        yield psycopg2.extensions.make_dsn(pg_dsn, user=role, password=role)
    finally:
        with admin.cursor() as cur:
            cur.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", (role,))
            cur.execute(f'DROP OWNED BY "{role}"')
            cur.execute(f'DROP ROLE "{role}"')
        admin.close()


def test_a_database_without_the_rights_to_create_the_tables(simulator: Any, restricted_dsn: str,
                                                            data_dir: Path) -> None:
    result = check(ingest_env(simulator, restricted_dsn, data_dir))
    assert result.returncode == 1
    [line] = problem_lines(result)
    assert line.startswith("datasync-ingest: check: database ") and "permission denied for schema public" in line


def test_a_run_holding_the_lock_is_a_problem(simulator: Any, pg_dsn: str, data_dir: Path) -> None:
    held = locks.try_lock(data_dir / locks.RUN_LOCK, exclusive=True)  # what a run holds for its life
    assert held is not None
    try:
        result = check(ingest_env(simulator, pg_dsn, data_dir))
    finally:
        held.close()
    assert result.returncode == 1
    assert problem_lines(result) == [
        f"datasync-ingest: check: lock: a run is using {data_dir} now; another would be refused"]


def test_after_a_run_it_plans_the_top_up(sim_factory: Any, pg_dsn: str, data_dir: Path) -> None:
    sim = sim_factory(events=6000)
    env = ingest_env(sim, pg_dsn, data_dir)
    code, log = run_to_end(env, data_dir / "run.log")
    assert code == 0, log[-2000:]
    before = sorted((p, p.stat().st_mtime_ns) for p in data_dir.rglob("*") if p.is_file())
    result = check(env)
    assert result.returncode == 0, result.stderr
    assert "checkpoint: drained" in result.stdout and "a run tops up" in result.stdout
    assert sorted((p, p.stat().st_mtime_ns) for p in data_dir.rglob("*") if p.is_file()) == before


def test_another_target_is_a_problem(sim_factory: Any, pg_dsn: str, data_dir: Path) -> None:
    sim = sim_factory(events=2000)
    code, log = run_to_end(ingest_env(sim, pg_dsn, data_dir), data_dir / "run.log")
    assert code == 0, log[-2000:]
    result = check(ingest_env(sim, pg_dsn, data_dir, INGEST_TABLE="other"))
    assert result.returncode == 1
    [line] = problem_lines(result)
    assert "checkpoint: holds the state of another target: --table events (this run: other)" in line


def test_the_embedded_database_is_not_created_for_a_look(simulator: Any, data_dir: Path) -> None:
    env = ingest_env(simulator, "", data_dir)
    result = check(env)
    assert result.returncode == 0, result.stderr
    assert f"embedded database {data_dir}/pg: none yet: a run creates it" in result.stdout
    assert not (data_dir / "pg").exists()


@pytest.mark.parametrize("args", [["--partitions", "many"], ["--sourse", "feed"]])
def test_bad_input_is_one_line(simulator: Any, pg_dsn: str, data_dir: Path, args: list[str]) -> None:
    result = check(ingest_env(simulator, pg_dsn, data_dir), *args)
    assert result.returncode == 2
    [line] = problem_lines(result)
    assert line.startswith("datasync-ingest: ") and args[0] in line


def test_the_plan_follows_the_budgets(sim_factory: Any, pg_dsn: str, data_dir: Path) -> None:
    """A realistic, rate-limited simulator (slow enough not to count as one on this
    machine): the default eight partitions on three lanes."""
    sim = sim_factory(events=60_000, latency="realistic", rate_limits=True, time_scale=5.0)
    result = check(ingest_env(sim, pg_dsn, data_dir))
    assert result.returncode == 0, result.stderr
    assert "plan: 8 partitions on 3 lanes (events_query 1, events 2, feed 5)" in result.stdout, result.stdout
    # No --rate-window: the time at the budgets is counted in the window the probes showed (60 s / 5).
    assert re.search(r"at the API's budgets \(.*feed \d+ pages at 39.5/12s; ", result.stdout), result.stdout



def test_an_embedded_database_is_started_for_the_look_and_stopped_again(sim_factory: Any, data_dir: Path) -> None:
    env = ingest_env(sim_factory(events=2000), "", data_dir)
    code, log = run_to_end(env, data_dir / "run.log")
    assert code == 0, log[-2000:]
    result = check(env)
    assert result.returncode == 0, result.stderr
    assert f"embedded database {data_dir}/pg: reachable; a run may create the tables" in result.stdout
    assert not (data_dir / "pg" / "postmaster.pid").exists()
