"""Counters shared by every process of a run, for progress lines, metrics and the summary.

One `multiprocessing.Array` of 64-bit integers indexed by name: cheap to update from any
child, readable by the supervisor without messages.
"""

from __future__ import annotations

from typing import Any

COUNTER_NAMES = (
    "fetched",  # events and rejects written into sealed segments
    "pages",
    "requests",
    "retries",
    "http_429",
    "http_5xx",
    "truncated",
    "token_refreshes",
    "cursor_refreshes",
    "bytes",
    "loaded",  # events inserted into the table
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
    def __init__(self, ctx: Any) -> None:
        self._array = ctx.Array("q", len(COUNTER_NAMES))

    def add(self, name: str, amount: int = 1) -> None:
        if amount:
            with self._array.get_lock():
                self._array[_INDEX[name]] += amount

    def add_many(self, amounts: dict[str, int]) -> None:
        with self._array.get_lock():
            for name, amount in amounts.items():
                self._array[_INDEX[name]] += amount

    def snapshot(self) -> dict[str, int]:
        with self._array.get_lock():
            values = list(self._array)
        return dict(zip(COUNTER_NAMES, values, strict=True))


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
