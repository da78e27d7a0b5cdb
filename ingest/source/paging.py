"""Where a walk goes after each page, whatever the server's paging says: a pure decision.

Three ways the API's paging can break come as well-formed 200s, so the retry budget never
sees them: `hasMore` without a `nextCursor`, a `nextCursor` that leads back to a page already
served, and empty pages that claim more. Taken at their word they end a walk early (events
lost) or fetch one page until the run is killed. But a cursor is only a position
(datasync-api.md 3.6): the page after an event starts strictly after its `(ts, id)` in the
server's own order, so a cursor forged from the last event the walk holds continues exactly
where the server's own would have, events sharing that millisecond included, whichever way
the server breaks ties. A server that a few forged cursors in a row cannot move past that
event is stuck there: the walk stops, naming the position, instead of asking for ever.

`Paging.after` is the decision, free of I/O and clocks, so that one table test walks every
kind of page (`tests/test_paging.py`); `ingest.source.fetcher` only carries it out.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from ingest.source.cursors import decode_cursor, encode_cursor
from ingest.source.normalise import exact_ms

# Forged cursors in a row that may fail to get past the last event held before the walk is
# declared stuck: one answers an occasional fault, the others a server slow to recover.
FORGED_CURSORS = 3

_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", re.ASCII)


@dataclass(frozen=True)
class Position:
    """An event's place in the API's order: what a cursor holds besides its expiry."""

    ts: int
    id: str

    def __str__(self) -> str:
        return f"ts={self.ts} id={self.id}"


@dataclass(frozen=True)
class Marks:
    """What a page says about where the walk is (`read_page`)."""

    has_more: bool
    last: Position | None  # the page's last event whose position can be read exactly
    final: Position | None  # the page's final event, if its position can be read exactly
    cursor: Position | None  # where its nextCursor points; None when absent or unreadable


class Move(enum.Enum):
    FOLLOW = "follow"  # send the server's nextCursor
    FORGE = "forge"  # send a cursor forged at the step's position
    END = "end"  # the server says there is no more
    STALLED = "stalled"  # forged cursors got nowhere: stop the run


@dataclass(frozen=True)
class Step:
    move: Move
    position: Position  # where the next page starts; where the walk ended or is stuck
    reason: str = ""  # why the server's cursor is not followed, for the log and the error


@dataclass(frozen=True)
class Paging:
    """The lowest event the walk holds (before its first page, the position it starts from),
    the ids of the page ends seen in that millisecond, and the forged cursors sent since a
    page last got below it."""

    held: Position
    tied: frozenset[str] = frozenset()
    forged: int = 0

    @classmethod
    def starting_at(cls, position: Position) -> Paging:
        return cls(position, frozenset({position.id}))

    def progressed(self, position: Position | None) -> bool:
        """Whether a page (or cursor) ending at `position` got below what the walk holds.
        Within one millisecond the tie-break's direction is uncertain, so any id not seen
        yet at that millisecond counts: a walk that goes back up within it only repeats
        events, and cannot loop, since each id counts once."""
        if position is None:
            return False
        held = self.held
        return position.ts < held.ts or (position.ts == held.ts and position.id not in self.tied)

    def moved_to(self, position: Position) -> Paging:
        tied = self.tied | {position.id} if position.ts == self.held.ts else frozenset({position.id})
        return Paging(position, tied)

    def after(self, page: Marks) -> tuple[Paging, Step]:
        """Follow a cursor that goes down without skipping the page's own final event, the
        server's word otherwise (a damaged final event cannot contradict it); else go on
        from the page's last event; else from the last event held, a few times."""
        if not page.has_more:
            return self, Step(Move.END, self.held)
        cursor, final = page.cursor, page.final
        if cursor is None:
            reason = "hasMore without a readable nextCursor"
        elif not self.progressed(cursor):
            reason = "nextCursor leads back to events already held"
        elif final is not None and cursor.ts < final.ts:
            reason = "nextCursor skips the events below the page's last one"
        else:
            return self.moved_to(cursor), Step(Move.FOLLOW, cursor)
        if self.progressed(page.last):
            assert page.last is not None
            return replace(self.moved_to(page.last), forged=1), Step(Move.FORGE, page.last, reason)
        reason = "an empty page with hasMore" if page.last is None else "no event below the last one held"
        if self.forged >= FORGED_CURSORS:
            return self, Step(Move.STALLED, self.held, f"no progress below {self.held} after {self.forged} forged"
                              f" cursors; last: {reason}")
        return replace(self, forged=self.forged + 1), Step(Move.FORGE, self.held, reason)


def cursor_position(cursor: str | None) -> Position | None:
    if not cursor:
        return None
    try:
        decoded = decode_cursor(cursor)
    except ValueError:
        return None
    return Position(int(decoded["ts"]), decoded["id"].lower())


def event_position(event: Any) -> Position | None:
    """Where an event stands, if that can be read exactly: a UUID and a timestamp in one of
    the API's two forms. A cursor forged from a damaged id could land elsewhere in its
    millisecond, and from a rounded timestamp elsewhere in its second."""
    if not isinstance(event, dict) or not isinstance(event.get("id"), str):
        return None
    event_id = event["id"].lower()
    ts = exact_ms(event.get("timestamp")) if _UUID.fullmatch(event_id) else None
    return Position(ts, event_id) if ts is not None else None


def read_page(events: Sequence[Any], has_more: bool, next_cursor: str | None) -> Marks:
    """The marks of a page. An event whose position cannot be read gives way to the one
    before it, which repeats a few events rather than skipping any."""
    final = event_position(events[-1]) if events else None
    last = final
    for event in reversed(events[:-1] if final is None else ()):
        last = event_position(event)
        if last is not None:
            break
    return Marks(has_more, last, final, cursor_position(next_cursor))


def forged_cursor(position: Position, exp_ms: int) -> str:
    return encode_cursor(position.id, position.ts, exp_ms)
