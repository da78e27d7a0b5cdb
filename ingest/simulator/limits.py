"""Rate-limit windows, the response cache and the latency model: the server's clocks.

Each takes `now` (wall seconds) as an argument instead of reading the clock, so tests can
drive them with plain numbers. Window lengths and TTLs arrive already divided by the time
scale. All are thread-safe: the HTTP server calls them from many handler threads.
"""

from __future__ import annotations

import math
import random
import threading
from collections import OrderedDict, deque
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

V = TypeVar("V")


def format_duration(seconds: float, time_scale: float, rounding: str = "ceil") -> str:
    """A relative duration for a header: whole seconds at scale 1 (like the real service),
    decimals with ms precision above it (so short scaled windows do not read as 0)."""
    seconds = max(0.0, seconds)
    if time_scale == 1:
        return str(math.ceil(seconds - 1e-9) if rounding == "ceil" else math.floor(seconds + 1e-9))
    return format(max(round(seconds, 3), 0.001), ".3f").rstrip("0").rstrip(".")


def duration_value(seconds: float, time_scale: float, rounding: str = "ceil") -> int | float:
    """The same duration as a JSON number."""
    text = format_duration(seconds, time_scale, rounding)
    return int(text) if time_scale == 1 else float(text)


@dataclass(frozen=True)
class WindowState:
    allowed: bool
    limit: int
    remaining: int
    reset: float  # seconds until the window closes (fixed) or a slot frees (sliding)


class FixedWindow:
    """Per-key fixed window opened by the first counted request (section 4)."""

    def __init__(self, limit: int, window: float) -> None:
        self.limit, self.window = limit, window
        self._open: dict[str, tuple[float, int]] = {}
        self._lock = threading.Lock()

    def _current(self, key: str, now: float) -> tuple[float, int] | None:
        state = self._open.get(key)
        if state is not None and now >= state[0] + self.window:
            del self._open[key]
            return None
        return state

    def peek(self, key: str, now: float) -> WindowState:
        """The state without counting (cache HITs are free)."""
        with self._lock:
            state = self._current(key, now)
        if state is None:
            return WindowState(True, self.limit, self.limit, self.window)
        start, count = state
        return WindowState(count < self.limit, self.limit, max(0, self.limit - count), start + self.window - now)

    def hit(self, key: str, now: float) -> WindowState:
        """Count one request if the window has room; a rejected request is not counted."""
        with self._lock:
            state = self._current(key, now) or (now, 0)
            start, count = state
            reset = start + self.window - now
            if count >= self.limit:
                self._open[key] = state
                return WindowState(False, self.limit, 0, reset)
            self._open[key] = (start, count + 1)
            return WindowState(True, self.limit, self.limit - count - 1, reset)


class SlidingWindow:
    """Per-key sliding log: at most `limit` accepted requests in any `window` seconds (the feed)."""

    def __init__(self, limit: int, window: float, count_rejected: bool = False) -> None:
        self.limit, self.window, self.count_rejected = limit, window, count_rejected
        self._log: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def hit(self, key: str, now: float) -> WindowState:
        with self._lock:
            log = self._log.setdefault(key, deque())
            while log and log[0] <= now - self.window:
                log.popleft()
            if len(log) >= self.limit:
                reset = log[0] + self.window - now
                if self.count_rejected:
                    log.append(now)
                return WindowState(False, self.limit, 0, reset)
            log.append(now)
            return WindowState(True, self.limit, self.limit - len(log), self.window)


class ResponseCache(Generic[V]):
    """Identical requests within `ttl` seconds are served from here (the 30 s `/events` cache).

    Entries are small page descriptions, not bodies, so a fast crawl cannot fill memory with
    megabyte pages; the body is re-rendered identically from the description.
    """

    def __init__(self, ttl: float, max_entries: int = 100_000) -> None:
        self.ttl, self.max_entries = ttl, max_entries
        self._entries: OrderedDict[Hashable, tuple[float, V]] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def get(self, key: Hashable, now: float) -> V | None:
        with self._lock:
            self._expire(now)
            found = self._entries.get(key)
            if found is None:
                self.misses += 1
                return None
            self.hits += 1
            return found[1]

    def put(self, key: Hashable, value: V, now: float) -> None:
        with self._lock:
            self._entries.pop(key, None)
            self._entries[key] = (now + self.ttl, value)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def _expire(self, now: float) -> None:
        while self._entries:
            first = next(iter(self._entries.values()))
            if first[0] > now:
                break
            self._entries.popitem(last=False)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {"entries": len(self._entries), "hits": self.hits, "misses": self.misses}


class LatencyModel:
    """Service time of a page, and the aggregate server capacity shared by all requests.

    Each page needs `base + per_event * n` seconds (± jitter) on its own, and reserves `n /
    capacity` seconds on one shared timeline; it finishes at whichever is later, so a crowd of
    parallel requests is stretched to the server-wide events/s cap. All values are wall seconds
    (already divided by the time scale; capacity already multiplied by it).
    """

    def __init__(self, base: float, per_event: float, jitter: float, capacity: float, seed: int) -> None:
        self.base, self.per_event, self.jitter, self.capacity = base, per_event, jitter, capacity
        self._rng = random.Random(seed)
        self._busy_until = 0.0
        self._lock = threading.Lock()

    def delay(self, events: int, now: float) -> float:
        with self._lock:
            factor = 1 + self._rng.uniform(-self.jitter, self.jitter)
            start = max(now, self._busy_until)
            self._busy_until = start + events / self.capacity
            return max((self.base + self.per_event * events) * factor, self._busy_until - now)
