"""The retry budget as a table: (budget, action, facts) -> (budget, decision), one row per
rule, every Action and every limit reached. The backoff's jitter is pinned to its midpoint."""

from __future__ import annotations

import random
from typing import Any

import pytest

from ingest.source.retries import (
    MAX_RATE_LIMITED,
    TOKEN_ATTEMPTS,
    Action,
    Decision,
    Facts,
    RetryBudget,
    Step,
)

PATH = "/api/v1/events"
LIMITED = "HTTP 429"
REFUSED = "HTTP 403 INVALID_STREAM_TOKEN"
EXPIRED = "HTTP 400 CURSOR_EXPIRED"
FRESH_TOKEN_REFUSED = f"{PATH}: a fresh stream token was refused too ({REFUSED})"
CURSOR_KEEPS_EXPIRING = f"{PATH}: the cursor keeps expiring ({EXPIRED}); is the clock right?"
QUERY_LANE_REFUSED = f"{PATH} with the key in the query string: HTTP 401 UNAUTHORIZED"
NOT_FOUND = f"{PATH}: HTTP 404 ENDPOINT_NOT_FOUND, not found (check --api-url)"


class MidRng:
    """uniform() returns the midpoint: backoff without jitter."""

    def uniform(self, a: float, b: float) -> float:
        return (a + b) / 2


def facts(described: str = "HTTP 503", **values: Any) -> Facts:
    return Facts(path=PATH, described=described, **values)


def budget(max_attempts: int = 4, **counts: int) -> RetryBudget:
    return RetryBudget(max_attempts, **counts)


def back_off(wait: float, attempt: int, limit: int = 4) -> Decision:
    return Decision(Step.BACK_OFF, wait, attempt, limit, "transient fault")


def slow_down(wait: float, attempt: int) -> Decision:
    return Decision(Step.SLOW_DOWN, wait, attempt, None, "rate limited")


def renew(attempt: int) -> Decision:
    return Decision(Step.RENEW_TOKEN, 0.0, attempt, None, "stream token refused, renewing it")


def give_up(why: str) -> Decision:
    return Decision(Step.GIVE_UP, reason=f"{PATH}: {why}")


def fail(message: str) -> Decision:
    return Decision(Step.FAIL, reason=message)


ROWS = [
    # -- pages: nothing spent ------------------------------------------------------------------
    pytest.param(
        budget(faults=2), Action.OK, facts("HTTP 200"),
        budget(faults=2), Decision(Step.RETURN_PAGE),
        id="ok",
    ),
    pytest.param(
        budget(), Action.DRAINED, facts("HTTP 418"),
        budget(), Decision(Step.RETURN_DRAINED),
        id="drained",
    ),
    # -- transient faults: backoff x time unit, Retry-After as a floor, max_attempts -----------
    pytest.param(
        budget(), Action.RETRY, facts(),
        budget(faults=1), back_off(1.0, 1),
        id="fault-first",
    ),
    pytest.param(
        budget(faults=2), Action.RETRY, facts(),
        budget(faults=3), back_off(4.0, 3),
        id="fault-doubles",
    ),
    pytest.param(
        budget(max_attempts=10, faults=6), Action.RETRY, facts(),
        budget(max_attempts=10, faults=7), back_off(30.0, 7, limit=10),
        id="fault-backoff-capped",
    ),
    pytest.param(
        budget(), Action.RETRY, facts(unit=0.01),
        budget(faults=1), back_off(0.01, 1),
        id="fault-time-unit",
    ),
    pytest.param(
        budget(), Action.RETRY, facts(told=6.0),
        budget(faults=1), back_off(6.0, 1),
        id="fault-retry-after-longer",
    ),
    pytest.param(
        budget(faults=1), Action.RETRY, facts(told=0.5),
        budget(faults=2), back_off(2.0, 2),
        id="fault-retry-after-shorter",
    ),
    pytest.param(
        budget(faults=3), Action.RETRY, facts(),
        budget(faults=4), give_up("gave up after 4 attempts; last: HTTP 503"),
        id="fault-max-attempts",
    ),
    pytest.param(
        budget(max_attempts=1), Action.RETRY, facts(),
        budget(max_attempts=1, faults=1), give_up("gave up after 1 attempts; last: HTTP 503"),
        id="fault-single-attempt",
    ),
    pytest.param(
        budget(rate_limited=9, token_refusals=1, cursor_expiries=1), Action.RETRY, facts(),
        budget(faults=1, rate_limited=9, token_refusals=1, cursor_expiries=1), back_off(1.0, 1),
        id="fault-own-allowance",
    ),
    # -- 429: as told, else 10 s more per 429; the repeated-429 floor; MAX_RATE_LIMITED --------
    pytest.param(
        budget(), Action.WAIT, facts(LIMITED),
        budget(rate_limited=1), slow_down(10.0, 1),
        id="429-silent",
    ),
    pytest.param(
        budget(rate_limited=1), Action.WAIT, facts(LIMITED),
        budget(rate_limited=2), slow_down(20.0, 2),
        id="429-silent-second",
    ),
    pytest.param(
        budget(rate_limited=3), Action.WAIT, facts(LIMITED),
        budget(rate_limited=4), slow_down(30.0, 4),
        id="429-silent-capped",
    ),
    pytest.param(
        budget(), Action.WAIT, facts(LIMITED, unit=0.01),
        budget(rate_limited=1), slow_down(0.1, 1),
        id="429-silent-time-unit",
    ),
    pytest.param(
        budget(), Action.WAIT, facts(LIMITED, told=2.5),
        budget(rate_limited=1), slow_down(2.5, 1),
        id="429-told",
    ),
    pytest.param(
        budget(rate_limited=2), Action.WAIT, facts(LIMITED, told=0.0),
        budget(rate_limited=3), slow_down(1.0, 3),
        id="429-told-zero-meets-the-floor",
    ),
    pytest.param(
        budget(rate_limited=1), Action.WAIT, facts(LIMITED, told=0.0, unit=0.01),
        budget(rate_limited=2), slow_down(0.005, 2),
        id="429-floor-time-unit",
    ),
    pytest.param(
        budget(rate_limited=2), Action.WAIT, facts(LIMITED, told=7.0),
        budget(rate_limited=3), slow_down(7.0, 3),
        id="429-told-above-the-floor",
    ),
    pytest.param(
        budget(rate_limited=MAX_RATE_LIMITED - 1), Action.WAIT, facts(LIMITED, told=0.0),
        budget(rate_limited=MAX_RATE_LIMITED), slow_down(30.0, MAX_RATE_LIMITED),
        id="429-last-allowed",
    ),
    pytest.param(
        budget(rate_limited=MAX_RATE_LIMITED), Action.WAIT, facts(LIMITED, told=0.0),
        budget(rate_limited=MAX_RATE_LIMITED + 1), give_up(f"still rate limited after {MAX_RATE_LIMITED} waits"),
        id="429-max",
    ),
    pytest.param(
        budget(faults=3), Action.WAIT, facts(LIMITED, told=1.0),
        budget(faults=3, rate_limited=1), slow_down(1.0, 1),
        id="429-own-allowance",
    ),
    # -- refused token: renew; a renewed one refused unexpired is fatal; TOKEN_ATTEMPTS --------
    pytest.param(
        budget(), Action.REFRESH_TOKEN, facts(REFUSED),
        budget(token_refusals=1), renew(1),
        id="token-first",
    ),
    pytest.param(
        budget(token_refusals=1), Action.REFRESH_TOKEN, facts(REFUSED, token_on_probation=True),
        budget(token_refusals=2), fail(FRESH_TOKEN_REFUSED),
        id="token-renewed-one-refused",
    ),
    pytest.param(
        budget(token_refusals=1), Action.REFRESH_TOKEN, facts(REFUSED, token_on_probation=True, token_expired=True),
        budget(token_refusals=2), renew(2),
        id="token-renewed-one-expired-in-flight",
    ),
    pytest.param(
        budget(token_refusals=TOKEN_ATTEMPTS - 1), Action.REFRESH_TOKEN, facts(REFUSED, token_expired=True),
        budget(token_refusals=TOKEN_ATTEMPTS), renew(TOKEN_ATTEMPTS),
        id="token-last-allowed",
    ),
    pytest.param(
        budget(token_refusals=TOKEN_ATTEMPTS), Action.REFRESH_TOKEN, facts(REFUSED, token_expired=True),
        budget(token_refusals=TOKEN_ATTEMPTS + 1), fail(FRESH_TOKEN_REFUSED),
        id="token-max",
    ),
    # -- expired cursor: refresh, then re-position, then fatal ---------------------------------
    pytest.param(
        budget(), Action.REFRESH_CURSOR, facts(EXPIRED),
        budget(cursor_expiries=1), Decision(Step.REFRESH_CURSOR, 0.0, 1, 2, "cursor expired, refreshing"),
        id="cursor-first",
    ),
    pytest.param(
        budget(cursor_expiries=1), Action.REFRESH_CURSOR, facts(EXPIRED),
        budget(cursor_expiries=2), Decision(Step.REPOSITION_CURSOR, 0.0, 2, 2, "cursor expired, re-positioning"),
        id="cursor-second",
    ),
    pytest.param(
        budget(cursor_expiries=2), Action.REFRESH_CURSOR, facts(EXPIRED),
        budget(cursor_expiries=3), fail(CURSOR_KEEPS_EXPIRING),
        id="cursor-max",
    ),
    pytest.param(
        budget(), Action.REFRESH_CURSOR, facts(EXPIRED, cursor_readable=False),
        budget(cursor_expiries=1), fail(CURSOR_KEEPS_EXPIRING),
        id="cursor-unreadable",
    ),
    # -- endings with nothing to count ---------------------------------------------------------
    pytest.param(
        budget(), Action.UNAVAILABLE, facts("HTTP 401 UNAUTHORIZED"),
        budget(), Decision(Step.UNAVAILABLE, reason=QUERY_LANE_REFUSED),
        id="unavailable",
    ),
    pytest.param(
        budget(faults=1), Action.FAIL, facts("HTTP 404 ENDPOINT_NOT_FOUND", refusal=NOT_FOUND),
        budget(faults=1), fail(NOT_FOUND),
        id="fail",
    ),
]


@pytest.mark.parametrize(("before", "action", "seen", "after", "decision"), ROWS)
def test_retry_budget(before: RetryBudget, action: Action, seen: Facts, after: RetryBudget, decision: Decision) -> None:
    assert before.after(action, seen, MidRng()) == (after, decision)


def test_every_action_has_a_row() -> None:
    assert {row.values[1] for row in ROWS} == set(Action)


def test_a_page_of_faults_spends_max_attempts_requests_with_growing_waits() -> None:
    spent, waits = budget(), []
    while True:
        spent, decision = spent.after(Action.RETRY, facts(), MidRng())
        if decision.step is not Step.BACK_OFF:
            break
        waits.append(decision.wait)
    assert decision.step is Step.GIVE_UP and spent.faults == 4
    assert waits == [1.0, 2.0, 4.0]


@pytest.mark.parametrize(
    ("action", "seen", "low", "high"),
    [(Action.RETRY, facts(), 0.8, 1.2), (Action.WAIT, facts("HTTP 429"), 9.0, 11.0)],
)
def test_backoffs_are_spread_by_the_rng(action: Action, seen: Facts, low: float, high: float) -> None:
    rng = random.Random(5)
    waits = {budget().after(action, seen, rng)[1].wait for _ in range(50)}
    assert all(low <= wait <= high for wait in waits) and len(waits) > 40

