"""Loaders: claim a ready segment, load it in ONE transaction with its ledger row, retire it.

The ledger row (primary key = segment id) is inserted first in the same transaction as
the rows, so "loaded" and "recorded as loaded" commit together: a crash before the commit
leaves nothing, a crash after it is healed by `segments.reconcile`, and loading a segment
twice is a no-op. Rows go through a temporary staging table so that duplicates (overlapping
partitions, retries) are absorbed by `ON CONFLICT (id) DO NOTHING` and reject rows can be
routed to `ingest_rejects`. The file is streamed to COPY in large reads: no per-row Python
work unless COPY refuses a line, and then only to cut that line out.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import psycopg2
import psycopg2.extensions
from loguru import logger
from psycopg2 import sql

from ingest.sink import db
from ingest.tsv import COLUMNS, EVENT_LINE_END, decode_row, encode_row

READ_SIZE = 1 << 20  # bytes per read of a segment: a load holds a few such chunks, never the segment
TEMP_BUFFERS = "64MB"  # keeps a large segment's staging table in memory

STAGING_DDL = (
    "CREATE TEMP TABLE staging (id text, occurred_at timestamptz, type text, name text, user_id text,"
    " session_id text, payload jsonb, reject_reason text, raw text) ON COMMIT DROP"
)
COPY_STAGING = f"COPY staging ({', '.join(COLUMNS)}) FROM STDIN"
# A row the events table can take; anything else (a reject row, or a hand-made line with
# a NULL where the table needs a value) goes to ingest_rejects instead.
STORABLE = "reject_reason IS NULL AND id IS NOT NULL AND occurred_at IS NOT NULL AND payload IS NOT NULL"
INSERT_EVENTS = sql.SQL(
    "INSERT INTO {table} (id, occurred_at, type, name, user_id, session_id, payload, ingested_at)"
    " SELECT id, occurred_at, type, name, user_id, session_id, payload, now() FROM staging"
    " WHERE " + STORABLE + " ON CONFLICT (id) DO NOTHING"
)
# A reject seen again (re-fetched after a crash, by two overlapping partitions, in another
# timestamp form: see `db.reject_key`) is stored once. Loaders holding one reject in two
# segments store theirs one after the other (LOCK_FOR_REJECTS, taken only by a segment that
# has any): a statement does not see what another transaction has not committed.
LOCK_FOR_REJECTS = f"SELECT pg_advisory_xact_lock({db.REJECTS_LOCK}) FROM staging WHERE NOT ({STORABLE}) LIMIT 1"
INSERT_REJECTS = (
    "INSERT INTO ingest_rejects (segment_id, reason, raw, rejected_at)"
    " SELECT DISTINCT ON (s.key) %(segment)s, s.reason, s.raw, now()"
    " FROM (SELECT coalesce(reject_reason, 'segment line without id, occurred_at or payload') AS reason, raw,"
    "              " + db.reject_key("raw") + " AS key"
    "       FROM (SELECT reject_reason, coalesce(raw, payload::text, id) AS raw FROM staging"
    "             WHERE NOT (" + STORABLE + ")) lines) s"
    " WHERE NOT EXISTS (SELECT 1 FROM ingest_rejects r"
    "                   WHERE " + db.reject_key("r.raw") + " = s.key AND r.segment_id <> %(segment)s)"
)
_COPY_LINE = re.compile(r"\bCOPY \w+, line (\d+)")
_COPY_COLUMN = re.compile(r"\bcolumn (\w+)")


@dataclass
class LoadResult:
    segment_id: str
    rows: int
    inserted: int
    duplicates: int
    rejected: int
    bytes: int
    skipped: bool


# ---------------------------------------------------------------------------------------
# One segment, one transaction


def copy_line_number(exc: psycopg2.Error) -> int | None:
    """The 1-based line COPY stopped at, from the error context ("COPY staging, line 7, ...")."""
    match = _COPY_LINE.search(getattr(exc.diag, "context", None) or "")
    return int(match.group(1)) if match else None


def copy_reason(exc: psycopg2.Error) -> str:
    """The server's message (and column): what an operator needs to fix the source line."""
    message = exc.diag.message_primary or str(exc).strip().splitlines()[0]
    column = _COPY_COLUMN.search(exc.diag.context or "")
    return f"{message} (column {column.group(1)})" if column else message


def refused_raw(line: bytes) -> str:
    """What a reject row keeps of a line COPY refused: the event's JSON text when the line
    is an event row (`raw` holds an event's JSON text, DESIGN section 3), so that the event
    refused again from a page that wrote it differently (`1e9` or `1E+9`: the body path
    keeps the server's text, the general path writes its own) is one reject by its id; the
    whole line when it is anything else. Invalid UTF-8 and NUL bytes are shown as escapes."""
    try:
        fields = decode_row(line)
    except UnicodeDecodeError:
        fields = []
    payload = fields[6] if len(fields) == len(COLUMNS) and fields[7] is None else None
    text = line.rstrip(b"\n").decode("utf-8", "backslashreplace") if payload is None else payload
    return text.replace("\x00", "\\x00")


def split_lines(data: bytes) -> list[bytes]:
    """Lines as COPY numbers them: every segment line ends in \\n (a raw \\r is an error
    inside a line, never a line break)."""
    pieces = data.split(b"\n")
    tail = pieces.pop()
    return [p + b"\n" for p in pieces] + ([tail] if tail else [])


def whole_lines(source: BinaryIO, size: int) -> Iterator[bytes]:
    """The file in reads of about `size` bytes, each completed to the end of its line, so
    that no line, and so no line ending the fast path looks for, is split between two
    chunks. Memory is bounded by the read size, not by the segment's."""
    while chunk := source.read(size):
        if not chunk.endswith(b"\n"):
            chunk += source.readline()
        yield chunk


class _Chunks:
    """The file-like object `copy_expert` reads. It only ever calls read(), and sends
    whatever each call returns, so a chunk need not match the size it asks for."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._chunks = iter(chunks)
        self.error: Exception | None = None

    def read(self, size: int = -1) -> bytes:
        try:
            return next(self._chunks, b"")
        except Exception as exc:
            self.error = exc
            raise


def _copy(cur: psycopg2.extensions.cursor, statement: str, chunks: Iterable[bytes]) -> None:
    """COPY ... FROM STDIN fed with `chunks`. copy_expert reports an exception raised while
    reading as a server error (query_canceled, which `db.classify` would retry for as
    long as the database may be down): a segment that cannot be read fails as itself."""
    source = _Chunks(chunks)
    try:
        cur.copy_expert(statement, source)
    except psycopg2.OperationalError:
        if source.error is not None:
            raise source.error from None
        raise


COPY_DIRECT = sql.SQL(
    "COPY {table} (id, occurred_at, type, name, user_id, session_id, payload, ingested_at) FROM STDIN"
)


# The line ending of every event row, found by `re` (~1.6x faster than bytes.replace here).
_EVENT_LINE_END = re.compile(re.escape(EVENT_LINE_END))


def line_count(chunk: bytes) -> int:
    """Lines in `chunk` (newlines). Deleting them goes through memchr; `bytes.count` of one
    byte is a plain loop in CPython, ~4x slower on a segment's long lines."""
    return len(chunk) - len(chunk.replace(b"\n", b""))


def direct_rows(chunk: bytes, ingested_at: bytes) -> bytes | None:
    """Whole lines that are all event rows, as rows of the events table itself: their event
    columns, then `ingested_at`; None when any line is not an event row (a reject row: the
    staging path decides). One substitution and one line count in C, no per-row Python;
    exact because EVENT_LINE_END ends with the only newline it holds, so each line ending
    matches at most once."""
    template = b"\t" + ingested_at.replace(b"\\", b"\\\\") + b"\n"  # `re` reads backslashes in a template
    rows, ends = _EVENT_LINE_END.subn(template, chunk)
    return rows if chunk.endswith(b"\n") and ends == line_count(chunk) else None


class _NotEventRows(Exception):
    """A chunk holds a line that is not an event row: the direct COPY is abandoned."""


def _direct_chunks(source: BinaryIO, ingested_at: bytes) -> Iterator[bytes]:
    for chunk in whole_lines(source, READ_SIZE):
        rows = direct_rows(chunk, ingested_at)
        if rows is None:
            raise _NotEventRows()
        yield rows


def _copy_direct(cur: psycopg2.extensions.cursor, table: str, path: Path, ingested_at: bytes) -> int | None:
    """COPY straight into the events table, inside a savepoint, reading the file once. None
    (savepoint rolled back) when an id is already there, a line is refused, or a line turns
    out not to be an event row: the staging path, which absorbs duplicates and routes
    rejects, then takes over in the same transaction. A segment holding a reject thus
    costs the server the event rows COPY took before it; rejects are rare, a second read
    of every clean segment to decide first cost the loaders a third of their CPU."""
    cur.execute("SAVEPOINT direct")
    try:
        with path.open("rb") as source:
            _copy(cur, COPY_DIRECT.format(table=sql.Identifier(table)).as_string(cur), _direct_chunks(source, ingested_at))
    except (psycopg2.IntegrityError, psycopg2.DataError, _NotEventRows):
        cur.execute("ROLLBACK TO SAVEPOINT direct")
        return None
    loaded = cur.rowcount
    cur.execute("RELEASE SAVEPOINT direct")
    return int(loaded)


def _transaction(
    conn: psycopg2.extensions.connection, path: Path, segment_id: str, table: str, source: BinaryIO | None
) -> LoadResult | psycopg2.DataError:
    """Ledger row, staging, COPY, insert, rejects, counts, commit. `source` replaces the
    file once lines have been cut out of it; the fast path is only for the file as sealed.
    A COPY data error is returned (after rollback) for the caller to cut the line out;
    anything else raises."""
    size = path.stat().st_size
    with conn.cursor() as cur:
        cur.execute(
            "INSERT INTO ingest_segments (segment_id) VALUES (%s) ON CONFLICT DO NOTHING RETURNING now()::text",
            (segment_id,),
        )
        row = cur.fetchone()
        if row is None:
            conn.rollback()
            return LoadResult(segment_id, 0, 0, 0, 0, size, skipped=True)
        loaded = _copy_direct(cur, table, path, row[0].encode()) if source is None else None
        if loaded is not None:
            rows = inserted = loaded
            rejected = 0
        else:
            cur.execute(STAGING_DDL)
            try:
                with path.open("rb") if source is None else source as staged:
                    _copy(cur, COPY_STAGING, whole_lines(staged, READ_SIZE))
            except psycopg2.DataError as exc:
                conn.rollback()
                return exc
            rows = cur.rowcount
            cur.execute(INSERT_EVENTS.format(table=sql.Identifier(table)))
            inserted = cur.rowcount
            cur.execute(LOCK_FOR_REJECTS)
            cur.execute(INSERT_REJECTS, {"segment": segment_id})
            rejected = cur.rowcount
        duplicates = rows - inserted - rejected
        cur.execute(
            "UPDATE ingest_segments SET rows = %s, inserted = %s, duplicates = %s, rejected = %s, bytes = %s,"
            " loaded_at = now() WHERE segment_id = %s",
            (rows, inserted, duplicates, rejected, size, segment_id),
        )
    conn.commit()
    return LoadResult(segment_id, rows, inserted, duplicates, rejected, size, skipped=False)


def _without_refused(lines: list[bytes], refused: dict[int, str]) -> tuple[bytes, list[int]]:
    """The segment minus refused lines, plus a reject row for each; and which original
    line each kept line is (COPY's line numbers refer to this new data)."""
    kept = [i for i in range(len(lines)) if i not in refused]
    rejects = [encode_row([None] * 7 + [reason, refused_raw(lines[i])]) for i, reason in sorted(refused.items())]
    return b"".join([*(lines[i] for i in kept), *rejects]), kept


def load_segment(conn: psycopg2.extensions.connection, path: Path, segment_id: str, table: str) -> LoadResult:
    """Load one segment exactly once (see the module docstring).

    When COPY refuses a line, that line is identified (from the error's line number, by
    bisection when there is none), replaced by a reject row carrying PostgreSQL's message,
    and the whole transaction is redone, until COPY takes everything.
    """
    outcome = _transaction(conn, path, segment_id, table, None)
    if isinstance(outcome, LoadResult):
        return outcome
    lines = split_lines(path.read_bytes())
    refused: dict[int, str] = {}
    kept = list(range(len(lines)))
    while not isinstance(outcome, LoadResult):
        number = copy_line_number(outcome)
        if number is not None and number <= len(kept):
            index, reason = kept[number - 1], copy_reason(outcome)
        elif number is None:
            position, reason = find_first_bad_line(conn, [lines[i] for i in kept])
            index = kept[position]
        else:  # COPY refused one of our own reject rows: a bug, never data to drop
            raise outcome
        refused[index] = reason
        logger.warning("segment {}: line {} refused by COPY: {}", segment_id, index + 1, reason)
        data, kept = _without_refused(lines, refused)
        outcome = _transaction(conn, path, segment_id, table, io.BytesIO(data))
    return outcome


def _probe(cur: psycopg2.extensions.cursor, lines: list[bytes]) -> psycopg2.DataError | None:
    cur.execute("SAVEPOINT probe")
    try:
        _copy(cur, COPY_STAGING, [b"".join(lines)])
    except psycopg2.DataError as exc:
        return exc
    finally:
        cur.execute("ROLLBACK TO SAVEPOINT probe")
    return None


def first_refused_line(conn: psycopg2.extensions.connection, lines: list[bytes]) -> tuple[int, str] | None:
    """The first line COPY refuses and why, by bisection (None: every line loads).

    Invariant: the first `good` lines load and the first `bad` lines do not. Each probe is
    a COPY into a scratch table inside a savepoint; everything is rolled back at the end.
    """
    good, bad = 0, len(lines)
    with conn.cursor() as cur:
        cur.execute(STAGING_DDL)
        error = _probe(cur, lines)
        if error is None:
            conn.rollback()
            return None
        reason = copy_reason(error)
        while bad - good > 1:
            mid = (good + bad) // 2
            error = _probe(cur, lines[:mid])
            if error is None:
                good = mid
            else:
                bad, reason = mid, copy_reason(error)
    conn.rollback()
    return bad - 1, reason


def find_first_bad_line(conn: psycopg2.extensions.connection, lines: list[bytes]) -> tuple[int, str]:
    """`first_refused_line`, for an error COPY reported without a line number."""
    found = first_refused_line(conn, lines)
    if found is None:
        raise RuntimeError("COPY failed without a line number, but every line loads")
    return found
