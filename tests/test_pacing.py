"""Pacing logic on a fake clock, the shared shell, and spawned processes and threads on one budget."""

from __future__ import annotations

import multiprocessing as mp
import random
import threading
import time
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any

import pytest

from ingest.source.pacing import (
    DECREASE,
    RESET_MARGIN_SHARE,
    PaceParams,
    PaceState,
    SharedRateLimiter,
    floor_rate,
    full_rate,
    initial_state,
    learn,
    make_params,
    observe,
    penalise,
    recover,
    recovery_rate,
    reset_margin_share,
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
    assert state.rate == pytest.approx(floor_rate(state)) == pytest.approx(0.25)


def test_rate_recovers_additively_up_to_the_configured_rate() -> None:
    params = make_params(60, 60, burst=1)
    state = penalise(initial_state(params, 0.0), params, 0.0, 0.0)
    cut = state.rate
    later = recover(state, 60.0)
    assert recovery_rate(state) == pytest.approx(0.1 / 60)  # a tenth of the full rate per window
    assert later.rate == pytest.approx(cut + recovery_rate(state) * 60.0)
    assert cut < later.rate < full_rate(state) == 1.0
    assert recover(state, 10_000.0).rate == pytest.approx(1.0)


def test_no_recovery_while_blocked() -> None:
    params = make_params(60, 60, burst=1)
    state = penalise(initial_state(params, 0.0), params, 0.0, 30.0)
    assert recover(state, 30.0).rate == pytest.approx(state.rate)
    assert recover(state, 40.0).rate == pytest.approx(state.rate + recovery_rate(state) * 10.0)


@pytest.mark.parametrize(
    ("sent", "answered", "reset", "free_at"),
    [
        (0.0, 0.1, 12.5, 12.5 + 0.002 * 60),  # a quick answer
        (0.0, 4.0, 12.5, 12.5 + 0.002 * 60),  # a 4 s page: the reset counts from the arrival, not the answer
        (2.0, 2.5, 3.0, 5.0 + 0.02 * 60),  # sent later in the window; whole seconds, maybe rounded down
    ],
)
def test_observe_exhausted_blocks_until_the_reset_after_the_request_went_out(
    sent: float, answered: float, reset: float, free_at: float
) -> None:
    params = make_params(600, 60, burst=1)
    state = observe(initial_state(params, 0.0), sent=sent, remaining=0, reset_s=reset)
    _, delay = try_acquire(state, params, answered)
    assert answered + delay == pytest.approx(free_at)


@pytest.mark.parametrize(
    ("reset", "share"),
    [
        (51.0, 0.02),  # the real API: a relative integer, maybe rounded down
        (0.0, 0.02),
        (12.851, 0.002),  # a scaled simulator: ms, exact
        (0.85, 0.002),
    ],
)
def test_a_reset_is_waited_out_by_its_precision(reset: float, share: float) -> None:
    assert reset_margin_share(reset) == share
    assert RESET_MARGIN_SHARE["whole seconds"] * 60 >= 1.0  # covers a second rounded down


def test_observe_spreads_remaining_over_reset_from_the_request_start() -> None:
    params = make_params(600, 60, burst=1)  # 10/s: the headers are the slower of the two
    state, _ = try_acquire(initial_state(params, 0.0), params, 0.0)  # the request starts at 0
    state = observe(state, sent=0.0, remaining=3, reset_s=8.0)  # its response comes at 1.5
    _, delay = try_acquire(state, params, 1.5)
    assert delay == pytest.approx(0.5)  # 3 more then the reset: gaps of 8 / 4 = 2 s from 0


def test_observe_never_speeds_up_beyond_the_rate() -> None:
    params = make_params(6, 60, burst=1)  # one per 10 s
    state = initial_state(params, 0.0)
    state, _ = try_acquire(state, params, 0.0)
    state = observe(state, sent=0.0, remaining=9, reset_s=9.0)  # headers would allow 1 s
    _, delay = try_acquire(state, params, 1.0)
    assert delay == pytest.approx(9.0)


@pytest.mark.parametrize(("remaining", "reset"), [(None, 10.0), (3, None), (3, float("nan"))])
def test_observe_without_headers_changes_nothing(remaining: int | None, reset: float | None) -> None:
    params = make_params(60, 60, burst=1)
    state = initial_state(params, 0.0)
    assert observe(state, 0.0, remaining, reset) == state


# -- learning the budget: the window and the count the API shows -------------------------------

NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(
    ("learns_window", "learns_count", "readings", "expected"),
    [
        # (window, count) readings in order -> (window, per_window, window_learnt)
        (True, True, [], (60.0, 10.0, False)),
        (True, True, [(15.0, None)], (15.0, 10.0, True)),  # the first reading replaces the configured window
        (True, True, [(14.5, None), (15.0, None), (14.8, None)], (15.0, 10.0, True)),  # readings are lower bounds
        (True, True, [(None, 12.0), (None, 8.0)], (60.0, 8.0, False)),  # X-RateLimit-Limit is exact: the latest wins
        (True, True, [(15.0, 40.0)], (15.0, 40.0, True)),
        (False, True, [(15.0, 12.0)], (60.0, 12.0, False)),  # the user's --rate-window stands
        (True, False, [(15.0, 12.0)], (15.0, 10.0, True)),  # the user's count stands
        (True, True, [(NAN, NAN), (0.0, 0.0), (-3.0, -3.0), (INF, INF), (None, 0.5)], (60.0, 10.0, False)),
    ],
)
def test_learn_takes_what_the_user_left_unset(learns_window: bool, learns_count: bool,
                                               readings: list[tuple[float | None, float | None]],
                                               expected: tuple[float, float, bool]) -> None:
    params = make_params(10, 60, learns_window=learns_window, learns_count=learns_count)
    state = initial_state(params, 0.0)
    for window, count in readings:
        state = learn(state, params, 1.0, window, count)
    assert (state.window, state.per_window, state.window_learnt) == expected
    assert full_rate(state) == pytest.approx(expected[1] / expected[0])


def test_learning_respaces_what_was_paced_at_the_configured_window() -> None:
    """10 per 60 s paced the first request (the next due at 6 s); half a second later the
    API shows a 15 s window (time scale 4): the 5.5 s still owed at the old pace are owed
    at the new one, a quarter as long, and then a request every 1.5 s, not 6 s."""
    params = make_params(10, 60, learns_window=True)
    times, state = grant_times(initial_state(params, 0.0), params, 1)
    state = learn(state, params, 0.5, window_s=15.0)
    times, _ = grant_times(state, params, 4, start=0.5)
    assert times == pytest.approx([0.5 + 5.5 / 4, 3.375, 4.875, 6.375])


def test_learning_keeps_a_penalty_s_share_and_block() -> None:
    params = make_params(10, 60, learns_window=True)
    state = penalise(initial_state(params, 0.0), params, 0.0, 20.0)
    assert state.rate == pytest.approx(10 / 60 * DECREASE)
    state = learn(state, params, 1.0, window_s=15.0)
    assert state.rate == pytest.approx(10 / 15 * DECREASE)  # still cut to 80 %, of the new full rate
    assert state.blocked_until == pytest.approx(20.0)  # a server-dictated wait is not rescaled


@pytest.mark.parametrize("window", [15.0, 6.0, 0.3])
def test_never_more_than_burst_plus_rate_in_any_span_once_learnt(window: float) -> None:
    params = make_params(10, 60, burst=2, learns_window=True)
    state, now, times = initial_state(params, 0.0), 0.0, []
    rng = random.Random(2)
    learnt_at = 0.0
    while now < 60 + 5 * window:
        if not state.window_learnt and now >= 30.0:  # half a nominal window in, the API shows its own
            state, learnt_at = learn(state, params, now, window_s=window), now
        state, delay = try_acquire(state, params, now)
        if delay == 0.0:
            times.append(now)
        now += rng.uniform(0, delay + 0.01 * window)
    after = [t for t in times if t >= learnt_at]
    assert max_in_window(after, window) <= 2 + 10 + 1  # burst + count, +1 for the request paced before


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
    limiter.observe(clock.now - 1.0, 0, 5.0)  # sent a second ago
    assert limiter.acquire(clock.wait)
    assert clock.now == pytest.approx(66.0 + RESET_MARGIN_SHARE["whole seconds"] * 60)


def test_shared_limiter_learns_and_says_what_changed() -> None:
    clock = FakeClock()
    limiter = SharedRateLimiter(10, 60, burst=1, clock=clock, learns_window=True, learns_count=True)
    assert limiter.acquire(clock.wait)
    assert limiter.learnt_window() is None
    before, after = limiter.learn(window_s=15.0)
    assert (before.window, after.window, after.window_learnt) == (60.0, 15.0, True)
    assert limiter.learnt_window() == 15.0
    assert limiter.learn(window_s=14.0)[1] == after  # a shorter reading changes nothing
    assert limiter.acquire(clock.wait)
    assert clock.waits == pytest.approx([1.5])
    limiter.learn(count=20.0)
    assert limiter.snapshot().per_window == 20.0 and full_rate(limiter.snapshot()) == pytest.approx(20 / 15)


def test_a_limiter_with_the_users_window_learns_none() -> None:
    clock = FakeClock()
    limiter = SharedRateLimiter(10, 60, clock=clock)
    limiter.learn(window_s=15.0, count=40.0)
    state = limiter.snapshot()
    assert (state.window, state.per_window, state.window_learnt) == (60.0, 10.0, False)
    assert limiter.learnt_window() is None


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


def _learn_window(limiter: SharedRateLimiter, window_s: float) -> None:
    """Child: what a fetcher does when an answer shows the window."""
    limiter.learn(window_s=window_s)


def test_a_window_one_process_learns_paces_every_process_and_thread() -> None:
    """The parent paced a request at the nominal 60 s window (10 per window: the next one
    6 s later). A spawned child learns a 0.6 s window: the parent's threads, sharing the
    limiter, then go at 0.06 s intervals, not 6 s."""
    ctx = mp.get_context("spawn")
    limiter = SharedRateLimiter(10, 60, burst=1, ctx=ctx, learns_window=True)
    assert limiter.acquire(lambda seconds: False)
    child = ctx.Process(target=_learn_window, args=(limiter, 0.6))
    child.start()
    child.join(timeout=120)
    assert child.exitcode == 0
    state = limiter.snapshot()
    assert (state.window, state.window_learnt) == (0.6, True)
    waited: list[float] = []

    def wait(seconds: float) -> bool:
        waited.append(seconds)
        time.sleep(seconds)
        return False

    threads = [threading.Thread(target=lambda: [limiter.acquire(wait) for _ in range(3)]) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert max(waited) < 1.0, "paced at the learnt window: one wait at the nominal one would be about 6 s"
    assert limiter.snapshot().tat > state.tat
