"""Client-side pacing: stay under the API's budgets instead of discovering them by 429.

The feed's budget (~40 requests/min per key, no rate-limit headers) is shared by several
fetcher processes, so its pacer keeps its state in `multiprocessing` shared memory created by
the parent. The decisions themselves are pure functions on a plain `PaceState`, so they are
tested with a fake clock; `SharedRateLimiter` only loads, decides and stores under a lock.

The pacer is a GCRA (virtual-scheduling token bucket): at most `burst` requests at once,
then one per `1/rate` seconds, so any span of T seconds holds at most `burst + rate * T`
requests. On top of that:

- `penalise` (after a 429): nothing goes out before the wait is over, and the rate drops
  multiplicatively (x0.8, never below a floor); it recovers additively over time (AIMD), so a
  hidden limit is approached from below instead of being hit again at once;
- `observe` (endpoints with `X-RateLimit-*`): remaining == 0 blocks until the window resets;
  otherwise the remaining requests are spread over the time left, never faster than the rate.
"""

from __future__ import annotations

import email.utils
import math
import multiprocessing as mp
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC
from typing import Any

# AIMD tuning: each 429 cuts the rate to 80 %; the rate never goes below a quarter of the
# configured one; a tenth of the configured rate comes back per window without a 429.
DECREASE = 0.8
LOCK_TIMEOUT_S = 2.0
FLOOR_SHARE = 0.25
RECOVERY_SHARE_PER_WINDOW = 0.1


@dataclass(frozen=True)
class PaceParams:
    """Fixed for the life of a limiter."""

    rate: float  # requests per second at full speed
    burst: int  # requests allowed back to back
    floor: float  # lowest rate after penalties, per second
    recovery: float  # rate regained per second of time, per second


@dataclass(frozen=True)
class PaceState:
    """Everything that changes; stored in shared memory by `SharedRateLimiter`."""

    rate: float  # current (possibly penalised) rate, per second
    tat: float  # GCRA theoretical arrival time of the next request
    blocked_until: float  # nothing is sent before this instant
    updated: float  # when recovery was last applied


def make_params(rate_per_window: float, window_s: float, burst: int) -> PaceParams:
    if rate_per_window <= 0 or window_s <= 0 or burst < 1:
        raise ValueError("rate, window and burst must be positive")
    rate = rate_per_window / window_s
    return PaceParams(rate=rate, burst=burst, floor=rate * FLOOR_SHARE, recovery=rate * RECOVERY_SHARE_PER_WINDOW / window_s)


def initial_state(params: PaceParams, now: float) -> PaceState:
    return PaceState(rate=params.rate, tat=now, blocked_until=now, updated=now)


def recover(state: PaceState, params: PaceParams, now: float) -> PaceState:
    """Additive increase: the rate climbs back towards the configured one as time passes,
    counting only time outside a block (a penalty is not also a recovery period)."""
    elapsed = max(0.0, now - max(state.updated, state.blocked_until))
    rate = min(params.rate, state.rate + params.recovery * elapsed)
    return replace(state, rate=rate, updated=max(state.updated, now))


def try_acquire(state: PaceState, params: PaceParams, now: float) -> tuple[PaceState, float]:
    """Take a slot at `now` if one is free. Returns the new state and 0.0 when granted, or
    the state (only recovery applied) and the strictly positive seconds to wait first."""
    state = recover(state, params, now)
    if now < state.blocked_until:
        return state, state.blocked_until - now
    interval = 1.0 / state.rate
    allowed_at = state.tat - (params.burst - 1) * interval
    if now < allowed_at:
        return state, allowed_at - now
    return replace(state, tat=max(state.tat, now) + interval), 0.0


def penalise(state: PaceState, params: PaceParams, now: float, seconds: float) -> PaceState:
    """After a 429: block for `seconds`, cut the rate, and restart without a burst."""
    state = recover(state, params, now)
    rate = max(params.floor, state.rate * DECREASE)
    until = max(state.blocked_until, now + max(0.0, seconds))
    # The first request after the block goes at `until`, the next one a full interval later.
    tat = max(state.tat, until + (params.burst - 1) / rate)
    return replace(state, rate=rate, blocked_until=until, tat=tat)


def observe(state: PaceState, now: float, remaining: int | None, reset_s: float | None) -> PaceState:
    """Fold `X-RateLimit-Remaining` / `X-RateLimit-Reset` (seconds left) into the state.

    The budget is exhausted: block until the window resets. Otherwise the remaining slots
    are spread evenly up to the reset, counted from the start of the request these
    headers answer (not from its response: a slow page must not also delay the next one);
    the configured rate still applies, so the slower of the two wins.
    """
    if remaining is None or reset_s is None or not math.isfinite(reset_s):
        return state
    reset_s = max(0.0, reset_s)
    if remaining <= 0:
        return replace(state, blocked_until=max(state.blocked_until, now + reset_s))
    # `remaining` more requests fit before the window resets, and the first request of the
    # next window may go at the reset itself: remaining + 1 equal gaps.
    last_start = state.tat - 1.0 / state.rate
    return replace(state, tat=max(state.tat, last_start + reset_s / (remaining + 1)))


class SharedRateLimiter:
    """One request budget shared by processes: the state lives in `multiprocessing` values
    created here (in the parent) and travels to spawned children when the limiter is passed
    as a `Process` argument. `clock` must be the same across processes (monotonic is
    system-wide on Linux) and picklable (a module-level function)."""

    def __init__(
        self,
        rate: float,
        window: float,
        burst: int = 1,
        ctx: Any = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        ctx = ctx if ctx is not None else mp.get_context("spawn")
        self.params = make_params(rate, window, burst)
        self.clock = clock
        state = initial_state(self.params, clock())
        self._lock = ctx.Lock()
        self._rate = ctx.RawValue("d", state.rate)
        self._tat = ctx.RawValue("d", state.tat)
        self._blocked_until = ctx.RawValue("d", state.blocked_until)
        self._updated = ctx.RawValue("d", state.updated)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """The shared lock, but never a wait for ever: a process SIGKILLed while holding it
        never releases it. After LOCK_TIMEOUT_S we go on unsynchronised; the worst outcome
        is one request paced as if alone, which the 429 handling absorbs."""
        acquired = self._lock.acquire(timeout=LOCK_TIMEOUT_S)
        try:
            yield
        finally:
            if acquired:
                self._lock.release()

    def _load(self) -> PaceState:
        return PaceState(self._rate.value, self._tat.value, self._blocked_until.value, self._updated.value)

    def _store(self, state: PaceState) -> None:
        self._rate.value = state.rate
        self._tat.value = state.tat
        self._blocked_until.value = state.blocked_until
        self._updated.value = state.updated

    def snapshot(self) -> PaceState:
        """The current state (for progress reports and tests)."""
        with self._locked():
            return self._load()

    def acquire(self, wait: Callable[[float], bool]) -> bool:
        """Block until a slot is ours (True), or until `wait` reports a shutdown (False).
        The lock is never held while waiting."""
        while True:
            with self._locked():
                state, delay = try_acquire(self._load(), self.params, self.clock())
                self._store(state)
            if delay <= 0:
                return True
            if wait(delay):
                return False

    def penalise(self, seconds: float) -> None:
        with self._locked():
            self._store(penalise(self._load(), self.params, self.clock(), seconds))

    def observe(self, remaining: int | None, reset_s: float | None) -> None:
        with self._locked():
            self._store(observe(self._load(), self.clock(), remaining, reset_s))


def _header(headers: Mapping[str, str], name: str) -> str | None:
    """Case-insensitive lookup that also works on a plain dict."""
    wanted = name.lower()
    for key, value in headers.items():
        if key.lower() == wanted:
            return value
    return None


def _seconds(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        return None
    return seconds if math.isfinite(seconds) else None


def retry_after_seconds(headers: Mapping[str, str], body: dict[str, Any] | None, now_epoch: float) -> float | None:
    """How long a 429 asks us to wait, in (decimal) seconds, or None if it does not say.

    Sources in order: `Retry-After` (decimal seconds or an HTTP date), the body's
    `rateLimit.retryAfter`, then `X-RateLimit-Reset` (below 1e9 it is relative seconds, else an
    epoch in seconds, or in milliseconds when above 1e12).
    """
    retry_after = _header(headers, "Retry-After")
    if retry_after is not None:
        seconds = _seconds(retry_after)
        if seconds is None:
            try:
                when = email.utils.parsedate_to_datetime(retry_after.strip())
            except (TypeError, ValueError, IndexError):
                when = None
            if when is not None:
                if when.tzinfo is None:
                    when = when.replace(tzinfo=UTC)
                seconds = when.timestamp() - now_epoch
        if seconds is not None:
            return max(0.0, seconds)
    limits = body.get("rateLimit") if isinstance(body, dict) else None
    if isinstance(limits, dict):
        seconds = _seconds(limits.get("retryAfter"))
        if seconds is not None:
            return max(0.0, seconds)
    reset = _seconds(_header(headers, "X-RateLimit-Reset"))
    if reset is None:
        return None
    if reset >= 1e12:
        reset = reset / 1000.0 - now_epoch
    elif reset >= 1e9:
        reset -= now_epoch
    return max(0.0, reset)

