"""The protocol-fault setting: each broken form of paging is served as described, now and
then (a share of the page positions, for their first requests) and for good (from a position
on, past which no cursor gets). Plain HTTP, no client code: the client's tests rely on these
faults being what they claim."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from typing import Any

import pytest
import requests

from ingest.simulator import SimulatorConfig
from ingest.simulator.protocol import Shape, broken_shape
from tests.conftest import SIM_KEY
from tests.simulator.helpers import crawl, cursor_json, feed_url, make_cursor, parse_ts, session, token, wait_until

FORGE_ID = "ffffffff-ffff-ffff-ffff-ffffffffffff"


@pytest.fixture
def http() -> Any:
    with session(SIM_KEY) as s:
        yield s


@pytest.fixture
def order(sim_factory: Any, http: requests.Session) -> list[dict[str, Any]]:
    """Every event of the test dataset, in the API's order, from a simulator without faults."""
    return crawl(http, sim_factory().base_url + "/events", limit=5000)


def at(event: dict[str, Any]) -> str:
    """A cursor at `event`: the page after it starts with the event below it."""
    return make_cursor(event["id"], parse_ts(event["timestamp"]))


def get(http: requests.Session, url: str, limit: int, cursor: str | None = None, **params: Any) -> dict[str, Any]:
    query = {"limit": limit, **params, **({"cursor": cursor} if cursor else {})}
    response = http.get(url, params=query, timeout=10)
    assert response.status_code == 200, response.text
    return dict(response.json())


def ids(page: dict[str, Any]) -> list[str]:
    return [e["id"] for e in page["data"]]


def leads_to(cursor: str | None) -> tuple[str, int] | None:
    if cursor is None:
        return None
    decoded = cursor_json(cursor)
    return decoded["id"], decoded["ts"]


def position(event: dict[str, Any]) -> tuple[str, int]:
    return event["id"], parse_ts(event["timestamp"])


@pytest.mark.parametrize(
    ("kind", "args", "shape"),
    [
        pytest.param("none", (0, 10, 0, 50, 10, True, 0, True), None, id="off"),
        pytest.param("no_cursor", (0, 10, 0, 50, 10, True, None, False), None, id="not-chosen"),
        pytest.param("no_cursor", (40, 50, 0, 50, 10, False, None, True), None, id="last-page-is-sound"),
        pytest.param("no_cursor", (20, 30, 0, 50, 10, True, None, True), Shape(20, 30, True, False), id="no-cursor"),
        pytest.param("repeat_cursor", (20, 30, 0, 50, 10, True, None, True), Shape(20, 30, True, True),
                     id="repeat-cursor"),
        pytest.param("empty_pages", (20, 30, 0, 50, 10, True, None, True), Shape(20, 20, True, True), id="empty"),
        pytest.param("no_cursor", (10, 20, 0, 50, 10, True, 25, False), None, id="above-the-stuck-position"),
        pytest.param("no_cursor", (30, 40, 0, 50, 10, True, 25, False), Shape(25, 35, True, False), id="stuck"),
        pytest.param("repeat_cursor", (50, 50, 0, 50, 10, False, 25, False), Shape(25, 35, True, True),
                     id="stuck-at-the-end"),
        pytest.param("empty_pages", (35, 45, 30, 45, 10, True, 25, False), Shape(30, 30, True, True),
                     id="stuck-above-the-window"),
    ],
)
def test_broken_shape(kind: str, args: tuple[Any, ...], shape: Shape | None) -> None:
    assert broken_shape(kind, *args) == shape


def test_no_cursor_now_and_then(sim_factory: Any, http: requests.Session, order: list[dict[str, Any]]) -> None:
    sim = sim_factory(protocol_fault="no_cursor", protocol_fault_rate=1.0)
    url = sim.base_url + "/events"
    first = get(http, url, 100)
    assert ids(first) == [e["id"] for e in order[:100]]
    assert first["pagination"]["hasMore"] is True and first["pagination"]["nextCursor"] is None
    again = get(http, url, 100)  # the position's one faulty answer is spent
    assert ids(again) == ids(first) and leads_to(again["pagination"]["nextCursor"]) == position(order[99])
    last = get(http, url, 100, at(order[-51]))  # a last page is never faulty
    assert ids(last) == [e["id"] for e in order[-50:]] and last["pagination"]["hasMore"] is False
    assert sim.stats()["faults"] == {"no_cursor": 1}


def test_repeat_cursor_now_and_then(sim_factory: Any, http: requests.Session, order: list[dict[str, Any]]) -> None:
    sim = sim_factory(protocol_fault="repeat_cursor", protocol_fault_rate=1.0)
    url = sim.base_url + "/events"
    first = get(http, url, 100)
    back = first["pagination"]["nextCursor"]
    assert ids(first) == [e["id"] for e in order[:100]] and first["pagination"]["hasMore"] is True
    assert leads_to(back) == (FORGE_ID, parse_ts(order[0]["timestamp"]) + 1)  # above the newest event
    assert ids(get(http, url, 100, back)) == ids(first), "the cursor leads back to the page just served"
    second = get(http, url, 100, at(order[99]))
    assert ids(second) == [e["id"] for e in order[100:200]]
    assert leads_to(second["pagination"]["nextCursor"]) == position(order[99])
    assert sim.stats()["faults"] == {"repeat_cursor": 2}


def test_empty_pages_again_and_again(sim_factory: Any, http: requests.Session, order: list[dict[str, Any]]) -> None:
    sim = sim_factory(protocol_fault="empty_pages", protocol_fault_rate=1.0, protocol_fault_repeats=3)
    url = sim.base_url + "/events"
    cursor = at(order[99])
    for _ in range(3):
        page = get(http, url, 100, cursor)
        assert page["data"] == [] and page["pagination"]["hasMore"] is True and page["meta"]["returned"] == 0
        assert leads_to(page["pagination"]["nextCursor"]) == position(order[99]), "the position has not moved"
        cursor = page["pagination"]["nextCursor"]
    assert ids(get(http, url, 100, cursor)) == [e["id"] for e in order[100:200]]
    assert sim.stats()["faults"] == {"empty_pages": 3}


def test_now_and_then_is_a_share_of_positions_the_same_for_every_run_of_a_seed(
    sim_factory: Any, http: requests.Session
) -> None:
    counts = []
    for _ in range(2):
        sim = sim_factory(protocol_fault="empty_pages", protocol_fault_rate=0.5)
        assert len(crawl(http, sim.base_url + "/events", limit=100)) == 2000  # an empty page's cursor asks again
        counts.append(sim.stats()["faults"].get("empty_pages", 0))
    assert 0 < counts[0] < 19 and counts[0] == counts[1], counts


@pytest.mark.parametrize("kind", ["no_cursor", "repeat_cursor", "empty_pages"])
def test_stuck_from_a_position_whatever_the_cursor(
    sim_factory: Any, http: requests.Session, order: list[dict[str, Any]], kind: str
) -> None:
    sim = sim_factory(protocol_fault=kind, protocol_fault_from=1000)
    url = sim.base_url + "/events"
    above = get(http, url, 300, at(order[899]))  # starts above the stuck position: sound
    assert ids(above) == [e["id"] for e in order[900:1200]]
    assert leads_to(above["pagination"]["nextCursor"]) == position(order[1199])
    stuck = order[1000:1300] if kind != "empty_pages" else []
    for event in (order[1199], order[1299], order[1799], order[-1]):  # whatever is below, and the end
        page = get(http, url, 300, at(event))
        assert ids(page) == [e["id"] for e in stuck] and page["pagination"]["hasMore"] is True
        expected = None if kind == "no_cursor" else position(order[999])
        assert leads_to(page["pagination"]["nextCursor"]) == expected
    assert sim.stats()["faults"] == {kind: 4}


def test_stuck_on_the_feed_at_the_top_of_a_window_below_the_position(
    sim_factory: Any, http: requests.Session, order: list[dict[str, Any]]
) -> None:
    sim = sim_factory(protocol_fault="no_cursor", protocol_fault_from=1000)
    http.headers["X-Stream-Token"] = token(http, sim.base_url)
    until = parse_ts(order[1500]["timestamp"]) + 1
    since = parse_ts(order[-1]["timestamp"])
    window = [e for e in order if since <= parse_ts(e["timestamp"]) < until]
    for cursor in (None, at(window[150])):
        page = get(http, feed_url(sim.base_url), 100, cursor, since=since, until=until)
        assert ids(page) == [e["id"] for e in window[:100]]
        assert page["pagination"]["hasMore"] is True and page["pagination"]["nextCursor"] is None
    assert sim.stats()["faults"] == {"no_cursor": 2}


@pytest.mark.parametrize(
    "values",
    [{"protocol_fault": "sometimes"}, {"protocol_fault_rate": 1.5}, {"protocol_fault_repeats": 0},
     {"protocol_fault_from": -1}],
)
def test_bad_settings_are_refused(values: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="protocol_fault"):
        SimulatorConfig(events=10, **values)


def test_the_simulate_command_takes_the_fault_from_its_flags(tmp_path: Any) -> None:
    ready = tmp_path / "ready"
    child = subprocess.Popen(
        [sys.executable, "-m", "ingest.simulator.cli", "--events", "300", "--latency", "none", "--chaos", "none",
         "--api-key", SIM_KEY, "--ready-file", str(ready), "--protocol-fault", "empty_pages",
         "--protocol-fault-rate", "0.25", "--protocol-fault-from", "0"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=os.environ.copy(),
    )
    try:
        wait_until(ready.exists, timeout=30)
        body = get(session(SIM_KEY), ready.read_text().strip() + "/events", 100)
        assert body["data"] == [] and body["pagination"]["hasMore"] is True
    finally:
        child.send_signal(signal.SIGINT)
        _, err = child.communicate(timeout=20)
    assert child.returncode == 0
    settings = re.search(r"simulator settings: (.*)", err)
    assert settings and '"protocol_fault": "empty_pages"' in settings.group(1)
    assert '"protocol_fault_rate": 0.25' in settings.group(1) and '"protocol_fault_from": 0' in settings.group(1)
