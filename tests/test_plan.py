"""Partition planning: windows are contiguous, cover everything and follow the budgets."""

from __future__ import annotations

import itertools

import pytest

from ingest.plan import choose_lanes, estimate_oldest, split_range


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
