"""The fetcher against the simulator over HTTP: partition walks, the checkpoint after seals,
and work stealing, each checked by loading what was sealed into a real PostgreSQL."""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from ingest.config import Config
from ingest.run.fetching import fetch_context
from ingest.run.loading import load_ready
from ingest.simulator import SimulatorConfig, start_simulator
from ingest.sink import db
from ingest.sink.segments import SegmentStore
from ingest.source import checkpoint, fetcher
from ingest.source.api import ApiClient
from ingest.source.checkpoint import Checkpoint, PartitionState
from ingest.source.cursors import encode_cursor
from ingest.source.fetcher import FetchContext, current_bounds, fetch_partition, help_others, steal, walk
from ingest.source.lanes import LANES
from ingest.source.pacing import SharedRateLimiter
from tests.e2e import assert_exact

RATES = {"feed": 40.0, "events": 10.0, "events_query": 5.0}
NEWEST = 1769541612369
OLDEST = 1766946793000


@pytest.fixture(scope="module")
def sim() -> Iterator[Any]:
    simulator = start_simulator(SimulatorConfig(events=12_000, latency="none", rate_limits=False, chaos="none"))
    try:
        yield simulator
    finally:
        simulator.stop()


def setup(sim: Any, data_dir: Path, parts: list[PartitionState]) -> tuple[Config, FetchContext]:
    config = Config(
        api_url=sim.base_url, api_key=sim.api_key, data_dir=data_dir, page_limit=1000, segment_max_rows=2500,
        pacing="off", log_format="text",
    )
    plan = Checkpoint(
        generation="0badcafe", mode="feed", total=12_000, newest_ms=NEWEST, oldest_ms=OLDEST, partitions=parts
    )
    checkpoint.write(config.state_path, plan)
    ctx = mp.get_context("spawn")
    client = ApiClient(config, {lane: SharedRateLimiter(1000, 0.01, ctx=ctx) for lane in LANES})
    store = SegmentStore(config.segments_dir)
    store.ensure()
    fetch = fetch_context(config, "0badcafe", client, lambda: False, lambda seconds: False)
    return config, fetch


def load_all(config: Config, dsn: str) -> None:
    conn = db.connect(dsn)
    db.ensure_schema(conn, config.table)
    conn.close()
    load_ready(config, dsn, workers=2)


@pytest.mark.parametrize(("finished", "commits_every_page"), [(False, False), (True, True)])
def test_once_a_walk_is_finished_every_page_is_committed(
    sim: Any, data_dir: Path, finished: bool, commits_every_page: bool
) -> None:
    """Thieves cut by the committed position: a walk that commits only every few pages
    would be cut above where it really is, and the pages between fetched twice."""
    walking = PartitionState(index=0, lane="feed", lower_ms=0, upper_ms=NEWEST + 1)
    other = PartitionState(index=1, lane="feed", lower_ms=0, upper_ms=1, done=finished)
    config, fetch = setup(sim, data_dir, [walking, other])
    seen: list[int] = []

    def committed_pages(rows: int) -> None:
        state = checkpoint.read(config.state_path)
        assert state is not None
        seen.append(state.partitions[0].pages)

    fetch.on_page = committed_pages
    assert fetch_partition(fetch, walking)
    assert len(seen) > 4, seen  # pages of 1,000 against segments of 2,500 rows
    assert (seen == list(range(len(seen)))) == commits_every_page, seen


@pytest.mark.parametrize("source", LANES)
def test_two_partitions_cover_everything(sim: Any, data_dir: Path, pg_dsn: str, source: str) -> None:
    middle = 1768000000000
    parts = [
        PartitionState(index=0, lane=source, lower_ms=middle, upper_ms=NEWEST + 1),
        PartitionState(index=1, lane=source, lower_ms=0, upper_ms=middle),
    ]
    config, fetch = setup(sim, data_dir, parts)
    assert fetch_partition(fetch, parts[0]) and fetch_partition(fetch, parts[1])
    state = checkpoint.read(config.state_path)
    assert state is not None and state.drained
    assert [p.last_sealed is not None for p in state.partitions] == [True, True]
    # Each walk starts at its window's top: 12 full pages in all, plus at most a partial
    # page per walk and the empty last page of the older one.
    assert sum(p.pages for p in state.partitions) <= 12_000 // 1000 + 3
    load_all(config, pg_dsn)
    assert_exact(pg_dsn, sim.truth())


def test_a_stolen_lower_half_is_walked_by_the_thief_and_the_victim_stops_at_the_cut(
    sim: Any, data_dir: Path, pg_dsn: str
) -> None:
    victim = PartitionState(index=0, lane="feed", lower_ms=0, upper_ms=NEWEST + 1)
    config, fetch = setup(sim, data_dir, [victim])
    stolen: list[PartitionState] = []

    def steal_after_the_first_seal(rows: int) -> None:
        state = checkpoint.read(config.state_path)
        if not stolen and state is not None and state.partitions[0].cursor:
            taken = steal(config.state_path, "feed", page_limit=1000, rates=RATES)
            assert taken is not None
            stolen.append(taken)

    fetch.on_page = steal_after_the_first_seal
    assert fetch_partition(fetch, victim)
    assert stolen, "the victim committed a cursor, so a split was possible"
    taken = stolen[0]
    assert (taken.index, taken.lower_ms) == (1, 0)
    assert current_bounds(config.state_path, victim)[0] == taken.upper_ms
    fetch.on_page = lambda rows: None
    assert fetch_partition(fetch, taken)
    state = checkpoint.read(config.state_path)
    assert state is not None and state.drained and len(state.partitions) == 2
    victim_rows, thief_rows = (p.rows for p in state.partitions)
    assert victim_rows < 12_000 and thief_rows > 0, "the victim stopped at the cut; the thief walked the rest"
    load_all(config, pg_dsn)
    assert_exact(pg_dsn, sim.truth())


def test_nothing_worth_stealing(sim: Any, data_dir: Path) -> None:
    config, _ = setup(sim, data_dir, [PartitionState(index=0, lane="feed", lower_ms=0, upper_ms=10, done=True)])
    assert steal(config.state_path, "feed", page_limit=1000, rates=RATES) is None
    state = checkpoint.read(config.state_path)
    assert state is not None and len(state.partitions) == 1


def test_a_fetcher_of_the_other_lane_takes_over_half_on_its_own_lane(sim: Any, data_dir: Path, pg_dsn: str) -> None:
    # Walked 1 ms of its window so far (a cursor at the newest event): all left to do.
    at_top = encode_cursor("ffffffff-ffff-ffff-ffff-ffffffffffff", NEWEST, 0)
    feed = PartitionState(index=0, lane="feed", lower_ms=0, upper_ms=NEWEST + 1, rows=1000, cursor=at_top)
    idle = PartitionState(index=1, lane="events", lower_ms=0, upper_ms=0, done=True)
    config, fetch = setup(sim, data_dir, [feed, idle])
    taken = steal(config.state_path, "events", page_limit=1000, rates=RATES)
    assert taken is not None and taken.lane == "events" and taken.lower_ms == 0
    assert fetch_partition(fetch, taken) and fetch_partition(fetch, feed)
    load_all(config, pg_dsn)
    assert_exact(pg_dsn, sim.truth())


def test_a_lane_with_enough_walkers_does_not_steal(sim: Any, data_dir: Path) -> None:
    walks = [PartitionState(index=i, lane="feed", lower_ms=i * 10**12, upper_ms=(i + 1) * 10**12) for i in range(4)]
    config, _ = setup(sim, data_dir, walks)
    assert steal(config.state_path, "feed", page_limit=1000, rates=RATES) is None, "four feed walkers keep the feed busy"
    assert steal(config.state_path, "events", page_limit=1000, rates=RATES) is not None, "nobody walks /events"


def test_an_idle_fetcher_helps_until_no_walk_moves(
    sim: Any, data_dir: Path, pg_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fetcher, "STEAL_PATIENCE_S", 0.2)
    # Nothing committed yet: the split goes by the plan's density, not by measured progress.
    feed = PartitionState(index=0, lane="feed", lower_ms=0, upper_ms=NEWEST + 1)
    idle = PartitionState(index=1, lane="events", lower_ms=0, upper_ms=0, done=True)
    config, fetch = setup(sim, data_dir, [feed, idle])
    help_others(fetch, "events")  # halves of what is left, until the rest is too small to split
    state = checkpoint.read(config.state_path)
    assert state is not None and len(state.partitions) >= 3
    assert all(p.done for p in state.partitions[1:]), "every part taken over was walked"
    assert not state.partitions[0].done, "nobody walks the victim's upper part: the helper gave up"
    assert fetch_partition(fetch, state.partitions[0])
    help_others(fetch, "events")  # every walk done: returns at once
    load_all(config, pg_dsn)
    assert_exact(pg_dsn, sim.truth())


def test_a_refused_query_string_lane_goes_on_in_the_header_lane(data_dir: Path, pg_dsn: str) -> None:
    refusing = SimulatorConfig(events=3_000, latency="none", rate_limits=False, chaos="none", query_auth=False)
    simulator = start_simulator(refusing)
    try:
        part = PartitionState(index=0, lane="events_query", lower_ms=0, upper_ms=NEWEST + 1)
        config, fetch = setup(simulator, data_dir, [part])
        assert walk(fetch, part) == (True, "events")
        state = checkpoint.read(config.state_path)
        assert state is not None and state.partitions[0].lane == "events" and state.drained
        load_all(config, pg_dsn)
        assert_exact(pg_dsn, simulator.truth())
    finally:
        simulator.stop()


def test_a_lane_turned_off_on_resume_hands_its_walk_to_the_header_lane(sim: Any, data_dir: Path, pg_dsn: str) -> None:
    part = PartitionState(index=0, lane="events_query", lower_ms=0, upper_ms=NEWEST + 1)
    config, fetch = setup(sim, data_dir, [part])
    fetch.config = replace(config, query_rate=0.0)
    assert walk(fetch, part) == (True, "events")
    load_all(config, pg_dsn)
    assert_exact(pg_dsn, sim.truth())
