"""The fault layer: each fault's shape, reproducibility for a seed, and the truth of a crawl."""

from __future__ import annotations

import json

import pytest
import requests

from tests.conftest import SIM_KEY
from tests.simulator.helpers import crawl, feed_url, parse_ts, session, storable, token

FAULT_FREE = {"p5xx": 0.0, "p_truncate": 0.0, "p_reset": 0.0, "p_empty200": 0.0, "p_slow": 0.0, "p_missing_fields": 0.0,
                  "p_malformed_timestamp": 0.0, "p_duplicate": 0.0, "p_unstorable": 0.0}


def only(**fault: float) -> dict[str, float]:
    """Chaos on, every fault off except the given ones."""
    return {"chaos": "mild", **FAULT_FREE, **fault}


@pytest.fixture
def http():
    with session(SIM_KEY) as s:
        yield s


def test_5xx_split_and_alb_pages(sim_factory, http) -> None:
    sim = sim_factory(**only(p5xx=1.0))
    seen = {}
    for i in range(60):
        response = http.get(sim.base_url + "/events", params={"limit": 1 + i})
        seen[response.status_code] = response
    assert set(seen) == {500, 502, 503, 504}
    for status in (502, 504):
        assert seen[status].headers["Server"] == "awselb/2.0"
        assert seen[status].headers["Content-Type"].startswith("text/html") and b"<html>" in seen[status].content
        assert "X-Powered-By" not in seen[status].headers
    assert seen[500].json()["code"] == "INTERNAL_ERROR" and seen[503].json()["error"] == "Service Unavailable"
    stream = http.post(sim.base_url[:-7] + "/internal/dashboard/stream-access", headers={"User-Agent": "Mozilla"})
    assert stream.status_code in (500, 502, 503, 504)
    assert sum(sim.stats()["faults"].values()) == 61


def test_truncated_bodies(sim_factory, http) -> None:
    sim = sim_factory(**only(p_truncate=1.0), truncate_min_bytes=10_000)
    response = http.get(sim.base_url + "/events", params={"limit": 100})
    assert response.status_code == 200 and response.content.startswith(b'{"data":[')
    with pytest.raises(ValueError):
        json.loads(response.content)
    small = http.get(sim.base_url + "/events", params={"limit": 2})  # under the size threshold: intact
    assert small.json()["meta"]["returned"] == 2
    assert sim.stats()["faults"] == {"truncate": 1}


def test_empty_200(sim_factory, http) -> None:
    sim = sim_factory(**only(p_empty200=1.0))
    bodies = {http.get(sim.base_url + "/events", params={"limit": 1 + i}).content for i in range(20)}
    assert bodies <= {b"", b"[]", b"null"} and b"" in bodies


def test_connection_reset_mid_body(sim_factory, http) -> None:
    sim = sim_factory(**only(p_reset=1.0))
    with pytest.raises(requests.exceptions.RequestException):
        http.get(sim.base_url + "/events", params={"limit": 1000}).json()
    http.close()
    assert sim.stats()["faults"] == {"reset": 1}


def test_slow_responses(sim_factory, http) -> None:
    import time

    sim = sim_factory(**only(p_slow=1.0), time_scale=50.0, slow_delay=5.0)  # 50-150 ms
    started = time.monotonic()
    assert http.get(sim.base_url + "/events").ok
    assert time.monotonic() - started >= 0.05


def test_missing_fields_header_and_damage(sim_factory, http) -> None:
    sim = sim_factory(**only(p_missing_fields=1.0), missing_fields_share=0.05)
    response = http.get(sim.base_url + "/events", params={"limit": 200})
    assert response.headers["X-Chaos-Applied"] == "missingFields"
    assert response.headers["X-Chaos-Description"].startswith("Missing fields: ")
    data = response.json()["data"]
    damaged = [e for e in data if len(e) < 8]
    assert len(damaged) == 10 and all("id" in e and "timestamp" in e for e in data)
    listed = set(response.headers["X-Chaos-Description"].split(": ")[1].split(", "))
    assert {k for e in damaged for k in ("name", "properties", "session", "userId") if k not in e} == listed


def test_malformed_timestamps_are_parseable(sim_factory, http) -> None:
    sim = sim_factory(**only(p_malformed_timestamp=1.0))
    clean = sim_factory()
    damaged = http.get(sim.base_url + "/events", params={"limit": 60}).json()["data"]
    reference = http.get(clean.base_url + "/events", params={"limit": 60}).json()["data"]
    assert [e["id"] for e in damaged] == [e["id"] for e in reference]
    for bad, good in zip(damaged, reference, strict=True):
        assert bad["timestamp"] != good["timestamp"]
        assert parse_ts(bad["timestamp"]) == parse_ts(good["timestamp"])


def test_duplicates_repeat_the_previous_page_tail(sim_factory, http) -> None:
    sim = sim_factory(**only(p_duplicate=1.0))
    first = http.get(sim.base_url + "/events", params={"limit": 10}).json()
    second = http.get(sim.base_url + "/events", params={"limit": 10, "cursor": first["pagination"]["nextCursor"]})
    ids = [e["id"] for e in second.json()["data"]]
    repeated = [i for i in ids if i in {e["id"] for e in first["data"]}]
    assert 1 <= len(repeated) <= 3 and ids[: len(repeated)] == [e["id"] for e in first["data"]][-len(repeated):]


def test_unstorable_events_are_static(sim_factory, http) -> None:
    sim = sim_factory(**only(p_unstorable=0.01))
    truth = sim.truth()
    assert truth.unstorable == 20 and len(truth.storable_ids) == 1980 and truth.total == 2000
    runs = [http.get(sim.base_url + "/events", params={"limit": 5000, "x": i}).json()["data"] for i in range(2)]
    assert runs[0] == runs[1]
    bad = [e for e in runs[0] if not storable(e)]
    assert len(bad) == 20
    assert any(isinstance(e, list) for e in bad) and any(isinstance(e, dict) and "id" not in e for e in bad)
    assert any(isinstance(e, dict) and e.get("timestamp") == "not-a-date" for e in bad)
    assert any(isinstance(e, dict) and "\x00" in e.get("name", "") for e in bad)


def fingerprint(sim, http) -> list[tuple]:
    """What a fixed request sequence sees: statuses, chaos headers, item ids or parse failures."""
    out = []
    cursor = None
    for i in range(40):
        params = {"limit": 50, "n": i % 7}
        if cursor:
            params["cursor"] = cursor
        try:
            response = http.get(sim.base_url + "/events", params=params)
        except requests.RequestException:
            out.append(("reset",))
            continue
        try:
            page = json.loads(response.content)
        except ValueError:
            out.append((response.status_code, "unparseable"))
            continue
        if isinstance(page, dict) and "data" in page:
            cursor = page["pagination"]["nextCursor"]
            ids = tuple(e.get("id") if isinstance(e, dict) else e for e in page["data"])
            shapes = tuple(sorted(e) if isinstance(e, dict) else () for e in page["data"])
            out.append((response.status_code, response.headers.get("X-Chaos-Description"), ids, shapes))
        else:
            out.append((response.status_code, response.content[:20]))
    return out


def test_chaos_is_reproducible_for_a_seed(sim_factory) -> None:
    config = {"chaos": "heavy", "chaos_multiplier": 3.0, "truncate_min_bytes": 0, "slow_delay": 0.01}
    runs = []
    for seed in (11, 11, 12):
        sim = sim_factory(**{**config, "chaos_seed": seed})
        with session(SIM_KEY) as http:
            runs.append(fingerprint(sim, http))
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]
    assert len({entry[0] for entry in runs[0]}) >= 3  # several kinds of outcome were exercised


@pytest.mark.parametrize("route", ["events", "feed"])
def test_truth_matches_a_full_crawl_under_heavy_chaos(sim_factory, route) -> None:
    sim = sim_factory(events=20_000, seed=5, chaos="heavy", rate_limits=False, slow_delay=0.2)
    truth = sim.truth()
    assert truth.unstorable == 40 and len(truth.storable_ids) + truth.unstorable == truth.total == 20_000
    with session(SIM_KEY) as http:
        if route == "feed":
            http.headers["X-Stream-Token"] = token(http, sim.base_url)
            url = feed_url(sim.base_url)
        else:
            url = sim.base_url + "/events"
        items = crawl(http, url, limit=2000)
    stored = {e["id"] for e in items if storable(e)}
    assert stored == truth.storable_ids
    assert len(items) >= 20_000  # duplicates may add some, nothing is lost
    faults = sim.stats()["faults"]
    assert faults, "heavy chaos must inject faults"
