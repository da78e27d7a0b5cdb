"""Normalisation: timestamps, reject reasons, exact payloads, the page fast path."""

from __future__ import annotations

import copy
import json
from collections import OrderedDict, defaultdict
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ingest.source.normalise import (
    MAX_NESTING,
    PageRows,
    RawEvents,
    _api_iso_all,
    _api_iso_ms,
    _api_stamp,
    _from_number,
    _from_text,
    _normalise_event,
    decode_json,
    decode_page,
    format_timestamp,
    normalise_event,
    normalise_page,
    parse_timestamp,
    usual_lines,
    usual_page,
)
from ingest.tsv import EVENT_LINE_END, decode_row

MS = 1769541612369  # 2026-01-27T19:20:12.369Z
US = MS * 1000
ISO_US = 1769541553629000  # 2026-01-27T19:19:13.629Z


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (MS, US),  # epoch ms number, the API's usual form
        (1769541612, 1769541612_000000),  # epoch seconds
        (1769541612.5, 1769541612_500000),
        (1769541612369.5, 1769541612369_500),  # fractional ms
        (US, US),  # µs
        (US * 1000 + 123, US),  # ns (sub-µs rounded)
        (Decimal(1769541612369), US),  # what the exact decoder yields
        (-1, -1_000000),  # before 1970: seconds by magnitude
        (0, 0),
        (str(MS), US),  # numeric string
        (f"  {MS}\t", US),
        (f"\u200b{MS}\ufeff", US),
        ("1769541612", 1769541612_000000),
        ("1769541612.369", US),
        (str(US), US),
        (str(US * 1000), US),
        ("1.769541612369e12", US),
        ("2026-01-27T19:19:13.629Z", ISO_US),  # ISO, Z, ms fraction
        ("2026-01-27T19:19:13.629000Z", ISO_US),
        ("2026-01-27T19:19:13.629123Z", ISO_US + 123),
        ("2026-01-27T19:19:13Z", 1769541553_000000),  # no fraction
        ("2026-01-27T21:19:13.629+02:00", ISO_US),  # offset
        ("2026-01-27T14:19:13.629-0500", ISO_US),
        ("2026-01-27 19:19:13.629Z", ISO_US),  # space instead of T
        ("2026-01-27 19:19:13.629+00:00", ISO_US),
        ("2026-01-27T19:19:13.629", ISO_US),  # no offset: the API's UTC
        ("2026-01-27t19:19:13.629z", ISO_US),
        (" 2026-01-27T19:19:13.629Z ", ISO_US),  # whitespace
        ("\n\t2026-01-27T19:19:13.629Z\r\n", ISO_US),
        ("\u200b2026-01-27T19:19:13.629Z", ISO_US),  # zero-width characters
        ("2026-01-27T19:19:13.629Z\u200c", ISO_US),
        ("\u200d2026-01-27T19:19:13.629Z\ufeff", ISO_US),
        ("2026-01-27T19:19:13\u200b.629Z", ISO_US),
        ("\x00\x072026-01-27T19:19:13.629Z\x7f", ISO_US),  # control characters
    ],
)
def test_parse_timestamp(value: object, expected: int) -> None:
    assert parse_timestamp(value) == expected


@pytest.mark.parametrize(
    "value",
    [None, True, False, "", "   ", "\u200b", "abc", "2026-13-45T00:00:00Z", "12:00", [], {}, [MS], {"ms": MS},
     float("nan"), float("inf"), 10**40, "1e400", "NaN", "--1", "1769541612369ms"],
)
def test_unparseable_timestamps(value: object) -> None:
    assert parse_timestamp(value) is None


def test_format_timestamp_is_utc_with_microseconds() -> None:
    assert format_timestamp(ISO_US) == "2026-01-27T19:19:13.629000+00:00"
    assert format_timestamp(0) == "1970-01-01T00:00:00.000000+00:00"
    assert format_timestamp(-1) == "1969-12-31T23:59:59.999999+00:00"
    assert format_timestamp(parse_timestamp("0001-01-01T00:00:00Z") or 0) == "0001-01-01T00:00:00.000000+00:00"


@given(st.integers(min_value=parse_timestamp("0001-01-01T00:00:00Z"), max_value=parse_timestamp("9999-12-31T23:59:59.999999Z")))
@settings(max_examples=300)
def test_format_timestamp_matches_datetime(us: int) -> None:
    moment = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=us)
    assert format_timestamp(us) == moment.isoformat(timespec="microseconds")
    assert parse_timestamp(format_timestamp(us)) == us


def event(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "id": "5f1c9b4e-0d6a-4c1e-9a63-2b7f7a1d0c11",
        "sessionId": "0b9e4c1a-7c55-4e0f-8f8e-9d43c0a3e8d2",
        "userId": "e3a1f0d2-6b7c-4d8e-9f01-23456789abcd",
        "type": "click",
        "name": "event_a1b2c3",
        "properties": {"page": "/home"},
        "timestamp": "2026-01-27T19:19:13.629Z",
        "session": {"id": "0b9e4c1a-7c55-4e0f-8f8e-9d43c0a3e8d2", "deviceType": "mobile", "browser": "Chrome"},
    }
    base.update(changes)
    return {k: v for k, v in base.items() if v is not DROP}


DROP = object()


def test_storable_event_row() -> None:
    ev = event()
    n = normalise_event(ev)
    assert n.reason is None and n.event_id == ev["id"] and n.ts_ms == ISO_US // 1000
    fields = decode_row(n.line)
    assert fields[:6] == [ev["id"], "2026-01-27T19:19:13.629000+00:00", "click", "event_a1b2c3", ev["userId"], ev["sessionId"]]
    assert fields[6] is not None and fields[6].encode() == orjson.dumps(ev)  # compact, as received
    assert fields[7:] == [None, None]


@pytest.mark.parametrize(
    ("changes", "columns"),
    [
        ({"type": DROP, "name": DROP, "userId": DROP, "sessionId": DROP}, [None, None, None, None]),
        ({"type": None, "name": None, "userId": None, "sessionId": None}, [None, None, None, None]),
        ({"type": 7, "name": True, "userId": {"a": [1]}, "sessionId": 1.5}, ["7", "true", '{"a":[1]}', "1.5"]),
        ({"name": "tab\there\nnew\\line"}, ["click", "tab\there\nnew\\line", None, None]),
    ],
)
def test_optional_columns(changes: dict[str, Any], columns: list[str | None]) -> None:
    ev = event(**changes)
    n = normalise_event(ev)
    assert n.reason is None
    got = decode_row(n.line)[2:6]
    assert got[:2] == columns[:2]
    if columns[2:] != [None, None]:
        assert got[2:] == columns[2:]
    assert json.loads(decode_row(n.line)[6] or "") == ev


NUL_ID = "abc\x00"


@pytest.mark.parametrize(
    ("ev", "reason", "kept_id"),
    [
        ([1, 2], "not an object", None),
        ("a string", "not an object", None),
        (None, "not an object", None),
        (42, "not an object", None),
        (event(id=DROP), "missing id", None),
        (event(id=None), "missing id", None),
        (event(id=5), "id is not a string", None),
        (event(id=["x"]), "id is not a string", None),
        (event(id=""), "empty id", None),
        (event(timestamp=DROP), "missing timestamp", "5f1c9b4e-0d6a-4c1e-9a63-2b7f7a1d0c11"),
        (event(timestamp=None), "missing timestamp", "5f1c9b4e-0d6a-4c1e-9a63-2b7f7a1d0c11"),
        (event(timestamp="yesterday"), 'unparseable timestamp: "yesterday"', "5f1c9b4e-0d6a-4c1e-9a63-2b7f7a1d0c11"),
        (event(timestamp=True), "unparseable timestamp: true", "5f1c9b4e-0d6a-4c1e-9a63-2b7f7a1d0c11"),
        (event(timestamp="x" * 500), 'unparseable timestamp: "' + "x" * 99 + "...", "5f1c9b4e-0d6a-4c1e-9a63-2b7f7a1d0c11"),
        (event(name="a\x00b"), 'NUL character in name', "5f1c9b4e-0d6a-4c1e-9a63-2b7f7a1d0c11"),
        (event(properties={"page": "/h\x00"}), 'NUL character in properties.page', "5f1c9b4e-0d6a-4c1e-9a63-2b7f7a1d0c11"),
        (event(properties={"pa\x00ge": 1}), "NUL character in a key of properties", "5f1c9b4e-0d6a-4c1e-9a63-2b7f7a1d0c11"),
        (event(id=NUL_ID), 'NUL character in id', None),
        (event(name="\ud800"), 'lone surrogate in name', "5f1c9b4e-0d6a-4c1e-9a63-2b7f7a1d0c11"),
        (event(session={"x": ["\udfff"]}), 'lone surrogate in session.x.[0]', "5f1c9b4e-0d6a-4c1e-9a63-2b7f7a1d0c11"),
        (event(id="\ud83d"), 'lone surrogate in id', None),
        (event(**{"a\tb\u00e9": "\x00"}), "NUL character in a\\tb\\u00e9", "5f1c9b4e-0d6a-4c1e-9a63-2b7f7a1d0c11"),
    ],
)
def test_reject_reasons(ev: Any, reason: str, kept_id: str | None) -> None:
    n = normalise_event(ev)
    assert n.reason == reason and n.ts_ms is None
    fields = decode_row(n.line)
    assert len(fields) == 9
    assert fields[0] == kept_id
    assert fields[1:7] == [None] * 6
    assert fields[7] == reason
    raw = fields[8]
    assert raw is not None and raw.isascii()
    assert json.loads(raw) == ev  # the event's JSON text, nothing lost


def test_escaped_backslash_u0000_text_is_not_a_nul() -> None:
    ev = event(name="\\u0000")
    n = normalise_event(ev)
    assert n.reason is None and decode_row(n.line)[3] == "\\u0000"


def test_exact_numbers_reach_the_payload() -> None:
    body = b'{"id":"a","timestamp":1769541612369,"big":123456789012345678901234567890,"f":0.10000000000000000001,"e":1e400}'
    ev = decode_json(body)
    n = normalise_event(ev)
    assert n.reason is None
    payload = decode_row(n.line)[6] or ""
    assert "123456789012345678901234567890" in payload and "0.10000000000000000001" in payload and "1E+400" in payload


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b'{"a":1,"b":[true,null,"x"]}', {"a": 1, "b": [True, None, "x"]}),
        (b'{"a": 1.5}', {"a": 1.5}),
        (b'{"n":123456789012345678901234567890}', {"n": 123456789012345678901234567890}),
        (b'{"n": 18446744073709551616}', {"n": 18446744073709551616}),
        (b'[0.12345678901234567890]', [Decimal("0.12345678901234567890")]),
        (b'[1e400]', [Decimal("1e400")]),
        (b'[1e-400]', [Decimal("1e-400")]),
        (b'"\\ud800"', "\ud800"),
        (b"123456789012345678901", 123456789012345678901),  # a bare number: nothing before it
        (b" 1.00000000000000000001", Decimal("1.00000000000000000001")),
        (b'{"s":"\\u00e9\\u0000"}', {"s": "\u00e9\x00"}),
    ],
)
def test_decode_json_alters_nothing(body: bytes, expected: Any) -> None:
    got = decode_json(body)
    assert got == expected
    assert repr(got) == repr(expected)  # no silent int -> float


@pytest.mark.parametrize("body", [b"", b"   ", b'{"data":[{"id":"a","x":"trunc', b"{", b"NaN", b"[Infinity]", b"\xff\xfe"])
def test_decode_json_refuses_non_json(body: bytes) -> None:
    with pytest.raises(ValueError):
        decode_json(body)


# ---------------------------------------------------------------------------------------
# The page fast path

any_event = st.one_of(
    st.builds(
        lambda ts, name, i: event(id=f"id-{i}", timestamp=ts, name=name),
        st.one_of(
            st.integers(min_value=-(10**20), max_value=10**20),
            st.sampled_from(["2026-01-27T19:19:13.629Z", " 1769541612369", "bad", None]),
        ),
        st.one_of(st.none(), st.text(max_size=5)),
        st.integers(0, 50),
    ),
    st.sampled_from([None, [], "x", {"timestamp": MS}, {"id": 3, "timestamp": MS}]),
)


@given(st.lists(any_event, max_size=20))
@settings(max_examples=150, deadline=None)
def test_page_equals_per_event_concatenation(events: list[Any]) -> None:
    singles = [normalise_event(e) for e in events]
    page = normalise_page(events)
    assert page.data == b"".join(n.line for n in singles)
    assert page.rows == len(events)
    assert page.rejected == sum(n.reason is not None for n in singles)
    stamps = [n.ts_ms for n in singles if n.ts_ms is not None]
    assert page.min_ts_ms == (min(stamps) if stamps else None)


@given(st.lists(any_event, max_size=20), st.integers(-(10**12), 10**15), st.integers(0, 10**15))
@settings(max_examples=150, deadline=None)
def test_page_window_keeps_its_partition_and_every_reject(events: list[Any], lo: int, width: int) -> None:
    hi = lo + width
    singles = [normalise_event(e) for e in events]
    page = normalise_page(events, window=(lo, hi))
    kept = [n for n in singles if n.reason is not None or lo <= (n.ts_ms or 0) < hi]
    assert page.data == b"".join(n.line for n in kept)
    assert page.rows == len(kept)
    assert page.rejected == sum(n.reason is not None for n in singles)
    stamps = [n.ts_ms for n in kept if n.ts_ms is not None]
    assert page.min_ts_ms == (min(stamps) if stamps else None)


def test_window_is_half_open() -> None:
    events = [event(id="a", timestamp=MS - 1), event(id="b", timestamp=MS), event(id="c", timestamp=MS + 1), event(id=None)]
    page = normalise_page(events, window=(MS, MS + 1))
    assert [decode_row(line)[0] for line in page.data.splitlines(keepends=True)] == ["b", None]
    assert (page.rows, page.rejected, page.min_ts_ms) == (2, 1, MS)


# ---------------------------------------------------------------------------------------
# Shortcuts for the API's usual forms: wherever they answer, the general path agrees


def general_us(value: object) -> int | None:
    """`parse_timestamp` without its shortcuts."""
    if isinstance(value, str):
        return _from_text(value)
    if isinstance(value, (int, float, Decimal)) and not isinstance(value, bool):
        return _from_number(value)
    return None


def general_stamp(value: object) -> tuple[str, int] | None:
    """What the general path makes of a timestamp: (formatted text, epoch ms)."""
    us = general_us(value)
    return None if us is None else (format_timestamp(us), us // 1000)


def assert_stamp_agrees(value: object, shortcut: bool | None = None) -> None:
    """`shortcut`: whether the shortcut must answer (None: either way)."""
    for _ in range(2):  # once filling the per-minute cache, once reading it
        fast = _api_stamp(value)
        assert shortcut is None or (fast is not None) == shortcut
        assert fast is None or fast == general_stamp(value)
        assert parse_timestamp(value) == general_us(value)


@pytest.mark.parametrize(
    ("value", "shortcut"),
    [
        (MS, True),
        (10**11, True),  # the epoch-ms range by magnitude, both ends
        (10**14 - 1, True),
        (10**11 - 1, False),  # epoch seconds
        (10**14, False),  # epoch µs
        (-MS, False),
        (True, False),
        (float(MS), False),
        (Decimal(MS), False),
        ("2026-01-27T19:19:13.629Z", True),
        ("1970-01-01T00:00:00.000Z", True),
        ("1969-12-31T23:59:59.999Z", True),
        ("0001-01-01T00:00:00.000Z", True),
        ("9999-12-31T23:59:59.999Z", True),
        ("2028-02-29T12:00:00.000Z", True),  # leap day
        ("2026-02-29T12:00:00.000Z", False),  # no such day: a reject either way
        ("2026-13-27T19:19:13.629Z", False),
        ("2026-01-32T19:19:13.629Z", False),
        ("0000-01-01T00:00:00.000Z", False),
        ("2026-01-27T24:00:00.000Z", False),
        ("2026-01-27T19:60:13.629Z", False),
        ("2026-01-27T19:19:60.000Z", False),  # leap second
        ("2026-01-27T19:19:13.629z", False),  # the general path reads these
        ("2026-01-27t19:19:13.629Z", False),
        ("2026-01-27 19:19:13.629Z", False),
        ("2026-01-27T19:19:13.6291Z", False),
        ("2026-01-27T19:19:13.62Z", False),
        ("2026-01-27T19:19:13Z", False),
        ("2026-01-27T19:19:13.629+00:00", False),
        ("2026-01-27T19:19:13.629Z\n", False),
        (" 2026-01-27T19:19:13.629Z", False),
        ("\u200b2026-01-27T19:19:13.629Z", False),
        ("2026-01-27T19:19:13.\u0666\u0662\u0669Z", False),  # Arabic-Indic digits
        ("\uff12026-01-27T19:19:13.629Z", False),  # fullwidth 2
        ("2026-01-27T19:19:1\u00b2.629Z", False),  # superscript 2
        ("+026-01-27T19:19:13.629Z", False),
        ("2026-01-27T19:19:+3.629Z", False),
        ("2026-01-27T19:19:1_.629Z", False),
        (str(MS), False),
    ],
)
def test_timestamp_shortcut_agrees_with_the_general_path(value: object, shortcut: bool) -> None:
    assert_stamp_agrees(value, shortcut)


@given(st.integers(min_value=10**11, max_value=10**14 - 1))
@settings(max_examples=300)
def test_epoch_ms_shortcut_agrees(ms: int) -> None:
    assert_stamp_agrees(ms, shortcut=True)


@given(st.datetimes(timezones=st.just(UTC)))
@settings(max_examples=300)
def test_api_iso_shortcut_agrees(moment: datetime) -> None:
    text = moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    assert_stamp_agrees(text, shortcut=True)


@given(st.from_regex(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{3}Z", fullmatch=True))
@settings(max_examples=300)
def test_api_iso_shaped_texts_agree(text: str) -> None:
    """Any digits in the API's shape: invalid dates and times fall to the general path."""
    assert_stamp_agrees(text)


@given(st.from_regex(r"\s?\d{4}-\d\d-\d\d[Tt ]\d\d:\d\d:\d\d(\.\d{1,6})?[Zz]?\s?", fullmatch=True))
@settings(max_examples=300)
def test_iso_like_texts_agree(text: str) -> None:
    """Near misses (any Unicode digit, other separators, other precisions) too."""
    assert_stamp_agrees(text)


def test_orjson_escapes_what_copy_and_postgresql_cannot_take_raw() -> None:
    """`usual_lines` relies on this: no backslash in orjson's text means no NUL, tab,
    newline, carriage return or backslash in any string of the event."""
    for char in [*map(chr, range(0x20)), "\\"]:
        assert b"\\" in orjson.dumps({"k": char}) and b"\\" in orjson.dumps({char: 1})


def usual_line(ev: Any) -> tuple[bytes, int] | None:
    """The shortcut's line and epoch ms for one event, None where it leaves the event to the
    general path."""
    usual = usual_lines([ev])
    head = usual.heads[0]
    return None if head is None else (head.encode() + usual.payloads[0] + EVENT_LINE_END, int(usual.first_ms))


def test_usual_events_take_the_shortcut() -> None:
    for stamp in (MS, "2026-01-27T19:19:13.629Z"):
        ev = event(timestamp=stamp)
        assert usual_line(ev) == (normalise_event(ev).line, normalise_event(ev).ts_ms)


@pytest.mark.parametrize(
    "changes",
    [
        {"id": "x" * 256},  # the longest id the shortcut takes
        {"id": "\U0001f600" * 256},
        {"id": "x" * 257},
        {"id": "\U0001f600" * 257},
        {"id": ""},
        {"id": 5},
        {"id": DROP},
        {"type": DROP},
        {"name": None},
        {"userId": 7},
        {"sessionId": {"a": 1}},
        {"name": "tab\there"},
        {"name": "back\\slash"},
        {"name": "a\x00b"},
        {"name": "\ud800"},
        {"name": "\x7f\u2028\ufeff\u00e9\U0001f600\\N"},
        {"properties": {"page": "/h\nome"}},
        {"properties": {"n": 123456789012345678901234567890}},
        {"properties": {"n": Decimal("0.1000000000000000000001")}},
        {"properties": {"a\tb": 1}},
        {"timestamp": " 2026-01-27T19:19:13.629Z"},
        {"timestamp": 1769541612.369},
        {"timestamp": DROP},
        {"timestamp": "2026-02-30T00:00:00.000Z"},
    ],
)
def test_usual_line_agrees_with_the_general_path(changes: dict[str, Any]) -> None:
    for stamp in (MS, "2026-01-27T19:19:13.629Z"):
        ev = event(**{"timestamp": stamp, **changes})
        assert_usual_agrees(ev)


def assert_usual_agrees(ev: Any) -> None:
    usual = usual_line(ev)
    general = _normalise_event(ev)
    if usual is not None:
        assert general.reason is None and usual == (general.line, general.ts_ms)
    assert normalise_page([ev]).data == general.line


field_text = st.one_of(st.text(max_size=8), st.text(alphabet=st.sampled_from(list("\\\t\n\r\x00N \u00e9")), max_size=4))
usual_ish_event = st.builds(
    lambda eid, typ, name, user, session, stamp, page: event(
        id=eid, type=typ, name=name, userId=user, sessionId=session, timestamp=stamp, properties={"page": page}
    ),
    st.one_of(st.just("5f1c9b4e-0d6a-4c1e-9a63-2b7f7a1d0c11"), field_text, st.none()),
    st.one_of(st.sampled_from(["click", "page_view"]), field_text, st.none(), st.integers()),
    st.one_of(st.just("event_a1b2c3"), field_text),
    st.one_of(st.just("e3a1f0d2-6b7c-4d8e-9f01-23456789abcd"), field_text),
    st.one_of(st.just("0b9e4c1a-7c55-4e0f-8f8e-9d43c0a3e8d2"), field_text),
    st.one_of(
        st.integers(min_value=10**11 - 10, max_value=10**14 + 10),
        st.datetimes(timezones=st.just(UTC)).map(lambda m: m.isoformat(timespec="milliseconds").replace("+00:00", "Z")),
        st.sampled_from(["2026-01-27T19:19:13.629Z", "2026-01-27T19:19:13.629", " 1769541612369", "bad", None]),
    ),
    st.one_of(st.just("/home"), field_text),
)


@given(usual_ish_event)
@settings(max_examples=500)
def test_usual_line_agrees_on_near_usual_events(ev: dict[str, Any]) -> None:
    assert_usual_agrees(ev)


# ---------------------------------------------------------------------------------------
# The page at a time: `usual_lines` decides per page what the general path decides per event


def test_api_iso_all_agrees_on_a_table_of_pages() -> None:
    good = "2026-01-27T19:19:13.629Z"
    for texts, verdict in [
        ([], True),
        ([good], True),
        ([good, "1970-01-01T00:00:00.000Z", "9999-12-31T23:59:59.999Z", "2028-02-29T12:00:00.000Z"], True),
        ([good, "2026-02-29T12:00:00.000Z"], False),  # no such day
        ([good, "2026-01-27T24:00:00.000Z"], False),
        ([good, "2026-01-27T19:19:60.000Z"], False),  # leap second
        ([good, "0000-01-01T00:00:00.000Z"], False),
        ([good, "2026-01-27T19:19:13.\u0666\u0662\u0669Z"], False),  # other digits
        ([good, good[:-1]], False),
        ([good + "\n" + good, good[:-1]], False),  # a newline inside a text never passes for a separator
        ([good[:-2], good + "Z"], False),  # lengths that add up
        ([good, good.lower()], False),
    ]:
        for _ in range(2):  # once filling the per-minute cache, once reading it
            assert _api_iso_all(texts) is verdict, texts
            assert all(_api_iso_ms(t) is not None for t in texts) is verdict


iso_like_text = st.one_of(
    st.datetimes(timezones=st.just(UTC)).map(lambda m: m.isoformat(timespec="milliseconds").replace("+00:00", "Z")),
    st.from_regex(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{3}Z", fullmatch=True),
    st.from_regex(r"\s?\d{4}-\d\d-\d\d[Tt ]\d\d:\d\d:\d\d(\.\d{1,6})?[Zz\n]?\s?", fullmatch=True),
)


@given(st.lists(iso_like_text, max_size=8))
@settings(max_examples=300)
def test_api_iso_all_agrees_with_each_text(texts: list[str]) -> None:
    assert _api_iso_all(texts) == all(_api_iso_ms(t) is not None for t in texts)


def assert_page_agrees(events: list[Any], window: tuple[int, int] | None = None) -> None:
    """`normalise_page` gives exactly the general path's lines, rows, rejects and minimum."""
    lo, hi = window or (-(10**30), 10**30)
    singles = [normalise_event(e) for e in events]
    kept = [n for n in singles if n.reason is not None or lo <= (n.ts_ms or 0) < hi]
    page = normalise_page(events, window=window)
    assert page.data == b"".join(n.line for n in kept)
    assert page.rows == len(kept)
    assert page.rejected == sum(n.reason is not None for n in singles)
    stamps = [n.ts_ms for n in kept if n.ts_ms is not None]
    assert page.min_ts_ms == (min(stamps) if stamps else None)


tied_stamp = st.sampled_from([MS, MS + 1, "2026-01-27T19:20:12.369Z", "2026-01-27T19:20:12.370Z"])


@given(
    st.lists(st.one_of(usual_ish_event, st.builds(lambda s: event(id="tie", timestamp=s), tied_stamp)), max_size=12),
    st.sampled_from([None, (MS, MS + 1), (MS + 1, MS + 2), (0, MS), (MS, 10**15)]),
)
@settings(max_examples=400, deadline=None)
def test_pages_of_near_usual_events_agree(events: list[Any], window: tuple[int, int] | None) -> None:
    """Mostly usual pages, some events not, ties on the window's edges, both timestamp forms."""
    assert_page_agrees(events, window)


class Text(str):
    pass


class Record(dict):  # type: ignore[type-arg]
    pass


@pytest.mark.parametrize(
    "odd",
    [
        event(id=Text("5f1c9b4e"), name=Text("n")),  # str subclasses are text, as orjson writes them
        Record(event()),
        OrderedDict(event()),
        defaultdict(str, {k: v for k, v in event().items() if k != "name"}),  # must not be asked for "name"
        {k: v for k, v in event().items() if k != "userId"},
        event(properties={"n": 123456789012345678901234567890}),  # orjson cannot write it
        event(properties={"note": "\ud800"}),
        event(timestamp=True),
        event(timestamp="2026-02-29T12:00:00.000Z"),
        event(name="a\\b"),
        event(id="x" * 257),
        event(id=""),
        [event()],
        "an event",
        None,
    ],
)
def test_an_odd_event_in_a_usual_page_takes_the_general_path(odd: Any) -> None:
    before = copy.deepcopy(odd)
    assert_page_agrees([event(id="a"), odd, event(id="b", timestamp=MS)])
    assert odd == before and type(odd) is type(before)


def test_a_usual_page_never_asks_the_general_path(monkeypatch: pytest.MonkeyPatch) -> None:
    import ingest.source.normalise as module

    asked: list[Any] = []
    monkeypatch.setattr(module, "normalise_event", lambda e: asked.append(e) or _normalise_event(e))
    events = [event(id=f"e{n}", timestamp=MS + n if n % 3 == 0 else format_api_iso(MS + n)) for n in range(50)]
    odd = event(id="odd", name=None)
    assert normalise_page(events).rows == 50 and asked == []
    assert normalise_page([*events, odd]).rows == 51 and asked == [odd]  # only the odd one


def format_api_iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def test_a_deep_event_in_a_page_is_rejected_as_alone() -> None:
    deep: Any = {}
    for _ in range(MAX_NESTING + 5):
        deep = {"a": deep}
    assert_page_agrees([event(id="a"), event(id="deep", properties=deep)])


def nested(levels: int) -> Any:
    value: Any = {}
    for _ in range(levels - 1):
        value = {"a": value}
    return value


@pytest.mark.parametrize("what", ["event", "body"])
def test_deep_values_take_the_deep_stack_even_while_another_thread_raised_the_limit(
    what: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The limit `deep_call` raises is process-wide. A walker that recursed deep on its own
    because another thread had raised it would be cut off fatally when the limit is
    lowered again, so deep work must go through `deep_call` whatever the limit reads."""
    import sys

    from ingest.source import normalise

    routed: list[str] = []
    real_deep_call = normalise.deep_call

    def spy(fn: Any, *args: Any) -> Any:
        routed.append(fn.__name__)
        return real_deep_call(fn, *args)

    monkeypatch.setattr(normalise, "deep_call", spy)
    old_limit = sys.getrecursionlimit()
    sys.setrecursionlimit(normalise.DEEP_RECURSION_LIMIT)  # as another thread's deep_call leaves it
    try:
        if what == "event":  # on a walker's stack, which could hold the recursion
            lines: list[bytes] = []
            walker = normalise.deep_stack_thread(
                lambda: lines.append(normalise_event(event(id="d", properties=nested(2_000))).line), name="walker"
            )
            walker.start()
            walker.join()
            assert decode_row(lines[0])[0] == "d"
        else:  # deeper than orjson reads: the exact decoder's path
            body = orjson.dumps([{"id": "d"}])[:-2] + b',"p":' + b"[" * 2_000 + b"]" * 2_000 + b"}]"
            assert decode_json(body)[0]["id"] == "d"
    finally:
        sys.setrecursionlimit(old_limit)
    assert routed, routed


# ---------------------------------------------------------------------------------------
# Usual pages straight from the body: `decode_page` must give the lines the general path gives


def page_body(events: list[Any]) -> bytes:
    """Compact JSON as the API writes it (ints of any size, text as it is: UTF-8)."""
    doc = {"data": events, "pagination": {"limit": 5000, "hasMore": True, "nextCursor": None}, "meta": {"total": 3}}
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode("utf-8", "surrogatepass")


def body_lines(body: bytes, window: tuple[int, int] | None = None) -> tuple[Any, PageRows]:
    events = decode_page(body)["data"]
    return events, normalise_page(events, window)


@given(st.lists(st.one_of(usual_ish_event, any_event), max_size=12), st.integers(10**11, 10**14), st.integers(0, 10**14))
@settings(max_examples=400)
def test_a_page_from_its_body_equals_the_general_path(events: list[Any], lo: int, width: int) -> None:
    body = page_body(events)
    for window in (None, (lo, lo + width)):
        decoded, rows = body_lines(body, window)
        assert rows == normalise_page(decode_json(body)["data"], window)
    # Every event usual (and the body clean): the page took the body path.
    usual = all(head is not None for head in usual_lines(decode_json(body)["data"]).heads)
    clean = not any(mark in body for mark in (b"\\", b"\t", b"\n", b"\r"))
    assert isinstance(decoded, RawEvents) == (usual and clean), body


def test_a_page_of_usual_events_takes_the_body_path_and_reads_as_its_events() -> None:
    events = [event(id=f"e{i}", timestamp=MS - i if i % 3 == 0 else "2026-01-27T19:19:13.629Z") for i in range(7)]
    decoded, rows = body_lines(page_body(events))
    assert isinstance(decoded, RawEvents) and rows.rows == 7
    assert len(decoded) == 7 and decoded[-1] == events[-1] and list(decoded) == events and decoded[1:3] == events[1:3]


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (page_body([event(name="a\\b")]), "an escape"),
        (page_body([event()]).replace(b',"name"', b',\n"name"'), "a newline between tokens"),
        (page_body([event()]).replace(b',"name"', b',\t"name"'), "a tab between tokens"),
        (page_body([event(name="caf\u00e9")]).replace("\u00e9".encode(), b"\xff"), "invalid UTF-8"),
        (page_body([event(name=None)]), "a text column that is null"),
        (page_body([event(id="")]), "an empty id"),
        (page_body([event(id="x" * 300)]), "an id too long"),
        (page_body([event(timestamp="2026-02-30T19:19:13.629Z")]), "no such day"),
        (page_body([event(timestamp=17695416123)]), "a number in seconds"),
        (page_body([event(properties=DROP)]).replace(b'"data":[', b'"data":[' + b"[" * 3000 + b"]" * 3000 + b","),
         "nested past msgspec's depth"),
        (page_body([event()]).replace(b',"pagination"', b',"pages"'), "no nested pagination"),
    ],
)
def test_bodies_the_body_path_leaves_to_the_general_one(body: bytes, why: str) -> None:
    assert usual_page(body) is None, why
    try:  # the general path reads it, or refuses it as it did before there was a body path
        decoded = decode_page(body)
    except ValueError:
        with pytest.raises(ValueError):
            decode_json(body)
    else:
        assert isinstance(decoded["data"], list) and len(decoded["data"]) == len(decode_json(body)["data"]), why


def test_the_payload_is_the_events_own_text_equal_as_jsonb() -> None:
    # Spaces and number forms orjson would write differently: the payload keeps the API's text.
    text = (b'{"id": "a", "sessionId": "s", "userId": "u", "type": "click", "name": "n",'
            b' "properties": {"price": 1.50, "big": 123456789012345678901234567890, "e": 1E2},'
            b' "timestamp": 1769541612369, "session": null}')
    body = b'{"data": [' + text + b'], "pagination": {"hasMore": false, "nextCursor": null}}'
    decoded, rows = body_lines(body)
    assert isinstance(decoded, RawEvents)
    (row,) = [decode_row(line) for line in rows.data.splitlines()]
    assert row[:6] == ["a", "2026-01-27T19:20:12.369000+00:00", "click", "n", "u", "s"]
    assert row[6].encode() == text
    assert decode_json(row[6].encode()) == decode_json(text)
