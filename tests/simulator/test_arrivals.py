"""Live arrivals (`arrival_rate`): the stream itself, then over real HTTP and across processes.

Timing-sensitive checks compare counts with the model clock the simulator reports
(`truth().clock`) and with wall-clock brackets measured around the calls, never with fixed
sleeps, so a loaded machine only makes them wait longer.
"""

from __future__ import annotations

import itertools
import re
import signal
import subprocess
import sys
import threading
import time
from typing import Any

import pytest
import requests
from click.testing import CliRunner

from ingest.simulator import SimulatorConfig, spawn_simulator
from ingest.simulator.arrivals import CHUNK, LiveData, LiveView
from ingest.simulator.cli import build_simulator_config, simulate
from ingest.simulator.config import scaled_type_counts
from ingest.simulator.dataset import Dataset
from ingest.simulator.hostile import HOSTILE_KINDS
from ingest.simulator.hostile import storable as hostile_storable
from tests.conftest import SIM_KEY
from tests.simulator.helpers import crawl, feed_url, make_cursor, parse_ts, session, storable, token

TIME_END = 1769541612369
ISO = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")
KEY = "ds_" + "ab" * 16
FAULT_FREE = {"p5xx": 0.0, "p_truncate": 0.0, "p_reset": 0.0, "p_empty200": 0.0, "p_slow": 0.0,
              "p_missing_fields": 0.0, "p_malformed_timestamp": 0.0, "p_duplicate": 0.0}


def config(**fields: Any) -> SimulatorConfig:
    return SimulatorConfig(**{"events": 2000, "seed": 3, "chaos": "none", "api_keys": (KEY,), **fields})


class Clock:
    """A hand-driven monotonic clock for `LiveData`."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def live(cfg: SimulatorConfig, static: Dataset | None = None) -> tuple[LiveData, Clock]:
    clock = Clock()
    return LiveData(cfg, static or Dataset.build(cfg), clock), clock


def arrivals_of(data: LiveData) -> list[tuple[int, str, int]]:
    """(ts, id, session) of every published arrival, in storage (arrival) order."""
    block = data.block
    return [(block.ts[j], block.id_of(j), block.sess[j]) for j in range(data.count)]


def order_keys(snapshot: Any) -> list[tuple[int, str]]:
    return [(snapshot.ts[i], snapshot.id_of(i)) for i in snapshot.everything]


def wait_for(predicate: Any, timeout: float = 60.0) -> Any:
    """Poll until `predicate()` is truthy (generous: the machine may be loaded)."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)
    return value


def regular_timestamp(value: Any) -> bool:
    """Epoch ms or the plain ISO form: what an undamaged event carries."""
    return type(value) is int or (isinstance(value, str) and bool(ISO.match(value)))


def key_of(event: dict) -> tuple[int, str]:
    return parse_ts(event["timestamp"]), event["id"]


@pytest.fixture
def http():
    with session(SIM_KEY) as s:
        yield s


def feed_session(sim: Any) -> Any:
    http = session(SIM_KEY)
    http.headers["X-Stream-Token"] = token(http, sim.base_url)
    return http


def walk(http: Any, url: str, limit: int, cursor: str | None = None, params: dict | None = None
         ) -> tuple[list[dict], list[dict]]:
    """Follow nextCursor from `cursor` (None: the top) to the end: (items, envelopes)."""
    items: list[dict] = []
    pages: list[dict] = []
    while True:
        query = {"limit": limit, **(params or {}), **({"cursor": cursor} if cursor else {})}
        response = http.get(url, params=query, timeout=30)
        assert response.status_code == 200, response.text
        page = response.json()
        pages.append(page)
        items += page["data"]
        cursor = page["pagination"]["nextCursor"]
        if not page["pagination"]["hasMore"]:
            return items, pages


# -- the stream (no HTTP) ------------------------------------------------------------------


def test_arrivals_depend_on_the_model_clock_only() -> None:
    cfg = config(arrival_rate=400.0)
    static = Dataset.build(cfg)
    (steps, step_clock), (jump, jump_clock) = live(cfg, static), live(cfg, static)
    for i in range(1, 101):  # a request every 30 ms ...
        step_clock.now = i * 0.03
        steps.snapshot()
    jump_clock.now = 3.0  # ... or one request at the end
    assert jump.snapshot().count == steps.count > 0
    assert arrivals_of(jump) == arrivals_of(steps)
    assert jump.watermark == steps.watermark == TIME_END + 1 + 3000
    other, other_clock = live(config(arrival_rate=400.0, seed=4))
    other_clock.now = 3.0
    other.snapshot()
    assert arrivals_of(other) != arrivals_of(jump)


def test_each_arrival_sorts_above_everything_servable_before_it() -> None:
    data, clock = live(config(arrival_rate=2000.0, events=500))
    before = order_keys(data.snapshot())
    for i in range(1, 41):
        clock.now = i * 0.005
        snap = data.snapshot()
        keys = order_keys(snap)
        assert all(a > b for a, b in itertools.pairwise(keys))  # (ts DESC, id DESC), no ties in the key
        assert keys[len(keys) - len(before) :] == before  # what was there is untouched, below the new
        assert all(ts < snap.clock for ts, _ in keys[: len(keys) - len(before)])
        before = keys
    assert data.count > 300 and data.block.ts[0] > TIME_END
    ties = sum(1 for a, b in itertools.pairwise(data.block.ts) if a == b)
    assert ties > 0  # at 2,000/s, events share milliseconds: their ids are sorted within the ms


def test_arrival_sessions_are_shaped_like_the_generated_ones() -> None:
    cfg = config(arrival_rate=5.0)
    data, clock = live(cfg)
    clock.now = 3 * 3600.0
    snap = data.snapshot()
    hour = 3_600_000
    spans: dict[int, list[int]] = {}
    for ts, _, s in arrivals_of(data):
        spans.setdefault(s, []).append(ts)
    # sessions first seen in the second hour began after the clock started and ended before it stopped
    whole = [times for times in spans.values() if TIME_END + hour < times[0] < snap.clock - hour]
    assert len(whole) > 100
    assert all(35 <= len(times) <= 70 and times[-1] - times[0] <= hour for times in whole)
    first_hour = sum(1 for ts, _, _ in arrivals_of(data) if ts <= TIME_END + hour)
    assert 0.85 * 5 * 3600 < first_hour < 1.15 * 5 * 3600  # the right rate from the first ms
    assert 0.85 * 5 * 3 * 3600 < data.count < 1.15 * 5 * 3 * 3600
    counts = [0] * len(data.block.type_names)
    for j in range(CHUNK):
        counts[data.block.types[j]] += 1
    assert list(zip(data.block.type_names, counts, strict=True)) == scaled_type_counts(CHUNK)
    ids = [event_id for _, event_id, _ in arrivals_of(data)]
    assert len(set(ids)) == len(ids) and all(event_id[14] == "4" for event_id in ids)
    event = snap.event_dict(snap.everything[0], True)
    static_users = {snap.static.event_dict(i, True)["userId"] for i in range(len(snap.static))}
    assert event["userId"] in static_users and event["session"]["id"] == event["sessionId"]


def test_freeze_stops_the_clock_and_resume_skips_the_frozen_stretch() -> None:
    cfg = config(arrival_rate=300.0, time_scale=2.0)
    data, clock = live(cfg)
    reference, reference_clock = live(cfg, data.static)
    clock.now = 1.0
    frozen = data.freeze()
    clock.now = 50.0
    assert data.snapshot().count == frozen.count and data.snapshot().clock == frozen.clock == TIME_END + 1 + 2000
    data.resume()
    clock.now = 51.0
    reference_clock.now = 2.0  # 2 s of running clock either way, at time scale 2
    assert data.snapshot().clock == reference.snapshot().clock == TIME_END + 1 + 4000
    assert arrivals_of(data) == arrivals_of(reference)


def test_truth_counts_unstorable_and_hostile_arrivals() -> None:
    cfg = config(arrival_rate=1000.0, chaos="mild", p_unstorable=0.02, hostile_events=40)
    data, clock = live(cfg)
    clock.now = 5.0
    snap = data.snapshot()
    truth = snap.truth()
    block = data.block
    bad = [j for j in range(snap.count) if j in block.unstorable]
    hostile = [j for j in range(snap.count) if j in block.hostile]
    assert bad and hostile and truth.arrived == snap.count
    assert truth.unstorable == len(data.static.unstorable) + len(bad)
    assert truth.total == 2000 + snap.count == len(truth.storable_ids) + truth.unstorable
    assert {block.id_of(j) for j in hostile} <= truth.storable_ids
    assert not {block.id_of(j) for j in bad} & truth.storable_ids


@pytest.mark.parametrize(("split", "start", "stop"), [(0, 0, 5), (3, 0, 5), (3, 1, 3), (3, 3, 6), (3, 4, 8), (8, 2, 7)])
def test_live_view_serves_the_newer_part_reversed_then_the_older(split: int, start: int, stop: int) -> None:
    newer, older = range(100, 110), range(0, 5)
    view = LiveView(newer, split, older)
    expected = [*reversed(newer[:split]), *older]
    assert len(view) == len(expected) and list(view) == expected
    assert view[start:stop] == expected[start:stop]
    assert [view[i] for i in range(len(view))] == expected and view[-1] == expected[-1]


# -- over HTTP -----------------------------------------------------------------------------


def test_arrivals_appear_at_the_newest_end_and_in_meta_total(sim_factory, http) -> None:
    sim = sim_factory(arrival_rate=100.0, time_scale=10.0)
    fresh = {"limit": 50}
    first = http.get(sim.base_url + "/events", params=fresh).json()
    grown = wait_for(lambda: (truth := sim.truth()).arrived >= 500 and truth)
    fresh["limit"] = 51  # another cache key: /events caches pages
    body = http.get(sim.base_url + "/events", params=fresh).json()
    with feed_session(sim) as feed:
        fed = feed.get(feed_url(sim.base_url), params={"limit": 50}).json()
    assert first["meta"]["total"] < grown.total <= body["meta"]["total"] <= fed["meta"]["total"]
    for page in (body, fed):
        keys = [key_of(e) for e in page["data"]]
        assert all(a > b for a, b in itertools.pairwise(keys)) and keys[-1][0] > TIME_END  # all new, newest first
    replay = http.get(sim.base_url + "/events", params={"limit": 50})  # a cache HIT replays the stored body
    assert replay.headers["X-Cache"] == "HIT" and replay.json()["data"] == first["data"]
    assert replay.json()["meta"]["total"] == first["meta"]["total"]
    model_seconds = (grown.clock - TIME_END - 1) / 1000
    assert 0.5 * 100 < grown.arrived / model_seconds < 2 * 100  # about the configured rate


def test_time_scale_scales_the_rate(sim_factory) -> None:
    rate, scale = 50.0, 8.0
    sim = sim_factory(arrival_rate=rate, time_scale=scale)
    outer_start = time.monotonic()
    first = sim.truth()
    inner_start = time.monotonic()
    while True:
        inner_end = time.monotonic()
        last = sim.truth()
        outer_end = time.monotonic()
        if last.arrived >= first.arrived + 400:
            break
        time.sleep(0.02)
    model = (last.clock - first.clock) / 1000
    # the model clock runs `scale` times the wall clock: brackets measured around the snapshots
    assert scale * (inner_end - inner_start) - 0.002 <= model <= scale * (outer_end - outer_start) + 0.002
    arrived = last.arrived - first.arrived
    assert 0.5 * rate * model < arrived < 2 * rate * model  # R per model second: R x scale per wall second
    assert arrived > 0.5 * rate * scale * (inner_end - inner_start)


def test_a_walk_begun_before_arrivals_sees_exactly_what_existed_at_its_start(sim_factory) -> None:
    sim = sim_factory(arrival_rate=200.0, time_scale=10.0)
    wait_for(lambda: sim.truth().arrived >= 200)
    with feed_session(sim) as http:
        at_start = sim.freeze_arrivals()
        top = http.get(feed_url(sim.base_url), params={"limit": 300}).json()
        sim.resume_arrivals()
        wait_for(lambda: sim.truth().arrived >= at_start.arrived + 1000)
        rest, pages = walk(http, feed_url(sim.base_url), 300, top["pagination"]["nextCursor"])
        # without a freeze: the walk is sandwiched between the truths around its first page
        before = sim.truth()
        second_top = http.get(feed_url(sim.base_url), params={"limit": 250}).json()
        after = sim.truth()
        second, _ = walk(http, feed_url(sim.base_url), 250, second_top["pagination"]["nextCursor"])
    items = top["data"] + rest
    assert [e["id"] for e in items] == list(dict.fromkeys(e["id"] for e in items))  # nothing twice
    assert {e["id"] for e in items} == at_start.storable_ids and len(items) == at_start.total
    assert all(a > b for a, b in itertools.pairwise(key_of(e) for e in items))
    assert [p["meta"]["returned"] for p in pages[:-1]] == [300] * (len(pages) - 1)  # growth did not shorten pages
    seen = {e["id"] for e in second_top["data"] + second}
    assert before.storable_ids <= seen <= after.storable_ids
    assert all(parse_ts(e["timestamp"]) < after.clock for e in second_top["data"])


@pytest.mark.parametrize("route", ["events", "feed"])
def test_a_walk_from_the_top_after_arrivals_sees_old_and_new_once(sim_factory, route) -> None:
    sim = sim_factory(arrival_rate=300.0, time_scale=10.0)
    static = sim.truth()
    wait_for(lambda: sim.truth().arrived >= 1500)
    truth = sim.freeze_arrivals()
    http = feed_session(sim) if route == "feed" else session(SIM_KEY)
    with http:
        url = feed_url(sim.base_url) if route == "feed" else sim.base_url + "/events"
        items, pages = walk(http, url, 700)
        stats = http.get(sim.base_url[:-7] + "/internal/stats").json()
    ids = [e["id"] for e in items]
    assert len(ids) == len(set(ids)) == truth.total == pages[0]["meta"]["total"] == stats["events"]
    assert set(ids) == truth.storable_ids and static.storable_ids < truth.storable_ids
    assert truth.arrived == truth.total - 2000 >= 1500 and static.clock is not None and static.clock <= truth.clock
    assert all(a > b for a, b in itertools.pairwise(key_of(e) for e in items))
    assert sum(t["count"] for t in stats["eventTypes"]) == sum(d["count"] for d in stats["deviceTypes"]) == truth.total


def test_concurrent_walks_while_the_data_grows(sim_factory) -> None:
    sim = sim_factory(arrival_rate=200.0, time_scale=5.0)
    results: list[tuple[Any, list[dict], Any]] = []
    errors: list[BaseException] = []

    def walker(limit: int) -> None:
        try:
            with feed_session(sim) as http:
                for _ in range(3):
                    before = sim.truth()
                    items, _ = walk(http, feed_url(sim.base_url), limit)
                    results.append((before, items, sim.truth()))
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=walker, args=(limit,)) for limit in (97, 250, 1000)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    assert len(results) == 9
    for before, items, after in results:
        ids = [e["id"] for e in items]
        assert len(ids) == len(set(ids))
        assert before.storable_ids <= set(ids) <= after.storable_ids
        assert all(a > b for a, b in itertools.pairwise(key_of(e) for e in items))
    assert any(after.arrived > before.arrived for before, _, after in results)  # it grew during walks


def test_since_until_cursors_filters_and_lookups_see_arrivals(sim_factory, http) -> None:
    sim = sim_factory(arrival_rate=300.0, time_scale=10.0)
    wait_for(lambda: sim.truth().arrived >= 600)
    truth = sim.freeze_arrivals()
    everything, _ = walk(http, sim.base_url + "/events", 5000)
    new = [e for e in everything if parse_ts(e["timestamp"]) > TIME_END]
    assert len(new) == truth.arrived
    with feed_session(sim) as feed:
        url = feed_url(sim.base_url)
        window, _ = walk(feed, url, 100, params={"since": TIME_END + 1})
        assert [e["id"] for e in window] == [e["id"] for e in new]
        middle = parse_ts(new[len(new) // 2]["timestamp"])
        below, _ = walk(feed, url, 100, params={"since": TIME_END + 1, "until": middle})
        assert [e["id"] for e in below] == [e["id"] for e in new if parse_ts(e["timestamp"]) < middle]
    anchor = new[100]
    cursor = http.get(sim.base_url + "/events", params={"limit": 101}).json()["pagination"]["nextCursor"]
    page = http.get(sim.base_url + "/events", params={"limit": 5, "cursor": cursor}).json()["data"]
    assert [e["id"] for e in page] == [e["id"] for e in everything[101:106]] and everything[100] == anchor
    one = http.get(sim.base_url + "/events/" + anchor["id"]).json()["data"]
    assert one["id"] == anchor["id"] and one["sessionId"] == anchor["sessionId"]
    of_session = http.get(sim.base_url + "/events", params={"sessionId": anchor["sessionId"], "limit": 5000}).json()
    assert {e["id"] for e in of_session["data"]} == {e["id"] for e in everything if e["sessionId"] == anchor["sessionId"]}
    clicks = http.get(sim.base_url + "/events", params={"type": "click", "limit": 5000}).json()["data"]
    assert [e["id"] for e in clicks] == [e["id"] for e in everything if e["type"] == "click"]


def test_arrival_rate_zero_is_the_static_dataset(sim_factory, http) -> None:
    static = sim_factory()
    growing = sim_factory(arrival_rate=200.0, time_scale=10.0)
    first = http.get(static.base_url + "/events", params={"limit": 5}).json()
    wait_for(lambda: growing.truth().arrived >= 100)  # time passed: enough for arrivals elsewhere
    assert static.app.live is None
    truth = static.truth()
    assert truth == Dataset.build(static.config).truth() == static.freeze_arrivals()
    assert truth.clock is None and truth.arrived == 0 and truth.total == 2000
    static.resume_arrivals()
    again = http.get(static.base_url + "/events", params={"limit": 5, "n": 1}).json()
    assert again["data"] == first["data"] and again["meta"]["total"] == 2000
    assert static.stats()["arrived"] == 0 and growing.stats()["arrived"] >= 100


def test_chaos_applies_to_arrivals_and_the_truth_counts_their_damage(sim_factory) -> None:
    sim = sim_factory(arrival_rate=300.0, time_scale=10.0, chaos="heavy", p_unstorable=0.01, slow_delay=0.2,
                      truncate_min_bytes=1024)
    static_unstorable = sim.truth().unstorable
    wait_for(lambda: sim.truth().arrived >= 2000)
    truth = sim.freeze_arrivals()
    assert truth.unstorable > static_unstorable  # some arrivals are unstorable too
    with feed_session(sim) as http:
        items = crawl(http, feed_url(sim.base_url), limit=500)
    assert {e["id"] for e in items if storable(e)} == truth.storable_ids
    static_ids = Dataset.build(sim.config).truth().storable_ids
    assert len({e["id"] for e in items if storable(e)} - static_ids) > 1900
    assert sim.stats()["faults"]


def test_page_faults_hit_pages_of_arrivals(sim_factory, http) -> None:
    faults = {**FAULT_FREE, "p_missing_fields": 1.0, "p_duplicate": 1.0, "p_malformed_timestamp": 0.2}
    sim = sim_factory(arrival_rate=300.0, time_scale=10.0, chaos="mild", missing_fields_share=0.2, **faults)
    wait_for(lambda: sim.truth().arrived >= 500)
    first = http.get(sim.base_url + "/events", params={"limit": 100})
    second = http.get(sim.base_url + "/events", params={"limit": 100, "cursor": first.json()["pagination"]["nextCursor"]})
    for response in (first, second):
        assert response.headers["X-Chaos-Applied"] == "missingFields"
        events = response.json()["data"]
        assert all(parse_ts(e["timestamp"]) > TIME_END for e in events)  # pages of arrivals only
        assert any(len(e) < 8 for e in events)  # fields dropped
        assert not all(regular_timestamp(e["timestamp"]) for e in events)  # some malformed
    tail = [e["id"] for e in first.json()["data"]]
    repeated = [e["id"] for e in second.json()["data"] if e["id"] in tail]
    assert 1 <= len(repeated) <= 3 and repeated == tail[-len(repeated) :]


def test_hostile_arrivals_are_served_as_written_and_judged_in_the_truth(sim_factory, http) -> None:
    sim = sim_factory(arrival_rate=300.0, time_scale=10.0, hostile_events=40)  # 2% of the events
    wait_for(lambda: sim.truth().arrived >= 1000)
    truth = sim.freeze_arrivals()
    block = sim.app.live.block
    with feed_session(sim) as feed:  # raw text: the deep and megabyte kinds are not for every parser
        body = feed.get(feed_url(sim.base_url), params={"limit": 5000, "since": TIME_END + 1}).text
    on_page = range(max(0, truth.arrived - 5000), truth.arrived)  # the newest arrivals, in storage order
    kinds = {j: block.hostile.get(j) or block.unstorable.get(j) for j in on_page}
    hostile = {j: kind for j, kind in kinds.items() if kind in HOSTILE_KINDS}
    assert len(set(hostile.values())) >= 5
    for j, kind in hostile.items():
        assert block.hostile_json(j) in body
        assert (block.id_of(j) in truth.storable_ids) == hostile_storable(kind)


def test_spawned_simulator_offers_the_same_truth_snapshots() -> None:
    cfg = SimulatorConfig(events=3000, seed=8, latency="none", rate_limits=False, chaos="mild",
                          api_keys=(SIM_KEY,), slow_delay=0.1, arrival_rate=200.0, time_scale=10.0)
    with spawn_simulator(cfg) as sim:
        wait_for(lambda: sim.truth().arrived >= 500)
        truth = sim.freeze_arrivals()
        assert sim.truth() == truth and truth.total == 3000 + truth.arrived
        with feed_session(sim) as http:
            items = crawl(http, feed_url(sim.base_url), limit=1000)
        assert {e["id"] for e in items if storable(e)} == truth.storable_ids
        sim.resume_arrivals()
        later = wait_for(lambda: (t := sim.truth()).arrived > truth.arrived and t)
        assert truth.storable_ids < later.storable_ids and later.clock > truth.clock


def test_cli_arrival_rate_option() -> None:
    assert build_simulator_config({}, {}, [], {"arrival_rate": 2.5, "api_keys": (KEY,)}).arrival_rate == 2.5
    assert build_simulator_config({}, {"DATASYNC_SIM_ARRIVAL_RATE": "7"}, [], {"api_keys": (KEY,)}).arrival_rate == 7
    assert SimulatorConfig(api_keys=(KEY,)).arrival_rate == 0
    with pytest.raises(ValueError, match="arrival_rate"):
        SimulatorConfig(api_keys=(KEY,), arrival_rate=-1)
    result = CliRunner().invoke(simulate, ["--help"])
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    assert "--arrival-rate R" in text and "per model second" in text and "--time-scale" in text
    assert CliRunner().invoke(simulate, ["--arrival-rate", "-3"]).exit_code == 2


def test_simulate_command_goes_live_with_arrival_rate(tmp_path) -> None:
    ready = tmp_path / "ready"
    child = subprocess.Popen(
        [sys.executable, "-m", "ingest.simulator.cli", "--events", "3000", "--latency", "none", "--chaos", "none",
         "--api-key", KEY, "--arrival-rate", "100", "--time-scale", "10", "--ready-file", str(ready)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        wait_for(ready.exists)
        url = ready.read_text().strip() + "/events"

        def total() -> int:  # from the top, by a forged cursor: a fresh `exp` makes each one a cache MISS
            cursor = make_cursor("ffffffff-ffff-ffff-ffff-ffffffffffff", 2**50)
            return int(requests.get(url, params={"cursor": cursor}, headers={"X-API-Key": KEY},
                                    timeout=10).json()["meta"]["total"])

        wait_for(lambda: total() > 3100)
    finally:
        child.send_signal(signal.SIGINT)
        _, err = child.communicate(timeout=20)
    assert child.returncode == 0 and '"arrival_rate": 100.0' in err
