"""The loader against a real PostgreSQL: exactly once, bad lines, crashes, transient errors."""

from __future__ import annotations

import errno
import io
import multiprocessing
import os
import signal
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import psycopg2
import psycopg2.extensions
import pytest
from hypothesis import given
from hypothesis import strategies as st
from loguru import logger

import ingest.sink.loader as loader_module
import ingest.sink.pool as pool_module
from ingest.config import Config
from ingest.counters import SharedCounters
from ingest.run import children, loading
from ingest.run.loading import load_ready
from ingest.sink import db
from ingest.sink.loader import (
    COPY_STAGING,
    STAGING_DDL,
    LoadResult,
    direct_rows,
    find_first_bad_line,
    line_count,
    load_segment,
    split_lines,
    whole_lines,
)
from ingest.sink.pool import loader_loop
from ingest.sink.segments import SegmentStore, SegmentWriter, claim, id_of, reconcile
from ingest.source.normalise import normalise_page
from ingest.tsv import EVENT_LINE_END, decode_row, encode_row

BASE_MS = 1766946793000
TABLE = "events"


def api_event(n: int, prefix: str = "e") -> dict[str, Any]:
    """An event shaped like the API's (section 6): mixed epoch-ms / ISO timestamps."""
    ms = BASE_MS + n * 37
    stamp: Any = ms if n % 3 == 0 else datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")
    return {
        "id": f"{prefix}-{n:08d}",
        "sessionId": f"s-{n // 50}",
        "userId": f"u-{n // 1000}",
        "type": "click",
        "name": f"event_{n % 999999:06d}",
        "properties": {"page": "/home", "tab\there": "line\nbreak \\ \u00e9"},
        "timestamp": stamp,
        "session": {"id": f"s-{n // 50}", "deviceType": "mobile", "browser": "Chrome"},
    }


def expected_ms(n: int) -> int:
    return BASE_MS + n * 37


def make_config(data_dir: Path, **changes: Any) -> Config:
    return Config(data_dir=data_dir, table=TABLE, log_format="text", log_level="INFO", **changes)


@pytest.fixture
def dsn(pg_dsn: str) -> str:
    conn = db.connect(pg_dsn)
    db.ensure_schema(conn, TABLE)
    conn.close()
    return pg_dsn


@pytest.fixture
def conn(dsn: str) -> Iterator[psycopg2.extensions.connection]:
    c = db.connect(dsn)
    c.set_client_encoding("UTF8")
    yield c
    c.close()


@pytest.fixture
def store(data_dir: Path) -> SegmentStore:
    s = SegmentStore(data_dir / "segments")
    s.ensure()
    return s


def seal(store: SegmentStore, seq: int, events: list[Any], partition: int = 0) -> Path:
    """A ready segment made the way the fetcher makes them."""
    writer = SegmentWriter(store, partition, "ab12", seq, max_rows=1 << 30, max_bytes=1 << 40, max_age=1e9)
    page = normalise_page(events)
    writer.append(page.data, page.rows)
    seg = writer.seal()
    assert seg is not None
    return store.ready / f"{seg}.tsv"


def query(conn: psycopg2.extensions.connection, text: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with conn.cursor() as cur:
        cur.execute(text, args)
        rows = cur.fetchall()
    conn.rollback()
    return rows


def count(conn: psycopg2.extensions.connection, table: str) -> int:
    return int(query(conn, f"SELECT count(*) FROM {table}")[0][0])


def wait_for(condition: Callable[[], Any], what: str, timeout: float = 120.0) -> Any:
    """Poll a condition (never a fixed sleep); fail with `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def ledger(conn: psycopg2.extensions.connection) -> dict[str, tuple[int, ...]]:
    rows = query(conn, "SELECT segment_id, rows, inserted, duplicates, rejected, bytes, loaded_at IS NOT NULL FROM ingest_segments")
    return {r[0]: tuple(r[1:]) for r in rows}


def assert_exactly(conn: psycopg2.extensions.connection, ids: set[str]) -> None:
    got = [r[0] for r in query(conn, f"SELECT id FROM {TABLE}")]
    assert len(got) == len(set(got)) == len(ids) and set(got) == ids


# ---------------------------------------------------------------------------------------
# load_segment


def test_load_segment_stores_rows_rejects_and_ledger(store: SegmentStore, conn: psycopg2.extensions.connection) -> None:
    events: list[Any] = [api_event(n) for n in range(1000)]
    events += [api_event(5), {"timestamp": BASE_MS}, {"id": "bad-ts", "timestamp": "soon"}, "not an object"]
    path = seal(store, 1, events)
    result = load_segment(conn, path, id_of(path), TABLE)
    assert result == LoadResult(id_of(path), 1004, 1000, 1, 3, path.stat().st_size, skipped=False)
    assert ledger(conn) == {id_of(path): (1004, 1000, 1, 3, path.stat().st_size, True)}
    assert_exactly(conn, {f"e-{n:08d}" for n in range(1000)})
    # payload is the event as sent; occurred_at the instant it names
    for n in (0, 1, 2, 999):
        ev = api_event(n)
        same, ms, name = query(
            conn,
            f"SELECT payload = %s::jsonb, (extract(epoch FROM occurred_at) * 1000)::bigint, name FROM {TABLE} WHERE id = %s",
            (orjson.dumps(ev).decode(), ev["id"]),
        )[0]
        assert same and ms == expected_ms(n) and name == ev["name"]
    rejects = query(conn, "SELECT segment_id, reason, raw FROM ingest_rejects ORDER BY id")
    assert [(s, r) for s, r, _ in rejects] == [
        (id_of(path), "missing id"),
        (id_of(path), 'unparseable timestamp: "soon"'),
        (id_of(path), "not an object"),
    ]
    assert orjson.loads(rejects[1][2]) == {"id": "bad-ts", "timestamp": "soon"}


def test_an_unstorable_event_seen_again_in_another_form_is_one_reject(
    store: SegmentStore, conn: psycopg2.extensions.connection
) -> None:
    # The API writes a timestamp as a number or an ISO string by the event's place in the
    # page: overlapping walks can fetch one unstorable event in both forms, even within one
    # segment; a faulty response can also leave fields out. A different event is another reject.
    as_number = {"name": "nul\u0000", "timestamp": 1769541553629, "properties": {"n": 1}}
    as_text = {**as_number, "timestamp": "2026-01-27T19:19:13.629Z"}
    later = {**as_number, "timestamp": "2026-01-27T19:19:14.000Z", "name": "other\u0000"}
    with_id = {"id": "e-x", "name": "nul\u0000", "timestamp": 1769541553629, "userId": "u-1"}
    with_id_cut = {"id": "e-x", "name": "nul\u0000", "timestamp": "2026-01-27T19:19:13.629Z"}
    first = seal(store, 1, [api_event(1), as_number, as_text, with_id])
    second = seal(store, 2, [as_text, later, api_event(2), with_id_cut])
    assert load_segment(conn, first, id_of(first), TABLE).rejected == 2
    assert load_segment(conn, second, id_of(second), TABLE).rejected == 1
    reasons = sorted(r[0] for r in query(conn, "SELECT reason FROM ingest_rejects"))
    assert reasons == ["NUL character in name", "missing id", "missing id"]


class CommitHeld(psycopg2.extensions.connection):
    """A loader's connection that stops at its commit until `go_on` is set."""

    def hold(self) -> None:
        self.at_commit, self.go_on = threading.Event(), threading.Event()

    def commit(self) -> None:
        self.at_commit.set()
        assert self.go_on.wait(120), "the test never let the commit go on"
        super().commit()


def test_loaders_holding_one_reject_at_once_store_it_once(
    store: SegmentStore, conn: psycopg2.extensions.connection, dsn: str
) -> None:
    unstorable = {"id": "e-x", "name": "nul\u0000", "timestamp": BASE_MS}
    first, second = seal(store, 1, [api_event(1), unstorable]), seal(store, 2, [api_event(2), unstorable])
    held = psycopg2.connect(dsn, connection_factory=CommitHeld)
    held.hold()
    other = db.connect(dsn)
    results: dict[int, LoadResult] = {}
    loads = [
        threading.Thread(target=lambda: results.__setitem__(1, load_segment(held, first, id_of(first), TABLE))),
        threading.Thread(target=lambda: results.__setitem__(2, load_segment(other, second, id_of(second), TABLE))),
    ]
    loads[0].start()
    wait_for(held.at_commit.is_set, "the first load at its commit")
    loads[1].start()
    waiting = "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
    try:
        wait_for(lambda: query(conn, waiting)[0][0] == 1, "the second load waiting for the first's rejects", timeout=30)
    finally:
        held.go_on.set()
        for load in loads:
            load.join(timeout=120)
        held.close()
        other.close()
    assert sorted((r.inserted, r.rejected) for r in results.values()) == [(1, 0), (1, 1)]
    assert count(conn, "ingest_rejects") == 1


def test_same_segment_loaded_twice_changes_nothing(store: SegmentStore, conn: psycopg2.extensions.connection) -> None:
    path = seal(store, 1, [api_event(n) for n in range(500)])
    first = load_segment(conn, path, id_of(path), TABLE)
    before = (count(conn, TABLE), count(conn, "ingest_rejects"), ledger(conn))
    second = load_segment(conn, path, id_of(path), TABLE)
    assert not first.skipped and first.inserted == 500
    assert second.skipped and second.inserted == 0
    assert (count(conn, TABLE), count(conn, "ingest_rejects"), ledger(conn)) == before
    assert list(ledger(conn)) == [id_of(path)]


def test_overlapping_segments_count_duplicates(store: SegmentStore, conn: psycopg2.extensions.connection) -> None:
    a = seal(store, 1, [api_event(n) for n in range(300)])
    b = seal(store, 2, [api_event(n) for n in range(200, 400)])
    load_segment(conn, a, id_of(a), TABLE)
    result = load_segment(conn, b, id_of(b), TABLE)
    assert (result.rows, result.inserted, result.duplicates) == (200, 100, 100)
    assert_exactly(conn, {f"e-{n:08d}" for n in range(400)})




@pytest.mark.parametrize(
    ("data", "size", "chunks"),
    [
        (b"", 4, []),
        (b"ab\ncd\n", 3, [b"ab\n", b"cd\n"]),  # a read ending at a line's end is kept as read
        (b"ab\ncd\nef\n", 4, [b"ab\ncd\n", b"ef\n"]),  # one ending mid-line is completed
        (b"abcdefgh\nij\n", 2, [b"abcdefgh\n", b"ij\n"]),  # a line longer than a read
        (b"ab\ncd", 4, [b"ab\ncd"]),  # a last line without newline comes as it is
        (b"ab\ncd", 3, [b"ab\n", b"cd"]),
    ],
)
def test_whole_lines(data: bytes, size: int, chunks: list[bytes]) -> None:
    assert list(whole_lines(io.BytesIO(data), size)) == chunks


@pytest.mark.parametrize(
    ("chunk", "rows"),
    [
        (b"a\tb\t\\N\t\\N\nc\td\t\\N\t\\N\n", b"a\tb\tNOW\nc\td\tNOW\n"),
        (b"a\tb\t\\N\t\\N\n\\N\t\\N\tmissing id\t{}\n", None),  # a reject row: staging
        (b"a\tb\t\\N\t\\N", None),  # no final newline: not a sealed segment's shape
        (b"a\tb\t\\N\t\\N\n\n", None),  # an empty line
        (b"a\tb\t\\N\t\\N\t\\N\n", b"a\tb\t\\N\tNOW\n"),  # any line that ends like an event row
        (b"", None),
    ],
)
def test_direct_rows_end_each_event_row_with_ingested_at(chunk: bytes, rows: bytes | None) -> None:
    assert direct_rows(chunk, b"NOW") == rows


def test_direct_rows_take_ingested_at_literally() -> None:
    """`re` reads backslashes in a substitution template: the text must come out as given."""
    assert direct_rows(b"a\t\\N\t\\N\n", b"x\\1\\g<0>") == b"a\tx\\1\\g<0>\n"


@given(st.binary(max_size=64))
def test_line_count(data: bytes) -> None:
    assert line_count(data) == data.count(b"\n")


segment_bytes = st.lists(st.sampled_from([b"a", b"\t", b"\\", b"N", b"\\N", b"\n", EVENT_LINE_END])).map(b"".join)


def reference_direct_rows(data: bytes, ingested_at: bytes) -> bytes | None:
    """What the fast path must make of a segment taken whole: every line an event row,
    each line ending replaced (the plain bytes operations, one at a time)."""
    if not (data.endswith(b"\n") and data.count(b"\n") == data.count(EVENT_LINE_END)):
        return None
    return data.replace(EVENT_LINE_END, b"\t" + ingested_at + b"\n")


@given(segment_bytes.filter(bool), st.integers(min_value=1, max_value=24))
def test_streaming_in_chunks_decides_and_rewrites_as_the_whole_segment_would(data: bytes, size: int) -> None:
    """Chunked, the fast path takes exactly the segments it took whole, and COPY gets the
    same bytes: whatever the read size, and wherever reads cut a line or a line ending."""
    chunks = list(whole_lines(io.BytesIO(data), size))
    assert b"".join(chunks) == data
    assert all(chunk.endswith(b"\n") for chunk in chunks[:-1])
    assert direct_rows(data, b"NOW") == reference_direct_rows(data, b"NOW")
    rows = [direct_rows(chunk, b"NOW") for chunk in chunks]
    whole = reference_direct_rows(data, b"NOW")
    assert (None not in rows) is (whole is not None)
    if whole is not None:
        assert b"".join(rows) == whole  # type: ignore[arg-type]


def spy_direct(monkeypatch: pytest.MonkeyPatch) -> list[int | None]:
    """Record what each fast-path attempt returned (None: it fell back to staging)."""
    outcomes: list[int | None] = []
    real = loader_module._copy_direct

    def spy(*args: Any) -> int | None:
        outcomes.append(real(*args))
        return outcomes[-1]

    monkeypatch.setattr(loader_module, "_copy_direct", spy)
    return outcomes


def test_clean_segment_takes_the_direct_path(
    store: SegmentStore, conn: psycopg2.extensions.connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    outcomes = spy_direct(monkeypatch)
    path = seal(store, 1, [api_event(n) for n in range(700)])
    result = load_segment(conn, path, id_of(path), TABLE)
    assert outcomes == [700]
    assert (result.rows, result.inserted, result.duplicates, result.rejected) == (700, 700, 0, 0)
    assert_exactly(conn, {f"e-{n:08d}" for n in range(700)})
    ev = api_event(3)
    same, stamped = query(
        conn,
        f"SELECT payload = %s::jsonb, ingested_at = (SELECT loaded_at FROM ingest_segments) FROM {TABLE} WHERE id = %s",
        (orjson.dumps(ev).decode(), ev["id"]),
    )[0]
    assert same and stamped, "payload as sent; ingested_at is the loading transaction's time"


@pytest.mark.parametrize("read_size", [None, 4096])
def test_a_colliding_id_falls_back_to_staging_in_the_same_transaction(
    store: SegmentStore, conn: psycopg2.extensions.connection, monkeypatch: pytest.MonkeyPatch, read_size: int | None
) -> None:
    outcomes = spy_direct(monkeypatch)
    if read_size is not None:  # many chunks: the collision comes after COPY took several
        monkeypatch.setattr(loader_module, "READ_SIZE", read_size)
    a = seal(store, 1, [api_event(n) for n in range(300)])
    b = seal(store, 2, [api_event(n) for n in range(300, 600)] + [api_event(299)])  # the last id is already loaded
    load_segment(conn, a, id_of(a), TABLE)
    result = load_segment(conn, b, id_of(b), TABLE)
    assert outcomes == [300, None]
    assert (result.rows, result.inserted, result.duplicates) == (301, 300, 1)
    assert_exactly(conn, {f"e-{n:08d}" for n in range(600)})
    assert ledger(conn)[id_of(b)][:3] == (301, 300, 1)


def read_size_cutting_a_line_end(path: Path) -> int:
    """A read size whose first read ends inside the third line's EVENT_LINE_END."""
    data = path.read_bytes()
    third_newline = len(b"\n".join(data.split(b"\n", 3)[:3]))
    return third_newline - 2


def table_dump(conn: psycopg2.extensions.connection, table: str) -> bytes:
    """Every stored row but ingested_at, as COPY writes it: equal dumps, equal rows."""
    out = io.BytesIO()
    with conn.cursor() as cur:
        cur.copy_expert(
            f"COPY (SELECT id, occurred_at, type, name, user_id, session_id, payload FROM {table} ORDER BY id) TO STDOUT",
            out,
        )
    conn.rollback()
    return out.getvalue()


def test_a_segment_of_many_chunks_loads_through_the_direct_path_unchanged(
    store: SegmentStore, conn: psycopg2.extensions.connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    outcomes = spy_direct(monkeypatch)
    path = seal(store, 1, [api_event(n) for n in range(700)])
    monkeypatch.setattr(loader_module, "READ_SIZE", read_size_cutting_a_line_end(path))
    result = load_segment(conn, path, id_of(path), TABLE)
    assert outcomes == [700]
    assert (result.rows, result.inserted, result.duplicates, result.rejected) == (700, 700, 0, 0)
    with conn.cursor() as cur:  # the same segment given to COPY whole, as one buffer
        cur.execute(f"CREATE TABLE reference (LIKE {TABLE})")
        cur.copy_expert(
            "COPY reference (id, occurred_at, type, name, user_id, session_id, payload, ingested_at) FROM STDIN",
            io.BytesIO(direct_rows(path.read_bytes(), b"now") or b""),
        )
    conn.commit()
    assert table_dump(conn, TABLE) == table_dump(conn, "reference")
    assert count(conn, TABLE) == 700


def test_a_reject_row_after_the_first_chunk_sends_the_segment_to_staging(
    store: SegmentStore, conn: psycopg2.extensions.connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    outcomes = spy_direct(monkeypatch)
    monkeypatch.setattr(loader_module, "READ_SIZE", 4096)
    events = [api_event(n) for n in range(700)]
    path = seal(store, 1, [*events[:500], {"timestamp": BASE_MS}, *events[500:]])
    result = load_segment(conn, path, id_of(path), TABLE)
    assert outcomes == [None]  # abandoned at that chunk: the savepoint takes back what COPY took
    assert (result.rows, result.inserted, result.duplicates, result.rejected) == (701, 700, 0, 1)
    assert_exactly(conn, {f"e-{n:08d}" for n in range(700)})
    assert query(conn, "SELECT reason FROM ingest_rejects") == [("missing id",)]


def test_a_line_refused_after_the_first_chunk_falls_back_and_is_cut_out(
    store: SegmentStore, conn: psycopg2.extensions.connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    outcomes = spy_direct(monkeypatch)
    monkeypatch.setattr(loader_module, "READ_SIZE", 4096)
    path = seal(store, 1, [api_event(n) for n in range(700)])
    lines = path.read_bytes().splitlines(keepends=True)
    lines[600] = bad_line("timestamp", 600)  # an event row's shape: only COPY can refuse it
    path.write_bytes(b"".join(lines))
    result = load_segment(conn, path, id_of(path), TABLE)
    assert outcomes == [None]
    assert (result.rows, result.inserted, result.duplicates, result.rejected) == (700, 699, 0, 1)
    assert_exactly(conn, {f"e-{n:08d}" for n in range(700)} - {"e-00000600"})


def test_a_read_error_during_copy_is_raised_as_itself(conn: psycopg2.extensions.connection) -> None:
    """Not as the query_canceled copy_expert turns it into, which would be retried as a
    database outage."""

    def failing() -> Iterator[bytes]:
        yield normalise_page([api_event(1)]).data
        raise OSError(errno.EIO, "Input/output error")

    with conn.cursor() as cur:
        cur.execute(STAGING_DDL)
        with pytest.raises(OSError, match="Input/output error"):
            loader_module._copy(cur, COPY_STAGING, failing())
    conn.rollback()


@pytest.mark.parametrize("reject", [False, True], ids=["direct", "staging"])
def test_a_load_holds_a_few_chunks_never_the_segment(
    store: SegmentStore, conn: psycopg2.extensions.connection, monkeypatch: pytest.MonkeyPatch, reject: bool
) -> None:
    read_size = 1 << 17
    monkeypatch.setattr(loader_module, "READ_SIZE", read_size)
    events: list[Any] = [api_event(n) for n in range(12_000)]
    path = seal(store, 1, events + [{"no": "id"}] * reject)
    assert path.stat().st_size > 16 * read_size
    tracemalloc.start()
    try:
        result = load_segment(conn, path, id_of(path), TABLE)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert (result.inserted, result.rejected) == (12_000, int(reject))
    assert peak < 6 * read_size, f"{peak:,} bytes held at once"


def bad_line(kind: str, n: int) -> bytes:
    """A line written straight into the TSV that COPY (or the table) refuses."""
    ev = api_event(n)
    fields: list[str | None] = [ev["id"], "2026-01-01T00:00:00+00:00", "t", "n", "u", "s", orjson.dumps(ev).decode(), None, None]
    if kind == "timestamp":
        fields[1] = "not a time"
    elif kind == "jsonb":
        fields[6] = '{"id": broken'
    elif kind == "nul-in-jsonb":
        fields[6] = '{"x": "\\u0000"}'
    elif kind == "columns":
        return encode_row(fields[:5])
    elif kind == "utf8":
        return encode_row(fields).replace(b"\tt\t", b"\t\xff\xfe\t")
    elif kind == "nul-byte":
        return encode_row(fields).replace(b"\tt\t", b"\tt\x00t\t")
    return encode_row(fields)


def whole(line: bytes) -> str:
    return line.rstrip(b"\n").decode("utf-8", "backslashreplace").replace("\x00", "\\x00")


def payload_of(line: bytes) -> str:
    return str(decode_row(line)[6])


# What a reject keeps of a refused line: an event row's JSON text, else the whole line.
@pytest.mark.parametrize(
    ("kind", "reason_has", "raw_of"),
    [
        ("timestamp", "invalid input syntax for type timestamp with time zone", payload_of),
        ("jsonb", "invalid input syntax for type json", payload_of),
        ("nul-in-jsonb", "unsupported Unicode escape sequence", payload_of),
        ("columns", "missing data for column", whole),
        ("utf8", "invalid byte sequence", whole),
        ("nul-byte", "invalid byte sequence", payload_of),
    ],
)
def test_bad_line_in_the_middle_is_the_only_reject(
    store: SegmentStore, conn: psycopg2.extensions.connection, kind: str, reason_has: str, raw_of: Callable[[bytes], str]
) -> None:
    path = seal(store, 1, [api_event(n) for n in range(5000)])
    lines = path.read_bytes().splitlines(keepends=True)
    broken = bad_line(kind, 2500)
    lines[2500] = broken
    path.write_bytes(b"".join(lines))
    result = load_segment(conn, path, id_of(path), TABLE)
    assert (result.rows, result.inserted, result.duplicates, result.rejected) == (5000, 4999, 0, 1)
    assert_exactly(conn, {f"e-{n:08d}" for n in range(5000)} - {"e-00002500"})
    [(reason, raw)] = query(conn, "SELECT reason, raw FROM ingest_rejects")
    assert reason_has in reason
    assert raw == raw_of(broken)
    assert ledger(conn)[id_of(path)][:4] == (5000, 4999, 0, 1)


def test_several_bad_lines_each_rejected(store: SegmentStore, conn: psycopg2.extensions.connection) -> None:
    path = seal(store, 1, [api_event(n) for n in range(300)])
    lines = path.read_bytes().splitlines(keepends=True)
    for n, kind in ((0, "jsonb"), (150, "timestamp"), (151, "columns"), (299, "utf8")):
        lines[n] = bad_line(kind, n)
    path.write_bytes(b"".join(lines))
    result = load_segment(conn, path, id_of(path), TABLE)
    assert (result.rows, result.inserted, result.rejected) == (300, 296, 4)
    assert count(conn, "ingest_rejects") == 4 and count(conn, TABLE) == 296


def test_an_event_the_table_refuses_in_two_spellings_is_one_reject(
    store: SegmentStore, conn: psycopg2.extensions.connection
) -> None:
    # The body path keeps the server's text of a number, the general path writes its own:
    # overlapping walks can seal one event PostgreSQL refuses in both spellings.
    event = api_event(3)
    for n, spelling in enumerate(("1e200000", "1E+200000"), 1):
        payload = orjson.dumps(event).decode().replace('"properties":{', '"properties":{"n":' + spelling + ",", 1)
        refused = encode_row([event["id"], "2026-01-01T00:00:00+00:00", "t", "n", "u", "s", payload, None, None])
        path = seal(store, n, [api_event(10 * n + k) for k in range(3)])
        path.write_bytes(path.read_bytes() + refused)
        result = load_segment(conn, path, id_of(path), TABLE)
        assert (result.inserted, result.rejected) == (3, 2 - n)
    [(reason, raw)] = query(conn, "SELECT reason, raw FROM ingest_rejects")
    assert "numeric" in reason and orjson.loads(raw.replace("1e200000", "1"))["id"] == event["id"]


@pytest.mark.parametrize("bad_at", [0, 1, 63, 64, 99])
def test_bisection_finds_the_first_bad_line(conn: psycopg2.extensions.connection, bad_at: int) -> None:
    lines = normalise_page([api_event(n) for n in range(100)]).data.splitlines(keepends=True)
    lines[bad_at] = bad_line("timestamp", bad_at)
    if bad_at + 5 < len(lines):
        lines[bad_at + 5] = bad_line("jsonb", bad_at + 5)  # a later one is not the first
    index, reason = find_first_bad_line(conn, lines)
    assert index == bad_at and "timestamp" in reason
    assert count(conn, TABLE) == 0  # probing leaves nothing behind


# ---------------------------------------------------------------------------------------
# loader_loop


def test_loop_waits_for_segments_until_fetch_is_done(data_dir: Path, store: SegmentStore, dsn: str) -> None:
    config = make_config(data_dir, keep_segments=True)
    done = threading.Event()
    results: list[LoadResult] = []
    thread = threading.Thread(target=loader_loop, args=(config, dsn, lambda: False, done.is_set, results.append))
    thread.start()
    try:
        seal(store, 1, [api_event(n) for n in range(100)])
        wait_for(lambda: len(results) == 1, "the first segment")
        assert thread.is_alive()  # fetch not done: keeps polling
        seal(store, 2, [api_event(n) for n in range(100, 200)])
        done.set()
    finally:
        done.set()
        thread.join(60)
    assert not thread.is_alive()
    assert [r.inserted for r in results] == [100, 100]
    assert sorted(os.listdir(store.loaded)) == ["p00-00000001-ab12.tsv", "p00-00000002-ab12.tsv"]
    assert store.counts()["ready"] == store.counts()["loading"] == 0


def test_loop_returns_on_stop(data_dir: Path, store: SegmentStore, dsn: str) -> None:
    seal(store, 1, [api_event(1)])
    stop = threading.Event()
    stop.set()
    loader_loop(make_config(data_dir), dsn, stop.is_set, lambda: False)
    assert store.counts()["ready"] == 1  # stopped before claiming anything


def backend_waiting_on_lock(conn: psycopg2.extensions.connection) -> int | None:
    rows = query(
        conn,
        "SELECT pid FROM pg_stat_activity WHERE application_name = 'datasync-ingest-loader'"
        " AND wait_event_type = 'Lock' AND datname = current_database()",
    )
    return int(rows[0][0]) if rows else None


def test_connection_killed_mid_load_is_retried_and_loads_once(
    data_dir: Path, store: SegmentStore, dsn: str, conn: psycopg2.extensions.connection
) -> None:
    path = seal(store, 1, [api_event(n) for n in range(2000)])
    seg = id_of(path)
    messages: list[str] = []
    sink = logger.add(lambda m: messages.append(str(m)), level="WARNING")
    locker = db.connect(dsn)
    results: list[LoadResult] = []
    try:
        with locker.cursor() as cur:  # the loader's INSERT INTO events blocks behind this, after its COPY
            cur.execute(f"LOCK TABLE {TABLE} IN ACCESS EXCLUSIVE MODE")
        thread = threading.Thread(
            target=loader_loop, args=(make_config(data_dir), dsn, lambda: False, lambda: True, results.append)
        )
        thread.start()
        victim = wait_for(lambda: backend_waiting_on_lock(conn), "the loader to block after COPY")
        assert query(conn, "SELECT pg_terminate_backend(%s)", (victim,))[0][0] is True
        locker.rollback()
        thread.join(120)
        assert not thread.is_alive()
    finally:
        locker.close()
        logger.remove(sink)
    assert any("retrying" in m and seg in m for m in messages)
    assert [(r.segment_id, r.inserted, r.skipped) for r in results] == [(seg, 2000, False)]
    assert_exactly(conn, {f"e-{n:08d}" for n in range(2000)})
    assert list(ledger(conn)) == [seg] and store.counts()["loading"] == 0


# ---------------------------------------------------------------------------------------
# Crashes: SIGKILL at the worst moments, then reconcile and a restart


def _loader_dying_before_retire(config: Config, dsn: str, marker: str) -> None:
    """A loader whose retire() announces itself and hangs: the test SIGKILLs it there,
    after the commit and before the file leaves loading/."""

    def hang(store: SegmentStore, path: Path, keep: bool) -> None:
        Path(marker).write_text(path.name)
        while True:
            time.sleep(1)

    pool_module.retire = hang  # type: ignore[assignment]
    loader_loop(config, dsn, lambda: False, lambda: True)


def _plain_loader(config: Config, dsn: str) -> None:
    loader_loop(config, dsn, lambda: False, lambda: True)


def restart_and_check(
    config: Config, dsn: str, conn: psycopg2.extensions.connection, ids: set[str], segments: int, committed: int
) -> None:
    """Reconcile and load again: only the uncommitted segments load, nothing twice."""
    store = SegmentStore(config.segments_dir)
    reconcile(store, db.ledger_ids(conn))
    totals = load_ready(config, dsn, workers=2)
    assert (totals["segments_loaded"], totals["duplicates"]) == (segments - committed, 0)
    assert_exactly(conn, ids)
    assert len(ledger(conn)) == segments
    assert store.counts() == {"open": 0, "ready": 0, "loading": 0, "loaded": 0, "rejected": 0}


def test_sigkill_after_commit_before_retire(
    data_dir: Path, store: SegmentStore, dsn: str, conn: psycopg2.extensions.connection, tmp_path: Path
) -> None:
    config = make_config(data_dir)
    for seq in range(1, 4):
        seal(store, seq, [api_event(n) for n in range(seq * 1000, seq * 1000 + 1000)])
    marker = tmp_path / "retiring"
    ctx = multiprocessing.get_context("spawn")
    proc = ctx.Process(target=_loader_dying_before_retire, args=(config, dsn, str(marker)))
    proc.start()
    try:
        wait_for(marker.exists, "the loader to reach retire")
        os.kill(proc.pid or 0, signal.SIGKILL)
    finally:
        proc.join(60)
    assert proc.exitcode == -signal.SIGKILL
    first = "p00-00000001-ab12"
    assert list(ledger(conn)) == [first]  # committed...
    assert [id_of(p) for p in store.segments("loading")] == [first]  # ...but not retired
    assert count(conn, TABLE) == 1000
    restart_and_check(config, dsn, conn, {f"e-{n:08d}" for n in range(1000, 4000)}, 3, committed=1)


def test_sigkill_after_copy_before_commit(
    data_dir: Path, store: SegmentStore, dsn: str, conn: psycopg2.extensions.connection
) -> None:
    config = make_config(data_dir)
    for seq in range(1, 3):
        seal(store, seq, [api_event(n) for n in range(seq * 1000, seq * 1000 + 1000)])
    locker = db.connect(dsn)
    ctx = multiprocessing.get_context("spawn")
    proc = ctx.Process(target=_plain_loader, args=(config, dsn))
    try:
        with locker.cursor() as cur:
            cur.execute(f"LOCK TABLE {TABLE} IN ACCESS EXCLUSIVE MODE")
        proc.start()
        wait_for(lambda: backend_waiting_on_lock(conn), "the loader to block after COPY")
        os.kill(proc.pid or 0, signal.SIGKILL)
        proc.join(60)
    finally:
        locker.rollback()
        locker.close()
    assert proc.exitcode == -signal.SIGKILL
    assert [id_of(p) for p in store.segments("loading")] == ["p00-00000001-ab12"]
    # The orphaned server session can only roll back; wait until it is gone.
    wait_for(
        lambda: not query(
            conn, "SELECT 1 FROM pg_stat_activity WHERE application_name = 'datasync-ingest-loader' AND datname = current_database()"
        ),
        "the dead loader's session to end",
    )
    assert ledger(conn) == {} and count(conn, TABLE) == 0
    restart_and_check(config, dsn, conn, {f"e-{n:08d}" for n in range(1000, 3000)}, 2, committed=0)


# ---------------------------------------------------------------------------------------
# The pool


def run_pool(data_dir: Path, store: SegmentStore, dsn: str, segments: int, rows: int, workers: int) -> float:
    for seq in range(segments):
        seal(store, seq + 1, [api_event(n) for n in range(seq * rows, (seq + 1) * rows)], partition=seq % 3)
    started = time.perf_counter()
    totals = load_ready(make_config(data_dir), dsn, workers)
    elapsed = time.perf_counter() - started
    assert totals == {"segments_loaded": segments, "rows_loaded": segments * rows, "events_loaded": segments * rows,
                      "duplicates": 0, "rejected": 0}
    return elapsed


def test_pool_loads_every_segment_exactly_once(
    data_dir: Path, store: SegmentStore, dsn: str, conn: psycopg2.extensions.connection
) -> None:
    run_pool(data_dir, store, dsn, segments=20, rows=1000, workers=3)
    assert_exactly(conn, {f"e-{n:08d}" for n in range(20_000)})
    assert len(ledger(conn)) == 20 and store.counts()["ready"] == store.counts()["loading"] == 0
    assert db.totals(conn, TABLE)["inserted"] == 20_000


@pytest.mark.slow
def test_pool_200_segments_of_5000_rows_with_4_loaders(
    data_dir: Path, store: SegmentStore, dsn: str, conn: psycopg2.extensions.connection
) -> None:
    elapsed = run_pool(data_dir, store, dsn, segments=200, rows=5000, workers=4)
    print(f"\n200 x 5000 rows, 4 loaders: {elapsed:.1f} s, {1_000_000 / elapsed:,.0f} rows/s")
    assert count(conn, TABLE) == 1_000_000
    assert query(conn, f"SELECT count(DISTINCT id) FROM {TABLE}")[0][0] == 1_000_000
    assert len(ledger(conn)) == 200


def test_claimed_files_are_named_after_the_loader(store: SegmentStore) -> None:
    seal(store, 1, [api_event(1)])
    path = claim(store, 31337)
    assert path is not None and path.name == "p00-00000001-ab12.31337.tsv"


def test_segment_the_table_refuses_goes_to_rejected(
    data_dir: Path, store: SegmentStore, dsn: str, conn: psycopg2.extensions.connection
) -> None:
    """A constraint violation outside COPY cannot be cut to one line: the segment is set aside."""
    with conn.cursor() as cur:
        cur.execute(f"ALTER TABLE {TABLE} ADD CONSTRAINT no_scroll CHECK (type <> 'scroll')")
    conn.commit()
    refused = [{**api_event(n), "type": "scroll"} if n == 7 else api_event(n) for n in range(10)]
    seal(store, 1, refused)
    seal(store, 2, [api_event(n) for n in range(10, 20)])
    loader_loop(make_config(data_dir), dsn, lambda: False, lambda: True)
    assert [id_of(p) for p in store.segments("rejected")] == ["p00-00000001-ab12"]
    assert "no_scroll" in (store.rejected / "p00-00000001-ab12.reason").read_text()
    assert list(ledger(conn)) == ["p00-00000002-ab12"]  # the failed attempt left no ledger row
    assert_exactly(conn, {f"e-{n:08d}" for n in range(10, 20)})


def test_terminal_database_error_requeues_and_raises(data_dir: Path, store: SegmentStore, pg_dsn: str) -> None:
    seal(store, 1, [api_event(1)])  # no schema in this database: a terminal error
    with pytest.raises(psycopg2.errors.UndefinedTable):
        loader_loop(make_config(data_dir), pg_dsn, lambda: False, lambda: True)
    assert store.counts()["ready"] == 1 and store.counts()["loading"] == 0


def test_loader_process_counts_and_stops_on_request(data_dir: Path, store: SegmentStore, dsn: str) -> None:
    ctx = multiprocessing.get_context("spawn")
    fetch_done, stop, errors = ctx.Event(), ctx.Event(), ctx.Queue()
    counters = SharedCounters(ctx)
    seal(store, 1, [api_event(n) for n in range(300)] + [{"no": "id"}])
    proc = children.start(ctx, "loader", 0, loading.loader, make_config(data_dir), stop, counters, errors,
                          dsn, fetch_done)
    try:
        wait_for(lambda: counters.snapshot()["events_loaded"] == 300, "the segment to load")
        assert proc.is_alive()  # fetch not done: waits for more
        stop.set()
        proc.join(60)
    finally:
        if proc.is_alive():
            proc.kill()
    assert proc.exitcode == 0
    snapshot = counters.snapshot()
    assert [snapshot[k] for k in ("segments_loaded", "rows_loaded", "events_loaded", "duplicates", "rejected")] == [
        1, 301, 300, 0, 1
    ]


def _parent_of_a_loader(config: Config, dsn: str, pid_file: str) -> None:
    ctx = multiprocessing.get_context("spawn")
    fetch_done, stop, errors, counters = ctx.Event(), ctx.Event(), ctx.Queue(), SharedCounters(ctx)
    child = children.start(ctx, "loader", 0, loading.loader, config, stop, counters, errors, dsn, fetch_done)
    Path(pid_file).write_text(str(child.pid))
    child.join()


def exited(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return "\nState:\tZ" in status  # a zombie nobody reaped has exited all the same


def test_loader_process_exits_when_its_parent_dies(data_dir: Path, dsn: str, tmp_path: Path) -> None:
    pid_file = tmp_path / "loader.pid"
    ctx = multiprocessing.get_context("spawn")
    parent = ctx.Process(target=_parent_of_a_loader, args=(make_config(data_dir), dsn, str(pid_file)))
    parent.start()
    loader_pid = int(wait_for(lambda: pid_file.exists() and pid_file.read_text(), "the loader to start"))
    assert not exited(loader_pid)
    os.kill(parent.pid or 0, signal.SIGKILL)
    parent.join(60)
    try:
        wait_for(lambda: exited(loader_pid), "the orphaned loader to exit", timeout=60)
    finally:
        if not exited(loader_pid):
            os.kill(loader_pid, signal.SIGKILL)


@pytest.mark.parametrize(
    ("data", "lines"),
    [(b"", []), (b"a\n", [b"a\n"]), (b"a\nb", [b"a\n", b"b"]), (b"a\r\nb\n", [b"a\r\n", b"b\n"]), (b"\n\n", [b"\n", b"\n"])],
)
def test_split_lines(data: bytes, lines: list[bytes]) -> None:
    assert split_lines(data) == lines
