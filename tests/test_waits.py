"""The program's one backoff formula and its interruptible wait, on a fake clock."""

from __future__ import annotations

import random

import pytest

from ingest.waits import backoff, wait_until


class MidRng:
    """uniform() returns the midpoint: backoff without jitter."""

    def uniform(self, a: float, b: float) -> float:
        return (a + b) / 2


def test_backoff_doubles_up_to_the_cap() -> None:
    assert [backoff(n, rng=MidRng()) for n in range(1, 8)] == [1, 2, 4, 8, 16, 30, 30]
    assert backoff(1, base=0.01, cap=0.3, rng=MidRng()) == pytest.approx(0.01)
    assert backoff(10_000, rng=MidRng()) == 30


def test_backoff_jitter_stays_in_bounds() -> None:
    rng = random.Random(3)
    values = [backoff(3, jitter=0.2, rng=rng) for _ in range(200)]
    assert all(3.2 <= v <= 4.8 for v in values)
    assert len(set(values)) > 100


class FakeClock:
    """`nap` advances the clock by what it is asked for and records it."""

    def __init__(self) -> None:
        self.now = 100.0
        self.naps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def nap(self, seconds: float) -> None:
        self.naps.append(seconds)
        self.now += seconds


def test_wait_until_naps_in_steps_up_to_the_deadline() -> None:
    clock = FakeClock()
    assert wait_until(100.625, lambda: False, clock, clock.nap, step=0.25) is False
    assert clock.naps == [0.25, 0.25, 0.125]


def test_wait_until_notices_a_stop_within_one_step() -> None:
    clock = FakeClock()
    assert wait_until(160.0, lambda: len(clock.naps) >= 2, clock, clock.nap, step=0.25) is True
    assert clock.naps == [0.25, 0.25]


def test_wait_until_a_past_deadline_does_not_nap() -> None:
    clock = FakeClock()
    assert wait_until(99.0, lambda: False, clock, clock.nap) is False
    assert clock.naps == []
