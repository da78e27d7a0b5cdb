"""Contract tests over real HTTP: datasync-api.md sections 2-6, one behaviour per test."""

from __future__ import annotations

import base64
import itertools
import json
import re
import time

import pytest
import requests

from tests.conftest import SIM_KEY, SIM_KEY_2
from tests.simulator.helpers import (
    BROWSER,
    crawl,
    cursor_json,
    feed_url,
    make_cursor,
    parse_ts,
    root,
    session,
    token,
    wait_until,
)

EVENT_KEYS = ["id", "sessionId", "userId", "type", "name", "properties", "timestamp", "session"]
ISO = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")
UUID4 = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
DECIMAL = re.compile(r"^\d+(\.\d{1,3})?$")
TYPES = {"page_view", "click", "api_call", "form_submit", "scroll", "purchase", "error", "video_play"}


@pytest.fixture
def sim(sim_factory):
    return sim_factory()


@pytest.fixture
def http():
    with session(SIM_KEY) as s:
        yield s


@pytest.fixture
def all_events(sim, http):
    return crawl(http, sim.base_url + "/events", limit=5000)


def key_of(event: dict) -> tuple[int, str]:
    return parse_ts(event["timestamp"]), event["id"]


# -- envelope and schema (3.2, 6) ----------------------------------------------------------


def test_envelope_is_nested_with_common_headers(sim, http) -> None:
    response = http.get(sim.base_url + "/events", params={"limit": 2})
    body = response.json()
    assert list(body) == ["data", "pagination", "meta"]
    assert list(body["pagination"]) == ["limit", "hasMore", "cursorExpiresIn", "nextCursor"]
    assert body["pagination"]["limit"] == 2 and body["pagination"]["hasMore"] is True
    assert body["meta"] == {"total": 2000, "returned": 2, "requestId": response.headers["X-Request-ID"]}
    assert response.headers["Content-Type"] == "application/json; charset=utf-8"
    assert response.headers["X-Powered-By"] == "Express"
    assert response.headers["Access-Control-Allow-Origin"] == "*"
    assert re.match(r'^W/"[0-9a-f]+-[A-Za-z0-9+/]{27}"$', response.headers["ETag"])
    assert response.headers["Connection"] == "keep-alive" and "Date" in response.headers


def test_event_schema(all_events) -> None:
    assert len(all_events) == 2000
    for event in all_events:
        assert list(event) == EVENT_KEYS
        assert UUID4.match(event["id"]) and UUID4.match(event["sessionId"]) and UUID4.match(event["userId"])
        assert event["type"] in TYPES and re.match(r"^event_[a-z0-9]{6}$", event["name"])
        assert event["properties"] == {"page": "/home"}
        assert event["session"]["id"] == event["sessionId"]
        assert event["session"]["deviceType"] in ("mobile", "tablet", "desktop")
        assert event["session"]["browser"] in ("Chrome", "Safari", "Firefox", "Edge")
    assert len({e["id"] for e in all_events}) == 2000
    per_session: dict[str, set] = {}
    for event in all_events:
        per_session.setdefault(event["sessionId"], set()).add((event["userId"], json.dumps(event["session"])))
    assert all(len(v) == 1 for v in per_session.values())  # user and device fixed for a session
    assert 35 <= 2000 / len(per_session) <= 70


def test_limit_default_and_cap(sim, http) -> None:
    assert len(http.get(sim.base_url + "/events").json()["data"]) == 100
    body = http.get(sim.base_url + "/events", params={"limit": 9000}).json()
    assert body["pagination"]["limit"] == 5000 and body["meta"]["returned"] == 2000


def test_ordering_is_strict_and_pages_are_full(sim, http) -> None:
    url, cursor, keys, pages = sim.base_url + "/events", None, [], []
    while True:
        body = http.get(url, params={"limit": 300, **({"cursor": cursor} if cursor else {})}).json()
        pages.append(body)
        keys += [key_of(e) for e in body["data"]]
        cursor = body["pagination"]["nextCursor"]
        if not body["pagination"]["hasMore"]:
            break
    assert all(a > b for a, b in itertools.pairwise(keys))  # (ts DESC, id DESC), no inversions, no repeats
    assert [p["meta"]["returned"] for p in pages] == [300] * 6 + [200]
    assert pages[-1]["pagination"]["nextCursor"] is None
    assert keys[0][0] == 1769541612369 and keys[-1][0] == 1766946793000


def test_mixed_timestamps_follow_page_position(sim, http, all_events) -> None:
    by_id = {e["id"]: parse_ts(e["timestamp"]) for e in all_events}
    for offset in (0, 1, 2):
        first = all_events[offset]
        cursor = make_cursor(first["id"], parse_ts(first["timestamp"]))
        data = http.get(sim.base_url + "/events", params={"limit": 9, "cursor": cursor}).json()["data"]
        for i, event in enumerate(data):
            if i % 3 == 0:
                assert isinstance(event["timestamp"], int)
            else:
                assert ISO.match(event["timestamp"])
            assert parse_ts(event["timestamp"]) == by_id[event["id"]]


def test_feed_epoch_ms_switch(sim_factory) -> None:
    sim = sim_factory(feed_timestamp_mode="epochMs")
    with session(SIM_KEY) as http:
        data = http.get(feed_url(sim.base_url), headers={"X-Stream-Token": token(http, sim.base_url)}).json()["data"]
    assert len(data) == 100 and all(isinstance(e["timestamp"], int) for e in data)


# -- cursors (3.4-3.6) ----------------------------------------------------------------------


def test_cursor_encodes_last_event_with_fresh_expiry(sim, http) -> None:
    before = time.time() * 1000
    body = http.get(sim.base_url + "/events", params={"limit": 5}).json()
    decoded = cursor_json(body["pagination"]["nextCursor"])
    assert list(decoded) == ["id", "ts", "v", "exp"]
    last = body["data"][-1]
    assert decoded["id"] == last["id"] and decoded["ts"] == parse_ts(last["timestamp"]) and decoded["v"] == 2
    assert before + 119_000 <= decoded["exp"] <= time.time() * 1000 + 120_000
    assert isinstance(body["pagination"]["cursorExpiresIn"], int)
    assert 115 <= body["pagination"]["cursorExpiresIn"] <= 120


@pytest.mark.parametrize("urlsafe", [False, True])
def test_both_base64_alphabets_give_the_same_page(sim, http, all_events, urlsafe) -> None:
    anchor = all_events[41]
    cursor = make_cursor(anchor["id"], parse_ts(anchor["timestamp"]), urlsafe=urlsafe)
    data = http.get(sim.base_url + "/events", params={"limit": 10, "cursor": cursor}).json()["data"]
    assert [e["id"] for e in data] == [e["id"] for e in all_events[42:52]]


def test_forged_cursor_positions_by_timestamp(sim, http, all_events) -> None:
    target = all_events[500]
    ts = parse_ts(target["timestamp"])
    forged = make_cursor("ffffffff-ffff-ffff-ffff-ffffffffffff", ts + 1)
    data = http.get(sim.base_url + "/events", params={"limit": 5, "cursor": forged}).json()["data"]
    expected = [e for e in all_events if parse_ts(e["timestamp"]) <= ts][:5]
    assert [e["id"] for e in data] == [e["id"] for e in expected]
    # the tie-break: an id below every real id, same ts, starts after all events at that ts
    low = make_cursor("00000000-0000-0000-0000-000000000000", ts)
    data = http.get(sim.base_url + "/events", params={"limit": 1, "cursor": low}).json()["data"]
    assert data[0]["id"] == next(e["id"] for e in all_events if parse_ts(e["timestamp"]) < ts)


def test_cursor_outside_the_data(sim_factory, http) -> None:
    sim = sim_factory()
    newest = http.get(sim.base_url + "/events", params={"limit": 3}).json()["data"]
    future = make_cursor("ffffffff-ffff-ffff-ffff-ffffffffffff", 1769541612369 + 10_000)
    data = http.get(sim.base_url + "/events", params={"limit": 3, "cursor": future}).json()["data"]
    assert [e["id"] for e in data] == [e["id"] for e in newest]
    past = make_cursor("ffffffff-ffff-ffff-ffff-ffffffffffff", 1766946793000 - 1)
    body = http.get(sim.base_url + "/events", params={"cursor": past}).json()
    assert body["data"] == [] and body["pagination"]["hasMore"] is False and body["pagination"]["nextCursor"] is None
    teapot = sim_factory(out_of_range_mode="teapot")
    assert http.get(teapot.base_url + "/events", params={"cursor": past}).status_code == 418


def test_expired_cursor_and_revival(sim, http, all_events) -> None:
    anchor = all_events[10]
    expired = make_cursor(anchor["id"], parse_ts(anchor["timestamp"]), exp_ms=int(time.time() * 1000) - 90_000)
    response = http.get(sim.base_url + "/events", params={"cursor": expired})
    assert response.status_code == 400 and "X-Cache" not in response.headers
    body = response.json()
    assert body["code"] == "CURSOR_EXPIRED" and body["error"] == "Bad Request"
    assert re.match(r"^Cursor expired \d+ minutes? ago$", body["message"])
    revived = make_cursor(anchor["id"], parse_ts(anchor["timestamp"]))
    data = http.get(sim.base_url + "/events", params={"cursor": revived, "limit": 2}).json()["data"]
    assert [e["id"] for e in data] == [e["id"] for e in all_events[11:13]]


@pytest.mark.parametrize(
    "cursor",
    ["%%%garbage", base64.b64encode(b"{bad json").decode(), base64.b64encode(b'{"id":"x","ts":1}').decode()],
)
def test_malformed_cursor(sim, http, cursor) -> None:
    response = http.get(sim.base_url + "/events", params={"cursor": cursor})
    assert response.status_code == 400 and response.json()["code"] == "CURSOR_INVALID_FORMAT"


def test_garbage_cursor_as_load_balancer_502_switch(sim_factory, http) -> None:
    sim = sim_factory(garbage_cursor_502=True)
    response = http.get(sim.base_url + "/events", params={"cursor": "%%%garbage"})
    assert response.status_code == 502 and response.headers["Server"] == "awselb/2.0"


def test_cursor_expiry_scales_with_time(sim_factory, http) -> None:
    sim = sim_factory(time_scale=100.0)
    body = http.get(sim.base_url + "/events").json()
    expires_in = body["pagination"]["cursorExpiresIn"]
    assert isinstance(expires_in, float) and 1.0 <= expires_in <= 1.2
    exp = cursor_json(body["pagination"]["nextCursor"])["exp"]
    assert abs(exp - (time.time() * 1000 + 1200)) < 1000  # absolute wall-clock epoch ms
    wait_until(lambda: time.time() * 1000 > exp + 5, timeout=10)
    stale = http.get(sim.base_url + "/events", params={"cursor": body["pagination"]["nextCursor"], "limit": 7})
    assert stale.status_code == 400 and stale.json()["code"] == "CURSOR_EXPIRED"


# -- auth (2.1) -------------------------------------------------------------------------------


@pytest.mark.parametrize("headers", [{}, {"X-API-Key": "ds_" + "9" * 32}])
def test_missing_or_unknown_key_is_401(sim, headers) -> None:
    response = requests.get(sim.base_url + "/events", headers=headers)
    assert response.status_code == 401 and response.json()["code"] == "UNAUTHORIZED"
    assert set(response.json()) >= {"error", "message", "code"}


def test_key_expires_after_validity_from_first_call(sim_factory) -> None:
    sim = sim_factory(key_validity=60.0, time_scale=100.0)  # 0.6 s of wall time
    with session(SIM_KEY) as http:
        assert http.get(sim.base_url + "/events").status_code == 200
        expired = wait_until(lambda: (r := http.get(sim.base_url + "/events")).status_code == 401 and r, 10)
    assert expired.json()["code"] == "API_KEY_EXPIRED"
    with session(SIM_KEY_2) as other:  # the other key's clock has not started
        assert other.get(sim.base_url + "/events").status_code == 200


def test_query_parameter_key_has_its_own_bucket(sim_factory) -> None:
    sim = sim_factory(rate_limits=True)
    statuses = [requests.get(sim.base_url + "/events", params={"api_key": SIM_KEY, "limit": 1 + i}).status_code
                for i in range(6)]
    assert statuses == [200] * 5 + [429]
    with session(SIM_KEY) as http:
        response = http.get(sim.base_url + "/events", params={"limit": 77})
    assert response.status_code == 200 and response.headers["X-RateLimit-Remaining"] == "9"


# -- rate limits and cache (4) ----------------------------------------------------------------


def test_fixed_window_headers_and_429(sim_factory, http) -> None:
    sim = sim_factory(rate_limits=True)
    remaining, resets = [], []
    for i in range(10):
        params = {"limit": 10 + i} if i != 3 else {"cursor": "garbage"}  # 4xx count too
        response = http.get(sim.base_url + "/events", params=params)
        assert response.headers["X-RateLimit-Limit"] == "10"
        remaining.append(int(response.headers["X-RateLimit-Remaining"]))
        resets.append(int(response.headers["X-RateLimit-Reset"]))
    assert remaining == list(range(9, -1, -1))
    assert all(0 < r <= 60 for r in resets) and resets == sorted(resets, reverse=True)
    response = http.get(sim.base_url + "/events", params={"limit": 99})
    assert response.status_code == 429
    body = response.json()
    assert body["code"] == "RATE_LIMIT_EXCEEDED" and body["error"] == "Too Many Requests"
    retry = int(response.headers["Retry-After"])
    assert retry == int(response.headers["X-RateLimit-Reset"]) == body["rateLimit"]["retryAfter"]
    assert body["rateLimit"] == {"limit": 10, "remaining": 0, "reset": retry, "retryAfter": retry}
    assert "X-Cache" not in response.headers
    # budgets are per endpoint: the feed still works
    assert http.get(feed_url(sim.base_url), headers={"X-Stream-Token": token(http, sim.base_url)}).status_code == 200


def test_window_reopens_and_durations_scale(sim_factory, http) -> None:
    sim = sim_factory(rate_limits=True, time_scale=30.0)  # a 2 s window
    for i in range(10):
        response = http.get(sim.base_url + "/events", params={"limit": 1 + i})
        reset = response.headers["X-RateLimit-Reset"]
        assert DECIMAL.match(reset) and 0 < float(reset) <= 2.0
    rejected = http.get(sim.base_url + "/events", params={"limit": 50})
    assert rejected.status_code == 429 and 0 < float(rejected.headers["Retry-After"]) <= 2.0
    assert isinstance(rejected.json()["rateLimit"]["retryAfter"], float)
    reopened = wait_until(lambda: (r := http.get(sim.base_url + "/events", params={"limit": 51})).ok and r, 15)
    assert reopened.headers["X-RateLimit-Remaining"] == "9"


def test_cache_hits_are_free_and_replayed(sim_factory, http) -> None:
    sim = sim_factory(rate_limits=True, time_scale=20.0)  # 1.5 s cache, 3 s window
    first = http.get(sim.base_url + "/events", params={"limit": 20})
    second = http.get(sim.base_url + "/events", params={"limit": 20})
    assert (first.headers["X-Cache"], second.headers["X-Cache"]) == ("MISS", "HIT")
    assert first.headers["X-RateLimit-Remaining"] == second.headers["X-RateLimit-Remaining"] == "9"
    assert second.content == first.content  # stale requestId and cursorExpiresIn included
    assert DECIMAL.match(first.headers["X-Cache-TTL"]) and float(first.headers["X-Cache-TTL"]) == 1.5
    with session(SIM_KEY_2) as other:  # shared across keys
        assert other.get(sim.base_url + "/events", params={"limit": 20}).headers["X-Cache"] == "HIT"
    third = wait_until(
        lambda: (r := http.get(sim.base_url + "/events", params={"limit": 20})).headers.get("X-Cache") == "MISS" and r,
        15)
    assert third.json()["meta"]["requestId"] != first.json()["meta"]["requestId"]


def test_feed_is_not_cached_and_has_no_rate_headers(sim_factory, http) -> None:
    sim = sim_factory(rate_limits=True)
    headers = {"X-Stream-Token": token(http, sim.base_url)}
    responses = [http.get(feed_url(sim.base_url), headers=headers, params={"limit": 5}) for _ in range(2)]
    for response in responses:
        assert response.status_code == 200
        assert not any(h.lower().startswith(("x-ratelimit", "x-cache")) for h in response.headers)
    assert responses[0].json()["meta"]["requestId"] != responses[1].json()["meta"]["requestId"]


def test_hidden_feed_limit_is_a_sliding_window(sim_factory, http) -> None:
    sim = sim_factory(rate_limits=True, time_scale=30.0)  # 40 per 2 s
    headers = {"X-Stream-Token": token(http, sim.base_url)}
    statuses = [http.get(feed_url(sim.base_url), headers=headers, params={"limit": 1}).status_code for _ in range(40)]
    rejected = http.get(feed_url(sim.base_url), headers=headers, params={"limit": 1})
    if statuses != [200] * 40:
        pytest.fail(f"the first 40 feed calls must pass, got {statuses}")
    assert rejected.status_code == 429
    assert "Retry-After" not in rejected.headers and not any(h.startswith("X-RateLimit") for h in rejected.headers)
    assert rejected.json()["code"] == "RATE_LIMIT_EXCEEDED" and "rateLimit" not in rejected.json()
    with session(SIM_KEY_2) as other:  # per key
        assert other.get(feed_url(sim.base_url), headers={"X-Stream-Token": token(other, sim.base_url)}).ok
    wait_until(lambda: http.get(feed_url(sim.base_url), headers=headers, params={"limit": 1}).ok, 15)


def test_feed_retry_after_switch(sim_factory, http) -> None:
    sim = sim_factory(rate_limits=True, feed_limit=2, feed_retry_after=True)
    headers = {"X-Stream-Token": token(http, sim.base_url)}
    statuses = [http.get(feed_url(sim.base_url), headers=headers).status_code for _ in range(2)]
    rejected = http.get(feed_url(sim.base_url), headers=headers)
    assert statuses == [200, 200] and rejected.status_code == 429
    assert 0 < int(rejected.headers["Retry-After"]) <= 60 and "X-RateLimit-Limit" not in rejected.headers


# -- token flow (2.2) ------------------------------------------------------------------------


def test_stream_access_needs_a_dashboard_signal(sim, http) -> None:
    url = root(sim.base_url) + "/internal/dashboard/stream-access"
    plain = http.post(url, headers={"User-Agent": "curl/8.0"})
    assert plain.status_code == 403 and plain.json()["code"] == "DASHBOARD_REQUIRED"
    granted = http.post(url, headers=BROWSER, json={})
    access = granted.json()["streamAccess"]
    assert access["endpoint"] == "/api/v1/events/d4ta/x7k9/feed" and access["tokenHeader"] == "X-Stream-Token"
    assert re.match(r"^[0-9a-f]{64}$", access["token"]) and access["expiresIn"] == 300
    assert "generatedAt" in granted.json()["meta"]
    cookie = http.post(url, headers={"Cookie": f"dashboard_api_key={SIM_KEY}", "User-Agent": "x"})
    assert cookie.status_code == 200
    assert requests.post(url, headers=BROWSER).status_code == 401


def test_feed_token_rules(sim, http) -> None:
    url = feed_url(sim.base_url)
    for headers in ({}, {"X-Stream-Token": "0" * 64}):
        response = http.get(url, headers=headers)
        assert response.status_code == 403 and response.json()["code"] == "INVALID_STREAM_TOKEN"
    first, second = token(http, sim.base_url), token(http, sim.base_url)
    assert http.get(url, headers={"X-Stream-Token": first}).ok  # a new token does not revoke the old
    assert http.get(url, headers={"X-Stream-Token": second}).ok
    with session(SIM_KEY_2) as other:  # bound to the key that created it
        assert other.get(url, headers={"X-Stream-Token": first}).status_code == 403


def test_token_expires(sim_factory, http) -> None:
    sim = sim_factory(time_scale=300.0)  # 1 s tokens
    granted = http.post(root(sim.base_url) + "/internal/dashboard/stream-access", headers=BROWSER).json()
    assert granted["streamAccess"]["expiresIn"] == 1.0
    headers = {"X-Stream-Token": granted["streamAccess"]["token"]}
    assert http.get(feed_url(sim.base_url), headers=headers).ok
    expired = wait_until(lambda: (r := http.get(feed_url(sim.base_url), headers=headers)).status_code == 403 and r, 10)
    assert expired.json()["code"] == "INVALID_STREAM_TOKEN"


def test_stream_access_limit(sim_factory, http) -> None:
    sim = sim_factory(rate_limits=True)
    url = root(sim.base_url) + "/internal/dashboard/stream-access"
    statuses = [http.post(url, headers=BROWSER).status_code for _ in range(11)]
    assert statuses == [200] * 10 + [429]
    last = http.post(url, headers=BROWSER)
    assert last.status_code == 429 and not any(h.startswith("X-RateLimit") for h in last.headers)


# -- feed since/until (3.1) --------------------------------------------------------------------


def test_feed_honours_since_until_and_events_ignores_them(sim, http, all_events) -> None:
    since, until = parse_ts(all_events[1500]["timestamp"]), parse_ts(all_events[300]["timestamp"])
    headers = {"X-Stream-Token": token(http, sim.base_url)}
    http.headers.update(headers)
    window = crawl(http, feed_url(sim.base_url), limit=128, params={"since": since, "until": until})
    expected = [e["id"] for e in all_events if since <= parse_ts(e["timestamp"]) < until]
    assert [e["id"] for e in window] == expected and len(expected) > 1000
    body = http.get(feed_url(sim.base_url), params={"since": since, "until": until, "limit": 3}).json()
    assert body["meta"]["total"] == 2000
    ignored = http.get(sim.base_url + "/events", params={"since": since, "until": until, "limit": 3}).json()
    assert [e["id"] for e in ignored["data"]] == [e["id"] for e in all_events[:3]]


def test_feed_cursor_interchangeable_with_events(sim, http, all_events) -> None:
    cursor = http.get(sim.base_url + "/events", params={"limit": 50}).json()["pagination"]["nextCursor"]
    data = http.get(feed_url(sim.base_url), headers={"X-Stream-Token": token(http, sim.base_url)},
                    params={"limit": 5, "cursor": cursor}).json()["data"]
    assert [e["id"] for e in data] == [e["id"] for e in all_events[50:55]]


# -- other routes (1) ---------------------------------------------------------------------------


def test_discovery_routes(sim, http, all_events) -> None:
    base = root(sim.base_url)
    assert requests.get(base + "/health").text == "OK"
    assert requests.get(base + "/internal/health").json()["status"] == "healthy"
    stats = http.get(base + "/internal/stats").json()
    assert stats["events"] == 2000 and sum(t["count"] for t in stats["eventTypes"]) == 2000
    manifest = http.get(sim.base_url).json()
    assert manifest["version"] == "v1" and manifest["auth"] == {"method": "API Key", "header": "X-API-Key"}
    one = http.get(sim.base_url + "/events/" + all_events[7]["id"]).json()["data"]
    assert one["id"] == all_events[7]["id"] and list(one) == EVENT_KEYS
    for word in ("bulk", "export", "00000000-0000-4000-8000-000000000000"):
        missing = http.get(sim.base_url + "/events/" + word)
        assert missing.status_code == 404 and missing.json()["code"] == "EVENT_NOT_FOUND"
        assert missing.json()["message"] == f"Event with id '{word}' not found"
    unknown = http.get(sim.base_url + "/nothing")
    assert unknown.status_code == 404 and unknown.json()["code"] == "ENDPOINT_NOT_FOUND"
    html = requests.get(base + "/openapi.json")
    assert html.status_code == 200 and html.headers["Content-Type"].startswith("text/html")


def test_gzip_only_when_asked(sim, http) -> None:
    zipped = http.get(sim.base_url + "/events", headers={"Accept-Encoding": "gzip"}, stream=True)
    assert zipped.headers["Content-Encoding"] == "gzip"
    raw = zipped.raw.read(decode_content=False)
    assert raw[:2] == b"\x1f\x8b" and int(zipped.headers["Content-Length"]) == len(raw)
    plain = http.get(sim.base_url + "/events", headers={"Accept-Encoding": "identity"})
    assert "Content-Encoding" not in plain.headers and plain.json()["meta"]["returned"] == 100


def test_realistic_latency_scales(sim_factory, http) -> None:
    sim = sim_factory(latency="realistic", time_scale=50.0, events=5000)  # ~82 ms for 5,000 events
    started = time.monotonic()
    body = http.get(sim.base_url + "/events", params={"limit": 5000}).json()
    elapsed = time.monotonic() - started
    assert body["meta"]["returned"] == 5000
    assert elapsed >= 0.8 * 4.1 / 50
    assert body["pagination"]["cursorExpiresIn"] <= 120 / 50 - 0.8 * 4.1 / 50 + 0.01


def test_stats_counters(sim, http) -> None:
    http.get(sim.base_url + "/events", params={"limit": 5})
    http.get(sim.base_url + "/events", params={"cursor": "bad"})
    stats = sim.stats()
    assert stats["requests"]["events"] == 2 and stats["responses"] == {"200": 1, "400": 1}
    assert stats["events_served"] == 5


@pytest.mark.parametrize("encoding", ["gzip", "identity"])
def test_pages_rendered_ahead_are_identical_to_cold_renders(sim, http, encoding) -> None:
    headers = {"Accept-Encoding": encoding}
    first = http.get(sim.base_url + "/events", params={"limit": 700}, headers=headers).json()
    params = {"limit": 700, "cursor": first["pagination"]["nextCursor"]}
    ahead = http.get(sim.base_url + "/events", params=params, headers=headers, stream=True)  # prepared ahead
    cold = http.get(sim.base_url + "/events", params=params, headers=headers, stream=True)  # cache HIT, re-rendered
    assert (ahead.headers["X-Cache"], cold.headers["X-Cache"]) == ("MISS", "HIT")
    assert ahead.raw.read(decode_content=True) == cold.raw.read(decode_content=True)
    assert ahead.headers["ETag"] == cold.headers["ETag"]
