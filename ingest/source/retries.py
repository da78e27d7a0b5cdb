"""What one page may still spend on trouble, and what the client does next: a pure budget.

In the spirit of urllib3's `Retry`: `ApiClient.fetch_page` sends, reduces the outcome to an
`Action` (`ingest.source.api.classify`) and a few plain `Facts`, and asks its `RetryBudget`
what to do; it gets back a new budget and a `Decision`, and only carries the decision out.
Every limit and every wait's arithmetic lives here, free of I/O, so that one table test can
walk each action up to each limit without a server, a clock or a sleep.

Each kind of trouble has an allowance of its own: a page may meet 429s, a refused token and
a cut body on the way, and a burst of one must not use up the patience meant for another.
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass, replace
from typing import Any

from ingest.waits import backoff


class Action(enum.Enum):
    OK = "ok"
    RETRY = "retry"  # transient fault: back off, same request
    WAIT = "wait"  # 429: wait as told, slow the shared pace
    REFRESH_TOKEN = "refresh-token"  # stream token refused: get a new one, same request
    REFRESH_CURSOR = "refresh-cursor"  # cursor expired: rewrite exp, then re-position
    DRAINED = "drained"  # 418 for a cursor older than the data: nothing more to fetch
    UNAVAILABLE = "unavailable"  # a lane refused to this key (no feed token, no query-string key)
    FAIL = "fail"  # terminal


# Stream-access tries before the feed is declared unavailable; also the most token refusals
# one page survives, each answered by a renewal.
TOKEN_ATTEMPTS = 5
RETRY_BASE_S, RETRY_CAP_S = 1.0, 30.0  # backoff for transient faults (x time unit)
RATE_LIMITED_BASE_S, RATE_LIMITED_CAP_S = 10.0, 30.0  # silent 429: 10, 20, 30 s (x time unit)
RATE_LIMITED_JITTER = 0.1  # a silent 429's wait is nearly the spec's: only a small spread
MAX_RATE_LIMITED = 50  # 429s within one page before giving up: a safety net only


def repeated_429_floor(consecutive: int) -> float:
    """The least wait after the n-th 429 in a row, whatever Retry-After says: a Retry-After
    the server keeps contradicting (0, or too short to help) is no promise. None for the
    first, then 0.5 s doubling to RATE_LIMITED_CAP_S (before the time unit)."""
    return 0.0 if consecutive <= 1 else min(RATE_LIMITED_CAP_S, 0.5 * 2 ** (consecutive - 2))


class Step(enum.Enum):
    """The last three end the page; the client raises ApiError, FatalApiError and
    SourceUnavailable for them, which its callers tell apart (restart, stop, change lane)."""

    RETURN_PAGE = "return-page"
    RETURN_DRAINED = "return-drained"  # an empty last page
    BACK_OFF = "back-off"  # wait, then resend
    SLOW_DOWN = "slow-down"  # a 429: every process on the lane holds back (an unpaced client just waits)
    RENEW_TOKEN = "renew-token"  # then resend
    REFRESH_CURSOR = "refresh-cursor"  # the same position with a new `exp`, then resend
    REPOSITION_CURSOR = "reposition-cursor"  # a cursor forged just above its `ts`, then resend
    GIVE_UP = "give-up"  # the allowance is spent; a restart may help
    FAIL = "fail"  # retrying cannot help
    UNAVAILABLE = "unavailable"  # the lane is refused to this key: another lane takes over


# The revivals of an expired cursor, in order: each is more drastic than the one before
# (a re-positioned cursor may repeat a few events), and after the last the clock is suspect.
CURSOR_REVIVALS = ((Step.REFRESH_CURSOR, "refreshing"), (Step.REPOSITION_CURSOR, "re-positioning"))


@dataclass(frozen=True)
class Decision:
    step: Step
    wait: float = 0.0  # seconds before the request goes again
    attempt: int = 0  # which trouble of its kind this is, for the log line
    limit: int | None = None  # how many of its kind are allowed, when the log line names it
    reason: str = ""  # logged with a resend; the error's message when the page ends


@dataclass(frozen=True)
class Facts:
    """What the budget needs to know about one outcome besides its Action. The client reads
    them off itself and the response, so the budget never touches a clock, a header or a
    secret."""

    path: str  # the endpoint, for messages (never the query: it may hold the key)
    described: str  # the outcome, secret-free (`Outcome.describe`)
    refusal: str = ""  # a terminal refusal worded for the operator, already scrubbed of secrets
    told: float | None = None  # the wait the server dictated, already bounded
    unit: float = 1.0  # real seconds per nominal second (`ApiClient.time_unit`)
    token_expired: bool = False  # the refused token had outlived its lifetime by now
    token_on_probation: bool = False  # the refused token replaced a refused one, never accepted since
    cursor_readable: bool = True  # the sent cursor decodes to a position that can be revived


@dataclass(frozen=True)
class RetryBudget:
    """The troubles one page has met so far, by kind, and the one limit the config sets."""

    max_attempts: int  # requests one page may spend on transient faults, the last one included
    faults: int = 0
    rate_limited: int = 0
    token_refusals: int = 0
    cursor_expiries: int = 0

    def after(self, action: Action, facts: Facts, rng: Any = random) -> tuple[RetryBudget, Decision]:
        """The budget left once `action` is counted, and what to do about it. `rng` spreads
        the backoffs (so that workers do not retry in lockstep); tests pass a fixed one."""
        match action:
            case Action.OK:
                return self, Decision(Step.RETURN_PAGE)
            case Action.DRAINED:
                return self, Decision(Step.RETURN_DRAINED)
            case Action.RETRY:
                return self._after_fault(facts, rng)
            case Action.WAIT:
                return self._after_rate_limit(facts, rng)
            case Action.REFRESH_TOKEN:
                return self._after_token_refusal(facts)
            case Action.REFRESH_CURSOR:
                return self._after_cursor_expiry(facts)
            case Action.UNAVAILABLE:  # inside a page, only the query-string lane is refused
                reason = f"{facts.path} with the key in the query string: {facts.described}"
                return self, Decision(Step.UNAVAILABLE, reason=reason)
            case _:
                return self, Decision(Step.FAIL, reason=facts.refusal)

    def _after_fault(self, facts: Facts, rng: Any) -> tuple[RetryBudget, Decision]:
        spent = replace(self, faults=self.faults + 1)
        if spent.faults >= self.max_attempts:
            reason = f"{facts.path}: gave up after {spent.faults} attempts; last: {facts.described}"
            return spent, Decision(Step.GIVE_UP, reason=reason)
        wait = backoff(spent.faults, RETRY_BASE_S * facts.unit, RETRY_CAP_S * facts.unit, rng=rng)
        wait = max(wait, facts.told or 0.0)
        return spent, Decision(Step.BACK_OFF, wait, spent.faults, self.max_attempts, "transient fault")

    def _after_rate_limit(self, facts: Facts, rng: Any) -> tuple[RetryBudget, Decision]:
        spent = replace(self, rate_limited=self.rate_limited + 1)
        count = spent.rate_limited
        if count > MAX_RATE_LIMITED:
            reason = f"{facts.path}: still rate limited after {MAX_RATE_LIMITED} waits"
            return spent, Decision(Step.GIVE_UP, reason=reason)
        if facts.told is not None:
            wait = facts.told
        else:  # the feed's silent 429: the spec's 10 s more per 429
            fallback = min(RATE_LIMITED_CAP_S, RATE_LIMITED_BASE_S * count) * facts.unit
            wait = backoff(1, fallback, RATE_LIMITED_CAP_S * facts.unit, RATE_LIMITED_JITTER, rng)
        wait = max(wait, repeated_429_floor(count) * facts.unit)
        return spent, Decision(Step.SLOW_DOWN, wait, count, None, "rate limited")

    def _after_token_refusal(self, facts: Facts) -> tuple[RetryBudget, Decision]:
        spent = replace(self, token_refusals=self.token_refusals + 1)
        # A renewed token refused again means something other than expiry is wrong, unless it
        # ran out while the request was in flight (a stall, the adapter's own retries).
        refused_fresh = facts.token_on_probation and not facts.token_expired
        if refused_fresh or spent.token_refusals > TOKEN_ATTEMPTS:
            reason = f"{facts.path}: a fresh stream token was refused too ({facts.described})"
            return spent, Decision(Step.FAIL, reason=reason)
        return spent, Decision(Step.RENEW_TOKEN, 0.0, spent.token_refusals, None, "stream token refused, renewing it")

    def _after_cursor_expiry(self, facts: Facts) -> tuple[RetryBudget, Decision]:
        """CURSOR_EXPIRED although the client pushes `exp` forward before sending: clock skew or
        a long stall. Each revival is tried once."""
        spent = replace(self, cursor_expiries=self.cursor_expiries + 1)
        count = spent.cursor_expiries
        if not facts.cursor_readable or count > len(CURSOR_REVIVALS):
            reason = f"{facts.path}: the cursor keeps expiring ({facts.described}); is the clock right?"
            return spent, Decision(Step.FAIL, reason=reason)
        step, doing = CURSOR_REVIVALS[count - 1]
        return spent, Decision(step, 0.0, count, len(CURSOR_REVIVALS), f"cursor expired, {doing}")
