"""API events -> segment lines (TSV rows for `events`, or reject rows). Pure functions.

Two promises shape this module. `payload` must be the event exactly as the API sent it
(equal as jsonb), so nothing may be rounded or re-interpreted on the way; and nothing may
be dropped silently, so an event PostgreSQL cannot store (no usable id, no parseable
timestamp, a NUL character, a lone surrogate, not an object) becomes a reject row that
carries the reason and the event's ASCII-safe JSON text.
"""

from __future__ import annotations

import json
import math
import operator
import re
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from itertools import chain, repeat
from typing import Any, NamedTuple, overload

import msgspec
import orjson

from ingest.tsv import EVENT_LINE_END, encode_row, escape

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_US = timedelta(microseconds=1)
# Python's datetime range bounds what we can format; PostgreSQL's range is wider.
_MIN_US = (datetime(1, 1, 1, tzinfo=UTC) - EPOCH) // _ONE_US
_MAX_US = (datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC) - EPOCH) // _ONE_US

# ---------------------------------------------------------------------------------------
# JSON decoding


class _NotJSON(ValueError):
    """NaN/Infinity literals: Python accepts them, JSON (and jsonb) do not."""


def _refuse_constant(name: str) -> Any:
    raise _NotJSON(f"not JSON: {name}")


def _exact_int(text: str) -> int | Decimal:
    # Python refuses int() of more than 4300 digits; Decimal has no such limit.
    return int(text) if len(text) <= 4000 else Decimal(text)


# A number token (after ':' ',' or '[', or opening the body) that a double may not hold
# exactly: an exponent, or 17+ digits/dots (doubles keep every decimal of up to 15
# significant digits). Two patterns: one alternation costs the 1.7 MB scan 2.5x the time.
_RISKY_NUMBER = re.compile(rb"[:,\[]\s*-?(?:[0-9.]{17}|[0-9.]+[eE])")
_RISKY_FIRST = re.compile(rb"\s*-?(?:[0-9.]{17}|[0-9.]+[eE])")


# Deeply nested JSON: PostgreSQL's jsonb holds ~10,000 levels and more, orjson stops at
# 1024 (loads) and 255 (dumps), Python's recursive code at its recursion limit. Past those,
# the recursive work is redone on a thread with a large stack and a raised limit.
DEEP_STACK_BYTES = 512 << 20
DEEP_RECURSION_LIMIT = 60_000
MAX_NESTING = 10_000  # deeper events are rejected (PostgreSQL's default stack holds ~10-40k)
# Deeper than this is handled on the deep stack from the start, never by catching a
# RecursionError: the limit `deep_call` raises is process-wide, so another thread could
# meanwhile recurse past the default limit on its own, and lowering the limit again under
# it is fatal ("Cannot recover from stack overflow"). Outside `deep_call` nothing recurses
# deeper than this, far below the default limit of 1,000.
SHALLOW_NESTING = 200
_DEEP_LOCK = threading.Lock()
_STACK_LOCK = threading.Lock()


def deep_stack_thread(target: Callable[..., Any], *args: Any, name: str) -> threading.Thread:
    """An unstarted daemon thread with a stack for `DEEP_RECURSION_LIMIT` levels. The
    recursion limit is process-wide: while `deep_call` has it raised, any other thread that
    normalises (verify's walkers) may recurse that deep too, and on a default stack it would
    crash the process instead of raising RecursionError."""
    with _STACK_LOCK:
        old_stack = threading.stack_size()
        threading.stack_size(DEEP_STACK_BYTES)
        try:
            return threading.Thread(target=target, args=args, name=name, daemon=True)
        finally:
            threading.stack_size(old_stack)


def deep_call(fn: Callable[..., Any], *args: Any) -> Any:
    """`fn(*args)` with room for ~50,000 levels of recursion (RecursionError beyond)."""
    result: dict[str, Any] = {}

    def target() -> None:
        try:
            result["value"] = fn(*args)
        except BaseException as exc:  # handed to the caller's thread
            result["error"] = exc

    with _DEEP_LOCK:
        old_limit = sys.getrecursionlimit()
        sys.setrecursionlimit(max(old_limit, DEEP_RECURSION_LIMIT))
        try:
            thread = deep_stack_thread(target, name="deep-json")
            thread.start()
            thread.join()
        finally:
            sys.setrecursionlimit(old_limit)
    if "error" in result:
        raise result["error"]
    return result["value"]


def _decode_exact_shallow(body: bytes) -> Any:
    return json.loads(
        body.decode("utf-8"), parse_float=Decimal, parse_int=_exact_int, parse_constant=_refuse_constant
    )


def _decode_exact(body: bytes) -> Any:
    """The stdlib decoder, always on the deep stack (see SHALLOW_NESTING): a body's depth is
    not known before it is parsed, and this path is rare (bodies orjson refuses or cannot
    decode exactly)."""
    try:
        return deep_call(_decode_exact_shallow, body)
    except RecursionError:
        raise ValueError(f"JSON nested deeper than {DEEP_RECURSION_LIMIT - 10_000} levels") from None


def decode_json(body: bytes) -> Any:
    """orjson when it provably keeps every value, else the stdlib with Decimal numbers.

    orjson refuses lone surrogate escapes and numbers beyond double range, and silently
    turns integers beyond 64 bits (and over-long decimals) into doubles; strings it keeps
    exactly. So a body without risky number tokens is decoded exactly, and a body that
    re-encoding gives back byte for byte was too. The scan alone would be proof enough,
    but re-encoding and comparing a 5,000-event page takes ~0.9 ms against ~11 ms for the
    scan, so the scan only runs when the bytes differ. Raises ValueError when the body is
    not JSON at all (empty, truncated), which callers treat as transient.
    """
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError:
        return _decode_exact(body)
    try:
        same = orjson.dumps(value) == body
    except TypeError:  # nested deeper than orjson writes: the number scan decides
        same = False
    if not same and (_RISKY_NUMBER.search(body) or _RISKY_FIRST.match(body)):
        return _decode_exact(body)
    return value


def _encode(value: Any, ascii_only: bool) -> str:
    """Compact JSON for what orjson cannot write: Decimal, big ints, lone surrogates."""
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=ascii_only)
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int):
        return int.__repr__(value)
    if isinstance(value, float):
        return float.__repr__(value) if math.isfinite(value) else "null"  # as orjson writes them
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, dict):
        items = (f"{json.dumps(str(k), ensure_ascii=ascii_only)}:{_encode(v, ascii_only)}" for k, v in value.items())
        return "{" + ",".join(items) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_encode(v, ascii_only) for v in value) + "]"
    raise TypeError(f"not a JSON value: {type(value).__name__}")


def _json_bytes(value: Any) -> bytes:
    try:
        return orjson.dumps(value)
    except TypeError:  # Decimal, ints beyond 64 bits, lone surrogates
        return _encode(value, ascii_only=False).encode("utf-8", "surrogatepass")


def ascii_json(value: Any, limit: int | None = None) -> str:
    """JSON text that PostgreSQL text always accepts (no NUL byte, no surrogate)."""
    text = _encode(value, ascii_only=True)
    return text if limit is None or len(text) <= limit else text[:limit] + "..."


# ---------------------------------------------------------------------------------------
# Timestamps

# Zero-width characters and C0/C1 control characters, deleted wherever they appear.
_JUNK = dict.fromkeys([0x200B, 0x200C, 0x200D, 0xFEFF, *range(0x20), *range(0x7F, 0xA0)])
_NUMERIC = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")

# (upper bound of |value|, microseconds per unit): seconds, milliseconds, µs, else ns.
_UNITS = ((Decimal(10) ** 11, Decimal(1_000_000)), (Decimal(10) ** 14, Decimal(1000)), (Decimal(10) ** 17, Decimal(1)))
_NS = Decimal("0.001")


def _in_range(us: int) -> int | None:
    return us if _MIN_US <= us <= _MAX_US else None


def _from_number(value: float | Decimal) -> int | None:
    """The unit follows the magnitude (DESIGN.md: < 1e11 s, < 1e14 ms, < 1e17 µs, else ns)."""
    try:
        exact = Decimal(value)
    except (InvalidOperation, ValueError):
        return None
    if not exact.is_finite():
        return None
    factor = next((f for bound, f in _UNITS if abs(exact) < bound), _NS)
    return _in_range(int((exact * factor).to_integral_value()))


def _from_iso(text: str) -> int | None:
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    if moment.tzinfo is None:  # the API documents UTC; a bare local time can only mean that
        moment = moment.replace(tzinfo=UTC)
    return _in_range((moment - EPOCH) // _ONE_US)


def _from_text(text: str) -> int | None:
    if not _NUMERIC.fullmatch(text):
        us = _from_iso(text)
        if us is not None:
            return us
    cleaned = text.translate(_JUNK).strip()
    if _NUMERIC.fullmatch(cleaned):
        return _from_number(Decimal(cleaned))
    return _from_iso(cleaned.upper())


_MINUTES: dict[int, str] = {}  # minute -> "YYYY-MM-DDTHH:MM:"; a page spans an hour or two


def _minute_prefix(minute: int) -> str:
    prefix = _MINUTES.get(minute)
    if prefix is None:
        if len(_MINUTES) >= 4096:
            _MINUTES.clear()
        prefix = _MINUTES[minute] = (EPOCH + timedelta(minutes=minute)).isoformat()[:17]
    return prefix


def format_timestamp(us: int) -> str:
    """ISO-8601 UTC with microseconds: PostgreSQL's timestamptz input reads it exactly.
    (The per-minute prefix cache halves its cost.)"""
    minute, rest = divmod(us, 60_000_000)
    second, fraction = divmod(rest, 1_000_000)
    return f"{_minute_prefix(minute)}{second:02d}.{fraction:06d}+00:00"


# The API's two forms (datasync-api.md section 6) take shortcuts, which the tests compare
# with the general path: reading and writing a timestamp the general way took ~1.3 µs, a
# third of the fetcher's CPU per event.
_MS_LOW, _MS_HIGH = 10**11, 10**14  # where `_UNITS` reads a number as epoch ms
_SECONDS = [f"{s:02d}." for s in range(60)]
_MILLIS = [f"{ms:03d}000+00:00" for ms in range(1000)]


def _format_ms(ms: int) -> str:
    """`format_timestamp(ms * 1000)`, from tables instead of number formatting."""
    minute, rest = divmod(ms, 60_000)
    second, milli = divmod(rest, 1000)
    return f"{_minute_prefix(minute)}{_SECONDS[second]}{_MILLIS[milli]}"


# "2026-01-27T19:19:13.629Z": ASCII digits only, seconds 00-59 (Python reads no leap second).
_API_ISO = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:[0-5]\d\.\d{3}Z", re.ASCII)
# "YYYY-MM-DDTHH:MM:" -> epoch ms of that minute. A prefix gets in only when the general
# path read a text with it and `format_timestamp` wrote it back unchanged: a real date, and
# not hour 24 (newer Pythons read "T24:00:00" as the next midnight, but no other second).
# `datetime.fromisoformat` reads each field on its own, so every text with that prefix and
# any "SS.mmmZ" tail reads as minute + SS s + mmm ms, and formats as its own first 23
# characters + "000+00:00".
_ISO_MINUTES: dict[str, int] = {}


def _api_iso_ms(text: str) -> int | None:
    """Epoch ms of a text in the API's ISO form, else None (the general path decides)."""
    if not _API_ISO.fullmatch(text):
        return None
    minute = _ISO_MINUTES.get(text[:17])
    if minute is None:
        us = _from_text(text)
        if us is None or format_timestamp(us) != text[:23] + "000+00:00":
            return None
        if len(_ISO_MINUTES) >= 4096:
            _ISO_MINUTES.clear()
        minute = _ISO_MINUTES[text[:17]] = us // 1000 - int(text[17:19] + text[20:23])
    return minute + int(text[17:19] + text[20:23])


def _api_stamp(value: object) -> tuple[str, int] | None:
    """(`format_timestamp` text, epoch ms) for the API's two forms, else None."""
    if type(value) is int:
        return (_format_ms(value), value) if _MS_LOW <= value < _MS_HIGH else None
    if type(value) is str:
        ms = _api_iso_ms(value)
        return None if ms is None else (value[:23] + "000+00:00", ms)
    return None


def exact_ms(value: object) -> int | None:
    """Epoch ms of a timestamp in one of the API's own two forms, else None: a position to
    forge a cursor from must be millisecond-exact (a rounded one could skip events)."""
    stamp = _api_stamp(value)
    return stamp[1] if stamp is not None else None


def parse_timestamp(value: object) -> int | None:
    """Epoch microseconds UTC, or None when `value` is no timestamp we can read."""
    if type(value) is int and _MS_LOW <= value < _MS_HIGH:
        return value * 1000
    if type(value) is str:
        ms = _api_iso_ms(value)
        return ms * 1000 if ms is not None else _from_text(value)
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float, Decimal)):
        return _from_number(value)
    return None


# ---------------------------------------------------------------------------------------
# Events


class Normalised(NamedTuple):
    line: bytes
    event_id: str | None
    ts_ms: int | None
    reason: str | None


class PageRows(NamedTuple):
    data: bytes
    rows: int
    rejected: int
    min_ts_ms: int | None


def _unstorable_text(text: str) -> str | None:
    if "\x00" in text:
        return "NUL character"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "lone surrogate"
    return None


def _path_text(path: list[str]) -> str:
    return ".".join(path) if path else "the event"


def _unstorable(value: Any, path: list[str] | None = None) -> str | None:
    """Why PostgreSQL text/jsonb cannot hold this value (NUL, lone surrogate), and where."""
    path = path or []
    if isinstance(value, str):
        problem = _unstorable_text(value)
        return f"{problem} in {_path_text(path)}" if problem else None
    if isinstance(value, dict):
        for key, item in value.items():
            problem = _unstorable_text(key) if isinstance(key, str) else None
            if problem:
                return f"{problem} in a key of {_path_text(path)}"
            found = _unstorable(item, [*path, ascii_json(str(key), 40)[1:-1]])
            if found:
                return found
    if isinstance(value, list):
        for index, item in enumerate(value):
            found = _unstorable(item, [*path, f"[{index}]"])
            if found:
                return found
    return None


def _field(value: Any) -> str | None:
    if value is None or isinstance(value, str):  # a str subclass is text, as orjson writes it
        return value
    return _json_bytes(value).decode("utf-8")


# The primary key's btree holds entries up to ~2,700 bytes (less once compression fails):
# a longer id would make the whole segment unloadable, so it is a reject, like a NUL.
MAX_ID_BYTES = 1024


def reject_line(event: Any, reason: str) -> bytes:
    """A reject row: the id when it is a storable string, the reason, the ASCII JSON text."""
    eid = event.get("id") if isinstance(event, dict) else None
    keep_id = eid if isinstance(eid, str) and eid and len(eid) <= MAX_ID_BYTES and _unstorable_text(eid) is None else None
    return encode_row((keep_id, None, None, None, None, None, None, reason, ascii_json(event)))


def _reject(event: Any, reason: str) -> Normalised:
    eid = event.get("id") if isinstance(event, dict) else None
    return Normalised(reject_line(event, reason), eid if isinstance(eid, str) else None, None, reason)


def normalise_event(event: object) -> Normalised:
    """One decoded API event -> its segment line (see the module docstring)."""
    depth = nesting_depth(event)
    if depth <= SHALLOW_NESTING:
        return _normalise_event(event)
    if depth <= MAX_NESTING:
        return deep_call(_normalise_event, event)
    eid = event.get("id") if isinstance(event, dict) else None
    reason = f"nested deeper than {MAX_NESTING} levels"
    stub = {"id": eid if isinstance(eid, str) and _unstorable_text(eid) is None else None, "note": reason}
    return Normalised(reject_line(stub, reason), eid if isinstance(eid, str) else None, None, reason)


def nesting_depth(value: Any) -> int:
    """Levels of objects/arrays, counted without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        deepest = max(deepest, depth)
        stack.extend((child, depth + 1) for child in children)
    return deepest


def _normalise_event(event: object) -> Normalised:
    if type(event) is not dict:
        return _reject(event, "not an object")
    eid = event.get("id")
    if eid is None:
        return _reject(event, "missing id")
    if not isinstance(eid, str):  # a str subclass is text, as orjson writes it
        return _reject(event, "id is not a string")
    if not eid:
        return _reject(event, "empty id")
    if len(eid) > MAX_ID_BYTES // 4 and len(eid.encode("utf-8", "surrogatepass")) > MAX_ID_BYTES:
        return _reject(event, f"id longer than {MAX_ID_BYTES} bytes")
    try:
        payload = orjson.dumps(event)
    except TypeError:
        payload = b""
    # orjson writes NUL as \u0000 and refuses surrogates; a hit here is only a candidate
    # (an escaped backslash followed by "u0000" matches too), so look closer.
    if not payload or b"\\u0000" in payload:
        problem = _unstorable(event)
        if problem:
            return _reject(event, problem)
        payload = payload or _json_bytes(event)
    stamp = event.get("timestamp")
    if stamp is None:
        return _reject(event, "missing timestamp")
    us = parse_timestamp(stamp)
    if us is None:
        return _reject(event, f"unparseable timestamp: {ascii_json(stamp, 100)}")
    head = "\t".join(
        "\\N" if f is None else escape(f)
        for f in (
            eid,
            format_timestamp(us),
            _field(event.get("type")),
            _field(event.get("name")),
            _field(event.get("userId")),
            _field(event.get("sessionId")),
        )
    )
    # JSON text never holds a raw tab, newline or carriage return; backslash is all to escape.
    line = head.encode("utf-8") + b"\t" + payload.replace(b"\\", b"\\\\") + EVENT_LINE_END
    return Normalised(line, eid, us // 1000, None)


# ---------------------------------------------------------------------------------------
# Pages: the usual event's line a page at a time

# The fields every usual event has, in line order but the timestamp last.
_COLUMN_NAMES = ("id", "type", "name", "userId", "sessionId", "timestamp")
_GETTERS = tuple(map(operator.itemgetter, _COLUMN_NAMES))
_NO_COLUMNS = (None,) * len(_COLUMN_NAMES)
_MAX_ID_CHARS = MAX_ID_BYTES // 4  # UTF-8 takes at most 4 bytes a character
_US_TAIL = "000+00:00"  # after "YYYY-MM-DDTHH:MM:SS.mmm": what `format_timestamp` writes for a whole ms
_BACKSLASH = b"\\"
_UNWRITABLE = _BACKSLASH  # stands for an event orjson cannot write: like a backslash, it is not usual

# `_api_iso_ms` reads a text when it matches `_API_ISO` and its "YYYY-MM-DDTHH:MM:" names a
# real minute. For a page of texts, the first holds when the texts, each followed by a
# newline and with every ASCII digit read as 0, spell `_ISO_SHAPE` over and over (shaped
# records hold no newline, so the newlines are exactly the separators), and every
# seconds' tens digit is 0-5; the second is asked once per distinct minute.
_ISO_SHAPE = b"0000-00-00T00:00:00.000Z\n"
_DIGITS_AS_ZERO = bytes.maketrans(b"123456789", b"000000000")
_SECOND_TENS = slice(17, None, len(_ISO_SHAPE))
_MINUTE_OF = operator.itemgetter(slice(0, 17))


def _api_iso_all(texts: list[str]) -> bool:
    """`all(_api_iso_ms(t) is not None for t in texts)`, in a few passes over the page
    instead of a regex match and a cache lookup per text."""
    if not texts:
        return True
    try:
        joined = "\n".join(texts).encode("ascii") + b"\n"
    except UnicodeEncodeError:
        return False
    if joined.translate(_DIGITS_AS_ZERO) != _ISO_SHAPE * len(texts) or joined[_SECOND_TENS].translate(None, b"012345"):
        return False
    unseen = set(map(_MINUTE_OF, texts)) - _ISO_MINUTES.keys()
    return all(_api_iso_ms(minute + "00.000Z") is not None for minute in unseen)


def _stamp_ms(stamp: Any) -> int:
    """Epoch ms of a usual event's timestamp (in one of the API's two forms: checked)."""
    ms = stamp if type(stamp) is int else _api_iso_ms(stamp)
    assert ms is not None
    return ms


def _payloads(events: list[Any]) -> list[bytes]:
    """Each event's orjson text; `_UNWRITABLE` for one orjson cannot write (Decimal, big
    ints, lone surrogates, deep nesting)."""
    try:
        return list(map(orjson.dumps, events))
    except TypeError:
        pass
    payloads = []
    for event in events:
        try:
            payloads.append(orjson.dumps(event))
        except TypeError:
            payloads.append(_UNWRITABLE)
    return payloads


def _columns(events: list[Any]) -> list[list[Any]]:
    """The page's `_COLUMN_NAMES` as columns (one pass in C each, no tuple per event); an
    event without them all gets None in each. Only plain dicts: a subclass may answer a
    missing key (defaultdict), and the general path takes no subclass."""
    if set(map(type, events)) <= {dict}:
        try:
            return [list(map(get, events)) for get in _GETTERS]
        except KeyError:
            pass
    names = set(_COLUMN_NAMES)
    rows = [tuple(map(event.get, _COLUMN_NAMES)) if type(event) is dict and names <= event.keys() else _NO_COLUMNS
            for event in events]
    return [list(column) for column in zip(*rows, strict=True)] if rows else [[] for _ in _GETTERS]


class UsualLines(NamedTuple):
    heads: list[str | None]  # per event, its line up to the payload; None: the general path decides
    payloads: list[bytes]  # per event, orjson's text (a usual event's payload)
    first_ms: float  # the usual events' earliest and latest timestamps (inf, -inf: none)
    last_ms: float


def usual_lines(events: list[Any]) -> UsualLines:
    """The lines of the page's events in the API's usual shape, found a page at a time.

    Usual: a dict whose five text columns are strings, with a short non-empty id, a timestamp
    in one of the API's two forms, and an orjson text without a single backslash. orjson
    escapes backslash and every control character and refuses lone surrogates, so then no
    string anywhere in the event (key or value) holds a NUL, a lone surrogate or a character
    COPY needs escaped: `normalise_event` would escape nothing and reject nothing, and its
    line is `head + payload + EVENT_LINE_END`. Every test that is not a plain per-event
    branch runs once over the whole page (a Python operation costs ~50 ns on a small
    server, and the fetcher's CPU per event bounds the sink-bound throughput).
    """
    columns = _columns(events)
    heads: list[str | None] = []
    isos: list[str] = []
    millis: list[int] = []
    join = "\t".join
    for eid, typ, name, user, session, stamp in zip(*columns, strict=True):
        try:
            if not 0 < len(eid) <= _MAX_ID_CHARS:
                head = None
            elif type(stamp) is str:
                head = join((eid, stamp[:23] + _US_TAIL, typ, name, user, session, ""))
                isos.append(stamp)
            elif type(stamp) is int and _MS_LOW <= stamp < _MS_HIGH:
                head = join((eid, _format_ms(stamp), typ, name, user, session, ""))
                millis.append(stamp)
            else:
                head = None
        except TypeError:  # no columns (a None id has no length), or one that is not a string
            head = None
        heads.append(head)
    payloads = _payloads(events)
    clean = _BACKSLASH not in b"".join(payloads)  # one memchr, ~3x faster than a test per payload
    in_form = _api_iso_all(isos)
    if not (clean and in_form):  # the rare page: per event, which ones are not usual after all
        heads = [
            None if h is None or _BACKSLASH in p or (type(t) is str and _api_iso_ms(t) is None) else h
            for h, p, t in zip(heads, payloads, columns[-1], strict=True)
        ]
        stamps = [t for h, t in zip(heads, columns[-1], strict=True) if h is not None]
        isos = [s for s in stamps if type(s) is str]
        millis = [s for s in stamps if type(s) is int]
    # Texts in the API's ISO form sort as their instants do.
    first = min(min(millis, default=math.inf), _stamp_ms(min(isos)) if isos else math.inf)
    last = max(max(millis, default=-math.inf), _stamp_ms(max(isos)) if isos else -math.inf)
    return UsualLines(heads, payloads, first, last)


def _joined(heads: list[Any], payloads: list[bytes]) -> bytes:
    """The lines of a run of usual events (heads without None), in one join."""
    return b"".join(chain.from_iterable(zip(map(str.encode, heads), payloads, repeat(EVENT_LINE_END))))


# ---------------------------------------------------------------------------------------
# Usual pages straight from the body: no dict per event
#
# Decoding a page into dicts and writing each event back out cost a walker about 3 µs an
# event, half its CPU. A page whose events all have the usual shape is instead decoded by
# msgspec into the six columns (the other fields are skipped, still validated), and each
# event's payload is its own text in the body: equal as jsonb by definition, and the same
# bytes orjson would write for a compact body. A body that is not clean enough for that
# (escapes, whitespace COPY would read as separators, invalid UTF-8) or any event that is
# not usual sends the whole page the general way.


class _Columns(msgspec.Struct, gc=False):  # text and ints only: no cycles for the collector to find
    id: str
    sessionId: str
    userId: str
    type: str
    name: str
    timestamp: int | str


class _ColumnsBody(msgspec.Struct):
    data: list[_Columns]


class _RawBody(msgspec.Struct):
    data: list[msgspec.Raw]
    pagination: dict[str, Any]
    meta: Any = None


_COLUMNS_DECODER = msgspec.json.Decoder(_ColumnsBody)
_RAW_DECODER = msgspec.json.Decoder(_RawBody)
_NOT_CLEAN = (b"\\", b"\t", b"\n", b"\r")  # an escape; JSON whitespace that COPY reads as separators


class RawEvents(Sequence[Any]):
    """A usual page's events as the body's own bytes, with each event's line up to its
    payload already made. Read as a sequence, an event is decoded when asked for (the walk
    asks for the last one only); `normalise_page` takes the lines as they are."""

    def __init__(self, raws: list[msgspec.Raw], heads: list[str], stamps: list[int | str], first_ms: float,
                 last_ms: float) -> None:
        self.raws, self.heads, self.stamps = raws, heads, stamps
        self.first_ms, self.last_ms = first_ms, last_ms

    def __len__(self) -> int:
        return len(self.raws)

    @overload
    def __getitem__(self, index: int) -> Any: ...

    @overload
    def __getitem__(self, index: slice) -> list[Any]: ...

    def __getitem__(self, index: int | slice) -> Any:
        if isinstance(index, slice):
            return [decode_json(bytes(raw)) for raw in self.raws[index]]
        return decode_json(bytes(self.raws[index]))

    def __iter__(self) -> Iterator[Any]:
        return (decode_json(bytes(raw)) for raw in self.raws)

    def rows(self, lo: float, hi: float) -> PageRows:
        """`normalise_page` of these events: every one is usual, so each line is its head,
        its payload and EVENT_LINE_END."""
        if lo <= self.first_ms and self.last_ms < hi:
            data = b"".join(chain.from_iterable(zip(map(str.encode, self.heads), self.raws, repeat(EVENT_LINE_END))))
            first = int(self.first_ms) if self.raws else None
            return PageRows(data, len(self.raws), 0, first)
        kept = [(head, raw, ms) for head, raw, ms in zip(self.heads, self.raws, map(_stamp_ms, self.stamps), strict=True)
                if lo <= ms < hi]
        data = b"".join(chain.from_iterable((head.encode(), raw, EVENT_LINE_END) for head, raw, _ in kept))
        return PageRows(data, len(kept), 0, min((ms for _, _, ms in kept), default=None))


def _usual_heads(columns: list[_Columns]) -> tuple[list[str], list[int | str], float, float] | None:
    """Each event's line up to its payload, its timestamp, and the page's earliest and
    latest instants, when every event is usual (see `usual_lines`); else None."""
    heads: list[str] = []
    isos: list[str] = []
    millis: list[int] = []
    join = "\t".join
    for c in columns:
        eid, stamp = c.id, c.timestamp
        if not 0 < len(eid) <= _MAX_ID_CHARS:
            return None
        if isinstance(stamp, str):  # msgspec gives exactly str or int
            heads.append(join((eid, stamp[:23] + _US_TAIL, c.type, c.name, c.userId, c.sessionId, "")))
            isos.append(stamp)
        elif _MS_LOW <= stamp < _MS_HIGH:
            heads.append(join((eid, _format_ms(stamp), c.type, c.name, c.userId, c.sessionId, "")))
            millis.append(stamp)
        else:
            return None
    if not _api_iso_all(isos):
        return None
    first = min(min(millis, default=math.inf), _stamp_ms(min(isos)) if isos else math.inf)
    last = max(max(millis, default=-math.inf), _stamp_ms(max(isos)) if isos else -math.inf)
    return heads, [c.timestamp for c in columns], first, last


def usual_page(body: bytes) -> dict[str, Any] | None:
    """The body as `decode_json` reads it, with `data` as RawEvents, when every event is
    usual and the body is clean; else None (the general path decides).

    Clean: no backslash (so no escape, and no NUL or surrogate anywhere), no tab, newline or
    carriage return (JSON whitespace, but separators to COPY), valid UTF-8 (msgspec does
    not check it in the fields it skips). Deep nesting makes msgspec raise RecursionError
    in C, where it unwinds without running Python code; the general path then takes the
    body on its deep stack.
    """
    if any(mark in body for mark in _NOT_CLEAN):
        return None
    if not body.isascii():
        try:
            body.decode("utf-8")
        except UnicodeDecodeError:
            return None
    try:
        columns = _COLUMNS_DECODER.decode(body).data
        raw = _RAW_DECODER.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
        return None
    usual = _usual_heads(columns) if len(columns) == len(raw.data) else None
    if usual is None:
        return None
    return {"data": RawEvents(raw.data, *usual), "pagination": raw.pagination, "meta": raw.meta}


def decode_page(body: bytes) -> Any:
    """A page body decoded: a usual page without a dict per event (`usual_page`), any
    other the general way (`decode_json`)."""
    page = usual_page(body)
    return page if page is not None else decode_json(body)


def normalise_page(events: Sequence[Any], window: tuple[int, int] | None = None) -> PageRows:
    """A page's lines, equal to concatenating `normalise_event` lines.

    Events in the API's usual shape take `usual_lines`, which writes the same lines for
    about half the CPU; the others take `normalise_event`, each on its own, so that an
    unstorable event leaves the rest of its page on the fast path.

    With `window=(lo, hi)` (epoch ms) only events whose timestamp is in [lo, hi) are
    kept: the others belong to another fetch partition, which stores them. Rejects have
    no usable timestamp and are always kept.
    """
    lo, hi = window if window is not None else (-math.inf, math.inf)
    if isinstance(events, RawEvents):
        return events.rows(lo, hi)
    assert isinstance(events, list)
    usual = usual_lines(events)
    heads, payloads = usual.heads, usual.payloads
    parts: list[bytes] = []
    stamps: list[int] = []
    rows = rejected = 0

    def general(event: Any) -> None:
        nonlocal rows, rejected
        line, _, ts, _ = normalise_event(event)
        if ts is None:  # a reject (only rejects lack a timestamp)
            rejected += 1
        elif not lo <= ts < hi:
            return
        else:
            stamps.append(ts)
        parts.append(line)
        rows += 1

    if lo <= usual.first_ms and usual.last_ms < hi:  # every usual event is kept: runs of them, joined
        if usual.first_ms != math.inf:
            stamps.append(int(usual.first_ms))
        start = 0
        while start <= len(heads):
            try:
                end = heads.index(None, start)
            except ValueError:
                end = len(heads)
            parts.append(_joined(heads[start:end], payloads[start:end]))
            rows += end - start
            if end < len(heads):
                general(events[end])
            start = end + 1
    else:  # a page on its partition's edge: event by event
        for event, head, payload in zip(events, heads, payloads, strict=True):
            if head is None:
                general(event)
            elif lo <= (ts := _stamp_ms(event["timestamp"])) < hi:
                parts.append(head.encode() + payload + EVENT_LINE_END)
                stamps.append(ts)
                rows += 1
    return PageRows(b"".join(parts), rows, rejected, min(stamps) if stamps else None)
