"""Counters shared by every process of a run, for progress lines, metrics and the summary.

One `multiprocessing.Array` of 64-bit integers indexed by name: cheap to update from any
child, readable by the supervisor without messages.
"""

from __future__ import annotations

import copy
import threading
from typing import Any

COUNTER_NAMES = (
    "events_fetched",  # events and rejects written into sealed segments
    "pages",
    "requests",
    "retries",
    "http_429",
    "http_5xx",
    "truncated",
    "token_refreshes",
    "cursor_refreshes",
    "bytes",
    "events_loaded",  # events inserted into the table
    "rows_loaded",  # segment lines loaded: events, duplicates and rejects
    "duplicates",
    "rejected",
    "segments_loaded",
    "restarts",
)
_INDEX = {name: i for i, name in enumerate(COUNTER_NAMES)}

# ApiClient.stats keys that are mirrored into the shared counters.
CLIENT_COUNTERS = ("requests", "retries", "http_429", "http_5xx", "truncated", "token_refreshes", "cursor_refreshes", "bytes")


class SharedCounters:
    """One row of counters per process, summed on read.

    A child writes only its own row, so no lock between processes is needed: a lock held
    by a process that is SIGKILLed mid-update is never released and would freeze every other
    process of the run. The threads of one process (a fetcher's walkers) share its row, so a
    thread lock, which dies with its process, makes their read-add-store whole. The parent
    hands each child its row with `for_child()` when starting it; the parent itself writes
    row 0. Rows are reused round-robin after `ROWS - 1` starts (the old writer is long dead
    by then, and its totals stay counted).
    """

    ROWS = 256

    def __init__(self, ctx: Any) -> None:
        self._array = ctx.RawArray("q", self.ROWS * len(COUNTER_NAMES))
        self._starts = ctx.RawValue("q", 0)  # written by the parent only
        self._row = 0
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        return {name: value for name, value in self.__dict__.items() if name != "_lock"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def for_child(self) -> SharedCounters:
        """The same counters, writing to a row of their own (call in the parent)."""
        self._starts.value += 1
        child = copy.copy(self)
        child._row = 1 + (self._starts.value - 1) % (self.ROWS - 1)
        return child

    def add(self, name: str, amount: int = 1) -> None:
        if amount:
            with self._lock:
                self._array[self._row * len(COUNTER_NAMES) + _INDEX[name]] += amount

    def add_many(self, amounts: dict[str, int]) -> None:
        base = self._row * len(COUNTER_NAMES)
        with self._lock:
            for name, amount in amounts.items():
                self._array[base + _INDEX[name]] += amount

    def snapshot(self) -> dict[str, int]:
        width = len(COUNTER_NAMES)
        values = self._array[:]
        totals = [sum(values[i::width]) for i in range(width)]
        return dict(zip(COUNTER_NAMES, totals, strict=True))


class ClientStatsPublisher:
    """Forwards the growth of an ApiClient's `stats` dict into the shared counters."""

    def __init__(self, counters: SharedCounters) -> None:
        self._counters = counters
        self._seen: dict[str, int] = {}

    def publish(self, stats: dict[str, int]) -> None:
        delta = {}
        for name in CLIENT_COUNTERS:
            value = int(stats.get(name, 0))
            if value != self._seen.get(name, 0):
                delta[name] = value - self._seen.get(name, 0)
                self._seen[name] = value
        if delta:
            self._counters.add_many(delta)
