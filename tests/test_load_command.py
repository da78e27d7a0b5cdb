"""`load`: loads what is ready, never while a run works in the data directory, and ends a
failure in one line; through the real program and a real PostgreSQL."""

from __future__ import annotations

import subprocess
from pathlib import Path

import orjson
import psycopg2
import pytest

from ingest import locks
from ingest.sink.segments import SegmentStore, SegmentWriter
from ingest.source.normalise import normalise_page
from tests.e2e import PROGRAM, ingest_env


class NoApi:
    """Stands in for a simulator where load never asks the API: nothing listens there."""

    base_url = "http://127.0.0.1:9/api/v1"
    api_key = "ds_" + "1" * 32


def load(dsn: str, data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*PROGRAM, "load", *args], env=ingest_env(NoApi, dsn, data_dir), capture_output=True,
                          text=True, stdin=subprocess.DEVNULL, timeout=120)


def problem_lines(result: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in result.stderr.splitlines() if not line.startswith("{")]


def ready_segment(data_dir: Path, events: int = 50) -> SegmentStore:
    store = SegmentStore(data_dir / "segments")
    store.ensure()
    writer = SegmentWriter(store, 0, "0badcafe", 1, 10_000, 1 << 30, 1e9)
    page = [{"id": f"00000000-0000-4000-8000-{n:012d}", "timestamp": 1769541612369 - n, "type": "click"}
            for n in range(events)]
    rows = normalise_page(page)
    writer.append(rows.data, rows.rows)
    writer.seal()
    return store


def test_load_loads_what_is_ready(pg_dsn: str, data_dir: Path) -> None:
    store = ready_segment(data_dir)
    result = load(pg_dsn, data_dir)
    assert result.returncode == 0, result.stderr
    assert orjson.loads(result.stdout.splitlines()[-1])["events_loaded"] == 50
    assert store.counts()["ready"] == 0
    with psycopg2.connect(pg_dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM events")
        assert cur.fetchone()[0] == 50


def test_load_while_a_run_holds_the_lock_touches_nothing(pg_dsn: str, data_dir: Path) -> None:
    store = ready_segment(data_dir)
    # What a run has under way: a claimed segment and a half-written one, which reconcile
    # would re-queue and discard.
    (store.loading / "p01-00000001-0badcafe.4242.tsv").write_bytes(b"")
    (store.open / "p02-00000001-0badcafe.tsv").write_bytes(b"")
    before = sorted(p.relative_to(data_dir) for p in data_dir.rglob("*.tsv"))
    held = locks.try_lock(data_dir / locks.RUN_LOCK, exclusive=True)  # what a run holds for its life
    assert held is not None
    try:
        result = load(pg_dsn, data_dir)
    finally:
        held.close()
    assert result.returncode == 1
    assert problem_lines(result) == [f"datasync-ingest: load: a datasync-ingest run is using {data_dir}; stop it first"]
    assert sorted(p.relative_to(data_dir) for p in data_dir.rglob("*.tsv")) == before
    with psycopg2.connect(pg_dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT to_regclass('ingest_segments')")
        assert cur.fetchone()[0] is None  # not even the schema was made


def test_a_failed_load_is_one_line(pg_dsn: str, data_dir: Path) -> None:
    """`events` is a view of another shape: the schema step passes (IF NOT EXISTS), every
    COPY into it is refused, and no retry can help."""
    store = ready_segment(data_dir)
    with psycopg2.connect(pg_dsn) as conn, conn.cursor() as cur:
        cur.execute("CREATE VIEW events AS SELECT 'x'::text AS id")
    result = load(pg_dsn, data_dir, "--workers", "1")
    assert result.returncode == 1
    [line] = problem_lines(result)
    assert line.startswith("datasync-ingest: load: 1 loader(s) failed: loader failed: ") and 'relation "events"' in line
    assert "Traceback" not in result.stderr
    assert store.counts()["ready"] == 1  # what failed to load stays for the next try


def test_an_unreachable_database_is_one_line(data_dir: Path) -> None:
    ready_segment(data_dir)
    result = load("postgresql://nobody@127.0.0.1:9/none", data_dir)
    assert result.returncode == 1
    [line] = problem_lines(result)
    assert line.startswith("datasync-ingest: load: cannot connect to the database: ")


@pytest.mark.parametrize("args", [["--workers", "0"], ["--wrokers", "2"]])
def test_bad_input_is_one_line(pg_dsn: str, data_dir: Path, args: list[str]) -> None:
    result = load(pg_dsn, data_dir, *args)
    assert result.returncode == 2
    [line] = problem_lines(result)
    assert line.startswith("datasync-ingest: ") and args[0] in line
