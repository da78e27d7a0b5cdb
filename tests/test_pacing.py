"""Pacing logic on a fake clock, the shared shell, and two spawned processes on one budget."""

from __future__ import annotations

import multiprocessing as mp
import random
import time
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any

import pytest

from ingest.source.pacing import (
    DECREASE,
    PaceParams,
    PaceState,
    SharedRateLimiter,
    initial_state,
    make_params,
    observe,
    penalise,
    recover,
    retry_after_seconds,
    try_acquire,
)


def grant_times(state: PaceState, params: PaceParams, count: int, start: float = 0.0) -> tuple[list[float], PaceState]:
    """Drive the pure pacer like a client would: ask, sleep exactly as told, ask again."""
    now, times = start, []
    while len(times) < count:
        state, delay = try_acquire(state, params, now)
        if delay == 0.0:
            times.append(now)
        else:
            assert delay > 0
            now += delay
    return times, state


def max_in_window(times: list[float], span: float) -> int:
    return max(sum(1 for t in times if start <= t < start + span) for start in times)


def test_spacing_without_burst() -> None:
    params = make_params(60, 60, burst=1)  # one per second
    times, _ = grant_times(initial_state(params, 0.0), params, 5)
    assert times == pytest.approx([0.0, 1.0, 2.0, 3.0, 4.0])


def test_burst_then_steady() -> None:
    params = make_params(120, 60, burst=3)  # 2/s, three back to back
    times, _ = grant_times(initial_state(params, 0.0), params, 6)
    assert times == pytest.approx([0.0, 0.0, 0.0, 0.5, 1.0, 1.5])


def test_idle_time_refills_the_burst_but_no_more() -> None:
    params = make_params(60, 60, burst=2)
    state = initial_state(params, 0.0)
    _, state = grant_times(state, params, 4)
    times, _ = grant_times(state, params, 4, start=100.0)
    assert times == pytest.approx([100.0, 100.0, 101.0, 102.0])


@pytest.mark.parametrize(("rate", "window", "burst"), [(40, 60, 1), (38, 60, 2), (10, 6, 3)])
def test_never_more_than_burst_plus_rate_in_any_span(rate: float, window: float, burst: int) -> None:
    params = make_params(rate, window, burst)
    state, now, times = initial_state(params, 0.0), 0.0, []
    rng = random.Random(1)
    while now < 5 * window:
        state, delay = try_acquire(state, params, now)
        if delay == 0.0:
            times.append(now)
        now += rng.uniform(0, delay + 0.3)  # impatient clients poll early and late
    assert max_in_window(times, window) <= burst + rate


def test_penalise_blocks_cuts_rate_and_drops_the_burst() -> None:
    params = make_params(120, 60, burst=3)
    state = initial_state(params, 0.0)
    state = penalise(state, params, now=0.0, seconds=5.0)
    assert state.rate == pytest.approx(2.0 * DECREASE)
    _, delay = try_acquire(state, params, 1.0)
    assert delay == pytest.approx(4.0)
    times, _ = grant_times(state, params, 3, start=5.0)
    assert times[0] == pytest.approx(5.0)
    assert times[1] - times[0] == pytest.approx(1 / state.rate, rel=0.02)  # no burst after a 429
    assert times[2] - times[1] == pytest.approx(1 / state.rate, rel=0.02)


def test_penalise_never_shortens_a_block_and_respects_the_floor() -> None:
    params = make_params(60, 60, burst=1)
    state = penalise(initial_state(params, 0.0), params, 0.0, 30.0)
    state = penalise(state, params, 1.0, 2.0)
    assert state.blocked_until == pytest.approx(30.0)
    for _ in range(50):
        state = penalise(state, params, 1.0, 0.0)
    assert state.rate == pytest.approx(params.floor)


def test_rate_recovers_additively_up_to_the_configured_rate() -> None:
    params = make_params(60, 60, burst=1)
    state = penalise(initial_state(params, 0.0), params, 0.0, 0.0)
    cut = state.rate
    later = recover(state, params, 60.0)
    assert later.rate == pytest.approx(cut + params.recovery * 60.0)
    assert cut < later.rate < params.rate
    assert recover(state, params, 10_000.0).rate == pytest.approx(params.rate)


def test_no_recovery_while_blocked() -> None:
    params = make_params(60, 60, burst=1)
    state = penalise(initial_state(params, 0.0), params, 0.0, 30.0)
    assert recover(state, params, 30.0).rate == pytest.approx(state.rate)
    assert recover(state, params, 40.0).rate == pytest.approx(state.rate + params.recovery * 10.0)


def test_observe_exhausted_blocks_until_reset() -> None:
    params = make_params(600, 60, burst=1)
    state = observe(initial_state(params, 0.0), now=1.0, remaining=0, reset_s=12.5)
    _, delay = try_acquire(state, params, 1.0)
    assert delay == pytest.approx(12.5)


def test_observe_spreads_remaining_over_reset_from_the_request_start() -> None:
    params = make_params(600, 60, burst=1)  # 10/s: the headers are the slower of the two
    state, _ = try_acquire(initial_state(params, 0.0), params, 0.0)  # the request starts at 0
    state = observe(state, now=1.5, remaining=3, reset_s=8.0)  # its response comes at 1.5
    _, delay = try_acquire(state, params, 1.5)
    assert delay == pytest.approx(0.5)  # 3 more then the reset: gaps of 8 / 4 = 2 s from 0


def test_observe_never_speeds_up_beyond_the_rate() -> None:
    params = make_params(6, 60, burst=1)  # one per 10 s
    state = initial_state(params, 0.0)
    state, _ = try_acquire(state, params, 0.0)
    state = observe(state, now=0.0, remaining=9, reset_s=9.0)  # headers would allow 1 s
    _, delay = try_acquire(state, params, 1.0)
    assert delay == pytest.approx(9.0)


@pytest.mark.parametrize(("remaining", "reset"), [(None, 10.0), (3, None), (3, float("nan"))])
def test_observe_without_headers_changes_nothing(remaining: int | None, reset: float | None) -> None:
    params = make_params(60, 60, burst=1)
    state = initial_state(params, 0.0)
    assert observe(state, 0.0, remaining, reset) == state


NOW = 1_800_000_000.0


@pytest.mark.parametrize(
    ("headers", "body", "expected"),
    [
        ({"Retry-After": "51"}, None, 51.0),
        ({"retry-after": "0.85"}, None, 0.85),  # decimal, any header case
        ({"Retry-After": format_datetime(datetime.fromtimestamp(NOW + 30, tz=UTC), usegmt=True)}, None, 30.0),
        ({"Retry-After": "-4"}, None, 0.0),
        ({"Retry-After": "soon"}, {"rateLimit": {"retryAfter": 7}}, 7.0),  # unparseable: next source
        ({}, {"rateLimit": {"retryAfter": 2.5}}, 2.5),
        ({"X-RateLimit-Reset": "12"}, {"error": "x"}, 12.0),
        ({"X-RateLimit-Reset": "0.4"}, None, 0.4),
        ({"X-RateLimit-Reset": str(NOW + 20)}, None, 20.0),  # epoch seconds
        ({"X-RateLimit-Reset": str(int((NOW + 20) * 1000))}, None, 20.0),  # epoch ms
        ({"Retry-After": "3"}, {"rateLimit": {"retryAfter": 9}}, 3.0),  # header first
        ({}, {"rateLimit": {"retryAfter": True}}, None),
        ({}, None, None),
    ],
)
def test_retry_after_seconds(headers: dict[str, str], body: dict[str, Any] | None, expected: float | None) -> None:
    result = retry_after_seconds(headers, body, NOW)
    if expected is None:
        assert result is None
    else:
        assert result == pytest.approx(expected, abs=0.01)


class FakeClock:
    def __init__(self) -> None:
        self.now = 50.0
        self.waits: list[float] = []

    def __call__(self) -> float:
        return self.now

    def wait(self, seconds: float) -> bool:
        self.waits.append(seconds)
        self.now += seconds
        return False


def test_shared_limiter_shell_waits_through_the_callback() -> None:
    clock = FakeClock()
    limiter = SharedRateLimiter(30, 60, burst=1, clock=clock)  # one per 2 s
    assert limiter.acquire(clock.wait) and limiter.acquire(clock.wait)
    assert clock.waits == pytest.approx([2.0])
    limiter.penalise(10.0)
    assert limiter.snapshot().rate == pytest.approx(0.5 * DECREASE)
    assert limiter.acquire(clock.wait)
    assert clock.now == pytest.approx(62.0)
    limiter.observe(0, 5.0)
    assert limiter.acquire(clock.wait)
    assert clock.now == pytest.approx(67.0)


def test_shared_limiter_acquire_returns_false_on_shutdown() -> None:
    clock = FakeClock()
    limiter = SharedRateLimiter(1, 60, burst=1, clock=clock)
    assert limiter.acquire(clock.wait)
    assert limiter.acquire(lambda seconds: True) is False


# -- two spawned processes, one budget ------------------------------------------------------

RATE_PER_S, BURST, PER_PROCESS = 20.0, 2, 12


def _hammer(limiter: SharedRateLimiter, barrier: Any, out: Any) -> None:
    """Child: acquire as fast as allowed, recording for each grant an interval that is
    certain to contain the moment the limiter decided it (from the last wake-up to return)."""
    barrier.wait(timeout=60)
    grants = []
    woke = [0.0]

    def wait(seconds: float) -> bool:
        time.sleep(seconds)
        woke[0] = limiter.clock()
        return False

    for _ in range(PER_PROCESS):
        woke[0] = limiter.clock()
        assert limiter.acquire(wait)
        grants.append((woke[0], limiter.clock()))
    out.put(grants)


def test_two_processes_share_one_budget() -> None:
    ctx = mp.get_context("spawn")
    limiter = SharedRateLimiter(RATE_PER_S, 1.0, burst=BURST, ctx=ctx)
    barrier, out = ctx.Barrier(2), ctx.Queue()
    children = [ctx.Process(target=_hammer, args=(limiter, barrier, out)) for _ in range(2)]
    for child in children:
        child.start()
    try:
        grants = [g for _ in children for g in out.get(timeout=120)]
    finally:
        for child in children:
            child.join(timeout=60)
    assert [child.exitcode for child in children] == [0, 0]
    assert len(grants) == 2 * PER_PROCESS
    # Count only grants whose whole interval lies inside the window: they certainly count,
    # however late a child was scheduled. Two independent budgets would put about twice the
    # allowance in these windows.
    for span in (0.25, 0.5, 1.0):
        for start, _ in grants:
            inside = sum(1 for woke, done in grants if start <= woke and done <= start + span)
            assert inside <= BURST + RATE_PER_S * span + 1, (span, inside)
