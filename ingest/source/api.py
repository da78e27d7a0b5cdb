"""The DataSync API client: one page at a time, paced, retried, never partial.

Layers, from the wire up:

1. A persistent `requests.Session` (keep-alive, gzip) whose adapter carries a urllib3
   `Retry` for what the transport can see: connection failures and 500/502/503/504, retried
   a couple of times with short waits. 429 is deliberately left out: it is a pacing signal
   that the shared limiter must hear about.
2. `fetch_page` retries around request + body read + JSON parse, for what urllib3 cannot see
   (bodies cut mid-stream, resets mid-body, truncated or invalid JSON, empty 200s).
3. Every outcome (status, error code, exception) goes through one table, `classify`, to an
   `Action`, which a `RetryBudget` (`ingest.source.retries`) turns into the next `Step`; the
   loop only carries the steps out. Terminal outcomes raise `FatalApiError`, exhausted
   transient ones `ApiError`, a refused stream token `SourceUnavailable`, a shutdown during
   any wait `Stopped`.

Secrets: the key travels only in headers, never in a URL; messages and log lines name the
path, never the query; every stream token is registered with `ingest.logs.add_secrets`, and
server-provided text is scrubbed of the key and token before it is quoted.

Time: durations from the server are decimal seconds and deadlines come from the cursor's
`exp` and the token's `expiresIn`, so the client runs unchanged against a simulator whose
clock runs S times faster. Waits the server does not dictate (backoff, the feed's silent 429)
are scaled by `time_unit`, learnt from the token and cursor lifetimes and the rate-limit
resets the server reports; unless the user gave `--rate-window`, the shared limiters pace by
a window of 60 s x that unit, so what one process learns paces them all.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from functools import partial
from typing import Any
from urllib.parse import urlsplit

import requests
import urllib3
from loguru import logger
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from ingest.config import Config
from ingest.logs import add_secrets, redact
from ingest.source.cursors import (
    CURSOR_TTL_MS,
    cursor_expiring,
    decode_cursor,
    position_cursor,
    refresh_cursor,
)
from ingest.source.lanes import LANES, Lane, lane_rates
from ingest.source.normalise import RawEvents, decode_json, decode_page
from ingest.source.pacing import NOMINAL_WINDOW_S, SharedRateLimiter, retry_after_seconds
from ingest.source.retries import TOKEN_ATTEMPTS, Action, Facts, RetryBudget, Step
from ingest.waits import backoff, wait_until

API_SUFFIX = "/api/v1"
FEED_PATH = "/api/v1/events/d4ta/x7k9/feed"  # fallback when stream-access names none
STREAM_ACCESS_PATH = "/internal/dashboard/stream-access"
TOKEN_HEADER = "X-Stream-Token"
BROWSER_UA = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0 Safari/537.36"

# Nominal lifetimes of the real service; what the server reports divided by these is the
# simulator's time unit (1 on the real service).
NOMINAL_TOKEN_TTL_S = 300.0
NOMINAL_CURSOR_TTL_S = 120.0

CURSOR_MARGIN_S = 10.0  # refresh a cursor expiring sooner than this (x time unit)
TOKEN_REFRESH_SHARE = 0.8  # renew a token once this share of its lifetime has passed
TOKEN_BACKOFF_S = 10.0  # x attempt, when stream-access gives no Retry-After
# A server-dictated wait (Retry-After, X-RateLimit-Reset) longer than this many rate windows
# is cut to it: every budget of the API refills within one window, so a longer value is a
# server bug or a misread epoch, and honouring it would stall the run for hours.
MAX_TOLD_WINDOWS = 1.1
STOP_POLL_S = 0.2  # granularity of the default interruptible sleep

# Transport-level retries (inside the adapter, not interruptible, hence short).
TRANSPORT_RETRIES = 2
TRANSPORT_BACKOFF_FACTOR = 0.1
TRANSPORT_BACKOFF_MAX_S = 2.0
TRANSPORT_RETRY_AFTER_MAX_S = 2


class ApiError(Exception):
    """A page could not be fetched; a restart may help (retries exhausted)."""


class FatalApiError(ApiError):
    """Retrying cannot help (bad key, unknown endpoint, a fresh token refused...)."""


class SourceUnavailable(ApiError):
    """No stream token can be had: `--source auto` falls back to /api/v1/events."""


class Stopped(Exception):
    """Shutdown was requested while waiting."""


class BadBody(Exception):
    """A 2xx response that is not a complete page: truncated, empty, not JSON, wrong shape."""


# How each ending of a page's retry budget reaches the caller.
ENDINGS: dict[Step, type[ApiError]] = {
    Step.GIVE_UP: ApiError,
    Step.FAIL: FatalApiError,
    Step.UNAVAILABLE: SourceUnavailable,
}


# (endpoint, status, code) -> action; None matches anything. Endpoints: "feed", "events",
# "events_query" (/events with the key in the query string), "token" (stream-access). The
# most specific row wins; then the status class decides.
STATUS_ACTIONS: dict[tuple[str | None, int, str | None], Action] = {
    (None, 400, "CURSOR_EXPIRED"): Action.REFRESH_CURSOR,
    # The query-string lane is an optional extra: a key refused there is not refused on
    # the header lane, which takes the partition over.
    ("events_query", 401, None): Action.UNAVAILABLE,
    ("events_query", 403, None): Action.UNAVAILABLE,
    # Any feed 401/403 is taken for a token problem (the spec says so for 401, and asks for a
    # renewal on any 403); a fresh token refused again makes it fatal.
    ("feed", 401, None): Action.REFRESH_TOKEN,
    ("feed", 403, None): Action.REFRESH_TOKEN,
    ("token", 401, None): Action.FAIL,  # the key itself is refused
    ("token", 403, "DASHBOARD_REQUIRED"): Action.UNAVAILABLE,
    (None, 408, None): Action.RETRY,
    (None, 418, None): Action.DRAINED,
    (None, 429, None): Action.WAIT,
    (None, 500, None): Action.RETRY,
    (None, 501, None): Action.FAIL,
    (None, 502, None): Action.RETRY,  # also the load balancer's HTML page
    (None, 503, None): Action.RETRY,
    (None, 504, None): Action.RETRY,
}
CLASS_ACTIONS: dict[tuple[str | None, int], Action] = {
    (None, 2): Action.OK,
    ("token", 4): Action.UNAVAILABLE,  # any other refusal of stream-access: use /events
    (None, 4): Action.FAIL,  # 401, unrecognised 403, 404 ...
    (None, 5): Action.RETRY,
}
# Exceptions by class; the first match along the exception's MRO wins.
EXCEPTION_ACTIONS: dict[type[BaseException], Action] = {
    BadBody: Action.RETRY,
    requests.exceptions.ChunkedEncodingError: Action.RETRY,  # body cut or reset mid-stream
    requests.exceptions.ContentDecodingError: Action.RETRY,  # broken gzip
    requests.exceptions.ConnectionError: Action.RETRY,  # refused, reset, transport retries spent
    requests.exceptions.Timeout: Action.RETRY,
    requests.exceptions.RetryError: Action.RETRY,
    requests.exceptions.RequestException: Action.FAIL,  # invalid URL and the like
}


def classify(
    status: int | None, code: str | None, exc: type[BaseException] | None, endpoint: str = "events"
) -> Action:
    """What to do with one outcome. An exception (transport or body) decides over a status."""
    if exc is not None:
        for klass in exc.__mro__:
            if klass in EXCEPTION_ACTIONS:
                return EXCEPTION_ACTIONS[klass]
        return Action.FAIL
    if status is None:
        return Action.FAIL
    for key in ((endpoint, status, code), (None, status, code), (endpoint, status, None), (None, status, None)):
        if key in STATUS_ACTIONS:
            return STATUS_ACTIONS[key]
    for class_key in ((endpoint, status // 100), (None, status // 100)):
        if class_key in CLASS_ACTIONS:
            return CLASS_ACTIONS[class_key]
    return Action.FAIL


# Hints for terminal statuses, so the operator knows what to fix.
FAIL_HINTS: dict[int, str] = {
    400: "the request was refused as malformed",
    401: "the API key was refused (wrong or expired key?)",
    403: "access refused",
    404: "not found (check --api-url)",
}


@dataclass
class Page:
    events: Sequence[Any]  # a list, or RawEvents for a usual page
    next_cursor: str | None
    has_more: bool
    total: int | None
    nbytes: int
    status: int
    seconds: float = 0.0  # the exchange that brought it, without pacing waits or retries
    limit: int | None = None  # `pagination.limit`: the page size the server granted (after its cap)


@dataclass
class Outcome:
    """One request's result, reduced to what `classify` and the messages need."""

    status: int | None = None
    code: str | None = None
    message: str | None = None
    exc: BaseException | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    body: Any = None  # the decoded JSON, when there is one

    def describe(self) -> str:
        """A short, secret-free description: never str() of a transport error (URLs)."""
        if self.exc is not None:
            detail = f": {self.exc}" if isinstance(self.exc, BadBody) else ""
            status = f"HTTP {self.status} " if self.status is not None else ""
            return f"{status}{type(self.exc).__name__}{detail}"
        return " ".join(part for part in (f"HTTP {self.status}", self.code) if part)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float, Decimal)):
        return None
    return float(value)


def parse_page(body: bytes, status: int) -> tuple[Page, float | None]:
    """A complete page from a 2xx body, plus its `cursorExpiresIn`; BadBody otherwise.

    Pagination is nested (`pagination.hasMore/nextCursor`); the flat shape the public docs
    describe is accepted too. `hasMore` without a cursor is a page all the same: asking
    again cannot mend it, but the walk can go on from its last event (`ingest.source.paging`).
    """
    if not body.strip():
        raise BadBody("empty body")
    try:
        doc = decode_page(body)
    except ValueError:
        raise BadBody(f"invalid JSON ({len(body)} bytes)") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("data"), (list, RawEvents)):
        raise BadBody("not a JSON object with a data list")
    pagination = doc.get("pagination")
    if not isinstance(pagination, dict):
        pagination = doc
    has_more = pagination.get("hasMore")
    next_cursor = pagination.get("nextCursor")
    if not isinstance(has_more, bool):
        raise BadBody("no hasMore flag")
    if next_cursor is not None and not isinstance(next_cursor, str):
        raise BadBody("nextCursor is not a string")
    meta = doc.get("meta")
    total = _number(meta.get("total")) if isinstance(meta, dict) else None
    granted = _number(pagination.get("limit"))
    page = Page(doc["data"], next_cursor, has_more, int(total) if total is not None else None, len(body), status,
                limit=int(granted) if granted is not None and granted >= 1 else None)
    return page, _number(pagination.get("cursorExpiresIn"))


@dataclass
class StreamToken:
    token: str
    header: str
    feed_path: str
    refresh_at: float  # client clock: renew from here on (~80% of the lifetime)
    expires_at: float  # client clock, counted from before the request (conservative)


def parse_stream_access(doc: Any, issued_at: float) -> tuple[StreamToken, float]:
    """The token grant and its lifetime in seconds; the feed path is read from the body,
    the constant is only a fallback."""
    access = doc.get("streamAccess") if isinstance(doc, dict) else None
    if not isinstance(access, dict):
        raise BadBody("no streamAccess object")
    token = access.get("token")
    if not isinstance(token, str) or not token:
        raise BadBody("no token in streamAccess")
    lifetime = _number(access.get("expiresIn"))
    if lifetime is None or lifetime <= 0:
        lifetime = NOMINAL_TOKEN_TTL_S
    endpoint = access.get("endpoint")
    feed_path = endpoint if isinstance(endpoint, str) and endpoint.startswith("/") else FEED_PATH
    header = access.get("tokenHeader")
    header = header if isinstance(header, str) and header.strip() else TOKEN_HEADER
    refresh_at = issued_at + TOKEN_REFRESH_SHARE * lifetime
    return StreamToken(token, header.strip(), feed_path, refresh_at, issued_at + lifetime), lifetime


class TransportRetry(Retry):
    """urllib3 `Retry` that reads decimal Retry-After values (the simulator's time scale
    sends `0.85`; stock urllib3 rejects them) and never retries a 429 by itself."""

    RETRY_AFTER_STATUS_CODES = frozenset({503})

    def parse_retry_after(self, retry_after: str) -> float:
        seconds = retry_after_seconds({"Retry-After": retry_after}, None, time.time())
        return min(float(self.retry_after_max), seconds or 0.0)


def is_loopback(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def wants_gzip(mode: str, api_url: str) -> bool:
    """`--gzip auto` asks for gzip except from an API on this machine: there it saves no
    transfer time, and compressing 1.7 MB pages costs the server and us CPU that the rest
    of the run needs."""
    return mode == "on" or (mode == "auto" and not is_loopback(api_url))


def read_body(response: requests.Response) -> bytes:
    """The whole body in one read, its errors raised as `Response.content` raises them.
    `.content` reads 10 KiB at a time: on a 1.7 MB page that cost ~0.3 µs an event (the
    connection goes back to the pool once the body is read, as it does there)."""
    try:
        body = response.raw.read(decode_content=True)
    except urllib3.exceptions.ProtocolError as exc:  # a cut stream (IncompleteRead), a reset
        raise requests.exceptions.ChunkedEncodingError(exc) from exc
    except urllib3.exceptions.DecodeError as exc:
        raise requests.exceptions.ContentDecodingError(exc) from exc
    except urllib3.exceptions.ReadTimeoutError as exc:
        raise requests.exceptions.ConnectionError(exc) from exc
    except urllib3.exceptions.SSLError as exc:
        raise requests.exceptions.SSLError(exc) from exc
    response._content = body  # .content and .json() as usual
    return body


def make_session(gzip: bool = True) -> requests.Session:
    """One keep-alive session per process: gzip when `gzip` (see `wants_gzip`), transport
    retries, a pool for one fetcher (its page requests plus the occasional stream-access
    call)."""
    retry = TransportRetry(
        total=TRANSPORT_RETRIES + 1,
        connect=TRANSPORT_RETRIES,
        read=TRANSPORT_RETRIES,
        status=TRANSPORT_RETRIES,
        other=0,
        status_forcelist=(500, 502, 503, 504),
        backoff_factor=TRANSPORT_BACKOFF_FACTOR,
        backoff_max=TRANSPORT_BACKOFF_MAX_S,
        retry_after_max=TRANSPORT_RETRY_AFTER_MAX_S,
        raise_on_status=False,
        respect_retry_after_header=True,
    )
    adapter = HTTPAdapter(pool_connections=1, pool_maxsize=2, max_retries=retry)
    session = requests.Session()
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    session.headers.update({"Accept-Encoding": "gzip" if gzip else "identity", "Accept": "application/json"})
    return session


def make_limiters(config: Config, ctx: Any) -> dict[Lane, SharedRateLimiter]:
    """One shared pacer per lane with a budget, created in the parent process (children
    receive them as `Process` arguments); none with `--pacing off`, for a source without
    limits. What the user left unset (`--rate-window`, `--events-rate`) the API's answers
    set: until they do, the real service's 60 s window."""
    if config.pacing == "off":
        return {}
    window = config.rate_window if config.rate_window is not None else NOMINAL_WINDOW_S
    return {
        lane: SharedRateLimiter(rate, window, ctx=ctx, learns_window=config.rate_window is None,
                                learns_count=lane == "events" and config.events_rate is None)
        for lane, rate in lane_rates(config).items()
        if rate > 0
    }


class ApiClient:
    """Fetches pages from the feed or /api/v1/events for one process."""

    def __init__(
        self,
        config: Config,
        limiters: Mapping[Lane, SharedRateLimiter] | None = None,
        should_stop: Callable[[], bool] = lambda: False,
        clock: Callable[[], float] = time.time,
        sleep_until_or_stop: Callable[[float], bool] | None = None,
    ) -> None:
        """`limiters` paces each lane ("feed", "events", "events_query"; see `make_limiters`),
        shared with the other processes; a lane without one is not paced.
        `clock` gives epoch seconds (cursor `exp` and token deadlines are compared with it);
        `sleep_until_or_stop(deadline)` sleeps until that clock reaches `deadline` and returns
        True, early, if a shutdown was requested (by default `ingest.waits.wait_until`, which
        looks at `should_stop` every STOP_POLL_S)."""
        self.config = config
        self.session = make_session(wants_gzip(config.gzip, config.api_url))
        self._limiters = dict(limiters or {})
        self._should_stop = should_stop
        self._clock = clock
        self._sleep_until_or_stop: Callable[[float], bool] = sleep_until_or_stop or partial(
            wait_until, should_stop=should_stop, clock=clock, step=STOP_POLL_S
        )
        parts = urlsplit(config.api_url)
        self._origin = f"{parts.scheme}://{parts.netloc}"
        api_url = config.api_url.rstrip("/")
        self._api_url = api_url
        self._root = api_url[: -len(API_SUFFIX)] if api_url.endswith(API_SUFFIX) else self._origin
        self._token: StreamToken | None = None
        # Set when the current token replaced a refused one and has not been accepted yet:
        # if the server refuses it too, something other than expiry is wrong.
        self._token_on_probation = False
        self._unit: float | None = None
        self._counts_shown: dict[Lane, int] = {}  # X-RateLimit-Limit per lane, as last handed to its limiter
        self.stats: dict[str, int] = dict.fromkeys(
            ("requests", "retries", "http_429", "http_5xx", "truncated", "token_refreshes", "cursor_refreshes", "bytes"),
            0,
        )

    def close(self) -> None:
        """Release the pooled connections (the session is not used afterwards)."""
        self.session.close()

    # -- waiting ------------------------------------------------------------------------

    def _wait(self, seconds: float) -> bool:
        """Interruptible sleep; True when a shutdown was requested (the limiter's contract)."""
        return self._sleep_until_or_stop(self._clock() + max(0.0, seconds))

    def _wait_or_stop(self, seconds: float) -> None:
        if self._wait(seconds):
            raise Stopped()

    @property
    def time_unit(self) -> float:
        """Real seconds per nominal second: 1 on the real service, 1/S on a simulator
        running S times faster. The largest of this client's readings and the window the
        shared limiters learnt from other processes (1 until anything has been seen)."""
        units = [self._unit] if self._unit is not None else []
        for limiter in self._limiters.values():
            window = limiter.learnt_window()
            if window is not None:
                units.append(window / NOMINAL_WINDOW_S)
        return max(units, default=1.0)

    @property
    def rate_window(self) -> float:
        """Seconds the API's budgets count over: the user's `--rate-window`, else 60 s in
        the time unit the API shows."""
        return self.config.rate_window if self.config.rate_window is not None else NOMINAL_WINDOW_S * self.time_unit

    def _learn_time_unit(self, reported_s: float | None, nominal_s: float) -> None:
        """The largest unit seen wins: a cursor's lifetime is counted from the request's
        arrival and reads low by the page's latency (a stale cached `cursorExpiresIn` lower
        still); the token's lifetime and the first answer of a rate window are exact. A
        larger unit is handed to the shared limiters as their window."""
        if reported_s is None or reported_s <= 0:
            return
        unit = min(1.0, max(0.001, reported_s / nominal_s))
        if self._unit is not None and unit <= self._unit:
            return
        self._unit = unit
        self._teach(window_s=NOMINAL_WINDOW_S * unit)

    def _teach(self, window_s: float | None = None, count: float | None = None, lanes: tuple[Lane, ...] = LANES) -> None:
        """Hand what the API showed to the shared limiters of `lanes` (each takes what its
        user left unset) and tell the user when a pace changed."""
        for lane in lanes:
            limiter = self._limiters.get(lane)
            if limiter is None:
                continue
            before, after = limiter.learn(window_s, count)
            if after == before:
                continue
            # The first window learnt, and every count, are news; a window refined by a
            # later, longer reading (a few percent) is detail.
            say = logger.debug if before.window_learnt and after.per_window == before.per_window else logger.info
            say("pacing {} at {:g} requests per {:.3g}s, as the API shows", lane, after.per_window, after.window)

    def _bounded(self, told: float | None) -> float | None:
        """A wait the server asked for, capped at about one rate window (MAX_TOLD_WINDOWS)."""
        if told is None:
            return None
        cap = MAX_TOLD_WINDOWS * self.rate_window
        if told > cap:
            logger.debug("server asked for a {:.1f}s wait; capped at {:.2f}s (one rate window)", told, cap)
        return min(told, cap)

    # -- secrets --------------------------------------------------------------------------

    def _scrub(self, text: str) -> str:
        """Server text with the key and every token of this process masked (an older token
        echoed back must not survive: the message crosses to the supervisor, whose
        redactor never saw this process's tokens)."""
        for secret in (self.config.api_key, self._token.token if self._token else None):
            if secret:
                text = text.replace(secret, "***")
        return redact(text)

    def _fail_message(self, path: str, outcome: Outcome) -> str:
        hint = FAIL_HINTS.get(outcome.status or 0, "refused")
        said = f": {self._scrub(outcome.message)}" if outcome.message else ""
        return f"{path}: {outcome.describe()}, {hint}{said}"

    # -- one request ----------------------------------------------------------------------

    def _send(self, method: str, url: str, headers: dict[str, str], **kwargs: Any) -> tuple[Outcome, bytes]:
        """One HTTP exchange with the whole body read; never raises a transport error."""
        timeout = (min(10.0, self.config.request_timeout), self.config.request_timeout)
        self.stats["requests"] += 1
        try:
            response = self.session.request(method, url, headers=headers, timeout=timeout, stream=True, **kwargs)
            body = read_body(response)  # cut streams raise here
        except requests.exceptions.RequestException as exc:
            return Outcome(exc=exc), b""
        # Requests the adapter's Retry already repeated (5xx, resets) count too.
        history = getattr(getattr(response.raw, "retries", None), "history", ())
        self.stats["requests"] += len(history)
        self.stats["retries"] += len(history)
        self.stats["http_5xx"] += sum(1 for step in history if step.status and step.status >= 500)
        self.stats["bytes"] += len(body)
        status = response.status_code
        if status == 429:
            self.stats["http_429"] += 1
        elif status >= 500:
            self.stats["http_5xx"] += 1
        outcome = Outcome(status=status, headers=response.headers)
        if status >= 300:
            try:
                doc = decode_json(body)
            except ValueError:  # an HTML error page from the load balancer
                doc = None
            if isinstance(doc, dict):
                outcome.body = doc
                outcome.code = doc.get("code") if isinstance(doc.get("code"), str) else None
                outcome.message = doc.get("message") if isinstance(doc.get("message"), str) else None
        return outcome, body

    def _log_retry(self, path: str, outcome: Outcome, attempt: int, limit: int | None, wait: float, what: str) -> None:
        self.stats["retries"] += 1
        of = f"/{limit}" if limit else ""
        logger.warning(
            "{} {}: {} (attempt {}{}), waiting {:.2f}s", path, outcome.describe(), what, attempt, of, wait
        )

    # -- stream token -----------------------------------------------------------------------

    def _obtain_token(self, attempts: int) -> None:
        """POST stream-access with the dashboard signals until a token is issued."""
        url = self._root + STREAM_ACCESS_PATH
        headers = {
            "X-API-Key": self.config.api_key,
            "User-Agent": BROWSER_UA,
            "Origin": self._origin,
            "Referer": self._origin + "/",
            "Cookie": f"dashboard_api_key={self.config.api_key}",
            "X-Requested-With": "XMLHttpRequest",
            "Content-Type": "application/json",
        }
        outcome = Outcome()
        for attempt in range(1, attempts + 1):
            if self._should_stop():
                raise Stopped()
            issued_at = self._clock()
            outcome, body = self._send("POST", url, headers, data=b"{}")
            action = classify(outcome.status, outcome.code, type(outcome.exc) if outcome.exc else None, "token")
            if action is Action.OK:
                try:
                    token, lifetime = parse_stream_access(decode_json(body) if body.strip() else None, issued_at)
                except (ValueError, BadBody) as exc:
                    outcome.exc = exc if isinstance(exc, BadBody) else BadBody("invalid JSON")
                    action = Action.RETRY
                else:
                    add_secrets([token.token])
                    self._token = token
                    self.stats["token_refreshes"] += 1
                    self._learn_time_unit(lifetime, NOMINAL_TOKEN_TTL_S)
                    return
            if action is Action.FAIL:
                raise FatalApiError(self._fail_message(STREAM_ACCESS_PATH, outcome))
            if action is not Action.RETRY and action is not Action.WAIT:
                raise SourceUnavailable(f"stream-access refused a token: {outcome.describe()}")
            if attempt == attempts:
                break
            told = self._bounded(retry_after_seconds(outcome.headers, outcome.body, self._clock()))
            if told is not None:
                delay = told
            elif action is Action.WAIT:  # rate limited: the spec's 10 s x attempt
                delay = TOKEN_BACKOFF_S * attempt * self.time_unit
            else:  # the odd 5xx or reset: an ordinary short backoff
                delay = backoff(attempt) * self.time_unit
            self._log_retry(STREAM_ACCESS_PATH, outcome, attempt, attempts, delay, "no stream token yet")
            self._wait_or_stop(delay)
        raise SourceUnavailable(f"no stream token after {attempts} attempt(s): {outcome.describe()}")

    def _ensure_token(self) -> StreamToken:
        """A token with life left. Renewed at ~80% of its lifetime; if that early renewal
        fails, the current token is used until it really expires (no stall)."""
        now = self._clock()
        token = self._token
        if token is not None and now < token.refresh_at:
            return token
        if token is not None and now < token.expires_at:
            try:
                self._obtain_token(attempts=1)
            except SourceUnavailable as exc:
                logger.warning("early stream token renewal failed ({}); the current one is still valid", exc)
                token.refresh_at = now + (token.expires_at - now) / 2  # try again halfway to expiry
                return token
        else:
            self._obtain_token(attempts=TOKEN_ATTEMPTS)
        assert self._token is not None
        return self._token

    # -- cursors ----------------------------------------------------------------------------

    def _live_cursor(self, cursor: str | None) -> str | None:
        """The cursor with `exp` pushed forward if it would expire before the server sees it.
        A cursor that does not decode is sent as is: the server is the judge."""
        if cursor is None:
            return None
        now_ms = int(self._clock() * 1000)
        margin_ms = int(CURSOR_MARGIN_S * self.time_unit * 1000) + 200
        try:
            expiring = cursor_expiring(cursor, now_ms, margin_ms)
        except ValueError:
            return cursor
        if not expiring:
            return cursor
        self.stats["cursor_refreshes"] += 1
        return refresh_cursor(cursor, now_ms, CURSOR_TTL_MS)

    # -- pages ------------------------------------------------------------------------------

    def fetch_page(
        self,
        lane: Lane,
        cursor: str | None,
        since: int | None = None,
        until: int | None = None,
        limit: int | None = None,
    ) -> Page:
        """One complete page of `lane` after `cursor`: "feed", "events" (/events, key in
        the header) or "events_query" (/events, key in the query string: a separate budget).

        Paced by the lane's limiter, retried until it succeeds, `config.max_attempts`
        transient faults have happened (ApiError), a terminal answer arrives
        (FatalApiError), the query-string lane is refused (SourceUnavailable), or a shutdown
        is requested during a wait (Stopped).
        """
        if lane not in LANES:
            raise ValueError(f"unknown lane {lane!r}")
        limiter = self._limiters.get(lane)
        params: dict[str, Any] = {"limit": limit if limit is not None else self.config.page_limit}
        if lane == "feed":
            params.update({k: v for k, v in (("since", since), ("until", until)) if v is not None})
        budget = RetryBudget(self.config.max_attempts)
        while True:
            if self._should_stop():
                raise Stopped()
            if limiter is not None and not limiter.acquire(self._wait):
                raise Stopped()
            headers = {"X-API-Key": self.config.api_key}
            if lane == "feed":
                token = self._ensure_token()
                headers[token.header] = token.token
                path = token.feed_path
                url = self._root + path
            else:
                path = API_SUFFIX + "/events"
                url = self._api_url + "/events"
            if lane == "events_query":
                headers = {}
                params["api_key"] = self.config.api_key
            cursor = self._live_cursor(cursor)
            if cursor is not None:
                params["cursor"] = cursor
            sent = time.monotonic()
            paced_from = limiter.clock() if limiter is not None else sent
            outcome, body = self._send("GET", url, headers, params=params)
            page: Page | None = None
            if outcome.status is not None and 200 <= outcome.status < 300:
                try:
                    page, cursor_ttl = parse_page(body, outcome.status)
                    self._learn_time_unit(cursor_ttl, NOMINAL_CURSOR_TTL_S)
                except BadBody as exc:
                    self.stats["truncated"] += 1
                    outcome.exc = exc
            if lane != "feed" and outcome.status is not None:
                count, remaining, reset = rate_headers(outcome.headers, self._clock())
                self._learn_time_unit(window_shown(count, remaining, reset), NOMINAL_WINDOW_S)
                if count is not None and count != self._counts_shown.get(lane):
                    self._counts_shown[lane] = count
                    self._teach(count=count, lanes=(lane,))
                if limiter is not None:
                    limiter.observe(paced_from, remaining, self._bounded(reset))
            action = classify(outcome.status, outcome.code, type(outcome.exc) if outcome.exc else None, lane)
            budget, decision = budget.after(action, self._facts(action, path, outcome, cursor))
            step = decision.step
            if step is Step.RETURN_PAGE:
                assert page is not None, "an OK outcome is a parsed 2xx page"
                if lane == "feed":
                    self._token_on_probation = False
                page.seconds = time.monotonic() - sent
                return page
            if step is Step.RETURN_DRAINED:
                return Page([], None, False, None, len(body), outcome.status or 0)
            if step in ENDINGS:
                raise ENDINGS[step](decision.reason)
            self._log_retry(path, outcome, decision.attempt, decision.limit, decision.wait, decision.reason)
            if step is Step.SLOW_DOWN and limiter is not None:
                limiter.penalise(decision.wait)  # the next acquire waits, for every process
            elif step in (Step.BACK_OFF, Step.SLOW_DOWN):
                self._wait_or_stop(decision.wait)
            elif step is Step.RENEW_TOKEN:
                self._obtain_token(TOKEN_ATTEMPTS)
                self._token_on_probation = True
            else:
                cursor = self._revive_cursor(step, cursor)

    def _facts(self, action: Action, path: str, outcome: Outcome, cursor: str | None) -> Facts:
        """What the retry budget weighs besides the action, read off this client and the
        outcome. The refusal is worded only when it will be raised: it scrubs server text."""
        token = self._token
        return Facts(
            path=path,
            described=outcome.describe(),
            refusal=self._fail_message(path, outcome) if action is Action.FAIL else "",
            told=self._told(action, outcome),
            unit=self.time_unit,
            token_expired=token is not None and self._clock() >= token.expires_at,
            token_on_probation=self._token_on_probation,
            cursor_readable=_holds_position(cursor),
        )

    def _told(self, action: Action, outcome: Outcome) -> float | None:
        """The wait the server dictated, bounded. A 429 may say it anywhere; a transient fault
        only by an explicit Retry-After (a 503's): X-RateLimit-Reset on a damaged 200 is the
        pacing window, which the limiter already handles."""
        if action is Action.WAIT:
            return self._bounded(retry_after_seconds(outcome.headers, outcome.body, self._clock()))
        if action is Action.RETRY:
            return self._bounded(retry_after_seconds(_only_retry_after(outcome.headers), None, self._clock()))
        return None

    def _revive_cursor(self, step: Step, cursor: str | None) -> str:
        """A cursor the server takes again after CURSOR_EXPIRED. Re-positioning just above the
        cursor's `ts` can repeat a few events (deduped on id) but never skips one. The budget
        asks for a revival only of a cursor that decodes."""
        now_ms = int(self._clock() * 1000)
        self.stats["cursor_refreshes"] += 1
        if step is Step.REFRESH_CURSOR:
            return refresh_cursor(cursor or "", now_ms, CURSOR_TTL_MS)
        return position_cursor(int(decode_cursor(cursor or "")["ts"]) + 1, now_ms, CURSOR_TTL_MS * 10)


def _holds_position(cursor: str | None) -> bool:
    if cursor is None:
        return False
    try:
        decode_cursor(cursor)
    except ValueError:
        return False
    return True


def _only_retry_after(headers: Mapping[str, str]) -> dict[str, str]:
    return {name: value for name, value in headers.items() if name.lower() == "retry-after"}


def window_shown(limit: int | None, remaining: int | None, reset_s: float | None) -> float | None:
    """The rate window an answer's X-RateLimit headers show, if any: a fixed window opens
    at its first counted request, so the answer that leaves `limit - 1` reads the whole
    window in its reset (a cache HIT later in that window, which leaves the count as it
    was, reads less: a lower bound, which the largest-unit rule absorbs). Any other reset
    is only what is left of a window, and a 429's may be whatever the server's block is (a
    bug's hours included): neither is read."""
    if limit is None or remaining is None or reset_s is None or remaining != limit - 1:
        return None
    return reset_s


def _whole(text: str | None) -> int | None:
    try:
        return int(float(text)) if text is not None else None
    except (ValueError, OverflowError):
        return None


def rate_headers(headers: Mapping[str, str], now_epoch: float) -> tuple[int | None, int | None, float | None]:
    """`X-RateLimit-Limit` (requests per window), `X-RateLimit-Remaining`, and
    `X-RateLimit-Reset` as seconds left in the window (the API sends relative seconds; an
    epoch, should one appear, is converted)."""
    reset: float | None = None
    if headers.get("X-RateLimit-Reset") is not None:
        reset = retry_after_seconds({"X-RateLimit-Reset": headers["X-RateLimit-Reset"]}, None, now_epoch)
    limit = _whole(headers.get("X-RateLimit-Limit"))
    return limit if limit is not None and limit >= 1 else None, _whole(headers.get("X-RateLimit-Remaining")), reset
