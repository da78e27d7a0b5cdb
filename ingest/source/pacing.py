"""Client-side pacing: stay under the API's budgets instead of discovering them by 429.

The feed's budget (~40 requests/min per key, no rate-limit headers) is shared by several
fetcher processes (and walker threads within them), so its pacer keeps its state in
`multiprocessing` shared memory created by the parent. The decisions themselves are pure
functions on a plain `PaceState`, so they are tested with a fake clock; `SharedRateLimiter`
only loads, decides and stores under a lock.

The pacer is a GCRA (virtual-scheduling token bucket): at most `burst` requests at once,
then one per `1/rate` seconds, so any span of T seconds holds at most `burst + rate * T`
requests. On top of that:

- `penalise` (after a 429): nothing goes out before the wait is over, and the rate drops
  multiplicatively (x0.8, never below a floor); it recovers additively over time (AIMD), so a
  hidden limit is approached from below instead of being hit again at once;
- `observe` (endpoints with `X-RateLimit-*`, read as of the request's arrival): remaining
  == 0 blocks until the window resets; otherwise the remaining requests are spread over the
  time left, never faster than the rate;
- `learn`: the window and the count per window are the user's when given, else what the API
  shows (a simulator's clock may run S times faster: its windows are 60/S s). The state
  holds them, so what one process learns paces every process from its next request on.
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
# full one; a tenth of the full rate comes back per window without a 429.
DECREASE = 0.8
LOCK_TIMEOUT_S = 2.0
FLOOR_SHARE = 0.25
RECOVERY_SHARE_PER_WINDOW = 0.1
NOMINAL_WINDOW_S = 60.0  # the real service's rate windows (datasync-api.md section 4)
# A window reported closed is waited out a share of a window longer, by the precision of the
# reset: whole seconds (the real API) may be rounded down by up to one, 1.7% of its 60 s
# window, and would send the next window's first request into the old one; a reset with
# decimals (a scaled simulator: ms) is exact, and only the arrival's jitter is left.
RESET_MARGIN_SHARE = {"whole seconds": 0.02, "decimals": 0.002}


@dataclass(frozen=True)
class PaceParams:
    """Fixed for the life of a limiter: the user's settings, and which of them the API may
    correct (the ones the user left unset)."""

    per_window: float  # requests per window at full speed, until the API says otherwise
    window: float  # seconds the count is per, until the API shows its own
    burst: int  # requests allowed back to back
    learns_window: bool
    learns_count: bool


@dataclass(frozen=True)
class PaceState:
    """Everything that changes; stored in shared memory by `SharedRateLimiter`."""

    rate: float  # current (possibly penalised) rate, per second
    tat: float  # GCRA theoretical arrival time of the next request
    blocked_until: float  # nothing is sent before this instant
    updated: float  # when recovery was last applied
    per_window: float  # the budget: requests per window (configured, or the API's X-RateLimit-Limit)
    window: float  # seconds the budget is per (configured, or learnt)
    window_learnt: bool  # `window` was shown by the API, not the configured one


def make_params(per_window: float, window_s: float, burst: int = 1, learns_window: bool = False,
                learns_count: bool = False) -> PaceParams:
    if not (per_window > 0 and window_s > 0 and burst >= 1):
        raise ValueError("rate, window and burst must be positive")
    return PaceParams(per_window, window_s, burst, learns_window, learns_count)


def full_rate(state: PaceState) -> float:
    """Requests per second without a penalty."""
    return state.per_window / state.window


def floor_rate(state: PaceState) -> float:
    """The lowest rate penalties may cut to."""
    return full_rate(state) * FLOOR_SHARE


def recovery_rate(state: PaceState) -> float:
    """Rate regained per second of time without a 429, per second."""
    return full_rate(state) * RECOVERY_SHARE_PER_WINDOW / state.window


def initial_state(params: PaceParams, now: float) -> PaceState:
    return PaceState(rate=params.per_window / params.window, tat=now, blocked_until=now, updated=now,
                     per_window=params.per_window, window=params.window, window_learnt=False)


def recover(state: PaceState, now: float) -> PaceState:
    """Additive increase: the rate climbs back towards the full one as time passes,
    counting only time outside a block (a penalty is not also a recovery period)."""
    elapsed = max(0.0, now - max(state.updated, state.blocked_until))
    rate = min(full_rate(state), state.rate + recovery_rate(state) * elapsed)
    return replace(state, rate=rate, updated=max(state.updated, now))


def try_acquire(state: PaceState, params: PaceParams, now: float) -> tuple[PaceState, float]:
    """Take a slot at `now` if one is free. Returns the new state and 0.0 when granted, or
    the state (only recovery applied) and the strictly positive seconds to wait first."""
    state = recover(state, now)
    if now < state.blocked_until:
        return state, state.blocked_until - now
    interval = 1.0 / state.rate
    allowed_at = state.tat - (params.burst - 1) * interval
    if now < allowed_at:
        return state, allowed_at - now
    return replace(state, tat=max(state.tat, now) + interval), 0.0


def penalise(state: PaceState, params: PaceParams, now: float, seconds: float) -> PaceState:
    """After a 429: block for `seconds`, cut the rate, and restart without a burst."""
    state = recover(state, now)
    rate = max(floor_rate(state), state.rate * DECREASE)
    until = max(state.blocked_until, now + max(0.0, seconds))
    # The first request after the block goes at `until`, the next one a full interval later.
    tat = max(state.tat, until + (params.burst - 1) / rate)
    return replace(state, rate=rate, blocked_until=until, tat=tat)


def reset_margin_share(reset_s: float) -> float:
    """How much of a window to wait beyond a reset reported as `reset_s` seconds."""
    return RESET_MARGIN_SHARE["whole seconds" if float(reset_s).is_integer() else "decimals"]


def observe(state: PaceState, sent: float, remaining: int | None, reset_s: float | None) -> PaceState:
    """Fold `X-RateLimit-Remaining` / `X-RateLimit-Reset` (seconds left) into the state.

    Both are as of the request's arrival, `sent` here (an Express server counts a request
    in its rate-limit middleware, before the page is made), not of its response: a page
    takes seconds, and a window timed from the response would lose that much of every
    window. The budget is exhausted: block until the window resets, plus a margin for the
    reset's precision (`reset_margin_share`). Otherwise the remaining slots are spread
    evenly up to the reset; the budget's rate still applies, so the slower of the two wins.
    """
    if remaining is None or reset_s is None or not math.isfinite(reset_s):
        return state
    reset_s = max(0.0, reset_s)
    if remaining <= 0:
        until = sent + reset_s + reset_margin_share(reset_s) * state.window
        return replace(state, blocked_until=max(state.blocked_until, until))
    # `remaining` more requests fit before the window resets, and the first request of the
    # next window may go at the reset itself: remaining + 1 equal gaps.
    return replace(state, tat=max(state.tat, sent + reset_s / (remaining + 1)))


def _reading(value: float | None) -> float | None:
    """A usable reading: a finite positive number, else None."""
    return float(value) if value is not None and math.isfinite(value) and value > 0 else None


def learn(state: PaceState, params: PaceParams, now: float, window_s: float | None = None,
          count: float | None = None) -> PaceState:
    """Fold what the API shows of its budget into the state: a window (from the lifetimes
    and resets it reports) where the user gave none, a count per window
    (`X-RateLimit-Limit`) where the user gave none.

    Every reading of a window is a lower bound (a cursor's lifetime is counted from the
    request's arrival and reads low by the page's latency; a reset counts down from the
    window), so the first reading replaces the configured window and after that only a
    longer one does. The count is exact: the latest wins. The pace changes in proportion:
    the penalised rate keeps its share of the full one, and the requests already scheduled
    ahead of `now` are respaced at the new rate (else a limiter that had paced one
    request at a 60 s window would hold the next for a whole nominal interval).
    """
    window, learnt, per_window = state.window, state.window_learnt, state.per_window
    shown_window, shown_count = _reading(window_s), _reading(count)
    if params.learns_window and shown_window is not None and (not learnt or shown_window > window):
        window, learnt = shown_window, True
    if params.learns_count and shown_count is not None and shown_count >= 1:
        per_window = shown_count
    if (window, per_window, learnt) == (state.window, state.per_window, state.window_learnt):
        return state
    state = recover(state, now)
    scale = (per_window / window) / full_rate(state)
    tat = now + (state.tat - now) / scale if state.tat > now else state.tat
    return replace(state, rate=state.rate * scale, tat=tat, per_window=per_window, window=window,
                   window_learnt=learnt)


class SharedRateLimiter:
    """One request budget shared by processes and threads: the state lives in
    `multiprocessing` values created here (in the parent) and travels to spawned children
    when the limiter is passed as a `Process` argument. `clock` must be the same across
    processes (monotonic is system-wide on Linux) and picklable (a module-level function)."""

    def __init__(
        self,
        per_window: float,
        window: float,
        burst: int = 1,
        ctx: Any = None,
        clock: Callable[[], float] = time.monotonic,
        learns_window: bool = False,
        learns_count: bool = False,
    ) -> None:
        ctx = ctx if ctx is not None else mp.get_context("spawn")
        self.params = make_params(per_window, window, burst, learns_window, learns_count)
        self.clock = clock
        state = initial_state(self.params, clock())
        self._lock = ctx.Lock()
        self._values = {name: ctx.RawValue("d", float(getattr(state, name))) for name in STATE_FIELDS}

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
        values = {name: self._values[name].value for name in STATE_FIELDS}
        values["window_learnt"] = bool(values["window_learnt"])
        return PaceState(**values)

    def _store(self, state: PaceState) -> None:
        for name in STATE_FIELDS:
            self._values[name].value = float(getattr(state, name))

    def snapshot(self) -> PaceState:
        """The current state (for progress reports and tests)."""
        with self._locked():
            return self._load()

    def learnt_window(self) -> float | None:
        """The window the API showed (None: none yet, or the user's stands), read without
        the lock: clients ask on every request, and a read across an update at worst gives
        one request's waits the previous window."""
        return self._values["window"].value if self._values["window_learnt"].value else None

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

    def observe(self, sent: float, remaining: int | None, reset_s: float | None) -> None:
        """`sent`: when the request these headers answer went out, on `clock`."""
        with self._locked():
            self._store(observe(self._load(), sent, remaining, reset_s))

    def learn(self, window_s: float | None = None, count: float | None = None) -> tuple[PaceState, PaceState]:
        """`learn` on the shared state; the states before and after (the caller tells the
        user when the pace changed)."""
        with self._locked():
            before = self._load()
            after = learn(before, self.params, self.clock(), window_s, count)
            if after != before:
                self._store(after)
        return before, after


STATE_FIELDS = tuple(PaceState.__dataclass_fields__)


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

