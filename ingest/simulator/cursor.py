"""The section 3.4 cursor: standard base64 of compact JSON `{"id","ts","v","exp"}`.

Pure functions, so the accepted alphabets and the error mapping are table-tested directly.
`exp` is trusted (not signed), exactly like the real service: rewriting it revives a cursor.
"""

from __future__ import annotations

import base64
import binascii
import math
from dataclasses import dataclass

import orjson

CURSOR_VERSION = 2


@dataclass(frozen=True)
class Cursor:
    id: str
    ts: int
    exp: int


class CursorError(ValueError):
    """`code` is the API error code; `message` the text of the 400 body."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def encode_cursor(event_id: str, ts: int, exp: int) -> str:
    payload = orjson.dumps({"id": event_id, "ts": ts, "v": CURSOR_VERSION, "exp": exp})
    return base64.b64encode(payload).decode("ascii")


def decode_cursor(text: str, now_ms: int, accept_base64url: bool = True) -> Cursor:
    """Parse and validate a cursor; raise CursorError(CURSOR_INVALID_FORMAT|CURSOR_EXPIRED)."""
    raw = text.strip()
    if accept_base64url:
        raw = raw.replace("-", "+").replace("_", "/")
    raw += "=" * (-len(raw) % 4)
    try:
        payload = orjson.loads(base64.b64decode(raw, validate=True))
    except (binascii.Error, ValueError, orjson.JSONDecodeError):
        raise CursorError("CURSOR_INVALID_FORMAT", "Invalid cursor format") from None
    if not isinstance(payload, dict) or not {"id", "ts", "v", "exp"} <= payload.keys():
        raise CursorError("CURSOR_INVALID_FORMAT", "Invalid cursor format: missing keys")
    event_id, ts, exp = payload["id"], payload["ts"], payload["exp"]
    numbers_ok = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (ts, exp))
    if not isinstance(event_id, str) or not numbers_ok:
        raise CursorError("CURSOR_INVALID_FORMAT", "Invalid cursor format: bad field types")
    exp_ms = int(exp)
    if exp_ms < now_ms:
        minutes = max(1, math.ceil((now_ms - exp_ms) / 60_000))
        raise CursorError("CURSOR_EXPIRED", f"Cursor expired {minutes} minute{'s' if minutes != 1 else ''} ago")
    return Cursor(event_id, int(ts), exp_ms)
