"""The fetcher processes: how many, which partitions each walks, and which walker exit wins."""

from __future__ import annotations

import pytest

from ingest.run.exits import ChildExit
from ingest.run.fetching import assign_walkers, fetch_processes, worst


@pytest.mark.parametrize(
    ("walkers", "cpus", "expected"),
    [
        (8, 2, 1),  # the real API's plan on this machine: one process of threads
        (2, 2, 1),  # a local source on two cores: the other core is the loaders' and the server's
        (8, 4, 2),
        (8, 16, 8),  # never more processes than walkers
        (3, 64, 3),
        (1, 1, 1),
        (0, 8, 1),  # nothing to walk still gives a valid count
    ],
)
def test_fetch_processes(walkers: int, cpus: int, expected: int) -> None:
    assert fetch_processes(walkers, cpus) == expected


@pytest.mark.parametrize(
    ("indices", "processes", "expected"),
    [
        ([0, 1, 2, 3, 4], 1, [(0, 1, 2, 3, 4)]),
        ([0, 1, 2, 3, 4], 2, [(0, 2, 4), (1, 3)]),
        ([3, 7], 4, [(3,), (7,)]),  # no empty process
        ([], 2, []),
    ],
)
def test_assign_walkers(indices: list[int], processes: int, expected: list[tuple[int, ...]]) -> None:
    assert assign_walkers(indices, processes) == expected


@pytest.mark.parametrize(
    ("codes", "expected"),
    [
        ([], ChildExit.DONE),
        ([ChildExit.DONE, ChildExit.DONE], ChildExit.DONE),
        ([ChildExit.DONE, ChildExit.RETRYABLE], ChildExit.RETRYABLE),
        ([ChildExit.RETRYABLE, ChildExit.CRASHED], ChildExit.CRASHED),
        ([ChildExit.FATAL, ChildExit.RETRYABLE, ChildExit.DONE], ChildExit.FATAL),
    ],
)
def test_the_worst_walker_exit_is_the_process_exit(codes: list[ChildExit], expected: ChildExit) -> None:
    assert worst(codes) == expected
