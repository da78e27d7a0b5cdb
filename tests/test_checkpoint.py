"""The checkpoint: atomic replacement, round trip, concurrent partition updates."""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

import pytest

from ingest.source import checkpoint
from ingest.source.checkpoint import Checkpoint, CheckpointError, PartitionState


def make(path: Path, partitions: int = 2) -> Checkpoint:
    plan = Checkpoint(generation="abcd1234", mode="feed", total=100, newest_ms=1000)
    plan.partitions = [PartitionState(index=i, lane="feed", lower_ms=0, upper_ms=1000) for i in range(partitions)]
    checkpoint.write(path, plan)
    return plan


def test_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "ingestion.state"
    plan = make(path)
    loaded = checkpoint.read(path)
    assert loaded is not None and loaded.partitions == plan.partitions and loaded.generation == "abcd1234"
    assert loaded.version == checkpoint.FORMAT_VERSION and loaded.updated_at > 0
    assert list(tmp_path.iterdir()) == [path], "no temp files left behind"


def test_missing_and_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "ingestion.state"
    assert checkpoint.read(path) is None
    path.write_bytes(b'{"version": 1, "partit')
    with pytest.raises(CheckpointError, match="unreadable"):
        checkpoint.read(path)
    path.write_bytes(b'{"version": 99}')
    with pytest.raises(CheckpointError, match="version 99"):
        checkpoint.read(path)


def test_drained_only_when_every_partition_is_done(tmp_path: Path) -> None:
    path = tmp_path / "s"
    make(path)
    checkpoint.update_partition(path, 0, lambda p: setattr(p, "done", True))
    state = checkpoint.read(path)
    assert state is not None and not state.drained
    checkpoint.update_partition(path, 1, lambda p: setattr(p, "done", True))
    state = checkpoint.read(path)
    assert state is not None and state.drained


def _bump(path: str, index: int, times: int) -> None:
    def inc(p: PartitionState) -> None:
        p.rows += 1

    for _ in range(times):
        checkpoint.update_partition(Path(path), index, inc)


def test_concurrent_updates_from_processes_are_not_lost(tmp_path: Path) -> None:
    path = tmp_path / "ingestion.state"
    make(path, partitions=2)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_bump, args=(str(path), i, 50)) for i in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    state = checkpoint.read(path)
    assert state is not None and [p.rows for p in state.partitions] == [50, 50]
