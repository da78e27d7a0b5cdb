"""Narrow unit tests of the API client with `responses`: the classification table, the
stream token flow, retries of damaged responses, 429 handling, cursor expiry, secrets.

Time is a fake clock: every wait advances it and is recorded, so nothing really sleeps.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
import requests
import responses
from loguru import logger

from ingest.config import Config
from ingest.source import api, retries
from ingest.source.api import (
    Action,
    ApiClient,
    ApiError,
    BadBody,
    FatalApiError,
    SourceUnavailable,
    Stopped,
    classify,
)
from ingest.source.cursors import CURSOR_TTL_MS, FORGE_ID, decode_cursor, encode_cursor
from ingest.source.pacing import RESET_MARGIN_SHARE, SharedRateLimiter, full_rate

HOST = "http://api.test"
EVENTS = HOST + "/api/v1/events"
FEED = HOST + "/api/v1/events/d4ta/x7k9/feed"
STREAM_ACCESS = HOST + "/internal/dashboard/stream-access"
KEY = "ds_0123456789abcdef0123456789abcdef"
TOKEN_A = "a" * 64
TOKEN_B = "b" * 64
START = 1_800_000_000.0
EVENT_ID = "9b1f3c2e-5d4a-4e6b-8c7d-2a1b0c9d8e7f"


class FakeTime:
    """Epoch clock for the client; `sleep_until` jumps to the deadline and records the wait."""

    def __init__(self) -> None:
        self.now = START
        self.waits: list[float] = []
        self.stop_on_wait = False

    def __call__(self) -> float:
        return self.now

    def sleep_until(self, deadline: float) -> bool:
        self.waits.append(round(deadline - self.now, 6))
        if self.stop_on_wait:
            return True
        self.now = max(self.now, deadline)
        return False


@pytest.fixture
def clock() -> FakeTime:
    return FakeTime()


@pytest.fixture
def config() -> Config:
    return Config(api_url=HOST + "/api/v1", api_key=KEY, page_limit=100, max_attempts=4, request_timeout=5)


def make_client(config: Config, clock: FakeTime, **kwargs: Any) -> ApiClient:
    return ApiClient(config, clock=clock, sleep_until_or_stop=clock.sleep_until, **kwargs)


@pytest.fixture
def client(config: Config, clock: FakeTime) -> ApiClient:
    return make_client(config, clock)


@pytest.fixture
def mocked() -> Iterator[responses.RequestsMock]:
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        yield rsps


@pytest.fixture
def log_lines() -> Iterator[list[str]]:
    lines: list[str] = []
    handler = logger.add(lambda message: lines.append(str(message)), format="{message}", level="WARNING")
    yield lines
    logger.remove(handler)


def page_body(n: int = 2, has_more: bool = True, cursor_exp_in: float = 116) -> dict[str, Any]:
    cursor = encode_cursor(EVENT_ID, 1769541553629, int(START * 1000) + 120_000) if has_more else None
    return {
        "data": [{"id": f"id-{i}", "timestamp": 1769541612369 - i} for i in range(n)],
        "pagination": {"limit": n, "hasMore": has_more, "cursorExpiresIn": cursor_exp_in, "nextCursor": cursor},
        "meta": {"total": 3_000_000, "returned": n, "requestId": "r"},
    }


def error_body(status: int, code: str, message: str = "nope") -> dict[str, Any]:
    return {"error": requests.status_codes._codes[status][0], "message": message, "code": code}


def grant(token: str = TOKEN_A, expires_in: float = 300, **extra: Any) -> dict[str, Any]:
    access = {"endpoint": "/api/v1/events/d4ta/x7k9/feed", "token": token, "expiresIn": expires_in}
    access.update(extra)
    return {"streamAccess": access, "meta": {"generatedAt": "2026-02-19T19:18:20.000Z"}}


def sent_cursor(call: Any) -> dict[str, Any]:
    return decode_cursor(call.request.params["cursor"])


# -- the table ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "code", "exc", "endpoint", "action"),
    [
        (200, None, None, "events", Action.OK),
        (200, None, BadBody, "feed", Action.RETRY),  # truncated, empty, not an object
        (None, None, requests.exceptions.ChunkedEncodingError, "events", Action.RETRY),
        (None, None, requests.exceptions.ConnectionError, "feed", Action.RETRY),
        (None, None, requests.exceptions.ReadTimeout, "events", Action.RETRY),
        (None, None, requests.exceptions.ConnectTimeout, "events", Action.RETRY),
        (None, None, requests.exceptions.ContentDecodingError, "events", Action.RETRY),
        (None, None, requests.exceptions.RetryError, "events", Action.RETRY),
        (None, None, requests.exceptions.InvalidURL, "events", Action.FAIL),
        (500, None, None, "events", Action.RETRY),
        (502, None, None, "feed", Action.RETRY),
        (503, None, None, "events", Action.RETRY),
        (504, None, None, "token", Action.RETRY),
        (501, None, None, "events", Action.FAIL),
        (408, None, None, "events", Action.RETRY),
        (429, "RATE_LIMIT_EXCEEDED", None, "events", Action.WAIT),
        (429, None, None, "feed", Action.WAIT),
        (429, None, None, "token", Action.WAIT),
        (400, "CURSOR_EXPIRED", None, "feed", Action.REFRESH_CURSOR),
        (400, "CURSOR_INVALID_FORMAT", None, "events", Action.FAIL),
        (401, "UNAUTHORIZED", None, "events", Action.FAIL),
        (401, "API_KEY_EXPIRED", None, "events", Action.FAIL),
        (401, "UNAUTHORIZED", None, "feed", Action.REFRESH_TOKEN),
        (401, "UNAUTHORIZED", None, "token", Action.FAIL),
        (403, "INVALID_STREAM_TOKEN", None, "feed", Action.REFRESH_TOKEN),
        (403, "INVALID_STREAM_TOKEN", None, "events", Action.FAIL),
        (403, "SOMETHING_NEW", None, "events", Action.FAIL),
        (403, "SOMETHING_NEW", None, "feed", Action.REFRESH_TOKEN),  # renewed once, then fatal
        (403, "DASHBOARD_REQUIRED", None, "token", Action.UNAVAILABLE),
        (401, "UNAUTHORIZED", None, "events_query", Action.UNAVAILABLE),
        (403, None, None, "events_query", Action.UNAVAILABLE),
        (401, "UNAUTHORIZED", None, "events", Action.FAIL),
        (404, None, None, "token", Action.UNAVAILABLE),
        (404, "ENDPOINT_NOT_FOUND", None, "events", Action.FAIL),
        (418, None, None, "events", Action.DRAINED),
    ],
)
def test_classify(status: int | None, code: str | None, exc: type | None, endpoint: str, action: Action) -> None:
    assert classify(status, code, exc, endpoint) is action


# -- pages ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "url", "expected"),
    [
        ("auto", "https://api.example.com/api/v1", True),
        ("auto", "http://10.0.0.5:3000/api/v1", True),
        ("auto", "http://127.0.0.1:8080/api/v1", False),
        ("auto", "http://127.9.9.9/api/v1", False),
        ("auto", "http://localhost:8080/api/v1", False),
        ("auto", "http://api.localhost/api/v1", False),
        ("auto", "http://[::1]:8080/api/v1", False),
        ("on", "http://127.0.0.1:8080/api/v1", True),
        ("off", "https://api.example.com/api/v1", False),
    ],
)
def test_gzip_is_asked_for_unless_the_api_is_local(mode: str, url: str, expected: bool) -> None:
    assert api.wants_gzip(mode, url) is expected



def test_events_page_request_and_parse(client: ApiClient, mocked: responses.RequestsMock) -> None:
    mocked.get(EVENTS, json=page_body(3))
    cursor = encode_cursor(EVENT_ID, 1769541553629, int(START * 1000) + 100_000)
    page = client.fetch_page("events", cursor, since=1, until=2, limit=50)
    assert (len(page.events), page.has_more, page.total, page.status, page.limit) == (3, True, 3_000_000, 200, 3)
    assert page.next_cursor and decode_cursor(page.next_cursor)["id"] == EVENT_ID
    request = mocked.calls[0].request
    assert request.headers["X-API-Key"] == KEY
    assert request.headers["Accept-Encoding"] == "gzip"
    assert request.params == {"limit": "50", "cursor": cursor}  # /events ignores since/until
    assert KEY not in request.url
    assert client.stats["requests"] == 1 and client.stats["bytes"] == page.nbytes > 0


def test_last_page(client: ApiClient, mocked: responses.RequestsMock) -> None:
    mocked.get(EVENTS, json=page_body(1, has_more=False))
    page = client.fetch_page("events", None)
    assert (page.has_more, page.next_cursor) == (False, None)
    assert mocked.calls[0].request.params == {"limit": "100"}


@pytest.mark.parametrize(
    "bad",
    [
        json.dumps(page_body(5))[:-40].encode(),  # truncated mid-string
        b"",  # empty 200
        b"[]",  # JSON, not an object
        b"null",
        b'{"data": "nope"}',
        b"<html>oops</html>",
    ],
)
def test_damaged_200_is_retried_never_returned(
    client: ApiClient, mocked: responses.RequestsMock, clock: FakeTime, bad: bytes
) -> None:
    mocked.get(EVENTS, body=bad, status=200)
    mocked.get(EVENTS, json=page_body(4))
    page = client.fetch_page("events", None)
    assert len(page.events) == 4
    assert client.stats["truncated"] == 1 and len(clock.waits) == 1


def test_has_more_without_a_cursor_is_a_page_not_a_damaged_body(
    client: ApiClient, mocked: responses.RequestsMock, clock: FakeTime
) -> None:
    # Asking again cannot mend it: the walk goes on from its last event (ingest.source.paging).
    body = page_body(3)
    body["pagination"]["nextCursor"] = None
    mocked.get(EVENTS, json=body)
    page = client.fetch_page("events", None)
    assert (len(page.events), page.has_more, page.next_cursor) == (3, True, None)
    assert client.stats["requests"] == 1 and client.stats["truncated"] == 0 and clock.waits == []


@pytest.mark.parametrize(
    "exc",
    [
        requests.exceptions.ChunkedEncodingError("connection reset mid-body"),
        requests.exceptions.ConnectionError("reset"),
        requests.exceptions.ReadTimeout("slow"),
    ],
)
def test_transport_errors_are_retried(
    client: ApiClient, mocked: responses.RequestsMock, clock: FakeTime, exc: Exception
) -> None:
    mocked.get(EVENTS, body=exc)
    mocked.get(EVENTS, json=page_body(2))
    assert len(client.fetch_page("events", None).events) == 2
    assert len(clock.waits) == 1


def test_load_balancer_502_html_is_retried(
    client: ApiClient, mocked: responses.RequestsMock, clock: FakeTime, log_lines: list[str]
) -> None:
    html = "<html><head><title>502 Bad Gateway</title></head></html>"
    for _ in range(3):  # the transport retries twice, then the client backs off once
        mocked.get(EVENTS, body=html, status=502, content_type="text/html", headers={"Server": "awselb/2.0"})
    mocked.get(EVENTS, json=page_body(2))
    assert len(client.fetch_page("events", None).events) == 2
    assert client.stats["http_5xx"] == 1
    assert len(clock.waits) == 1 and 0.5 <= clock.waits[0] <= 1.5
    assert len(log_lines) == 1
    assert "/api/v1/events" in log_lines[0] and "502" in log_lines[0] and "waiting" in log_lines[0]


def test_transient_retry_ignores_the_rate_window_but_honours_retry_after(
    client: ApiClient, mocked: responses.RequestsMock, clock: FakeTime
) -> None:
    mocked.get(EVENTS, body=b"", status=200, headers={"X-RateLimit-Remaining": "5", "X-RateLimit-Reset": "50"})
    mocked.get(EVENTS, body=b"", status=200, headers={"Retry-After": "6"})
    mocked.get(EVENTS, json=page_body(2))
    client.fetch_page("events", None)
    assert clock.waits[0] < 2 and clock.waits[1] == 6


def test_transient_faults_are_capped_by_max_attempts(
    client: ApiClient, mocked: responses.RequestsMock, clock: FakeTime
) -> None:
    mocked.get(EVENTS, body=b"", status=200)
    with pytest.raises(ApiError) as caught:
        client.fetch_page("events", None)
    assert not isinstance(caught.value, FatalApiError)
    assert "/api/v1/events" in str(caught.value) and "4 attempts" in str(caught.value)
    assert client.stats["requests"] == 4 and len(clock.waits) == 3
    assert clock.waits == sorted(clock.waits)  # growing backoff


def test_418_means_no_more_data(client: ApiClient, mocked: responses.RequestsMock) -> None:
    mocked.get(EVENTS, json={"error": "I'm a teapot"}, status=418)
    page = client.fetch_page("events", encode_cursor(FORGE_ID, 1, int(START * 1000) + 60_000))
    assert (page.events, page.has_more, page.next_cursor, page.status) == ([], False, None, 418)


# -- 429 and pacing -------------------------------------------------------------------------


def test_429_honours_retry_after(client: ApiClient, mocked: responses.RequestsMock, clock: FakeTime) -> None:
    body = error_body(429, "RATE_LIMIT_EXCEEDED") | {"rateLimit": {"retryAfter": 51}}
    mocked.get(EVENTS, json=body, status=429, headers={"Retry-After": "2.5"})
    mocked.get(EVENTS, json=page_body(2))
    client.fetch_page("events", None)
    assert clock.waits == [2.5]
    assert client.stats["http_429"] == 1


def test_429_penalises_the_shared_limiter(config: Config, clock: FakeTime, mocked: responses.RequestsMock) -> None:
    limiter = SharedRateLimiter(600, 60, burst=1, clock=clock)
    client = make_client(config, clock, limiters={"events": limiter})
    mocked.get(EVENTS, json=error_body(429, "RATE_LIMIT_EXCEEDED"), status=429, headers={"Retry-After": "7"})
    mocked.get(EVENTS, json=page_body(2))
    client.fetch_page("events", None)
    assert sum(clock.waits) == pytest.approx(7.0)  # waited inside acquire, on the fake clock
    assert limiter.snapshot().rate < full_rate(limiter.snapshot())


def test_silent_feed_429_waits_10_then_20_seconds(
    client: ApiClient, mocked: responses.RequestsMock, clock: FakeTime
) -> None:
    mocked.post(STREAM_ACCESS, json=grant())
    mocked.get(FEED, json=error_body(429, "RATE_LIMIT_EXCEEDED"), status=429)
    mocked.get(FEED, json=error_body(429, "RATE_LIMIT_EXCEEDED"), status=429)
    mocked.get(FEED, json=page_body(2))
    client.fetch_page("feed", None)
    assert len(clock.waits) == 2
    assert 9 <= clock.waits[0] <= 11 and 18 <= clock.waits[1] <= 22


def test_events_headers_drive_the_pace(config: Config, clock: FakeTime, mocked: responses.RequestsMock) -> None:
    limiter = SharedRateLimiter(600, 60, burst=1, clock=clock)
    client = make_client(config, clock, limiters={"events": limiter})

    def slow_last_of_window(request: Any) -> tuple[int, dict[str, str], bytes]:
        clock.now += 3.0  # the page takes 3 s; its headers are as of the request's arrival
        return 200, {"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": "7.5"}, orjson.dumps(page_body(2))

    mocked.add_callback(responses.GET, EVENTS, callback=slow_last_of_window)
    mocked.get(EVENTS, json=page_body(2), headers={"X-RateLimit-Remaining": "4", "X-RateLimit-Reset": "8"})
    mocked.get(EVENTS, json=page_body(2))
    client.fetch_page("events", None)
    client.fetch_page("events", None)
    # The window closes 7.5 s after the request went out (3 s before its answer), and is
    # waited out a margin longer.
    assert clock.waits == [pytest.approx(7.5 - 3.0 + RESET_MARGIN_SHARE["decimals"] * 60)]
    client.fetch_page("events", None)
    assert clock.waits[1:] == [1.6]  # 4 left + the reset: 8 s / 5 from the request's start


def test_the_query_string_lane_sends_the_key_as_api_key_and_paces_on_its_own_budget(
    config: Config, clock: FakeTime, mocked: responses.RequestsMock
) -> None:
    header_lane = SharedRateLimiter(600, 60, burst=1, clock=clock)
    query_lane = SharedRateLimiter(600, 60, burst=1, clock=clock)
    client = make_client(config, clock, limiters={"events": header_lane, "events_query": query_lane})
    mocked.get(EVENTS, json=page_body(2), headers={"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": "7.5"})
    mocked.get(EVENTS, json=page_body(2))
    client.fetch_page("events_query", None, since=1, until=2, limit=50)
    request = mocked.calls[0].request
    assert "X-API-Key" not in request.headers
    assert request.params == {"limit": "50", "api_key": KEY}
    assert query_lane.snapshot().blocked_until > header_lane.snapshot().blocked_until, "only its own budget is spent"
    client.fetch_page("events_query", None)
    assert clock.waits == [pytest.approx(7.5 + RESET_MARGIN_SHARE["decimals"] * 60)]


@pytest.mark.parametrize("status", [401, 403])
def test_a_refused_query_string_lane_is_unavailable_not_fatal(
    client: ApiClient, mocked: responses.RequestsMock, status: int
) -> None:
    mocked.get(EVENTS, json=error_body(status, "UNAUTHORIZED"), status=status)
    with pytest.raises(SourceUnavailable) as refused:
        client.fetch_page("events_query", None)
    assert KEY not in str(refused.value)


# -- stream token -----------------------------------------------------------------------------


def test_token_flow_sends_dashboard_signals_and_reads_the_endpoint(
    client: ApiClient, mocked: responses.RequestsMock, monkeypatch: pytest.MonkeyPatch
) -> None:
    registered: list[str] = []
    monkeypatch.setattr(api, "add_secrets", lambda secrets: registered.extend(secrets))
    mocked.post(STREAM_ACCESS, json=grant(endpoint="/api/v1/events/moved/feed", tokenHeader="X-Other-Token"))
    mocked.get(HOST + "/api/v1/events/moved/feed", json=page_body(2))
    client.fetch_page("feed", None, since=100, until=200, limit=10)
    post = mocked.calls[0].request
    assert post.url == STREAM_ACCESS  # /internal is not under /api/v1
    assert post.headers["X-API-Key"] == KEY
    assert "Mozilla" in post.headers["User-Agent"]
    assert post.headers["Origin"] == HOST and post.headers["Referer"] == HOST + "/"
    assert post.headers["Cookie"] == f"dashboard_api_key={KEY}"
    assert post.headers["X-Requested-With"] == "XMLHttpRequest"
    get = mocked.calls[1].request
    assert get.headers["X-Other-Token"] == TOKEN_A and get.headers["X-API-Key"] == KEY
    assert get.params == {"limit": "10", "since": "100", "until": "200"}
    assert registered == [TOKEN_A]
    assert client.stats["token_refreshes"] == 1


def test_feed_path_falls_back_to_the_constant(client: ApiClient, mocked: responses.RequestsMock) -> None:
    mocked.post(STREAM_ACCESS, json={"streamAccess": {"token": TOKEN_A, "expiresIn": 300}})
    mocked.get(FEED, json=page_body(2))
    client.fetch_page("feed", None)
    assert mocked.calls[1].request.headers["X-Stream-Token"] == TOKEN_A


def test_token_refreshed_on_403_then_reused(client: ApiClient, mocked: responses.RequestsMock) -> None:
    mocked.post(STREAM_ACCESS, json=grant(TOKEN_A))
    mocked.post(STREAM_ACCESS, json=grant(TOKEN_B))
    mocked.get(FEED, json=error_body(403, "INVALID_STREAM_TOKEN"), status=403)
    mocked.get(FEED, json=page_body(2))
    mocked.get(FEED, json=page_body(2))
    client.fetch_page("feed", None)
    client.fetch_page("feed", None)
    tokens = [c.request.headers.get("X-Stream-Token") for c in mocked.calls if c.request.method == "GET"]
    assert tokens == [TOKEN_A, TOKEN_B, TOKEN_B]
    assert client.stats["token_refreshes"] == 2


def test_fresh_token_rejected_again_is_fatal(
    client: ApiClient, mocked: responses.RequestsMock, log_lines: list[str]
) -> None:
    mocked.post(STREAM_ACCESS, json=grant(TOKEN_A))
    mocked.post(STREAM_ACCESS, json=grant(TOKEN_B))
    mocked.get(FEED, json=error_body(403, "INVALID_STREAM_TOKEN", f"token {TOKEN_B} unknown"), status=403)
    with pytest.raises(FatalApiError) as caught:
        client.fetch_page("feed", None)
    text = str(caught.value) + "".join(log_lines)
    assert "fresh stream token" in str(caught.value)
    assert KEY not in text and TOKEN_A not in text and TOKEN_B not in text


def test_token_renewed_at_80_percent_of_its_life(
    client: ApiClient, mocked: responses.RequestsMock, clock: FakeTime
) -> None:
    mocked.post(STREAM_ACCESS, json=grant(TOKEN_A, expires_in=3.0))  # a simulator at 100x
    mocked.post(STREAM_ACCESS, json=grant(TOKEN_B, expires_in=3.0))
    mocked.get(FEED, json=page_body(2))
    client.fetch_page("feed", None)
    clock.now += 2.3
    client.fetch_page("feed", None)
    clock.now += 0.2  # 2.5 s: past 80 %
    client.fetch_page("feed", None)
    methods = [c.request.method for c in mocked.calls]
    assert methods == ["POST", "GET", "GET", "POST", "GET"]
    assert mocked.calls[4].request.headers["X-Stream-Token"] == TOKEN_B


def test_failed_early_renewal_keeps_the_valid_token(
    client: ApiClient, mocked: responses.RequestsMock, clock: FakeTime
) -> None:
    mocked.post(STREAM_ACCESS, json=grant(TOKEN_A))
    mocked.post(STREAM_ACCESS, json=error_body(429, "RATE_LIMIT_EXCEEDED"), status=429)
    mocked.get(FEED, json=page_body(2))
    client.fetch_page("feed", None)
    clock.now += 250
    client.fetch_page("feed", None)  # renewal refused: no stall, the old token still works
    assert clock.waits == []
    assert [c.request.method for c in mocked.calls] == ["POST", "GET", "POST", "GET"]
    assert mocked.calls[3].request.headers["X-Stream-Token"] == TOKEN_A


def test_dashboard_required_means_source_unavailable(client: ApiClient, mocked: responses.RequestsMock) -> None:
    mocked.post(STREAM_ACCESS, json=error_body(403, "DASHBOARD_REQUIRED"), status=403)
    with pytest.raises(SourceUnavailable):
        client.fetch_page("feed", None)
    assert len(mocked.calls) == 1


def test_token_endpoint_rate_limited_backs_off_10s_per_attempt_then_gives_up(
    client: ApiClient, mocked: responses.RequestsMock, clock: FakeTime
) -> None:
    mocked.post(STREAM_ACCESS, json=error_body(429, "RATE_LIMIT_EXCEEDED"), status=429)
    with pytest.raises(SourceUnavailable):
        client.fetch_page("feed", None)
    assert clock.waits == [10, 20, 30, 40]
    assert len(mocked.calls) == api.TOKEN_ATTEMPTS


def test_token_endpoint_5xx_gets_a_short_backoff(
    client: ApiClient, mocked: responses.RequestsMock, clock: FakeTime
) -> None:
    mocked.post(STREAM_ACCESS, body="<html>502</html>", status=502)
    with pytest.raises(SourceUnavailable):
        client.fetch_page("feed", None)
    assert len(clock.waits) == api.TOKEN_ATTEMPTS - 1
    for attempt, wait in enumerate(clock.waits, start=1):
        assert 0.7 * 2 ** (attempt - 1) <= wait <= 1.3 * 2 ** (attempt - 1)


def test_token_endpoint_429_uses_retry_after(
    client: ApiClient, mocked: responses.RequestsMock, clock: FakeTime
) -> None:
    mocked.post(STREAM_ACCESS, json=error_body(429, "RATE_LIMIT_EXCEEDED"), status=429, headers={"Retry-After": "1.5"})
    mocked.post(STREAM_ACCESS, json=grant())
    mocked.get(FEED, json=page_body(2))
    client.fetch_page("feed", None)
    assert clock.waits == [1.5]


def test_bad_key_on_token_endpoint_is_fatal(client: ApiClient, mocked: responses.RequestsMock) -> None:
    mocked.post(STREAM_ACCESS, json=error_body(401, "UNAUTHORIZED", f"bad key {KEY}"), status=401)
    with pytest.raises(FatalApiError) as caught:
        client.fetch_page("feed", None)
    assert "401" in str(caught.value) and KEY not in str(caught.value)


def test_time_scale_is_learnt_from_the_token_lifetime(
    client: ApiClient, mocked: responses.RequestsMock, clock: FakeTime
) -> None:
    mocked.post(STREAM_ACCESS, json=grant(expires_in=3.0))  # 100x faster than the real service
    mocked.get(FEED, json=error_body(429, "RATE_LIMIT_EXCEEDED"), status=429)
    mocked.get(FEED, json=page_body(2, cursor_exp_in=1.16))
    client.fetch_page("feed", None)
    assert 0.09 <= clock.waits[0] <= 0.11


def test_a_stale_low_cursor_lifetime_does_not_shrink_waits(
    client: ApiClient, mocked: responses.RequestsMock, clock: FakeTime
) -> None:
    mocked.get(EVENTS, json=page_body(2, cursor_exp_in=116))
    mocked.get(EVENTS, json=page_body(2, cursor_exp_in=1.16))  # e.g. a replayed cache entry
    mocked.get(EVENTS, body=b"", status=200)
    mocked.get(EVENTS, json=page_body(2))
    for _ in range(3):
        client.fetch_page("events", None)
    assert 0.75 <= clock.waits[0] <= 1.2


# -- the rate window and the budget, learnt ------------------------------------------------


def learning_limiters(clock: FakeTime, lanes: tuple[str, ...] = ("feed", "events")) -> dict[Any, SharedRateLimiter]:
    """Limiters as `make_limiters` makes them when the user sets neither window nor count."""
    return {lane: SharedRateLimiter(10, 60, clock=clock, learns_window=True, learns_count=lane == "events")
            for lane in lanes}


def test_the_token_lifetime_sets_every_limiters_window(
    config: Config, clock: FakeTime, mocked: responses.RequestsMock
) -> None:
    limiters = learning_limiters(clock)
    client = make_client(config, clock, limiters=limiters)
    mocked.post(STREAM_ACCESS, json=grant(expires_in=75.0))  # time scale 4: exact
    mocked.get(FEED, json=page_body(2, cursor_exp_in=28.9))  # counted from the request's arrival: reads low
    client.fetch_page("feed", None)
    assert [limiter.snapshot().window for limiter in limiters.values()] == [15.0, 15.0]
    assert client.rate_window == 15.0 and client.time_unit == 0.25


def test_events_headers_set_the_window_and_the_budget(
    config: Config, clock: FakeTime, mocked: responses.RequestsMock
) -> None:
    """No token on /events: the cursor's lifetime reads low (14.45 s), the first answer of a
    fixed window reads the window itself, a later one less; X-RateLimit-Limit is the count."""
    limiters = learning_limiters(clock)
    client = make_client(config, clock, limiters=limiters)
    for remaining, reset in (("11", "15"), ("10", "13.2")):
        headers = {"X-RateLimit-Limit": "12", "X-RateLimit-Remaining": remaining, "X-RateLimit-Reset": reset}
        mocked.get(EVENTS, json=page_body(2, cursor_exp_in=28.9), headers=headers)
    client.fetch_page("events", None)
    client.fetch_page("events", None)
    events, feed = limiters["events"].snapshot(), limiters["feed"].snapshot()
    assert (events.window, events.per_window) == (15.0, 12.0)
    assert (feed.window, feed.per_window) == (15.0, 10.0), "the feed's count is the user's (no headers there)"


@pytest.mark.parametrize(
    ("limit", "remaining", "reset", "window"),
    [
        (10, 9, 15.0, 15.0),  # the first answer of a fixed window reads the window
        (10, 9, 60.0, 60.0),  # the real service
        (10, 8, 13.5, None),  # later in the window: only what is left of it
        (10, 0, 1e4, None),  # a 429's block, whatever it says
        (None, 9, 15.0, None),
        (10, None, 15.0, None),
        (10, 9, None, None),
    ],
)
def test_the_window_an_answer_shows(limit: int | None, remaining: int | None, reset: float | None,
                                    window: float | None) -> None:
    assert api.window_shown(limit, remaining, reset) == window


def test_the_users_window_and_count_stand(clock: FakeTime, mocked: responses.RequestsMock) -> None:
    config = Config(api_url=HOST + "/api/v1", api_key=KEY, rate_window=30.0, events_rate=8.0)
    limiters = api.make_limiters(config, None)
    client = make_client(config, clock, limiters=limiters)
    mocked.post(STREAM_ACCESS, json=grant(expires_in=75.0))
    mocked.get(EVENTS, json=page_body(2), headers={"X-RateLimit-Limit": "12", "X-RateLimit-Reset": "15"})
    client.fetch_page("events", None)
    assert {lane: (s.window, s.per_window) for lane, s in ((k, v.snapshot()) for k, v in limiters.items())} == {
        "feed": (30.0, 39.5), "events": (30.0, 8.0), "events_query": (30.0, 5.0)}
    assert client.rate_window == 30.0


def test_pacing_off_means_no_limiters() -> None:
    assert api.make_limiters(Config(pacing="off"), None) == {}
    assert set(api.make_limiters(Config(), None)) == {"feed", "events", "events_query"}


def test_a_window_another_process_learnt_scales_this_clients_waits(
    config: Config, clock: FakeTime, mocked: responses.RequestsMock
) -> None:
    limiters = learning_limiters(clock)
    limiters["events"].learn(window_s=15.0)  # the supervisor's probe, say
    client = make_client(config, clock, limiters=limiters)
    assert client.time_unit == 0.25
    mocked.get(EVENTS, body=b"", status=200)  # a damaged page before any answer of this client's
    mocked.get(EVENTS, json=page_body(2, cursor_exp_in=29.0))
    client.fetch_page("events", None)
    backoff, paced = clock.waits
    assert backoff <= 0.25 * 1.2, "the transient backoff, in the learnt time unit (1 s x 0.25)"
    assert backoff + paced == pytest.approx(1.5), "the pace: 10 requests per learnt 15 s window"


def test_a_servers_wait_is_capped_at_the_learnt_window(
    config: Config, clock: FakeTime, mocked: responses.RequestsMock
) -> None:
    client = make_client(config, clock, limiters=learning_limiters(clock))
    mocked.post(STREAM_ACCESS, json=grant(expires_in=75.0))
    mocked.get(FEED, json=page_body(2, cursor_exp_in=29.0))
    mocked.get(FEED, json=error_body(429, "RATE_LIMIT_EXCEEDED"), status=429, headers={"Retry-After": "3600"})
    mocked.get(FEED, json=page_body(2, cursor_exp_in=29.0))
    client.fetch_page("feed", None)
    client.fetch_page("feed", None)
    assert 16.5 <= sum(clock.waits) <= 16.5 + 1.5 * 2, "1.1 windows of 15 s, and the pace itself"


# -- cursors --------------------------------------------------------------------------------


def test_cursor_about_to_expire_is_refreshed_before_sending(
    client: ApiClient, mocked: responses.RequestsMock
) -> None:
    mocked.get(EVENTS, json=page_body(2))
    cursor = encode_cursor(EVENT_ID, 1769541553629, int(START * 1000) + 1_000)
    client.fetch_page("events", cursor)
    sent = sent_cursor(mocked.calls[0])
    assert (sent["id"], sent["ts"]) == (EVENT_ID, 1769541553629)
    assert sent["exp"] == int(START * 1000) + CURSOR_TTL_MS
    assert client.stats["cursor_refreshes"] == 1


def test_fresh_cursor_is_sent_unchanged(client: ApiClient, mocked: responses.RequestsMock) -> None:
    mocked.get(EVENTS, json=page_body(2))
    cursor = encode_cursor(EVENT_ID, 1769541553629, int(START * 1000) + 100_000)
    client.fetch_page("events", cursor)
    assert mocked.calls[0].request.params["cursor"] == cursor


def test_cursor_expired_refresh_then_reposition_then_fatal(client: ApiClient, mocked: responses.RequestsMock) -> None:
    expired = error_body(400, "CURSOR_EXPIRED", "Cursor expired 2 minute(s) ago")
    for _ in range(3):
        mocked.get(EVENTS, json=expired, status=400)
    cursor = encode_cursor(EVENT_ID, 1769541553629, int(START * 1000) + 100_000)
    with pytest.raises(FatalApiError):
        client.fetch_page("events", cursor)
    first, second, third = (sent_cursor(c) for c in mocked.calls)
    assert (first["id"], first["ts"]) == (EVENT_ID, 1769541553629)
    assert (second["id"], second["ts"]) == (EVENT_ID, 1769541553629)  # same position, new exp
    assert second["exp"] > int(START * 1000)
    assert (third["id"], third["ts"]) == (FORGE_ID, 1769541553630)  # re-positioned, never the newest
    assert len(mocked.calls) == 3


def test_cursor_expired_once_then_success(client: ApiClient, mocked: responses.RequestsMock) -> None:
    mocked.get(EVENTS, json=error_body(400, "CURSOR_EXPIRED"), status=400)
    mocked.get(EVENTS, json=page_body(2))
    cursor = encode_cursor(EVENT_ID, 42, int(START * 1000) + 100_000)
    assert len(client.fetch_page("events", cursor).events) == 2
    assert sent_cursor(mocked.calls[1])["ts"] == 42


# -- terminal errors and secrets --------------------------------------------------------------


def test_401_is_fatal_and_never_shows_the_key(client: ApiClient, mocked: responses.RequestsMock) -> None:
    mocked.get(EVENTS, json=error_body(401, "UNAUTHORIZED", f"Invalid API key {KEY}"), status=401)
    with pytest.raises(FatalApiError) as caught:
        client.fetch_page("events", None)
    message = str(caught.value)
    assert "401" in message and "/api/v1/events" in message and "key" in message
    assert KEY not in message
    assert len(mocked.calls) == 1


def test_404_on_the_list_endpoint_is_fatal(client: ApiClient, mocked: responses.RequestsMock) -> None:
    mocked.get(EVENTS, json=error_body(404, "ENDPOINT_NOT_FOUND"), status=404)
    with pytest.raises(FatalApiError, match="404"):
        client.fetch_page("events", None)


def test_retry_log_lines_name_endpoint_status_wait_but_no_secret(
    client: ApiClient, mocked: responses.RequestsMock, log_lines: list[str]
) -> None:
    mocked.post(STREAM_ACCESS, json=error_body(429, "RATE_LIMIT_EXCEEDED"), status=429, headers={"Retry-After": "3"})
    mocked.post(STREAM_ACCESS, json=grant())
    for _ in range(3):
        mocked.get(FEED, json={"error": "Service Unavailable", "message": f"key {KEY}"}, status=503)
    mocked.get(FEED, json=page_body(2))
    client.fetch_page("feed", None)
    assert len(log_lines) == 2
    token_line, feed_line = log_lines
    assert "/internal/dashboard/stream-access" in token_line and "429" in token_line and "3.00s" in token_line
    assert "/api/v1/events/d4ta/x7k9/feed" in feed_line and "503" in feed_line and "attempt 1/4" in feed_line
    for line in log_lines:
        assert KEY not in line and TOKEN_A not in line and "api_key" not in line


# -- shutdown -------------------------------------------------------------------------------


def test_stop_during_a_wait_raises_stopped(
    client: ApiClient, mocked: responses.RequestsMock, clock: FakeTime
) -> None:
    clock.stop_on_wait = True
    mocked.get(EVENTS, json=error_body(429, "RATE_LIMIT_EXCEEDED"), status=429, headers={"Retry-After": "30"})
    with pytest.raises(Stopped):
        client.fetch_page("events", None)
    assert clock.waits == [30]
    assert len(mocked.calls) == 1


def test_stop_during_limiter_wait_raises_stopped(config: Config, clock: FakeTime, mocked: responses.RequestsMock) -> None:
    limiter = SharedRateLimiter(1, 60, burst=1, clock=clock)
    client = make_client(config, clock, limiters={"events": limiter})
    mocked.get(EVENTS, json=page_body(2))
    client.fetch_page("events", None)
    clock.stop_on_wait = True
    with pytest.raises(Stopped):
        client.fetch_page("events", None)
    assert len(mocked.calls) == 1


def test_stop_requested_before_sending(config: Config, clock: FakeTime, mocked: responses.RequestsMock) -> None:
    client = make_client(config, clock, should_stop=lambda: True)
    with pytest.raises(Stopped):
        client.fetch_page("events", None)
    assert len(mocked.calls) == 0


def test_default_sleep_is_interruptible(config: Config, mocked: responses.RequestsMock) -> None:
    """The built-in sleeper polls should_stop: a 60 s Retry-After ends within a poll."""
    flags = {"stop": False}
    client = ApiClient(config, None, should_stop=lambda: flags["stop"])

    def rate_limited_then_stop(request: Any) -> tuple[int, dict[str, str], str]:
        flags["stop"] = True  # a shutdown arrives while the client waits
        return 429, {"Retry-After": "60"}, json.dumps(error_body(429, "RATE_LIMIT_EXCEEDED"))

    mocked.add_callback(responses.GET, EVENTS, callback=rate_limited_then_stop)
    started = time.monotonic()
    with pytest.raises(Stopped):
        client.fetch_page("events", None)
    assert time.monotonic() - started < 30


@pytest.mark.parametrize(("consecutive", "floor"), [(1, 0.0), (2, 0.5), (3, 1.0), (5, 4.0), (9, 30.0), (40, 30.0)])
def test_repeated_429s_back_off_whatever_retry_after_says(consecutive: int, floor: float) -> None:
    assert retries.repeated_429_floor(consecutive) == floor


def test_a_storm_of_retry_after_zero_still_backs_off(
    client: ApiClient, mocked: responses.RequestsMock, clock: FakeTime
) -> None:
    for _ in range(3):
        mocked.get(EVENTS, json=error_body(429, "RATE_LIMIT_EXCEEDED"), status=429, headers={"Retry-After": "0"})
    mocked.get(EVENTS, json=page_body(2))
    client.fetch_page("events", None)
    assert clock.waits == [0.0, 0.5, 1.0]
