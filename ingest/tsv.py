"""PostgreSQL COPY text format: the byte layout of every segment line.

Segments are fed to `COPY ... FROM STDIN` unchanged, so the encoding here is the whole
contract between fetcher and loader. Only the four characters that COPY text treats
specially inside a field are escaped (backslash first, so escapes are never doubled);
`\\N` is NULL. NUL cannot be represented in PostgreSQL text at all: callers route values
containing it to rejects before they get here.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

COLUMNS = ("id", "occurred_at", "type", "name", "user_id", "session_id", "payload", "reject_reason", "raw")

NULL = "\\N"
# How every event row ends (no reject reason, no raw text): the normaliser writes it, and
# the loader's fast path recognises event rows by it.
EVENT_LINE_END = b"\t\\N\t\\N\n"

_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})

# COPY's single-character escapes; any other backslashed character stands for itself.
_UNESCAPES = {"t": "\t", "n": "\n", "r": "\r", "b": "\b", "f": "\f", "v": "\v"}
_ESCAPE_SEQ = re.compile(r"\\(.)", re.DOTALL)


def escape(value: str) -> str:
    """One field's text; the membership tests keep the common, clean case to four memchr."""
    if "\\" in value or "\t" in value or "\n" in value or "\r" in value:
        return value.translate(_ESCAPES)
    return value


def encode_row(fields: Sequence[str | None]) -> bytes:
    """A newline-terminated UTF-8 line; None becomes `\\N`."""
    return ("\t".join(NULL if f is None else escape(f) for f in fields) + "\n").encode("utf-8")


def _unescape(text: str) -> str:
    return _ESCAPE_SEQ.sub(lambda m: _UNESCAPES.get(m.group(1), m.group(1)), text)


def decode_row(line: bytes) -> list[str | None]:
    """The inverse of `encode_row` (also reads COPY's other one-letter escapes)."""
    text = line.decode("utf-8")
    text = text.removesuffix("\n")
    return [None if f == NULL else _unescape(f) for f in text.split("\t")]
