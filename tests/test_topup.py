"""Top-ups and the target guard as pure decisions: the plan of what the source gained, the
target a state belongs to, and old checkpoints read into the new format."""

from __future__ import annotations

from itertools import pairwise
from pathlib import Path

import orjson
import pytest

from ingest.config import Config
from ingest.run.target import EMBEDDED, database_identity, target_change, target_of
from ingest.source import checkpoint
from ingest.source.checkpoint import Checkpoint, PartitionState
from ingest.source.lanes import lane_rates
from ingest.source.plan import WALKER_ORDER, plan_top

RATES = lane_rates(Config())
NEWEST = 1_000_000


def state(done: bool = True, total: int | None = 100_000, newest: int | None = NEWEST) -> Checkpoint:
    parts = [PartitionState(index=i, lane="feed", lower_ms=i * 1000, upper_ms=(i + 1) * 1000, done=done, rows=10)
             for i in range(3)]
    return Checkpoint(generation="old00000", mode="mixed", total=total, newest_ms=newest, oldest_ms=0,
                      partitions=parts, target={"table": "events"}, source_total=total, loaded_newest_ms=newest,
                      topped_up_at=1.0)


def covers(parts: list[PartitionState], lower: int, upper: int) -> bool:
    """Contiguous windows from `upper` down to exactly `lower`."""
    ordered = sorted(parts, key=lambda p: -p.upper_ms)
    return (ordered[0].upper_ms == upper and ordered[-1].lower_ms == lower
            and all(a.lower_ms == b.upper_ms for a, b in pairwise(ordered)))


@pytest.mark.parametrize(
    ("growth", "page_limit", "requested", "walkers"),
    [
        (10, 5000, 0, 1),  # a few events: one partition, on the feed
        (5000, 5000, 0, 1),
        (5001, 5000, 0, 2),
        (30_000, 5000, 0, 6),
        (10_000_000, 5000, 0, len(WALKER_ORDER)),  # never more than a full plan's walkers
        (10, 5000, 3, 3),  # an explicit --partitions wins
        (None, 5000, 0, 1),  # growth unknown: one page's worth
    ],
)
def test_a_drained_state_gets_a_new_epoch_sized_by_the_growth(
    growth: int | None, page_limit: int, requested: int, walkers: int
) -> None:
    old = state()
    if growth is None:
        old.source_total = None
    new_total = None if growth is None else 100_000 + growth
    plan = plan_top(old, NEWEST + 60_000, new_total, page_limit, RATES, requested, "new00000")
    assert plan.generation == "new00000" and len(plan.partitions) == walkers
    assert [p.index for p in plan.partitions] == list(range(walkers))
    assert covers(plan.partitions, NEWEST, NEWEST + 60_001), "from the old newest (again) to the new newest"
    assert not any(p.done for p in plan.partitions)
    assert (plan.newest_ms, plan.oldest_ms, plan.total, plan.source_total) == (NEWEST + 60_000, NEWEST, growth, new_total)
    assert plan.rows == old.rows and plan.rows_earlier == 30, "earlier epochs' rows stay counted"
    assert plan.earlier_generations == ["old00000"], "and their segment ids can still be found"
    assert (plan.target, plan.loaded_newest_ms, plan.topped_up_at) == (old.target, NEWEST, 1.0)
    assert plan.partitions[0].lane == "feed" or walkers > 1


def test_an_unfinished_state_gets_the_top_added_to_its_walk() -> None:
    old = state(done=False)
    plan = plan_top(old, NEWEST + 5000, 100_000 + 12_000, 5000, RATES, 0, "new00000")
    assert plan.generation == "old00000", "the epoch under way keeps its segment ids"
    assert plan.partitions[:3] == old.partitions
    added = plan.partitions[3:]
    assert [p.index for p in added] == [3, 4, 5] and covers(added, NEWEST, NEWEST + 5001)
    assert (plan.total, plan.newest_ms, plan.source_total) == (112_000, NEWEST + 5000, 112_000)


@pytest.mark.parametrize(
    ("newest", "total"),
    [(NEWEST - 1, 100_000), (None, 100_000), (NEWEST - 500, 100_500), (NEWEST, 100_000), (NEWEST, None)],
)
def test_nothing_newer_plans_nothing(newest: int | None, total: int | None) -> None:
    old = state()
    plan = plan_top(old, newest, total, 5000, RATES, 0, "new00000")
    assert plan.partitions == old.partitions and plan.generation == "old00000" and plan.drained
    assert plan.source_total == total


def test_the_newest_millisecond_is_walked_again_when_nothing_else_is_new() -> None:
    """Events can arrive within the millisecond the last look saw last: one small walk."""
    plan = plan_top(state(), NEWEST, 100_001, 5000, RATES, 0, "new00000")
    assert len(plan.partitions) == 1 and covers(plan.partitions, NEWEST, NEWEST + 1)


# ---------------------------------------------------------------------------------------
# The target


@pytest.mark.parametrize(
    ("url", "identity"),
    [
        (None, EMBEDDED),
        ("postgresql://u:secret@db.example:6543/events", "db.example:6543/events"),
        ("postgresql://u:other@db.example:6543/events", "db.example:6543/events"),  # a new password: same target
        ("postgresql://u@/events?host=/run/pg", "/run/pg:5432/events"),
        ("postgres://u@localhost/ingest", "localhost:5432/ingest"),
    ],
)
def test_database_identity_never_holds_a_password(url: str | None, identity: str) -> None:
    assert database_identity(url) == identity
    assert "secret" not in identity and "other" not in identity


BASE = {"api_url": "http://a/api/v1", "table": "events", "database": EMBEDDED, "source": "auto"}


@pytest.mark.parametrize(
    ("recorded", "current", "change"),
    [
        (BASE, BASE, None),
        (None, BASE, None),  # a state from before targets were recorded: adopted
        (BASE, {**BASE, "table": "other"}, "--table events (this run: other)"),
        (BASE, {**BASE, "api_url": "http://b/api/v1"}, "--api-url http://a/api/v1 (this run: http://b/api/v1)"),
        (BASE, {**BASE, "database": "h:5432/x"}, f"--database-url {EMBEDDED} (this run: h:5432/x)"),
        (BASE, {**BASE, "source": "events"}, "--source auto (this run: events)"),
        (BASE, {**BASE, "table": "t2", "source": "feed"}, "--table events (this run: t2); --source auto (this run: feed)"),
    ],
)
def test_target_change(recorded: dict[str, str] | None, current: dict[str, str], change: str | None) -> None:
    assert target_change(recorded, current) == change


def test_target_of_a_config() -> None:
    config = Config(api_url="http://h/api/v1/", table="t", database_url="postgresql://u:pw@h:5/d", source="feed")
    assert target_of(config) == {"api_url": "http://h/api/v1", "table": "t", "database": "h:5/d", "source": "feed"}


# ---------------------------------------------------------------------------------------
# Older checkpoints


def test_a_version_2_checkpoint_resumes_in_the_current_version(tmp_path: Path) -> None:
    path = tmp_path / "ingestion.state"
    v2 = {"generation": "g", "mode": "mixed", "total": 50, "newest_ms": 9, "oldest_ms": 0, "version": 2,
          "updated_at": 1.0, "partitions": [{"index": 0, "lane": "feed", "lower_ms": 0, "upper_ms": 10, "rows": 5}]}
    path.write_bytes(orjson.dumps(v2))
    loaded = checkpoint.read(path)
    assert loaded is not None and loaded.version == checkpoint.FORMAT_VERSION
    assert (loaded.target, loaded.source_total, loaded.rows_earlier, loaded.loaded_newest_ms) == (None, 50, 0, None)
    assert loaded.rows == 5 and loaded.partitions[0].lane == "feed"


def test_a_version_1_checkpoint_still_resumes(tmp_path: Path) -> None:
    path = tmp_path / "ingestion.state"
    v1 = {"generation": "g", "source": "events", "total": 7, "newest_ms": 9, "version": 1,
          "partitions": [{"index": 0, "source": "events_query", "lower_ms": 0, "upper_ms": 10}]}
    path.write_bytes(orjson.dumps(v1))
    loaded = checkpoint.read(path)
    assert loaded is not None and (loaded.mode, loaded.partitions[0].lane, loaded.source_total) == ("events", "events_query", 7)
