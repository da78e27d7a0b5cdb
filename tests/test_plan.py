"""Partition planning: windows are contiguous, cover everything and follow the budgets."""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from ingest.plan import (
    NEVER,
    choose_lanes,
    choose_split,
    estimate_oldest,
    min_split_span,
    progress_unknown,
    split_range,
)


@pytest.mark.parametrize(
    "newest, page_oldest, page_events, total, expected",
    [
        (10_000, 9_000, 1001, 10_001, 0),  # 1 ms per event, 10,001 events -> oldest 0
        (10_000, 9_000, 1001, 5_001, 5_000),
        (10_000, 9_000, 1001, 1001, 9_000),  # the page holds everything
        (10_000, 9_000, 1001, None, 9_000),  # no total: only what we saw
        (10_000, 10_000, 1, 100, 10_000),  # one event: no density to extrapolate
        (10_000, 9_000, 1001, 10**9, 0),  # never below 0
    ],
)
def test_estimate_oldest(newest: int, page_oldest: int, page_events: int, total: int | None, expected: int) -> None:
    assert estimate_oldest(newest, page_oldest, page_events, total) == expected


@pytest.mark.parametrize(
    "mode, partitions, expected",
    [
        ("feed", 0, ["feed"] * 6),
        ("feed", 2, ["feed"] * 2),
        ("events", 0, ["events"] * 2),
        ("events", 3, ["events"] * 3),
        ("mixed", 0, ["feed"] * 6 + ["events"] * 2),
        ("mixed", 3, ["feed", "feed", "events"]),
        ("mixed", 5, ["feed"] * 4 + ["events"]),
        ("mixed", 8, ["feed"] * 6 + ["events"] * 2),
        ("mixed", 1, ["feed"]),
    ],
)
def test_choose_lanes(mode: str, partitions: int, expected: list[str]) -> None:
    lanes = choose_lanes(mode, partitions, feed_rate=40, events_rate=10)
    assert [source for source, _ in lanes] == expected


def test_mixed_lanes_weight_by_budget() -> None:
    lanes = choose_lanes("mixed", 0, feed_rate=36, events_rate=10)
    assert [w for _, w in lanes] == [6] * 6 + [5, 5]
    assert choose_lanes("mixed", 3, feed_rate=40, events_rate=10)[0][1] == 20


@pytest.mark.parametrize("lanes", [[("feed", 1.0)], [("feed", 1.0)] * 4, [("feed", 3.0), ("events", 1.0)]])
def test_split_range_is_contiguous_and_complete(lanes: list[tuple[str, float]]) -> None:
    parts = split_range(1_000, 101_000, lanes)
    assert parts[0].upper_ms == 101_000
    assert parts[-1].lower_ms == 0
    for newer, older in itertools.pairwise(parts):
        assert newer.lower_ms == older.upper_ms
    assert [p.index for p in parts] == list(range(len(lanes)))
    assert [p.source for p in parts] == [s for s, _ in lanes]


def test_split_range_sizes_follow_weights() -> None:
    parts = split_range(0, 100_000, [("feed", 3.0), ("events", 1.0)])
    assert parts[0].upper_ms - parts[0].lower_ms == 75_000
    assert parts[1].upper_ms - parts[1].lower_ms == 25_000


def part(index: int, lower: int, upper: int, source: str = "feed", done: bool = False, at: int | None = None) -> Any:
    from ingest.checkpoint import PartitionState
    from ingest.cursors import encode_cursor

    cursor = encode_cursor("ffffffff-ffff-ffff-ffff-ffffffffffff", at, 1) if at is not None else None
    return PartitionState(index=index, source=source, lower_ms=lower, upper_ms=upper, cursor=cursor, done=done)


@pytest.mark.parametrize(
    "parts, min_span, expected",
    [
        # the one with the most time left (by its cursor) is split in the middle of what is left
        ([part(0, 100, 200, at=150), part(1, 0, 100, at=90)], 10, (1, 45)),
        ([part(0, 100, 200), part(1, 0, 100, at=20)], 10, (0, 150)),
        # any lane: a fetcher of one lane helps a slower partition of the other
        ([part(0, 100, 200, done=True), part(1, 0, 100, source="events", at=60)], 10, (1, 30)),
        # done partitions are never split
        ([part(0, 100, 200, done=True)], 10, None),
        # too little left to be worth a split
        ([part(0, 100, 200, at=105)], 10, None),
        ([], 10, None),
    ],
)
def test_choose_split(parts: list[Any], min_span: int, expected: tuple[int, int] | None) -> None:
    assert choose_split(parts, min_span) == expected


def test_choose_split_counts_from_the_oldest_event_not_from_zero() -> None:
    parts = [part(0, 0, 1000, at=900)]
    assert choose_split(parts, 10, oldest_ms=700) == (0, 800)
    assert choose_split(parts, 10) == (0, 450)


@pytest.mark.parametrize(
    "walks, page, expected",
    [
        ([(1000, 900, 10, False)], 10, 400),  # 100 ms walked for 10 rows: 4 pages of 10 = 400 ms
        ([(1000, 900, 10, False), (900, 0, 500, True)], 10, 400),  # finished walks do not count
        ([(1000, None, 0, False)], 10, NEVER),  # nothing measured yet
    ],
)
def test_min_split_span(walks: list[tuple[int, int | None, int, bool]], page: int, expected: int) -> None:
    parts = []
    for i, (upper, at, rows, done) in enumerate(walks):
        p = part(i, 0, upper, done=done, at=at)
        p.rows = rows
        parts.append(p)
    assert min_split_span(parts, page) == expected


@pytest.mark.parametrize(
    "walks, expected",
    [
        ([(0, None, False)], True),  # started, nothing committed
        ([(1000, 900, False)], False),
        ([(1000, 900, False), (0, None, True)], False),  # a finished one never counts
        ([(0, 900, False)], True),
        ([], False),
    ],
)
def test_progress_unknown(walks: list[tuple[int, int | None, bool]], expected: bool) -> None:
    parts = []
    for i, (rows, at, done) in enumerate(walks):
        p = part(i, 0, 2000, done=done, at=at)
        p.rows = rows
        parts.append(p)
    assert progress_unknown(parts) is expected
