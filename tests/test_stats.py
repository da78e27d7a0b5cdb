"""Shared counters: one row per process, summed; a dead writer blocks nobody."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
from typing import Any

from ingest.counters import ClientStatsPublisher, SharedCounters
from ingest.source.pacing import SharedRateLimiter


def _count(counters: SharedCounters, times: int) -> None:
    for _ in range(times):
        counters.add("pages")
        counters.add_many({"events_fetched": 10, "requests": 1})


def test_rows_of_several_processes_add_up() -> None:
    ctx = mp.get_context("spawn")
    counters = SharedCounters(ctx)
    procs = [ctx.Process(target=_count, args=(counters.for_child(), 500)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    counters.add("restarts")
    snapshot = counters.snapshot()
    assert (snapshot["pages"], snapshot["events_fetched"], snapshot["requests"], snapshot["restarts"]) == (1500, 15000, 1500, 1)


def test_rows_are_distinct_and_wrap_round() -> None:
    counters = SharedCounters(mp.get_context("spawn"))
    rows = [counters.for_child()._row for _ in range(SharedCounters.ROWS)]
    assert rows[: SharedCounters.ROWS - 1] == list(range(1, SharedCounters.ROWS))
    assert rows[-1] == 1 and 0 not in rows


def test_publisher_forwards_only_growth() -> None:
    counters = SharedCounters(mp.get_context("spawn"))
    publisher = ClientStatsPublisher(counters)
    publisher.publish({"requests": 3, "http_429": 1, "unrelated": 9})
    publisher.publish({"requests": 5, "http_429": 1})
    snapshot = counters.snapshot()
    assert (snapshot["requests"], snapshot["http_429"]) == (5, 1)


def _die_holding_the_limiter_lock(limiter: Any) -> None:
    limiter._lock.acquire()
    os.kill(os.getpid(), signal.SIGKILL)


def test_a_limiter_lock_left_by_a_killed_process_does_not_block_for_ever() -> None:
    ctx = mp.get_context("spawn")
    limiter = SharedRateLimiter(1000, 1.0, ctx=ctx)
    child = ctx.Process(target=_die_holding_the_limiter_lock, args=(limiter,))
    child.start()
    child.join(60)
    assert child.exitcode == -signal.SIGKILL
    assert limiter.acquire(lambda seconds: False) is True
