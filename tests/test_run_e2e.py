"""`datasync-ingest run` end to end: the real program, the simulator over loopback HTTP, and
a real PostgreSQL. Every case ends by comparing the table with the simulator's truth."""

from __future__ import annotations

import random
import signal
from pathlib import Path
from typing import Any

import orjson
import psycopg2
import pytest
import requests

from ingest.source import checkpoint
from ingest.source.cursors import decode_cursor
from tests.e2e import (
    assert_exact,
    assert_no_secrets,
    fetched_rows,
    ingest_env,
    loaded_segments,
    reject_count,
    run_to_end,
    start_run,
    wait_for,
)


def crawl(sim: Any) -> dict[str, Any]:
    """Every event the simulator serves, by id, through a plain requests loop on /events."""
    events: dict[str, Any] = {}
    cursor = None
    with requests.Session() as session:
        while True:
            params: dict[str, Any] = {"limit": 5000}
            if cursor:
                params["cursor"] = cursor
            body = session.get(f"{sim.base_url}/events", params=params, headers={"X-API-Key": sim.api_key}).json()
            for event in body["data"]:
                events[event["id"]] = event
            cursor = body["pagination"]["nextCursor"]
            if not body["pagination"]["hasMore"]:
                return events


def summary_of(log: str) -> dict[str, Any]:
    for line in reversed(log.splitlines()):
        if '"summary"' in line:
            return dict(orjson.loads(line)["summary"])
    raise AssertionError("no summary line in the log")


@pytest.mark.sim(events=200_000)
def test_full_run_every_event_once_with_equal_payloads(simulator: Any, pg_dsn: str, data_dir: Path) -> None:
    code, log = run_to_end(ingest_env(simulator, pg_dsn, data_dir), data_dir / "run.log")
    assert code == 0, log[-3000:]
    assert_exact(pg_dsn, simulator.truth())
    served = crawl(simulator)
    with psycopg2.connect(pg_dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT id, payload, type, user_id, session_id FROM events")
        rows = cur.fetchall()
    assert len(rows) == len(served)
    for event_id, payload, type_, user_id, session_id in rows:
        original = served[event_id]
        # The timestamp's form (number or ISO string) follows the position in the page.
        assert {k: v for k, v in payload.items() if k != "timestamp"} == {
            k: v for k, v in original.items() if k != "timestamp"
        }
        assert (type_, user_id, session_id) == (original["type"], original["userId"], original["sessionId"])
    assert summary_of(log)["events_loaded"] == 200_000


@pytest.mark.sim(events=60_000, chaos="heavy", chaos_seed=11)
def test_heavy_chaos_ends_with_the_truth(simulator: Any, pg_dsn: str, data_dir: Path) -> None:
    truth = simulator.truth()
    assert truth.unstorable > 0, "the heavy preset must include unstorable events"
    env = ingest_env(simulator, pg_dsn, data_dir, INGEST_PAGE_LIMIT=2000, INGEST_WORKERS=3)
    code, log = run_to_end(env, data_dir / "run.log")
    assert code == 0, log[-3000:]
    assert_exact(pg_dsn, truth)
    with psycopg2.connect(pg_dsn) as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT count(*), count(DISTINCT raw), count(*) FILTER (WHERE coalesce(reason, '') = '')"
            " FROM ingest_rejects"
        )
        rejects, distinct_rejects, without_reason = cur.fetchone()
    # Every unstorable event is stored once as a reject, even where partitions overlap.
    assert rejects == distinct_rejects == truth.unstorable
    assert without_reason == 0
    stats = simulator.stats()
    assert sum(stats["faults"].values()) > 0, "the run met no faults"


@pytest.mark.sim(events=30_000, latency="realistic", rate_limits=True, time_scale=200.0)
@pytest.mark.parametrize(
    ("source", "lanes", "page", "least_tokens", "most_tokens"),
    [("feed", {"feed"}, 500, 2, 10**6), ("events", {"events", "events_query"}, 1000, 0, 0)],
)
def test_one_source_only(
    simulator: Any, pg_dsn: str, data_dir: Path, source: str, lanes: set[str], page: int, least_tokens: int,
    most_tokens: int,
) -> None:
    # At time scale 200 a token lives 1.5 s and a cursor 0.6 s: on the feed both expire
    # many times during the run; /events needs no token at all.
    env = ingest_env(simulator, pg_dsn, data_dir, INGEST_SOURCE=source, INGEST_PAGE_LIMIT=page)
    code, log = run_to_end(env, data_dir / "run.log")
    assert code == 0, log[-3000:]
    assert_exact(pg_dsn, simulator.truth())
    state = checkpoint.read(data_dir / "ingestion.state")
    assert state is not None and {p.lane for p in state.partitions} == lanes
    assert least_tokens <= simulator.stats().get("tokens_issued", 0) <= most_tokens


@pytest.mark.sim(events=40_000, time_scale=100.0)
def test_resume_after_sigterm_with_an_expired_cursor(simulator: Any, pg_dsn: str, data_dir: Path) -> None:
    env = ingest_env(simulator, pg_dsn, data_dir, INGEST_PAGE_LIMIT=500, INGEST_SEGMENT_MAX_ROWS=2000, INGEST_PARTITIONS=2)
    run = start_run(env, data_dir / "run.log")
    wait_for(lambda: loaded_segments(pg_dsn) >= 2, what="two loaded segments")
    run.kill_group(signal.SIGTERM)
    assert run.wait(120) == 143, run.log[-3000:]
    state = checkpoint.read(data_dir / "ingestion.state")
    assert state is not None and not state.drained and state.rows > 0
    cursors = [p.cursor for p in state.partitions if p.cursor and not p.done]
    assert cursors, "an unfinished partition keeps its cursor"
    # The saved cursors expire 1.2 s after issue (cursor TTL / time scale); wait them out.
    newest_exp = max(decode_cursor(c)["exp"] for c in cursors)
    wait_for(lambda: requests.get(f"{simulator.base_url}/events", params={"cursor": cursors[0]},
                                  headers={"X-API-Key": simulator.api_key}).status_code == 400,
             what="the saved cursor to expire")
    assert newest_exp > 0
    code, log = run_to_end(env, data_dir / "run2.log")
    assert code == 0, log[-3000:]
    assert_exact(pg_dsn, simulator.truth())


@pytest.mark.sim(events=60_000, chaos="mild", chaos_seed=5)
def test_sigkill_of_the_whole_group_three_times(simulator: Any, pg_dsn: str, data_dir: Path) -> None:
    env = ingest_env(simulator, pg_dsn, data_dir, INGEST_PAGE_LIMIT=1000, INGEST_SEGMENT_MAX_ROWS=3000)
    rng = random.Random(1234)
    for attempt in range(3):
        run = start_run(env, data_dir / f"run{attempt}.log")
        target = fetched_rows(data_dir) + rng.randint(1000, 8000)

        def progressed(run: Any = run, target: int = target) -> bool:
            return fetched_rows(data_dir) >= target or run.process.poll() is not None

        wait_for(progressed, what="progress")
        run.kill_group(signal.SIGKILL)
        run.wait(60)
    code, log = run_to_end(env, data_dir / "final.log")
    assert code == 0, log[-3000:]
    assert_exact(pg_dsn, simulator.truth())


@pytest.mark.sim(events=5_000)
def test_wrong_api_key_exits_1_without_leaking_it(simulator: Any, pg_dsn: str, data_dir: Path) -> None:
    wrong_key = "ds_" + "0123456789abcdef" * 2
    env = ingest_env(simulator, pg_dsn, data_dir, DATASYNC_API_KEY=wrong_key)
    code, log = run_to_end(env, data_dir / "run.log", timeout=120)
    assert code == 1
    assert "401" in log or "unauthori" in log.lower()
    assert_no_secrets([wrong_key], pg_dsn, data_dir, log)


@pytest.mark.sim(events=20_000, chaos="heavy", chaos_seed=3, rate_limits=True, latency="realistic", time_scale=200.0)
def test_secrets_never_leave_the_process(simulator: Any, pg_dsn: str, data_dir: Path) -> None:
    env = ingest_env(simulator, pg_dsn, data_dir, INGEST_PAGE_LIMIT=1000, INGEST_LOG_LEVEL="DEBUG")
    code, log = run_to_end(env, data_dir / "run.log")
    assert code == 0, log[-3000:]
    tokens = simulator.issued_tokens()
    assert tokens, "the run used the feed"
    assert_no_secrets([simulator.api_key, *tokens], pg_dsn, data_dir, log)
    assert reject_count(pg_dsn) >= simulator.truth().unstorable
