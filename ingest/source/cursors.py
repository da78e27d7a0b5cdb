"""Cursor arithmetic for the DataSync API (pure; no I/O, no clock).

A cursor is base64 of compact JSON `{"id", "ts", "v": 2, "exp"}`. The server positions the
next page strictly after `(ts, id)` in `(timestamp DESC, id DESC)` order and trusts `exp`
without a signature. That makes three things possible that the client relies on:

- an expired cursor is revived by rewriting `exp` (`refresh_cursor`), so a long 429 wait
  never forces a restart from the newest event;
- a cursor can be forged at any timestamp (`position_cursor`) to start a partition or to
  resume when only a timestamp is known, and at any event (`encode_cursor`) to go on after it
  when the server's own paging breaks (`ingest.source.paging`);
- expiry can be predicted locally from the decoded `exp` (`cursor_expiring`), because the
  server's `cursorExpiresIn` may be stale on cached responses.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

CURSOR_VERSION = 2
# The `exp` we write into a cursor we refresh or forge: the API trusts it, and its own
# cursors live about this long (datasync-api.md, "Cursors").
CURSOR_TTL_MS = 120_000
# Sorts after every lowercase UUID, so a forged cursor at `ts` never skips an event at `ts`
# when ids tie-break descending; when they tie-break ascending it starts just below `ts`.
FORGE_ID = "ffffffff-ffff-ffff-ffff-ffffffffffff"


def decode_cursor(text: str) -> dict[str, Any]:
    """Decode a cursor in standard base64 or base64url (padding optional).

    Raises ValueError unless the text is base64 of a JSON object with a string `id` and
    integer `ts` and `exp` (the fields the client needs to refresh or re-position it).
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError("empty cursor")
    raw = text.strip().replace("-", "+").replace("_", "/")
    raw += "=" * (-len(raw) % 4)
    try:
        decoded = base64.b64decode(raw, validate=True)
        value = json.loads(decoded.decode("utf-8"))
    except (binascii.Error, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"cursor is not base64 JSON: {exc}") from None
    problem = _shape_problem(value)
    if problem:
        raise ValueError(problem)
    return value


def _shape_problem(value: Any) -> str | None:
    if not isinstance(value, dict):
        return "cursor JSON is not an object"
    if not isinstance(value.get("id"), str):
        return "cursor has no string id"
    for key in ("ts", "exp"):
        field = value.get(key)
        if isinstance(field, bool) or not isinstance(field, int):
            return f"cursor has no integer {key}"
    return None


def encode_cursor(event_id: str, ts_ms: int, exp_ms: int) -> str:
    """The server's own format: standard base64 of compact JSON, keys id, ts, v, exp."""
    payload = {"id": event_id, "ts": int(ts_ms), "v": CURSOR_VERSION, "exp": int(exp_ms)}
    return base64.b64encode(json.dumps(payload, separators=(",", ":")).encode("utf-8")).decode("ascii")


def refresh_cursor(text: str, now_ms: int, ttl_ms: int) -> str:
    """The same position (`id`, `ts`) with `exp = now + ttl`: revives an expired cursor."""
    cursor = decode_cursor(text)
    return encode_cursor(cursor["id"], cursor["ts"], now_ms + ttl_ms)


def position_cursor(ts_ms: int, now_ms: int, ttl_ms: int) -> str:
    """A forged cursor at `ts_ms`: the next page starts at `ts_ms` or just below it.

    With the id tie-break descending (the simulator's default) events at exactly `ts_ms` are
    included; with it ascending they are not. Callers that must include `ts_ms` pass
    `ts_ms + 1` and dedupe on id; callers using an exclusive upper bound pass it as is.
    """
    return encode_cursor(FORGE_ID, ts_ms, now_ms + ttl_ms)


def cursor_expiring(text: str, now_ms: int, margin_ms: int) -> bool:
    """True when the cursor's `exp` falls before `now + margin` (ValueError if undecodable)."""
    return int(decode_cursor(text)["exp"]) < now_ms + margin_ms
