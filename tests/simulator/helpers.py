"""Plain-`requests` helpers for the simulator contract tests (no project client code)."""

from __future__ import annotations

import base64
import datetime as dt
import json
import time
from collections.abc import Callable
from typing import Any

import requests

BROWSER = {"User-Agent": "Mozilla/5.0 (X11; Linux x86_64) Chrome/120.0"}
ZERO_WIDTH = "\u200b\u200c\u200d\ufeff"


def root(base_url: str) -> str:
    return base_url[: -len("/api/v1")]


def session(key: str) -> requests.Session:
    http = requests.Session()
    http.headers["X-API-Key"] = key
    return http


def token(http: requests.Session, base_url: str) -> str:
    response = http.post(root(base_url) + "/internal/dashboard/stream-access", headers=BROWSER, timeout=10)
    assert response.status_code == 200, response.text
    return str(response.json()["streamAccess"]["token"])


def feed_url(base_url: str) -> str:
    return base_url + "/events/d4ta/x7k9/feed"


def cursor_json(cursor: str) -> dict[str, Any]:
    return dict(json.loads(base64.b64decode(cursor)))


def make_cursor(event_id: str, ts: int, exp_ms: int | None = None, urlsafe: bool = False) -> str:
    exp = exp_ms if exp_ms is not None else int(time.time() * 1000) + 600_000
    raw = json.dumps({"id": event_id, "ts": ts, "v": 2, "exp": exp}, separators=(",", ":")).encode()
    if urlsafe:
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")
    return base64.b64encode(raw).decode()


def parse_ts(value: Any) -> int:
    """Reference normaliser of section 5: strip, numbers by magnitude, else ISO-8601."""
    if isinstance(value, bool):
        raise TypeError("a boolean is not a timestamp")
    if isinstance(value, (int, float)):
        number = float(value)
    else:
        text = "".join(c for c in str(value) if c not in ZERO_WIDTH and c.isprintable()).strip()
        try:
            number = float(text)
        except ValueError:
            return int(dt.datetime.fromisoformat(text).timestamp() * 1000)
    if number < 1e11:
        return round(number * 1000)
    return int(number)


def storable(event: Any) -> bool:
    if not isinstance(event, dict) or not isinstance(event.get("id"), str):
        return False
    if "\\u0000" in json.dumps(event):  # json escapes NUL as \u0000
        return False
    try:
        parse_ts(event.get("timestamp"))
    except (ValueError, TypeError):
        return False
    return True


def wait_until(predicate: Callable[[], Any], timeout: float, interval: float = 0.02) -> Any:
    """Poll until `predicate()` returns something other than None/False; return it.

    Fails after `timeout` seconds. (Identity checks, because a 4xx `Response` is falsy.)
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value is not None and value is not False:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(interval)


def crawl(
    http: requests.Session, url: str, limit: int = 1000, params: dict[str, Any] | None = None,
    retries: int = 200,
) -> list[Any]:
    """Follow nextCursor to the end, retrying any fault on the same cursor; returns every item."""
    items: list[Any] = []
    cursor: str | None = None
    failures = 0
    while True:
        query = {"limit": limit, **(params or {})}
        if cursor:
            query["cursor"] = cursor
        try:
            response = http.get(url, params=query, timeout=30)
            page = response.json() if response.status_code == 200 else None
        except (requests.RequestException, ValueError):
            page = None
        if not isinstance(page, dict) or "pagination" not in page:
            failures += 1
            assert failures < retries, "too many faults in a row"
            continue
        items.extend(page["data"])
        cursor = page["pagination"]["nextCursor"]
        if not page["pagination"]["hasMore"]:
            return items
