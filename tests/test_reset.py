"""`reset`: a data directory's state removed on request, never under a run, never the
table unless asked; through the real program against the simulator and PostgreSQL."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import psycopg2
import pytest

from ingest import locks
from ingest.ops.reset import confirmation, generation_of, known_generations, segments_text
from ingest.source import checkpoint
from tests.e2e import (
    PROGRAM,
    NoApi,
    assert_exact,
    command,
    ingest_env,
    on_a_terminal,
    problem_lines,
    run_to_end,
    start_run,
    wait_for,
)


@pytest.mark.parametrize(
    ("yes", "terminal", "decision"),
    [(True, True, "go"), (True, False, "go"), (False, True, "ask"), (False, False, "refuse")],
)
def test_who_confirms(yes: bool, terminal: bool, decision: str) -> None:
    assert confirmation(yes, terminal) == decision


@pytest.mark.parametrize(
    ("name", "generation"),
    [
        ("p00-00000001-3fa9c2d1.tsv", "3fa9c2d1"),
        ("p12-00000042-0badcafe.1234.tsv", "0badcafe"),  # claimed by loader 1234
        ("p03-00000007-deadbeef.reason", "deadbeef"),
        ("p03-00000007-deadbeef.lines.tsv", "deadbeef"),
        ("notes.txt", None),
        ("x-y-z.tsv", None),
    ],
)
def test_generation_of_a_segment_file(name: str, generation: str | None) -> None:
    assert generation_of(name) == generation


def test_known_generations_are_the_checkpoint_s_and_the_segments() -> None:
    names = ["p00-00000001-aaaa0001.tsv", "p01-00000001-bbbb0002.tsv", "README"]
    assert known_generations(["cccc0003"], names) == ["aaaa0001", "bbbb0002", "cccc0003"]
    assert known_generations(["dddd0004", "cccc0003"], []) == ["cccc0003", "dddd0004"], "earlier epochs too"
    assert known_generations([], []) == []


def test_segments_text() -> None:
    assert segments_text({"open": 0, "ready": 3, "rejected": 1}, 3 << 20) == "segments: 3 ready, 1 rejected; 3.0 MB"
    assert segments_text({"ready": 0}, 0) == "segments: none; 0.0 MB"


# ---------------------------------------------------------------------------------------
# The command


def reset(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return command(env, "reset", *args)


def listing(path: Path) -> list[tuple[str, int]]:
    return sorted((str(p.relative_to(path)), p.stat().st_size) for p in path.rglob("*") if p.is_file())


def count(dsn: str, query: str) -> int:
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute(query)
        return int(cur.fetchone()[0])


@pytest.fixture
def ingested(sim_factory: Any, pg_dsn: str, data_dir: Path) -> tuple[Any, dict[str, str]]:
    """A drained run of 6,000 events (a few unstorable ones, so rejects exist), segments
    kept so there is something in the segment folders to remove."""
    sim = sim_factory(events=6000, hostile_events=11, key_validity=1e9)
    env = ingest_env(sim, pg_dsn, data_dir, INGEST_KEEP_SEGMENTS="true", INGEST_PAGE_LIMIT=1000)
    code, log = run_to_end(env, data_dir / "run.log")
    assert code == 0, log[-2000:]
    assert count(pg_dsn, "SELECT count(*) FROM ingest_rejects") > 0
    return sim, env


def test_reset_removes_the_state_and_keeps_the_table(ingested: Any, pg_dsn: str, data_dir: Path) -> None:
    sim, env = ingested
    rows = count(pg_dsn, "SELECT count(*) FROM events")
    result = reset(env, "--yes")
    assert result.returncode == 0, result.stderr
    assert f"removed {data_dir}/ingestion.state (the checkpoint)" in result.stdout
    assert f"removed {data_dir}/segments (segments: " in result.stdout and " loaded; " in result.stdout
    assert "kept the table events" in result.stdout
    assert not (data_dir / "ingestion.state").exists() and not (data_dir / "segments").exists()
    assert (data_dir / "run.log").exists() and (data_dir / locks.RUN_LOCK).exists()
    assert count(pg_dsn, "SELECT count(*) FROM events") == rows
    # Starting over fetches everything again; the primary key keeps it exact.
    code, log = run_to_end(env, data_dir / "again.log")
    assert code == 0, log[-2000:]
    assert_exact(pg_dsn, sim.truth())


def test_drop_table_drops_the_table_and_this_directory_s_ledger_rows_and_rejects(
        ingested: Any, pg_dsn: str, data_dir: Path) -> None:
    _, env = ingested
    state = checkpoint.read(data_dir / "ingestion.state")
    assert state is not None
    with psycopg2.connect(pg_dsn) as conn, conn.cursor() as cur:  # another data directory's rows
        cur.execute("INSERT INTO ingest_segments (segment_id) VALUES ('p00-00000001-0therd1r')")
        cur.execute("INSERT INTO ingest_rejects (segment_id, reason, raw) VALUES ('p00-00000001-0therd1r', 'r', '{}')")
    ledger = count(pg_dsn, "SELECT count(*) FROM ingest_segments") - 1
    result = reset(env, "--yes", "--drop-table")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("dropped table events in ")
    assert f"{ledger} ledger rows and " in result.stdout and f"of generation(s) {state.generation}" in result.stdout
    assert "1 ledger rows of other generations stay" in result.stdout
    assert "removed " in result.stdout
    assert count(pg_dsn, "SELECT count(*) FROM pg_tables WHERE tablename = 'events'") == 0
    assert count(pg_dsn, "SELECT count(*) FROM ingest_segments") == 1
    assert count(pg_dsn, "SELECT count(*) FROM ingest_rejects") == 1
    assert not (data_dir / "ingestion.state").exists()


def test_reset_while_a_run_holds_the_lock_removes_nothing(sim_factory: Any, pg_dsn: str, data_dir: Path) -> None:
    # Paced by the budgets to about ten seconds: reset comes well inside them.
    sim = sim_factory(events=60_000, latency="realistic", rate_limits=True, time_scale=10.0)
    env = ingest_env(sim, pg_dsn, data_dir, INGEST_PAGE_LIMIT=1000)
    run = start_run(env, data_dir / "run.log")
    try:
        wait_for(lambda: (data_dir / "ingestion.state").exists() or run.process.poll() is not None,
                 what="the run's checkpoint")
        assert run.process.poll() is None, run.log[-2000:]
        result = reset(env, "--yes", "--drop-table")
        assert result.returncode == 1
        assert problem_lines(result) == [f"datasync-ingest: reset: a datasync-ingest run is using {data_dir};"
                                         " stop it first"]
        assert run.process.poll() is None, "the run ended before reset asked: the test proves nothing"
        assert (data_dir / "ingestion.state").exists() and (data_dir / "segments").is_dir()
        assert run.wait(300) == 0, run.log[-2000:]
    finally:
        run.kill_group()
    assert_exact(pg_dsn, sim.truth())  # nothing was pulled from under the run, the table is there


def test_orphans_of_a_killed_run_still_at_work_keep_reset_out(ingested: Any, data_dir: Path) -> None:
    _, env = ingested
    before = listing(data_dir)
    orphan = locks.try_lock(data_dir / locks.WORKERS_LOCK, exclusive=False)  # what a live fetcher holds
    assert orphan is not None
    try:
        result = reset(env, "--yes")
    finally:
        orphan.close()
    assert result.returncode == 1
    assert problem_lines(result) == [f"datasync-ingest: reset: processes of a previous run still work in {data_dir};"
                                     " wait until they exit"]
    assert listing(data_dir) == before


def test_without_a_terminal_or_yes_nothing_is_removed(ingested: Any, data_dir: Path) -> None:
    _, env = ingested
    before = listing(data_dir)
    result = reset(env)
    assert result.returncode == 2
    assert problem_lines(result) == ["datasync-ingest: reset: no terminal to confirm on; pass --yes to remove"
                                     " without asking"]
    assert listing(data_dir) == before


def reset_on_a_terminal(env: dict[str, str], answer: bytes) -> tuple[int, str]:
    return on_a_terminal([*PROGRAM, "reset"], env, {b"remove them?": answer})


def test_on_a_terminal_it_asks_and_no_keeps_everything(ingested: Any, data_dir: Path) -> None:
    _, env = ingested
    before = listing(data_dir)
    code, output = reset_on_a_terminal(env, b"n\n")
    assert code == 1, output
    assert f"{data_dir}/ingestion.state (the checkpoint)" in output and "not confirmed; nothing removed" in output
    assert listing(data_dir) == before


def test_on_a_terminal_yes_removes(ingested: Any, data_dir: Path) -> None:
    _, env = ingested
    code, output = reset_on_a_terminal(env, b"y\n")
    assert code == 0, output
    assert f"removed {data_dir}/ingestion.state" in output
    assert not (data_dir / "ingestion.state").exists()


def test_a_data_directory_that_is_not_there_stays_so(pg_dsn: str, data_dir: Path) -> None:
    missing = data_dir / "missing"
    result = reset(ingest_env(NoApi, pg_dsn, missing), "--yes")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"nothing to remove: {missing} is not a directory"
    assert not missing.exists()


def test_the_embedded_database_is_kept(sim_factory: Any, data_dir: Path) -> None:
    """Without DATABASE_URL the table lives in <data-dir>/pg: reset keeps the server's files,
    --drop-table drops the table inside it."""
    sim = sim_factory(events=2000)
    env = ingest_env(sim, "", data_dir)
    code, log = run_to_end(env, data_dir / "run.log")
    assert code == 0, log[-2000:]
    result = reset(env, "--yes")
    assert result.returncode == 0, result.stderr
    assert (data_dir / "pg" / "PG_VERSION").is_file()
    result = reset(env, "--yes", "--drop-table")
    assert result.returncode == 0, result.stderr
    assert f"dropped table events in the embedded database {data_dir}/pg (2000 rows)" in result.stdout
    assert (data_dir / "pg" / "PG_VERSION").is_file()


@pytest.mark.parametrize("args", [["--drop-tabel"], ["--yes", "extra"]])
def test_bad_input_is_one_line(pg_dsn: str, data_dir: Path, args: list[str]) -> None:
    result = reset(ingest_env(NoApi, pg_dsn, data_dir), *args)
    assert result.returncode == 2
    [line] = problem_lines(result)
    assert line.startswith("datasync-ingest: ")
