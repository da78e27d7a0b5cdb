"""Every request as full as the server allows: what an answer proves of the server's cap,
the bounds of memory and time, the size a plan records and its walks, top-ups and steals
use, and two runs against the simulator, one whose cap is raised, one at the real 5,000."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import orjson
import pytest

from ingest.config import Config
from ingest.source import checkpoint
from ingest.source.checkpoint import DOCUMENTED_PAGE_CAP, Checkpoint, PartitionState
from ingest.source.lanes import lane_rates
from ingest.source.plan import (
    PAGE_BYTES_PER_EVENT,
    PAGE_MEMORY_BYTES,
    WALKER_ORDER,
    choose_page_size,
    honoured_page_size,
    memory_bound,
    plan_steal,
    plan_top,
    timeout_bound,
)
from tests.e2e import assert_exact, ingest_env, run_to_end

RATES = lane_rates(Config())


@pytest.mark.parametrize(
    ("asked", "granted", "returned", "has_more", "honoured"),
    [
        (20_000, 5000, 5000, True, 5000),  # the real service: capped silently, and it says so
        (20_000, 20_000, 20_000, True, 20_000),  # a server that serves what is asked
        (20_000, None, 5000, True, 5000),  # no limit said: a short page with more to come is the cap
        (20_000, 20_000, 5000, True, 5000),  # says one thing, serves another: what it served
        (20_000, None, 20_000, True, 20_000),
        (20_000, 20_000, 3000, False, 20_000),  # the data ended first, but the server said its limit
        (20_000, None, 3000, False, DOCUMENTED_PAGE_CAP),  # the data ended first, nothing said
        (20_000, None, 8000, False, 8000),  # ...but it served that many in one page
        (20_000, None, 0, True, DOCUMENTED_PAGE_CAP),  # an empty page that claims more shows nothing
        (3000, 5000, 3000, True, 3000),  # never more than asked
    ],
)
def test_what_an_answer_proves_the_server_serves(asked: int, granted: int | None, returned: int, has_more: bool,
                                                 honoured: int) -> None:
    assert honoured_page_size(asked, granted, returned, has_more) == honoured


def test_the_memory_bound_shares_the_page_memory_among_the_walkers() -> None:
    assert memory_bound(len(WALKER_ORDER)) == PAGE_MEMORY_BYTES // (PAGE_BYTES_PER_EVENT * len(WALKER_ORDER))
    assert 8000 < memory_bound(len(WALKER_ORDER)) < 9000  # the default plan's eight walkers
    assert memory_bound(2) == pytest.approx(4 * memory_bound(8), abs=4)
    assert memory_bound(0) == memory_bound(1)


@pytest.mark.parametrize(
    ("events", "seconds", "timeout", "bound"),
    [
        (5000, 4.1, 60.0, 18_292),  # the real service's pace: a quarter of the timeout
        (5000, 4.1, 10.0, 3048),
        (20_000, 0.5, 60.0, 600_000),  # a fast local source
        (5000, None, 60.0, None),  # not measured
        (0, 1.0, 60.0, None),
    ],
)
def test_the_timeout_bound(events: int, seconds: float | None, timeout: float, bound: int | None) -> None:
    assert timeout_bound(events, seconds, timeout) == bound


@pytest.mark.parametrize(
    ("ceiling", "honoured", "walkers", "events", "seconds", "timeout", "size"),
    [
        (20_000, 5000, 8, 5000, 4.1, 60.0, 5000),  # the real service as documented: no change
        (20_000, 20_000, 2, 20_000, 1.0, 60.0, 20_000),  # a local server that serves 20,000: the ceiling
        (50_000, 50_000, 2, 50_000, 1.0, 60.0, memory_bound(2)),  # memory binds
        (20_000, 20_000, 8, 20_000, 16.4, 60.0, memory_bound(8)),  # eight walkers: memory again
        (20_000, 20_000, 2, 20_000, 16.4, 60.0, 18_292),  # the timeout: a quarter of 60 s at 0.82 ms an event
        (20_000, 20_000, 2, 20_000, 16.4, 5.0, 5000),  # bounds never shrink below the documented cap...
        (1000, 20_000, 2, 20_000, 1.0, 60.0, 1000),  # ...but the user's ceiling does
        (20_000, 3000, 2, 3000, 1.0, 60.0, 3000),  # and so does a server with a lower cap
    ],
)
def test_the_page_size_of_a_plan(ceiling: int, honoured: int, walkers: int, events: int, seconds: float,
                                 timeout: float, size: int) -> None:
    assert choose_page_size(ceiling, honoured, walkers, events, seconds, timeout) == size


def a_plan(page_size: int, done: bool = False) -> Checkpoint:
    parts = [PartitionState(index=i, lane="feed" if i else "events", lower_ms=i * 1_000_000,
                            upper_ms=(i + 1) * 1_000_000, done=done or i > 0) for i in range(3)]
    return Checkpoint(generation="g0000000", mode="mixed", total=300_000, newest_ms=3_000_000, oldest_ms=0,
                      partitions=parts, source_total=300_000, page_size=page_size)


def test_a_plan_walks_its_own_size_within_the_ceiling() -> None:
    assert a_plan(20_000).walk_page_size(50_000) == 20_000
    assert a_plan(20_000).walk_page_size(1000) == 1000  # --page-limit lowered since: a ceiling


def test_a_checkpoint_from_before_page_sizes_walks_the_documented_cap(tmp_path: Path) -> None:
    path = tmp_path / "ingestion.state"
    v3 = {"generation": "g", "mode": "mixed", "total": 50, "newest_ms": 9, "oldest_ms": 0, "version": 3,
          "source_total": 50, "partitions": [{"index": 0, "lane": "feed", "lower_ms": 0, "upper_ms": 10}]}
    path.write_bytes(orjson.dumps(v3))
    assert checkpoint.walk_page_size_at(path, 20_000) == DOCUMENTED_PAGE_CAP == 5000
    assert checkpoint.walk_page_size_at(path, 1000) == 1000
    loaded = checkpoint.read(path)
    assert loaded is not None and loaded.page_size == 5000 and loaded.version == checkpoint.FORMAT_VERSION
    checkpoint.write(path, loaded)
    assert orjson.loads(path.read_bytes())["page_size"] == 5000
    assert checkpoint.walk_page_size_at(tmp_path / "absent", 20_000) == 5000


@pytest.mark.parametrize("drained", [True, False])
def test_a_top_up_keeps_the_plans_size_and_sizes_its_walkers_by_it(drained: bool) -> None:
    old = a_plan(20_000, done=drained)
    topped = plan_top(old, 3_500_000, 300_000 + 39_000, 50_000, RATES, 0, "g1111111")
    assert topped.page_size == 20_000
    new = topped.partitions if drained else topped.partitions[len(old.partitions):]
    assert len(new) == 2, "39,000 new events: two pages of 20,000, not eight of 5,000"


def test_a_steal_cuts_in_pages_of_the_plans_size() -> None:
    """A steal takes whole pages of what is left: the cut follows the plan's page size (or
    the user's lower ceiling), not the ceiling alone."""
    big, small = plan_steal(a_plan(20_000), "feed", 50_000, RATES), plan_steal(a_plan(5000), "feed", 50_000, RATES)
    assert big is not None and small is not None and big != small
    assert plan_steal(a_plan(20_000), "feed", 5000, RATES) == small


# -- against the simulator -----------------------------------------------------------------


def page_requests(sim: Any) -> int:
    requests = sim.stats()["requests"]
    return int(requests.get("events", 0) + requests.get("feed", 0))


def one_walk(sim: Any, pg_dsn: str, data_dir: Path) -> Checkpoint:
    """A run with one partition (so its requests can be counted exactly) and no page flag."""
    env = ingest_env(sim, pg_dsn, data_dir, INGEST_PARTITIONS=1)
    code, log = run_to_end(env, data_dir / "run.log")
    assert code == 0, log[-3000:]
    assert_exact(pg_dsn, sim.truth())
    state = checkpoint.read(data_dir / "ingestion.state")
    assert state is not None
    return state


@pytest.mark.parametrize(("max_limit", "events"), [(20_000, 100_000), (5000, 60_000)])
def test_pages_as_full_as_the_server_serves(sim_factory: Any, pg_dsn: str, data_dir: Path, max_limit: int,
                                            events: int) -> None:
    """The probe asks once for the default ceiling (20,000) and the walk uses what the
    server granted: with the cap raised, a quarter of the requests; at the real cap of
    5,000, exactly the pages 5,000-event pages need, plus the plan's two probes."""
    sim = sim_factory(events=events, max_limit=max_limit)
    state = one_walk(sim, pg_dsn, data_dir)
    assert state.page_size == max_limit
    assert page_requests(sim) == math.ceil(events / max_limit) + 2
