"""The paging decision as a table: (state, page marks) -> (state, step), one row per rule,
the forged-cursor limit reached; then how a page's marks are read off its events and cursor,
and a walk of a small (ts DESC, id DESC) order through each fault that never skips an event."""

from __future__ import annotations

import re
import time
from bisect import bisect_right
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson
import pytest

from ingest.source import checkpoint
from ingest.source.checkpoint import PartitionState
from ingest.source.cursors import FORGE_ID, decode_cursor, encode_cursor
from ingest.source.fetcher import fetch_partition
from ingest.source.normalise import exact_ms
from ingest.source.paging import (
    FORGED_CURSORS,
    Marks,
    Move,
    Paging,
    Position,
    Step,
    cursor_position,
    forged_cursor,
    read_page,
)
from tests.e2e import assert_exact, ingest_env, run_to_end
from tests.test_fetcher import load_all, setup

TOP = Position(2000, FORGE_ID)
A = Position(1900, "aaaaaaaa-0000-4000-8000-000000000000")
B = Position(1800, "bbbbbbbb-0000-4000-8000-000000000000")
# Two events of one millisecond: with ids descending, TIED_HI comes first.
TIED_HI = Position(1800, "cccccccc-0000-4000-8000-000000000000")
TIED_LO = Position(1800, "11111111-0000-4000-8000-000000000000")


def at(held: Position, *tied: Position, forged: int = 0) -> Paging:
    return Paging(held, frozenset({held.id, *(p.id for p in tied)}), forged)


def marks(last: Position | None, cursor: Position | None = None, has_more: bool = True,
          damaged_final: bool = False) -> Marks:
    return Marks(has_more, last, None if damaged_final else last, cursor)


def stalled(held: Position, last: str) -> Step:
    return Step(Move.STALLED, held, f"no progress below {held} after {FORGED_CURSORS} forged cursors; last: {last}")


NO_CURSOR = "hasMore without a readable nextCursor"
BACK = "nextCursor leads back to events already held"
SKIPS = "nextCursor skips the events below the page's last one"
NOTHING_NEW = "no event below the last one held"
EMPTY = "an empty page with hasMore"

ROWS = [
    # -- a sound page: follow the server ---------------------------------------------------------
    pytest.param(at(TOP), marks(A, A), at(A), Step(Move.FOLLOW, A), id="follow"),
    pytest.param(at(A, forged=2), marks(B, B), at(B), Step(Move.FOLLOW, B), id="progress-resets-the-count"),
    pytest.param(at(TOP), marks(B, A), at(A), Step(Move.FOLLOW, A), id="cursor-inside-the-page-repeats-only"),
    pytest.param(at(TOP), marks(A, B, damaged_final=True), at(B), Step(Move.FOLLOW, B),
                 id="a-damaged-final-event-cannot-contradict-the-cursor"),
    pytest.param(at(A), marks(None, B), at(B), Step(Move.FOLLOW, B), id="an-empty-page-that-moves-on"),
    pytest.param(at(A), marks(B, has_more=False), at(A), Step(Move.END, A), id="last-page"),
    pytest.param(at(A), marks(None, has_more=False), at(A), Step(Move.END, A), id="empty-last-page"),
    # -- (a) hasMore without nextCursor: go on from the page's last event ------------------------
    pytest.param(at(A), marks(B, None), at(B, forged=1), Step(Move.FORGE, B, NO_CURSOR), id="no-cursor"),
    # -- (b) a nextCursor back to a page already served, or past the page ------------------------
    pytest.param(at(A), marks(B, A), at(B, forged=1), Step(Move.FORGE, B, BACK), id="cursor-back"),
    pytest.param(at(B), marks(B, TOP), at(B, forged=1), Step(Move.FORGE, B, NOTHING_NEW), id="page-served-again"),
    pytest.param(at(B), marks(A, B), at(B, forged=1), Step(Move.FORGE, B, NOTHING_NEW), id="older-page-again"),
    pytest.param(at(TOP), marks(A, B), at(A, forged=1), Step(Move.FORGE, A, SKIPS), id="cursor-past-the-page"),
    # -- (c) empty pages with hasMore: again from the last event held ----------------------------
    pytest.param(at(A), marks(None, A), at(A, forged=1), Step(Move.FORGE, A, EMPTY), id="empty-page"),
    pytest.param(at(A, forged=FORGED_CURSORS - 1), marks(None), at(A, forged=FORGED_CURSORS),
                 Step(Move.FORGE, A, EMPTY), id="last-forged-cursor"),
    # -- stuck: the last forged cursor got nowhere either ----------------------------------------
    pytest.param(at(A, forged=FORGED_CURSORS), marks(None), at(A, forged=FORGED_CURSORS), stalled(A, EMPTY),
                 id="stalled-empty"),
    pytest.param(at(B, forged=FORGED_CURSORS), marks(B, None), at(B, forged=FORGED_CURSORS),
                 stalled(B, NOTHING_NEW), id="stalled-repeat"),
    # -- one millisecond, either tie-break direction ---------------------------------------------
    pytest.param(at(TIED_HI), marks(TIED_LO, TIED_LO), at(TIED_LO, TIED_HI), Step(Move.FOLLOW, TIED_LO),
                 id="tie-descending"),
    pytest.param(at(TIED_LO), marks(TIED_HI, TIED_HI), at(TIED_HI, TIED_LO), Step(Move.FOLLOW, TIED_HI),
                 id="tie-ascending"),
    pytest.param(at(TIED_LO, TIED_HI), marks(TIED_HI, TIED_HI), at(TIED_LO, TIED_HI, forged=1),
                 Step(Move.FORGE, TIED_LO, NOTHING_NEW), id="tie-seen-before"),
    pytest.param(at(TIED_LO, TIED_HI), marks(Position(1799, "ffff"), None), at(Position(1799, "ffff"), forged=1),
                 Step(Move.FORGE, Position(1799, "ffff"), NO_CURSOR), id="below-the-tie"),
]


@pytest.mark.parametrize(("before", "page", "after", "step"), ROWS)
def test_paging_table(before: Paging, page: Marks, after: Paging, step: Step) -> None:
    assert before.after(page) == (after, step)


def test_a_stuck_server_is_given_up_after_the_forged_cursors_and_no_more() -> None:
    paging, step = Paging.starting_at(TOP).after(marks(A, None))
    sent = [step]
    while step.move is Move.FORGE:
        paging, step = paging.after(marks(A, None))  # the same page, whatever is asked
        sent.append(step)
    assert [s.move for s in sent] == [Move.FORGE] * FORGED_CURSORS + [Move.STALLED]
    assert {s.position for s in sent} == {A}


# -- a page's marks ---------------------------------------------------------------------------

ID_1, ID_2 = "9b1f3c2e-5d4a-4e6b-8c7d-2a1b0c9d8e7f", "56a349b5-7243-4e0c-9fd8-f2c1eb2a5d35"


def event(event_id: Any, timestamp: Any) -> dict[str, Any]:
    return {"id": event_id, "timestamp": timestamp}


P_1, P_2 = Position(1769541553629, ID_1), Position(1769541612369, ID_2)


@pytest.mark.parametrize(
    ("events", "last", "final"),
    [
        pytest.param([event(ID_1, 1769541553629)], P_1, P_1, id="epoch-ms"),
        pytest.param([event(ID_1, "2026-01-27T19:19:13.629Z")], P_1, P_1, id="iso"),
        pytest.param([event(ID_1.upper(), 1769541553629)], P_1, P_1, id="id-lowercased"),
        pytest.param([event(ID_2, 1769541612369), event(ID_1, 1769541553)], P_2, None, id="epoch-seconds-give-way"),
        pytest.param([event(ID_2, 1769541612369), event(ID_1, " 2026-01-27T19:19:13.629Z\u200b")], P_2, None,
                     id="padded-text-gives-way"),
        pytest.param([event(ID_2, 1769541612369), event(None, 1769541553629)], P_2, None, id="no-id-gives-way"),
        pytest.param([event(ID_2, 1769541612369), event("x" * 40, 1769541553629)], P_2, None,
                     id="not-a-uuid-gives-way"),
        pytest.param([event(ID_1, "yesterday"), "not an event"], None, None, id="nothing-positioned"),
        pytest.param([], None, None, id="empty"),
    ],
)
def test_read_page(events: list[Any], last: Position | None, final: Position | None) -> None:
    cursor = encode_cursor(ID_1, 1769541553629, 0)
    assert read_page(events, True, cursor) == Marks(True, last, final, P_1)


def test_cursor_positions() -> None:
    assert cursor_position(encode_cursor(ID_1.upper(), 5, 6)) == Position(5, ID_1)
    assert cursor_position(None) is cursor_position("") is cursor_position("%%%") is None
    forged = decode_cursor(forged_cursor(Position(5, ID_1), 99))
    assert (forged["id"], forged["ts"], forged["exp"]) == (ID_1, 5, 99)


@pytest.mark.parametrize(
    ("value", "ms"),
    [(1769541553629, 1769541553629), ("2026-01-27T19:19:13.629Z", 1769541553629), (1769541553, None),
     ("1769541553629", None), (True, None), (1769541553629.0, None), (None, None)],
)
def test_exact_ms(value: Any, ms: int | None) -> None:
    assert exact_ms(value) == ms


# -- walks of an order with ties, through each fault ------------------------------------------

# (ts DESC, id DESC); the first three share a millisecond, so do the last two.
ORDER = [Position(50, "c"), Position(50, "b"), Position(50, "a"), Position(40, "z"), Position(30, "y"),
         Position(30, "x"), Position(20, "w")]


def serve(after: Position, limit: int) -> list[Position]:
    """The server's page strictly after `after` in its order."""
    keys = [(-p.ts, tuple(-ord(c) for c in p.id)) for p in ORDER]
    start = bisect_right(keys, (-after.ts, tuple(-ord(c) for c in after.id)))
    return ORDER[start : start + limit]


@pytest.mark.parametrize("fault", ["none", "no_cursor", "repeat_cursor", "empty_every_other"])
@pytest.mark.parametrize("limit", [1, 2, 3])
def test_a_walk_through_faults_holds_every_event(fault: str, limit: int) -> None:
    paging = Paging.starting_at(Position(51, "ffff"))
    position, held, requests = paging.held, [], 0
    while True:
        requests += 1
        events = serve(position, limit)
        more = bool(events) and events[-1] != ORDER[-1]
        cursor = events[-1] if more else None
        if fault == "no_cursor":
            cursor = None
        elif fault == "repeat_cursor" and more:
            cursor = position  # leads back to this very page
        elif fault == "empty_every_other" and requests % 2:
            events, more, cursor = [], True, position
        held += events
        page = Marks(more, events[-1] if events else None, events[-1] if events else None, cursor)
        paging, step = paging.after(page)
        assert step.move is not Move.STALLED
        if step.move is Move.END:
            break
        position = step.position
    assert held == ORDER, "every event once, in order: nothing skipped in a shared millisecond"
    assert requests <= 2 * len(ORDER) + 2


# -- whole runs against a server whose paging breaks ------------------------------------------

def test_a_walk_forging_every_cursor_keeps_the_events_sharing_a_page_end_millisecond(
    sim_factory: Any, pg_dsn: str, data_dir: Path
) -> None:
    # No page comes with a cursor on its first request, and the first page ends on the first
    # of two events of one millisecond: the forged cursor must not skip the second.
    start = 1767000000000  # 12,000 events in 30 s: many share a millisecond
    sim = sim_factory(events=12_000, time_start=start, time_end=start + 30_000, protocol_fault="no_cursor",
                      protocol_fault_rate=1.0)
    ts = sim.app.dataset.ts
    tie = next(i for i in range(100, 5000) if ts[i - 1] == ts[i])
    part = PartitionState(index=0, lane="events", lower_ms=0, upper_ms=ts[0] + 1)
    config, fetch = setup(sim, data_dir, [part])
    fetch.config = replace(config, page_limit=tie)
    assert fetch_partition(fetch, part)
    state = checkpoint.read(config.state_path)
    assert state is not None and state.drained
    assert sim.stats()["faults"]["no_cursor"] >= 12_000 // tie - 1
    load_all(config, pg_dsn)
    assert_exact(pg_dsn, sim.truth())


FAULTS = ["no_cursor", "repeat_cursor", "empty_pages"]
EVENTS = 10_000
RUN = {"INGEST_PAGE_LIMIT": 250, "INGEST_PARTITIONS": 2}  # two walks, and the lanes of --source auto
STALL_LINE = re.compile(
    r"partition \d+: (/api/v1/events(?:/d4ta/x7k9/feed)?): no progress below ts=(\d+) id=([0-9a-f-]{36})"
    rf" after {FORGED_CURSORS} forged cursors; last: [a-zA-Z ]+$"
)


def error_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if '"ERROR"' in line]


@pytest.mark.parametrize("fault", FAULTS)
def test_a_run_gets_past_occasional_faults_with_forged_cursors(
    sim_factory: Any, pg_dsn: str, data_dir: Path, fault: str
) -> None:
    # A third of the page positions are faulty on their first request (empty ones on their
    # first two): each time a cursor forged from the last event held gets past.
    repeats = 2 if fault == "empty_pages" else 1
    sim = sim_factory(events=EVENTS, protocol_fault=fault, protocol_fault_rate=0.3, protocol_fault_repeats=repeats)
    code, log = run_to_end(ingest_env(sim, pg_dsn, data_dir, **RUN), data_dir / "run.log", timeout=300)
    assert code == 0, log[-4000:]
    assert_exact(pg_dsn, sim.truth())
    assert sim.stats()["faults"].get(fault, 0) >= 5, sim.stats()
    assert log.count("going on below") >= 5, "the walks went on with forged cursors"


@pytest.mark.parametrize("fault", FAULTS)
def test_a_run_stuck_at_a_position_fails_at_once_naming_the_endpoint_and_position(
    sim_factory: Any, pg_dsn: str, data_dir: Path, fault: str
) -> None:
    stuck = 7_000  # no cursor gets past this position of the order: every page below it is faulty
    sim = sim_factory(events=EVENTS, protocol_fault=fault, protocol_fault_from=stuck)
    started = time.monotonic()
    code, log = run_to_end(ingest_env(sim, pg_dsn, data_dir, **RUN), data_dir / "run.log", timeout=120)
    elapsed = time.monotonic() - started
    assert code == 1, log[-4000:]
    assert "Traceback" not in log, log[-4000:]
    # The run's last word names the endpoint and the position, and nothing else went wrong
    # (every error line is a walk's report of the stall, or the run passing it on).
    errors = [orjson.loads(line)["message"] for line in error_lines(log)]
    assert errors and all(STALL_LINE.search(message) for message in errors), errors
    match = STALL_LINE.search(errors[-1])
    assert match
    ts = int(match.group(2))
    assert ts <= sim.app.dataset.ts[stuck - 1], "the walk stopped no higher than where the server is stuck"
    # Each walk below the position spends its few forged cursors there, then the run stops:
    # no restarts, no retries of the same request.
    served = sim.stats()["faults"].get(fault, 0)
    assert FORGED_CURSORS <= served <= 8 * (FORGED_CURSORS + 1), sim.stats()
    assert "restarting" not in log
    assert elapsed < 60, f"{elapsed:.0f} s to give up"
