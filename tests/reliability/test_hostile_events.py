"""Hostile events: what PostgreSQL can store arrives identical, the rest is rejected with a
reason, and nothing else is lost.

Two levels. (1) A hand-made page goes through the client's page parser, `normalise_page`, a
sealed segment and `load_segment` into a real database. (2) The simulator serves hostile
events (`hostile_events`) over real HTTP to the real program, and the table is compared
with the truth and with the exact JSON text that was served.

"Identical" is judged by PostgreSQL itself: `payload = <the served text>::jsonb`, and the
text columns equal the served strings byte for byte.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import psycopg2
import pytest

from ingest.simulator import SimulatorConfig, start_simulator
from ingest.simulator.hostile import HOSTILE_KINDS, hostile_json, storable
from ingest.sink import db
from ingest.sink.loader import load_segment
from ingest.sink.segments import SegmentStore, SegmentWriter, id_of
from ingest.source.api import BadBody, parse_page
from ingest.source.normalise import MAX_NESTING, deep_call, normalise_page
from tests.e2e import assert_exact, ingest_env, run_to_end

TABLE = "events"
BASE_MS = 1769541612369
TEXT_COLUMNS = (("type", "type"), ("name", "name"), ("userId", "user_id"), ("sessionId", "session_id"))


def base_event(n: int) -> dict[str, Any]:
    return {
        "id": f"00000000-0000-4000-8000-{n:012d}",
        "sessionId": f"s-{n}",
        "userId": f"u-{n}",
        "type": "click",
        "name": f"event_{n:06d}",
        "properties": {"page": "/home"},
        "timestamp": BASE_MS - n,
        "session": {"id": f"s-{n}", "deviceType": "mobile", "browser": "Chrome"},
    }


def nested(depth: int, n: int) -> str:
    head = json.dumps({**base_event(n), "properties": "X"}, separators=(",", ":"))
    return head.replace('"X"', '{"d":' * depth + "1" + "}" * depth)


def hostile_page() -> tuple[bytes, dict[str, str], dict[str, str]]:
    """A page mixing plain events with every hostile kind; returns the body, the storable
    texts by id and the unstorable texts by id."""
    texts: list[str] = []
    good: dict[str, str] = {}
    bad: dict[str, str] = {}
    n = 0
    for kind in HOSTILE_KINDS:
        for _ in range(2):
            n += 1
            text = hostile_json(kind, base_event(n))
            (good if storable(kind) else bad)[base_event(n)["id"]] = text
            texts.append(text)
            n += 1  # a plain event after each hostile one: its neighbours must survive
            plain = json.dumps(base_event(n))
            good[base_event(n)["id"]] = plain
            texts.append(plain)
    n += 1
    # An id longer than the primary key's btree can index (random, so it does not compress):
    # a reject, never a segment that cannot load.
    long_id = "".join(f"{(n * 7919 + i * 104729) % 65536:04x}" for i in range(1000))
    bad[long_id] = json.dumps({**base_event(n), "id": long_id})
    texts.append(bad[long_id])
    n += 1
    good[base_event(n)["id"]] = nested(MAX_NESTING - 1, n)  # the event is one level more
    texts.append(good[base_event(n)["id"]])
    n += 1
    bad[base_event(n)["id"]] = nested(MAX_NESTING * 2, n)
    texts.append(bad[base_event(n)["id"]])
    body = '{"data":[' + ",".join(texts) + '],"pagination":{"limit":5000,"hasMore":false,"nextCursor":null}}'
    return body.encode("utf-8"), good, bad


@pytest.fixture
def conn(pg_dsn: str) -> Any:
    c = db.connect(pg_dsn)
    db.ensure_schema(c, TABLE)
    c.set_client_encoding("UTF8")
    yield c
    c.close()


def check_identical(cur: Any, good: dict[str, str]) -> None:
    """Every storable event: payload equal as jsonb to the text sent, text columns identical."""
    for event_id, text in good.items():
        cur.execute(
            f"SELECT payload = %s::jsonb, type, name, user_id, session_id FROM {TABLE} WHERE id = %s", (text, event_id)
        )
        row = cur.fetchone()
        assert row is not None, f"{event_id} is missing"
        sent = deep_call(json.loads, text)  # stdlib json, on a stack deep enough
        assert row[0], f"{event_id}: payload differs from what was sent"
        for (key, _column), value in zip(TEXT_COLUMNS, row[1:], strict=True):
            assert value == sent.get(key), f"{event_id}: {key} is not byte-identical"


def check_rejected(cur: Any, bad: dict[str, str]) -> None:
    cur.execute("SELECT reason, raw FROM ingest_rejects")
    rejects = cur.fetchall()
    for event_id in bad:
        found = [reason for reason, raw in rejects if event_id in raw]
        assert len(found) == 1, f"{event_id} is not rejected exactly once"
        assert found[0].strip(), f"{event_id} has no reason"
    cur.execute(f"SELECT count(*) FROM {TABLE} WHERE id = ANY(%s)", (list(bad),))
    assert cur.fetchone()[0] == 0


def test_hostile_page_through_parser_normalise_and_copy(conn: Any, data_dir: Path) -> None:
    body, good, bad = hostile_page()
    page, _ = parse_page(body, 200)  # the client's own page parser (no BadBody, no crash)
    rows = normalise_page(page.events)
    assert rows.rows == len(good) + len(bad)
    store = SegmentStore(data_dir / "segments")
    store.ensure()
    writer = SegmentWriter(store, 0, "ab12", 1, max_rows=1 << 30, max_bytes=1 << 40, max_age=1e9)
    writer.append(rows.data, rows.rows)
    sealed = writer.seal()
    assert sealed is not None
    path = store.ready / f"{sealed}.tsv"
    result = load_segment(conn, path, id_of(path), TABLE)
    assert (result.inserted, result.rejected) == (len(good), len(bad))
    with conn.cursor() as cur:
        cur.execute(f"SELECT count(*) FROM {TABLE}")
        assert cur.fetchone()[0] == len(good)
        check_identical(cur, good)
        check_rejected(cur, bad)
        cur.execute("SELECT reason FROM ingest_rejects ORDER BY reason")
        reasons = [r for (r,) in cur.fetchall()]
    conn.rollback()
    joined = " | ".join(reasons)
    assert "NUL character" in joined and "lone surrogate" in joined and "nested deeper" in joined, joined
    assert "id longer than" in joined, joined
    assert any("numeric" in r or "overflow" in r or "exceed" in r for r in reasons), joined


@pytest.mark.parametrize("depth", [300, 3000, MAX_NESTING * 2])
def test_deep_pages_parse_without_crashing_the_fetcher(depth: int) -> None:
    # 300 levels: past what orjson writes; 3000: past Python's default recursion limit.
    body = ('{"data":[' + nested(depth, 1) + '],"pagination":{"hasMore":false,"nextCursor":null}}').encode()
    page, _ = parse_page(body, 200)
    rows = normalise_page(page.events)
    assert rows.rows == 1 and rows.rejected == (depth + 1 > MAX_NESTING)


def test_a_page_too_deep_to_parse_is_a_damaged_body_not_a_crash() -> None:
    body = ('{"data":[' + nested(200_000, 1) + '],"pagination":{"hasMore":false,"nextCursor":null}}').encode()
    with pytest.raises(BadBody):
        parse_page(body, 200)


def run_hostile(pg_dsn: str, data_dir: Path, events: int, hostile: int, **env: Any) -> None:
    config = SimulatorConfig(
        events=events, seed=9, latency="none", rate_limits=False, chaos="none", hostile_events=hostile,
        key_validity=1e9,
    )
    sim = start_simulator(config)
    try:
        truth = sim.truth()
        dataset = sim.app.dataset
        assert truth.unstorable == sum(not storable(kind) for kind in dataset.unstorable.values())
        code, log = run_to_end(ingest_env(sim, pg_dsn, data_dir, **env), data_dir / "run.log", timeout=400)
        assert code == 0, log[-3000:]
        assert_exact(pg_dsn, truth)
        good = {dataset.id_of(i): dataset.hostile_json(i) for i in dataset.hostile}
        bad = {dataset.id_of(i): dataset.hostile_json(i) for i in dataset.unstorable}
        assert good and bad
        with psycopg2.connect(pg_dsn) as conn, conn.cursor() as cur:
            check_identical(cur, good)
            check_rejected(cur, bad)
            cur.execute("SELECT count(*) FROM ingest_rejects")
            assert cur.fetchone()[0] == truth.unstorable
    finally:
        sim.stop()


def test_hostile_events_end_to_end_over_http(pg_dsn: str, data_dir: Path) -> None:
    run_hostile(pg_dsn, data_dir, 3000, 2 * len(HOSTILE_KINDS), INGEST_PAGE_LIMIT=1000)


@pytest.mark.slow
def test_many_hostile_events_across_partitions(pg_dsn: str, data_dir: Path) -> None:
    run_hostile(
        pg_dsn, data_dir, 30_000, 20 * len(HOSTILE_KINDS), INGEST_PAGE_LIMIT=2000, INGEST_PARTITIONS=3,
        INGEST_SEGMENT_MAX_ROWS=3000, INGEST_WORKERS=3,
    )
