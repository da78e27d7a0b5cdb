"""`verify`: the source crawled as a run walks it (so about as fast), compared with the
table; exit 0 on a match, 1 on a mismatch, 3 when it could not check, in one line."""

from __future__ import annotations

import io
import subprocess
import time
from pathlib import Path
from typing import Any

import orjson
import psycopg2
import pytest

from ingest.ops.crawl import IdOutput, sort_lines
from ingest.ops.report import judged_by_postgresql
from ingest.sink import db
from ingest.source.normalise import decode_json, normalise_event, reject_line
from tests.conftest import SIM_KEY_2
from tests.e2e import NoApi, command, ingest_env, problem_lines, run_to_end

EVENT = {"id": "00000000-0000-4000-8000-000000000001", "timestamp": 1769541612369, "type": "click"}


def huge(n: str, event_id: str = "big") -> dict[str, Any]:
    """An event holding a number as the API's JSON text has it (beyond a double's range)."""
    return decode_json(f'{{"id":"{event_id}","timestamp":1769541612369,"n":{n}}}'.encode())


@pytest.mark.parametrize(
    ("lines", "ids", "rejects", "doubtful"),
    [
        ([normalise_event(EVENT).line], [EVENT["id"].encode()], [], []),
        ([reject_line({"x": 1}, "missing id")], [], [reject_line({"x": 1}, "missing id")], []),
        # the id as COPY text: a tab in an id is written escaped, as the segment had it
        ([normalise_event({**EVENT, "id": "a\tb"}).line, normalise_event(EVENT).line],
         [b"a\\tb", EVENT["id"].encode()], [], []),
        # numbers that jsonb may refuse are PostgreSQL's to judge
        ([normalise_event(huge("1e200000")).line, normalise_event(EVENT).line], [EVENT["id"].encode()], [],
         [normalise_event(huge("1e200000")).line]),
        ([normalise_event(huge("1" * 10_000)).line], [], [], [normalise_event(huge("1" * 10_000)).line]),
        ([normalise_event(huge("1e308")).line], [b"big"], [], []),  # a double's largest
        ([normalise_event({**EVENT, "sessionId": "4e123456-aaaa"}).line], [EVENT["id"].encode()], [], []),  # text
        ([], [], [], []),
    ],
)
def test_sort_segment_lines(lines: list[bytes], ids: list[bytes], rejects: list[bytes], doubtful: list[bytes]) -> None:
    assert sort_lines(b"".join(lines)) == (b"".join(i + b"\n" for i in ids), b"".join(rejects), b"".join(doubtful))


def test_an_id_reads_back_through_copy_as_the_table_got_it(pg_conn: Any) -> None:
    odd = "id with\ttab, back\\slash and\nnewline"
    ids, _, _ = sort_lines(normalise_event({**EVENT, "id": odd}).line)
    with pg_conn.cursor() as cur:
        cur.execute("CREATE TEMP TABLE t (id text)")
        cur.copy_expert("COPY t FROM STDIN", io.BytesIO(ids))
        cur.execute("SELECT id FROM t")
        assert cur.fetchone()[0] == odd


def test_postgresql_judges_the_doubtful_rows(pg_dsn: str, tmp_path: Path) -> None:
    rows = [huge("1e200000", "a"), huge("1e20000", "b"), huge("1" * 10_000, "c"), huge("-1e-200000", "d"),
            huge("1e200000", "a")]  # seen twice by overlapping walks: refused once
    (tmp_path / "000.doubtful").write_bytes(b"".join(normalise_event(e).line for e in rows[:3]))
    (tmp_path / "001.doubtful").write_bytes(b"".join(normalise_event(e).line for e in rows[3:]))
    taken, refused = judged_by_postgresql(pg_dsn, sorted(tmp_path.iterdir()))
    assert (taken, refused) == (b"b\nc\n", 2)


def test_id_output_writes_at_a_seal_and_drops_at_an_abort(tmp_path: Path) -> None:
    out = IdOutput(tmp_path, 3, next_seq=7)
    out.append(normalise_event(EVENT).line, 1)
    assert out.due() and not list(tmp_path.iterdir())  # nothing reaches the file before a seal
    assert out.seal() is None and out.next_seq == 7
    out.append(normalise_event({**EVENT, "id": "later"}).line, 1)
    out.abort()
    out.seal()
    assert (tmp_path / "003.ids").read_bytes() == EVENT["id"].encode() + b"\n"
    assert not (tmp_path / "003.rejects").exists() and not (tmp_path / "003.doubtful").exists()


# ---------------------------------------------------------------------------------------
# The command


def verify(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return command(env, "verify", *args, timeout=300)


def make_schema(dsn: str) -> None:
    conn = db.connect(dsn)
    try:
        db.ensure_schema(conn, "events")
    finally:
        conn.close()


def test_verify_takes_no_longer_than_half_again_the_run(sim_factory: Any, pg_dsn: str, data_dir: Path) -> None:
    """Both against one rate-limited simulator at the API's latency and budgets (ten times
    faster), each with a key of its own, so that each starts with full budgets. One stream
    takes about twice the run here (about five times against the real API's 5,000-event
    pages and 4 s latency, which the scale keeps)."""
    scale = 10.0
    sim = sim_factory(events=150_000, latency="realistic", rate_limits=True, time_scale=scale)
    env = ingest_env(sim, pg_dsn, data_dir)
    started = time.monotonic()
    code, log = run_to_end(env, data_dir / "run.log")
    run_s = time.monotonic() - started
    assert code == 0, log[-2000:]
    started = time.monotonic()
    result = verify({**env, "DATASYNC_API_KEY": SIM_KEY_2})
    verify_s = time.monotonic() - started
    assert result.returncode == 0, result.stderr[-2000:]
    report = orjson.loads(result.stdout)
    assert report["match"] and report["source_events"] == 150_000 and report["partitions"] >= 8
    assert verify_s <= 1.5 * run_s, f"verify {verify_s:.1f}s against the run's {run_s:.1f}s"


def test_unstorable_events_are_counted_once_over_partitions(sim_factory: Any, pg_dsn: str, data_dir: Path) -> None:
    sim = sim_factory(events=6000, hostile_events=33, key_validity=1e9)
    env = ingest_env(sim, pg_dsn, data_dir, INGEST_PAGE_LIMIT=500, INGEST_PARTITIONS=4)
    code, log = run_to_end(env, data_dir / "run.log")
    assert code == 0, log[-2000:]
    result = verify(env)
    assert result.returncode == 0, result.stderr[-2000:]
    report = orjson.loads(result.stdout)
    truth = sim.truth()
    assert report["source_events"] == len(truth.storable_ids) and report["source_unstorable"] == truth.unstorable > 0
    assert report["rejects_stored"] == truth.unstorable


def test_a_mismatch_exits_1_and_names_the_ids(sim_factory: Any, pg_dsn: str, data_dir: Path) -> None:
    sim = sim_factory(events=3000)
    env = ingest_env(sim, pg_dsn, data_dir)
    code, log = run_to_end(env, data_dir / "run.log")
    assert code == 0, log[-2000:]
    with psycopg2.connect(pg_dsn) as conn, conn.cursor() as cur:
        cur.execute("DELETE FROM events WHERE id IN (SELECT id FROM events ORDER BY id LIMIT 2) RETURNING id")
        gone = sorted(row[0] for row in cur.fetchall())
        cur.execute("INSERT INTO events (id, occurred_at, payload) VALUES ('not-from-the-source', now(), '{}')")
    result = verify(env, "--sample", "5")
    assert result.returncode == 1
    report = orjson.loads(result.stdout)
    assert (report["missing"], report["missing_sample"]) == (2, gone)
    assert (report["extra"], report["extra_sample"]) == (1, ["not-from-the-source"])


def test_a_table_made_by_hand_is_compared_too(simulator: Any, pg_dsn: str, data_dir: Path) -> None:
    """No ledger, no rejects table: only the table with the events."""
    with psycopg2.connect(pg_dsn) as conn, conn.cursor() as cur:
        cur.execute("CREATE TABLE events (id text PRIMARY KEY)")
    result = verify(ingest_env(simulator, pg_dsn, data_dir))
    assert result.returncode == 1, result.stderr[-2000:]
    report = orjson.loads(result.stdout)
    assert (report["missing"], report["rejects_stored"]) == (20_000, 0)


def test_an_unreachable_api_could_not_be_checked(pg_dsn: str, data_dir: Path) -> None:
    make_schema(pg_dsn)
    result = verify(ingest_env(NoApi, pg_dsn, data_dir, INGEST_MAX_ATTEMPTS=1, INGEST_SOURCE="events"))
    assert result.returncode == 3
    [line] = problem_lines(result)
    assert line.startswith("datasync-ingest: verify: could not check: cannot plan the crawl: ") and "Connection" in line


def test_a_key_that_expires_mid_crawl_stops_every_walk_in_one_line(sim_factory: Any, pg_dsn: str,
                                                                   data_dir: Path) -> None:
    """The key lives two seconds (from its first call); the crawl, paced, needs about five."""
    make_schema(pg_dsn)
    scale = 10.0
    sim = sim_factory(events=150_000, latency="realistic", rate_limits=True, time_scale=scale, key_validity=20.0)
    result = verify(ingest_env(sim, pg_dsn, data_dir))
    assert result.returncode == 3, result.stdout
    [line] = problem_lines(result)
    assert line.startswith("datasync-ingest: verify: could not check: partition ") and "401" in line


def test_a_missing_table_could_not_be_checked(simulator: Any, pg_dsn: str, data_dir: Path) -> None:
    result = verify(ingest_env(simulator, pg_dsn, data_dir))
    assert result.returncode == 3
    assert problem_lines(result) == ["datasync-ingest: verify: could not check: the database has no table events:"
                                     " nothing was loaded into it"]


def test_no_embedded_database_is_created_to_verify(simulator: Any, data_dir: Path) -> None:
    result = verify(ingest_env(simulator, "", data_dir))
    assert result.returncode == 3
    assert problem_lines(result) == [f"datasync-ingest: verify: could not check: no embedded database in"
                                     f" {data_dir}/pg: nothing was loaded with this data directory"]
    assert not (data_dir / "pg").exists()


@pytest.mark.parametrize("args", [["--sample", "-1"], ["--sampel", "3"]])
def test_bad_input_is_one_line(simulator: Any, pg_dsn: str, data_dir: Path, args: list[str]) -> None:
    result = verify(ingest_env(simulator, pg_dsn, data_dir), *args)
    assert result.returncode == 2
    [line] = problem_lines(result)
    assert line.startswith("datasync-ingest: ") and args[0] in line
