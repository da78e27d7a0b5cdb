"""Cursor encode/decode/refresh/forge: the server's exact format and both base64 alphabets."""

from __future__ import annotations

import base64
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ingest.source.cursors import (
    FORGE_ID,
    cursor_expiring,
    decode_cursor,
    encode_cursor,
    position_cursor,
    refresh_cursor,
)

# The example from the API specification (section 3.2).
SPEC_CURSOR = (
    "eyJpZCI6IjliMWYzYzJlLTVkNGEtNGU2Yi04YzdkLTJhMWIwYzlkOGU3ZiIsInRzIjoxNzY5NTQxNTUzNjI5LCJ2Ijoy"
    "LCJleHAiOjE3NzE1Mjg4MjAwMDB9"
)
SPEC_ID = "9b1f3c2e-5d4a-4e6b-8c7d-2a1b0c9d8e7f"


def b64(payload: object) -> str:
    return base64.b64encode(json.dumps(payload).encode()).decode()


def test_decode_spec_example() -> None:
    assert decode_cursor(SPEC_CURSOR) == {"id": SPEC_ID, "ts": 1769541553629, "v": 2, "exp": 1771528820000}


def test_encode_matches_the_server_byte_for_byte() -> None:
    assert encode_cursor(SPEC_ID, 1769541553629, 1771528820000) == SPEC_CURSOR


def test_decode_accepts_base64url_without_padding() -> None:
    raw = base64.b64decode(SPEC_CURSOR)
    urlsafe = base64.urlsafe_b64encode(raw).decode().rstrip("=")
    assert decode_cursor(urlsafe) == decode_cursor(SPEC_CURSOR)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "!!!not base64!!!",
        base64.b64encode(b"not json").decode(),
        base64.b64encode(b"\xff\xfe").decode(),
        b64([1, 2, 3]),
        b64({"ts": 1, "v": 2, "exp": 2}),  # no id
        b64({"id": "x", "v": 2, "exp": 2}),  # no ts
        b64({"id": "x", "ts": 1, "v": 2}),  # no exp
        b64({"id": "x", "ts": "1", "v": 2, "exp": 2}),  # ts not a number
        b64({"id": "x", "ts": True, "v": 2, "exp": 2}),  # bool is not a timestamp
        b64({"id": 7, "ts": 1, "v": 2, "exp": 2}),
    ],
)
def test_decode_rejects_garbage(text: str) -> None:
    with pytest.raises(ValueError):
        decode_cursor(text)


def test_refresh_keeps_position_and_moves_exp() -> None:
    refreshed = decode_cursor(refresh_cursor(SPEC_CURSOR, now_ms=2_000_000_000_000, ttl_ms=120_000))
    assert refreshed == {"id": SPEC_ID, "ts": 1769541553629, "v": 2, "exp": 2_000_000_120_000}


def test_refresh_of_garbage_raises() -> None:
    with pytest.raises(ValueError):
        refresh_cursor("garbage", 0, 1)


def test_position_cursor_is_forged_at_ts() -> None:
    cursor = decode_cursor(position_cursor(1769541612370, now_ms=1_000, ttl_ms=500))
    assert cursor == {"id": FORGE_ID, "ts": 1769541612370, "v": 2, "exp": 1_500}
    # The forged id sorts after every lowercase UUID: nothing at `ts` is skipped when ids
    # tie-break descending.
    assert FORGE_ID > "fffffffe-ffff-4fff-bfff-ffffffffffff"


@pytest.mark.parametrize(
    ("exp", "now", "margin", "expected"),
    [
        (10_000, 0, 5_000, False),
        (10_000, 5_000, 5_000, False),  # exactly at the margin: still usable
        (10_000, 5_001, 5_000, True),
        (10_000, 20_000, 0, True),  # already expired
    ],
)
def test_cursor_expiring(exp: int, now: int, margin: int, expected: bool) -> None:
    assert cursor_expiring(encode_cursor("a", 1, exp), now, margin) is expected


ids = st.text(min_size=0, max_size=60)
timestamps = st.integers(min_value=0, max_value=2**53)


@given(ids, timestamps, timestamps)
def test_round_trip_standard_alphabet(event_id: str, ts: int, exp: int) -> None:
    assert decode_cursor(encode_cursor(event_id, ts, exp)) == {"id": event_id, "ts": ts, "v": 2, "exp": exp}


@given(ids, timestamps, timestamps)
def test_round_trip_base64url_unpadded(event_id: str, ts: int, exp: int) -> None:
    standard = encode_cursor(event_id, ts, exp)
    urlsafe = standard.replace("+", "-").replace("/", "_").rstrip("=")
    assert decode_cursor(urlsafe) == {"id": event_id, "ts": ts, "v": 2, "exp": exp}


@given(ids, timestamps, timestamps, timestamps)
def test_refresh_round_trip(event_id: str, ts: int, exp: int, now: int) -> None:
    refreshed = decode_cursor(refresh_cursor(encode_cursor(event_id, ts, exp), now, 1_000))
    assert (refreshed["id"], refreshed["ts"], refreshed["exp"]) == (event_id, ts, now + 1_000)
