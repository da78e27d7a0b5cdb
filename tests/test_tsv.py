"""TSV round trips: pure (decode_row) and through a real PostgreSQL COPY."""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg2.extensions
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ingest.source.normalise import normalise_event, normalise_page, usual_lines
from ingest.tsv import COLUMNS, decode_row, encode_row

# Everything PostgreSQL text can hold: any code point but NUL (and no lone surrogates).
storable = st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",))
tricky = st.sampled_from(list("\\\t\n\r\"'N.{}[]:,u0 é\u2028\ufeff\u200b"))
text = st.one_of(st.text(alphabet=storable), st.text(alphabet=tricky), st.just("\\N"), st.just("\\."))
row = st.lists(st.one_of(st.none(), text), min_size=len(COLUMNS), max_size=len(COLUMNS))

json_scalar = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=False, allow_infinity=False),
    text,
)
json_value = st.recursive(
    json_scalar,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(text, inner, max_size=4)),
    max_leaves=12,
)
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def iso_ms(ms: int) -> str:
    """The API's ISO form, "2026-01-27T19:19:13.629Z"."""
    return (EPOCH + timedelta(milliseconds=ms)).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def epoch_ms(stamp: int | str) -> int:
    return stamp if isinstance(stamp, int) else (datetime.fromisoformat(stamp) - EPOCH) // timedelta(milliseconds=1)


epoch_ms_number = st.integers(min_value=100_000_000_000, max_value=99_999_999_999_999)
event = st.fixed_dictionaries(
    {
        "id": text.filter(bool),
        "timestamp": st.one_of(epoch_ms_number, epoch_ms_number.map(iso_ms)),  # the API's two forms
    },
    optional={"type": json_value, "name": text, "userId": text, "sessionId": text, "properties": json_value},
)

SLOW_DB = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)


def copy_in(conn: psycopg2.extensions.connection, table: str, data: bytes) -> None:
    with conn.cursor() as cur:
        cur.copy_expert(f"COPY {table} ({', '.join(COLUMNS)}) FROM STDIN", io.BytesIO(data))


@pytest.fixture
def conn(pg_conn: psycopg2.extensions.connection) -> psycopg2.extensions.connection:
    pg_conn.set_client_encoding("UTF8")
    with pg_conn.cursor() as cur:
        cols = ", ".join(f"{c} text" for c in COLUMNS)
        cur.execute(f"CREATE TABLE plain (ord bigserial, {cols})")
        cur.execute(
            "CREATE TABLE typed (ord bigserial, id text, occurred_at timestamptz, type text, name text,"
            " user_id text, session_id text, payload jsonb, reject_reason text, raw text)"
        )
    pg_conn.commit()
    return pg_conn


@given(st.lists(row, max_size=5))
@settings(max_examples=200)
def test_decode_inverts_encode(rows: list[list[str | None]]) -> None:
    for fields in rows:
        line = encode_row(fields)
        assert line.endswith(b"\n") and line.count(b"\n") == 1 and b"\r" not in line
        assert decode_row(line) == fields


def test_encode_row_escapes_each_special_character() -> None:
    assert encode_row(["a\\b", "c\td", "e\nf", "g\rh", None, ""]) == b"a\\\\b\tc\\td\te\\nf\tg\\rh\t\\N\t\n"


@given(st.lists(row, min_size=1, max_size=6))
@SLOW_DB
def test_copy_returns_every_string_byte_identical(conn: psycopg2.extensions.connection, rows: list[list[str | None]]) -> None:
    with conn.cursor() as cur:
        cur.execute("TRUNCATE plain RESTART IDENTITY")
        copy_in(conn, "plain", b"".join(encode_row(r) for r in rows))
        cur.execute(f"SELECT {', '.join(COLUMNS)} FROM plain ORDER BY ord")
        back = [list(r) for r in cur.fetchall()]
    conn.rollback()
    assert [[None if v is None else v.encode("utf-8") for v in r] for r in back] == [
        [None if v is None else v.encode("utf-8") for v in r] for r in rows
    ]


def _as_json(value: Any) -> str:
    return json.dumps(value)


usual_event = st.builds(
    lambda eid, session, user, typ, name, stamp, device: {
        "id": eid,
        "sessionId": session,
        "userId": user,
        "type": typ,
        "name": name,
        "properties": {"page": "/home"},
        "timestamp": stamp,
        "session": {"id": session, "deviceType": device, "browser": "Chrome"},
    },
    st.uuids().map(str),
    st.uuids().map(str),
    st.uuids().map(str),
    st.sampled_from(["page_view", "click", "purchase"]),
    st.from_regex(r"event_[a-z0-9]{6}", fullmatch=True),
    st.one_of(epoch_ms_number, epoch_ms_number.map(iso_ms)),
    st.sampled_from(["mobile", "tablet", "desktop"]),
)


@given(st.lists(event, min_size=1, max_size=5))
@SLOW_DB
def test_normalised_events_survive_copy(conn: psycopg2.extensions.connection, events: list[dict[str, Any]]) -> None:
    """Strings come back identical, payload equals the event as jsonb, the instant is exact."""
    assert_survives_copy(conn, events)


@given(st.lists(usual_event, min_size=1, max_size=5))
@SLOW_DB
def test_usual_events_survive_copy(conn: psycopg2.extensions.connection, events: list[dict[str, Any]]) -> None:
    """The same for the API's usual shape, which `normalise_page` writes by a shortcut."""
    assert None not in usual_lines(events).heads
    assert_survives_copy(conn, events)


def assert_survives_copy(conn: psycopg2.extensions.connection, events: list[dict[str, Any]]) -> None:
    lines = [normalise_event(e) for e in events]
    assert all(n.reason is None for n in lines)
    page = normalise_page(events)
    assert page.data == b"".join(n.line for n in lines)
    with conn.cursor() as cur:
        cur.execute("TRUNCATE typed RESTART IDENTITY")
        copy_in(conn, "typed", page.data)
        for ord_, ev in enumerate(events, start=1):
            cur.execute(
                "SELECT id, type, name, user_id, session_id, payload = %s::jsonb,"
                " (extract(epoch FROM occurred_at) * 1000)::bigint, reject_reason, raw FROM typed WHERE ord = %s",
                (_as_json(ev), ord_),
            )
            got = cur.fetchone()
            typ = ev.get("type")
            assert got[0] == ev["id"]
            # Non-string values are stored as their JSON text.
            assert (got[1] if typ is None or isinstance(typ, str) else json.loads(got[1])) == typ
            assert (got[2], got[3], got[4]) == (ev.get("name"), ev.get("userId"), ev.get("sessionId"))
            assert got[5] is True
            assert got[6] == epoch_ms(ev["timestamp"])
            assert got[7] is None and got[8] is None
    conn.rollback()
