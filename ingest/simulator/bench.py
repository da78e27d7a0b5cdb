"""`measure_throughput`: how fast one client can page the feed (used by `make bench`)."""

from __future__ import annotations

import time

import orjson
import requests

DASHBOARD_HEADERS = {"User-Agent": "Mozilla/5.0 (X11; Linux x86_64) Chrome/120.0"}


def measure_throughput(base_url: str, api_key: str, pages: int, limit: int = 5000) -> float:
    """Events/s received by one sequential client paging the feed at `limit` (gzip, keep-alive).

    Restarts from the first page when the data runs out, so any `pages` works on any size.
    """
    root = base_url[: -len("/api/v1")]
    with requests.Session() as http:
        http.headers["X-API-Key"] = api_key
        grant = http.post(root + "/internal/dashboard/stream-access", headers=DASHBOARD_HEADERS, timeout=30)
        grant.raise_for_status()
        access = grant.json()["streamAccess"]
        http.headers[access["tokenHeader"]] = access["token"]
        url = root + access["endpoint"]
        cursor: str | None = None
        events = 0
        started = time.perf_counter()
        for _ in range(pages):
            params: dict[str, str | int] = {"limit": limit}
            if cursor:
                params["cursor"] = cursor
            response = http.get(url, params=params, timeout=60)
            response.raise_for_status()
            page = orjson.loads(response.content)
            events += len(page["data"])
            cursor = page["pagination"]["nextCursor"]
        return events / (time.perf_counter() - started)
