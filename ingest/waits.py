"""The one way any part of a run waits: in short steps that a stop request cuts short, and
backing off exponentially between attempts.

Every sleep of the program goes through `wait_until`, so a shutdown is never delayed by more
than one step, whichever room is waiting (a fetcher paced by the API, a loader riding out a
database outage, the supervisor waiting for orphans). The clock and the step are parameters
so that fake clocks drive the same code in tests.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Any

STEP_S = 0.2  # the longest a stop request waits to be noticed


def wait_until(
    deadline: float,
    should_stop: Callable[[], bool],
    clock: Callable[[], float] = time.monotonic,
    nap: Callable[[float], Any] = time.sleep,
    step: float = STEP_S,
) -> bool:
    """Sleep until `clock()` reaches `deadline`; True, early, as soon as a stop is requested.
    `nap` may be an event's `wait`, which wakes at once when the event is set."""
    while not should_stop():
        left = deadline - clock()
        if left <= 0:
            return False
        nap(min(left, step))
    return True


def wait_for(seconds: float, should_stop: Callable[[], bool], nap: Callable[[float], Any] = time.sleep) -> bool:
    """`wait_until` `seconds` from now on the monotonic clock."""
    return wait_until(time.monotonic() + max(0.0, seconds), should_stop, nap=nap)


def backoff(attempt: int, base: float = 1.0, cap: float = 30.0, jitter: float = 0.2, rng: Any = random) -> float:
    """Exponential backoff for attempt 1, 2, 3...: base, 2*base, 4*base... at most `cap`,
    each spread by +/- `jitter` (a fraction) so that workers do not retry in lockstep."""
    delay = min(cap, base * 2.0 ** min(max(attempt - 1, 0), 60))
    return max(0.0, min(cap, delay * (1.0 + rng.uniform(-jitter, jitter))))
