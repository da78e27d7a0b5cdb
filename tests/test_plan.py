"""Partition planning: windows are contiguous, cover everything and follow the budgets."""

from __future__ import annotations

import itertools
import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ingest.source.checkpoint import Checkpoint
from ingest.source.plan import (
    best_cut,
    choose_lanes,
    choose_split,
    estimate_oldest,
    lane_needs_walker,
    measured_ms_per_event,
    partitions_for,
    plan_steal,
    planned_ms_per_event,
    probe_depth,
    progress_mark,
    revised_oldest,
    split_range,
    walker_speed,
)


@pytest.mark.parametrize(
    "newest, sample, total, expected",
    [
        (10_000, (10_000, 9_000, 1001), 10_001, 0),  # 1 ms per event, 10,001 events -> oldest 0
        (10_000, (10_000, 9_000, 1001), 5_001, 5_000),
        (10_000, (10_000, 9_000, 1001), 1001, 9_000),  # the page holds everything
        (10_000, (10_000, 9_000, 1001), None, 9_000),  # no total: only what we saw
        (10_000, (10_000, 10_000, 1), 100, 10_000),  # one event: no density to extrapolate
        (10_000, (10_000, 9_000, 1001), 10**9, 0),  # never below 0
        # a sample from deeper in: its density counts, from the newest event
        (10_000, (6_000, 4_000, 1001), 2_001, 6_000),
    ],
)
def test_estimate_oldest(newest: int, sample: tuple[int, int, int], total: int | None, expected: int) -> None:
    assert estimate_oldest(newest, sample, total) == expected


@pytest.mark.parametrize(
    "newest, first_oldest, expected",
    [(100_000, 99_000, 70_000), (100_000, 100_000, 99_970), (5_000, 1_000, 0)],
)
def test_probe_depth_is_thirty_first_probe_spans_down(newest: int, first_oldest: int, expected: int) -> None:
    assert probe_depth(newest, first_oldest) == expected


RATES = {"feed": 40, "events": 10, "events_query": 5}
QUERY = "events_query"


@pytest.mark.parametrize(
    "requested, events, seconds, cpus, expected",
    [
        (0, 5000, 4.1, 2, 0),  # the real API's pace: the lanes' default
        (0, 5000, 2.0, 8, 0),
        (0, 5000, 0.05, 2, 4),  # a local source: two walkers a core
        (0, 5000, 0.05, 1, 2),
        (0, 5000, 0.05, 6, 12),
        (0, 5000, 0.05, 0, 2),  # the core count unknown
        (3, 5000, 0.05, 6, 3),  # asked for: as asked
        (0, 5000, None, 6, 0),  # not measured
    ],
)
def test_partitions_for(requested: int, events: int, seconds: float | None, cpus: int, expected: int) -> None:
    assert partitions_for(requested, events, seconds, cpus) == expected


@pytest.mark.parametrize(
    "mode, partitions, rates, expected",
    [
        ("feed", 0, RATES, ["feed"] * 5),
        ("feed", 2, RATES, ["feed"] * 2),
        ("feed", 7, RATES, ["feed"] * 7),
        ("events", 0, RATES, [QUERY] + ["events"] * 2),
        ("events", 1, RATES, ["events"]),
        ("events", 4, RATES, [QUERY] + ["events"] * 3),
        ("events", 0, {**RATES, QUERY: 0}, ["events"] * 2),  # the query lane turned off
        ("mixed", 0, RATES, [QUERY] + ["events"] * 2 + ["feed"] * 5),
        ("mixed", 1, RATES, ["feed"]),
        ("mixed", 3, RATES, ["events", "feed", "feed"]),
        ("mixed", 5, RATES, [QUERY, "events"] + ["feed"] * 3),
        ("mixed", 10, RATES, [QUERY] + ["events"] * 2 + ["feed"] * 7),
        ("mixed", 0, {**RATES, QUERY: 0}, ["events"] * 2 + ["feed"] * 5),
    ],
)
def test_choose_lanes(mode: str, partitions: int, rates: dict[str, float], expected: list[str]) -> None:
    lanes = choose_lanes(mode, partitions, rates)
    assert [source for source, _ in lanes] == expected


def test_lanes_weight_by_budget_per_walker() -> None:
    lanes = choose_lanes("mixed", 0, {"feed": 40, "events": 10, QUERY: 5})
    assert [w for _, w in lanes] == [5, 5, 5] + [8] * 5
    assert choose_lanes("mixed", 3, RATES)[-1][1] == 20


def test_a_mode_without_budget_is_refused() -> None:
    with pytest.raises(ValueError):
        choose_lanes("feed", 0, {"feed": 0})
    with pytest.raises(ValueError):
        choose_lanes("sideways", 0, RATES)


@pytest.mark.parametrize("lanes", [[("feed", 1.0)], [("feed", 1.0)] * 4, [("feed", 3.0), ("events", 1.0)]])
def test_split_range_is_contiguous_and_complete(lanes: list[tuple[str, float]]) -> None:
    parts = split_range(1_000, 101_000, lanes)
    assert parts[0].upper_ms == 101_000
    assert parts[-1].lower_ms == 0
    for newer, older in itertools.pairwise(parts):
        assert newer.lower_ms == older.upper_ms
    assert [p.index for p in parts] == list(range(len(lanes)))
    assert [p.lane for p in parts] == [s for s, _ in lanes]


def test_split_range_sizes_follow_weights() -> None:
    parts = split_range(0, 100_000, [("feed", 3.0), ("events", 1.0)])
    assert parts[0].upper_ms - parts[0].lower_ms == 75_000
    assert parts[1].upper_ms - parts[1].lower_ms == 25_000


def part(index: int, lower: int, upper: int, lane: str = "feed", done: bool = False, at: int | None = None) -> Any:
    from ingest.source.checkpoint import PartitionState
    from ingest.source.cursors import encode_cursor

    cursor = encode_cursor("ffffffff-ffff-ffff-ffff-ffffffffffff", at, 1) if at is not None else None
    return PartitionState(index=index, lane=lane, lower_ms=lower, upper_ms=upper, cursor=cursor, done=done)


@pytest.mark.parametrize(
    "parts, page_ms, expected",
    [
        # the one with the most left (by its cursor, a page behind the walk) is split: of its
        # 8 pages the thief takes 4
        ([part(0, 100, 200, at=150), part(1, 0, 100, at=90)], 10, (1, 32)),  # 80% of 4 pages
        ([part(0, 100, 200), part(1, 0, 100, at=20)], 10, (0, 140)),
        # any lane: a fetcher of one lane helps a slower partition of the other
        ([part(0, 100, 200, done=True), part(1, 0, 100, lane="events", at=60)], 10, (1, 16)),
        # two pages left (a committed position may be a page behind the walk): one each
        ([part(0, 0, 100, at=30)], 10, (0, 8)),
        ([part(0, 0, 100, at=20)], 10, None),
        # done partitions are never split
        ([part(0, 100, 200, done=True)], 10, None),
        # a partial page left: no split finishes sooner
        ([part(0, 100, 200, at=105)], 10, None),
        ([], 10, None),
        # nothing measured, no estimate: no basis for a split
        ([part(0, 0, 100)], None, None),
    ],
)
def test_choose_split(parts: list[Any], page_ms: int | None, expected: tuple[int, int] | None) -> None:
    assert choose_split(parts, page_ms) == expected


@pytest.mark.parametrize(
    "pages_left, victim, thief, expected",
    [
        (1.0, 1, 1, None),  # one request left: nothing to share
        (2.0, 1, 1, 1),
        (1.5, 1, 1, 1),  # two requests (the second partial): one each
        (9.0, 1, 1, 4),  # 4 + 5 pages
        (3.0, 1, 10, 2),  # a fast thief takes the larger part
        (3.0, 10, 1, None),  # a slow thief would finish after the victim alone
        (10.0, 8, 5, 4),  # the query lane (5/window) helping a feed walk (8/window)
    ],
)
def test_best_cut(pages_left: float, victim: float, thief: float, expected: int | None) -> None:
    assert best_cut(pages_left, victim, thief) == expected


@pytest.mark.parametrize(
    "pages_left, victim, thief, expected",
    [
        # below a walk's next page: a faster thief takes all of a partial remainder
        (0.34, 5, 9.875, 1),  # a query walk's last partial page, fetched by a feed walker
        (1.0, 1, 10, 1),
        (1.0, 1, 1, None),  # as fast: no sooner
        (0.5, 10, 5, None),  # slower: later
        (3.0, 1, 10, 3),
        (9.0, 1, 1, 4),  # a long remainder is still shared
    ],
)
def test_best_cut_beside_the_next_page(pages_left: float, victim: float, thief: float, expected: int | None) -> None:
    assert best_cut(pages_left, victim, thief, beside_next_page=True) == expected


@given(
    st.floats(min_value=0.05, max_value=60),
    st.floats(min_value=0.5, max_value=40),
    st.floats(min_value=0.5, max_value=40),
    st.booleans(),
)
def test_best_cut_is_as_good_as_trying_every_cut(pages_left: float, victim: float, thief: float, beside: bool) -> None:
    def finish(taken: int) -> float:
        return max(taken / thief, max(0, math.ceil(pages_left - taken - 1e-9)) / victim)

    whole = math.ceil(pages_left - 1e-9)
    alone = whole / victim
    fastest = min([finish(k) for k in range(1, whole + 1 if beside else whole)], default=alone)
    chosen = best_cut(pages_left, victim, thief, beside)
    if fastest < alone - 1e-9:
        assert chosen is not None and finish(chosen) == pytest.approx(fastest)
    else:
        assert chosen is None


@pytest.mark.parametrize(
    "parts, thief, expected",
    [
        # a query-string walker (5/window) helping a feed walk (40 shared by 5: 8) takes 4 of 10 pages
        ([part(i, i * 1000, i * 1000 + 1000) for i in range(5)], QUERY, (0, 320)),
        # an /events walker (10) takes more than half of a feed walk (8)
        ([part(i, i * 1000, i * 1000 + 1000) for i in range(5)], "events", (0, 480)),
        # the victim is the walk that will take longest, not the longest span: a query walk
        # of 600 ms (at 5) outlasts a feed walk of 1000 ms (at 10)
        ([part(0, 0, 1000), part(1, 2000, 2600, lane=QUERY)], "feed", (1, 2000 + 320)),
        # a query walk's last third of a page below its next one: a feed walker takes it,
        # cut a fifth of a page above where that next page ends (it may come up short)
        ([part(0, 1000, 2000, lane=QUERY, at=1134)], "feed", (0, 1134 - 100 + 20)),
    ],
)
def test_choose_split_sizes_the_parts_by_walker_speed(parts: list[Any], thief: str, expected: tuple[int, int]) -> None:
    assert choose_split(parts, 100, thief=thief, rates=RATES) == expected


@pytest.mark.parametrize(
    "lanes, lane, joining, expected",
    [
        (["feed"] * 5, "feed", 0, 8.0),
        (["feed"] * 2, "feed", 0, 10.0),  # one walker keeps ~one page in flight: 4 to fill the feed
        (["feed"] * 4, "feed", 1, 8.0),
        ([], "events", 1, 10.0),
        (["events", "events"], "events", 0, 5.0),
        ([], "nowhere", 1, 0.0),
    ],
)
def test_walker_speed(lanes: list[str], lane: str, joining: int, expected: float) -> None:
    parts = [part(i, 0, 1000, lane=source) for i, source in enumerate(lanes)]
    assert walker_speed(parts, lane, RATES, joining) == expected


def test_choose_split_counts_from_the_oldest_event_not_from_zero() -> None:
    parts = [part(0, 0, 1000, at=900)]
    assert choose_split(parts, 10, oldest_ms=700) == (0, 772)
    assert choose_split(parts, 10) == (0, 352)


@pytest.mark.parametrize(
    "walks, expected",
    [
        ([(1000, 900, 10, False)], 10.0),  # 100 ms walked for 10 rows
        ([(1000, 900, 10, False), (900, 0, 500, True)], 10.0),  # finished walks do not count
        ([(1000, None, 0, False)], None),  # nothing measured yet, no plan estimate
    ],
)
def test_measured_ms_per_event(walks: list[tuple[int, int | None, int, bool]], expected: float | None) -> None:
    parts = []
    for i, (upper, at, rows, done) in enumerate(walks):
        p = part(i, 0, upper, done=done, at=at)
        p.rows = rows
        parts.append(p)
    assert measured_ms_per_event(parts) == expected


def test_the_density_falls_back_on_the_plan_until_something_is_measured() -> None:
    assert measured_ms_per_event([part(0, 0, 1000)], planned=2.5) == 2.5
    measured = [part(0, 0, 1000, at=900)]
    measured[0].rows = 10
    assert measured_ms_per_event(measured, planned=2.5) == 10.0


def walks(*specs: tuple[int, int, int | None, int, bool]) -> list[Any]:
    """(lower, upper, walked to, rows, done) per partition."""
    parts = []
    for i, (lower, upper, at, rows, done) in enumerate(specs):
        p = part(i, lower, upper, done=done, at=at)
        p.rows = rows
        parts.append(p)
    return parts


@pytest.mark.parametrize(
    "parts, total, oldest, expected",
    [
        # no walk went below the estimate: it stands
        (walks((5000, 10_000, 6000, 400, False), (0, 5000, 4000, 100, False)), 1000, 3000, 3000),
        # the bottom walk went below 3000 with 400 of 1000 events still unfetched, 100 of them
        # ahead of the other walk (1000 ms at 10 ms/event): 300 more below 2000, 3000 ms
        (walks((5000, 10_000, 6000, 400, False), (0, 5000, 2000, 200, False)), 1000, 3000, 0),
        (walks((5000, 10_000, 6000, 400, False), (0, 5000, 2000, 200, False)), 700, 3000, 2000),
        # everything fetched: the data ends where the walk is
        (walks((5000, 10_000, 5000, 500, True), (0, 5000, 2000, 500, False)), 1000, 3000, 2000),
        (walks((0, 5000, 2000, 500, False)), None, 3000, 3000),  # no total: nothing to go by
    ],
)
def test_revised_oldest(parts: list[Any], total: int | None, oldest: int, expected: int) -> None:
    assert revised_oldest(parts, total, oldest, 10.0) == expected


def test_a_bottom_walk_that_outgrew_the_estimate_is_still_split() -> None:
    # The estimate said the data ends at 900,000; the bottom walk is at 850,000 with a
    # third of the events still to fetch: a fetcher with nothing to do must help it.
    parts = walks((1_000_000, 2_000_000, 1_000_000, 4000, True), (0, 1_000_000, 850_000, 1000, False))
    plan = Checkpoint(generation="g", mode="mixed", total=7500, newest_ms=2_000_000, oldest_ms=900_000, partitions=parts)
    choice = plan_steal(plan, "events", 1000, RATES)
    assert choice is not None and choice[0] == 1 and choice[1] < 850_000


def test_no_steal_while_the_lane_is_busy() -> None:
    parts = [part(i, i * 1000, i * 1000 + 1000) for i in range(4)]
    plan = Checkpoint(generation="g", mode="feed", total=4000, newest_ms=4000, oldest_ms=0, partitions=parts)
    assert plan_steal(plan, "feed", 100, RATES) is None
    assert plan_steal(plan, "events", 100, RATES) is not None


@pytest.mark.parametrize(
    "total, newest, oldest, expected",
    [(100, 1000, 0, 10.0), (None, 1000, 0, None), (0, 1000, 0, None), (100, None, 0, None), (100, 5, 5, None)],
)
def test_planned_ms_per_event(total: int | None, newest: int | None, oldest: int, expected: float | None) -> None:
    assert planned_ms_per_event(total, newest, oldest) == expected


@pytest.mark.parametrize(
    "lanes, lane, expected",
    [
        ([("feed", False)] * 4, "feed", False),  # four feed walkers keep its budget busy
        ([("feed", False)] * 3 + [("feed", True)], "feed", True),
        ([("feed", False)] * 4, "events", True),  # nobody walks /events
        ([("events", False), ("feed", False)], "events", False),
        ([("events", True)], "events", True),
        ([], "events_query", True),
    ],
)
def test_lane_needs_walker(lanes: list[tuple[str, bool]], lane: str, expected: bool) -> None:
    parts = [part(i, 0, 1000, lane=source, done=done) for i, (source, done) in enumerate(lanes)]
    assert lane_needs_walker(parts, lane) is expected


def test_progress_mark_changes_with_every_commit_finish_and_split() -> None:
    parts = [part(0, 0, 1000, at=900), part(1, 1000, 2000)]
    before = progress_mark(parts)
    assert progress_mark([part(0, 0, 1000, at=900), part(1, 1000, 2000)]) == before
    assert progress_mark([part(0, 0, 1000, at=800), part(1, 1000, 2000)]) != before  # a page committed
    assert progress_mark([part(0, 0, 1000, at=900), part(1, 1000, 2000, done=True)]) != before
    assert progress_mark([part(0, 500, 1000, at=900), part(1, 1000, 2000)]) != before  # split
