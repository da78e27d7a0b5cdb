"""The data directory runs out of space while a segment (or the checkpoint) is written.

Expected: exit 1 with one line naming the problem, no torn segment in ready/, the
checkpoint still parses, and once space returns the next run completes exactly."""

from __future__ import annotations

import errno
import random
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ingest.source import checkpoint
from ingest.source.checkpoint import Checkpoint, PartitionState
from tests.e2e import Run, assert_exact, fetched_rows, ingest_env, run_to_end, start_run, wait_for
from tests.reliability.helpers import (
    assert_checkpoint_intact,
    assert_ready_segments_parse,
    can_mount,
    small_filesystem,
)

pytestmark = pytest.mark.skipif(not can_mount(), reason="needs root to mount a small tmpfs")


SIM_DEFAULTS = {"events": 30_000, "seed": 13}  # for the `simulator` fixture (conftest)


@pytest.fixture
def small_data_dir(tmp_path: Path) -> Iterator[Path]:
    with small_filesystem(tmp_path / "mnt", "2m") as mount:
        yield mount / "data"


def grow(mount: Path, size: str) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(mount)], check=True)


def error_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if '"ERROR"' in line]


def assert_clean_failure(code: int, log: str, dsn: str, data_dir: Path) -> None:
    assert code == 1, log[-3000:]
    assert "Traceback" not in log, log[-3000:]
    last = error_lines(log)[-1]
    assert "no space left in the data directory" in last, last
    assert len(last) < 1000
    assert_checkpoint_intact(data_dir)
    assert_ready_segments_parse(dsn, data_dir)
    leftovers = [p.name for p in data_dir.glob(".*.tmp")]
    assert not leftovers, f"half-written temp files left behind: {leftovers}"


def test_disk_full_while_a_segment_is_written(
    simulator: Any, pg_dsn: str, small_data_dir: Path, tmp_path: Path
) -> None:
    # A segment of 20,000 rows (several MB) cannot fit in 2 MB.
    env = ingest_env(simulator, pg_dsn, small_data_dir, INGEST_PAGE_LIMIT=1000, INGEST_SEGMENT_MAX_ROWS=20_000,
                     INGEST_PARTITIONS=1)
    code, log = run_to_end(env, tmp_path / "full.log", timeout=120)
    assert_clean_failure(code, log, pg_dsn, small_data_dir)
    assert not list((small_data_dir / "segments" / "ready").glob("*.tsv")), "a half-written segment was sealed"
    assert not list((small_data_dir / "segments" / "open").glob("*.tsv")), "the failed segment still takes space"
    grow(small_data_dir.parent, "256m")
    code, log = run_to_end(env, tmp_path / "after.log", timeout=180)
    assert code == 0, log[-3000:]
    assert_exact(pg_dsn, simulator.truth())


def test_checkpoint_write_on_a_full_disk_keeps_the_old_one_and_no_temp_file(tmp_path: Path) -> None:
    with small_filesystem(tmp_path / "mnt", "256k") as mount:
        state_path = mount / "ingestion.state"
        old = Checkpoint(generation="g", mode="events", total=1, newest_ms=1,
                         partitions=[PartitionState(index=0, lane="events", lower_ms=0, upper_ms=2)])
        checkpoint.write(state_path, old)
        fill(mount, mount / "ballast")
        big = Checkpoint(generation="g", mode="events", total=1, newest_ms=1,
                         partitions=[PartitionState(index=i, lane="events", lower_ms=0, upper_ms=2, cursor="c" * 4096)
                                     for i in range(64)])
        with pytest.raises(OSError) as raised:
            checkpoint.write(state_path, big)
        assert raised.value.errno == errno.ENOSPC
        assert checkpoint.read(state_path) == old
        assert sorted(p.name for p in mount.iterdir()) == ["ballast", "ingestion.state"]


def fill(mount: Path, ballast: Path) -> None:
    """Take every free byte of the file system."""
    with open(ballast, "ab", buffering=0) as fh:
        size = 1 << 20
        while size >= 1:
            try:
                while fh.write(b"\0" * size) == size:
                    pass
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
            size //= 16


def keep_full(mount: Path, ballast: Path, stop: threading.Event) -> None:
    while not stop.is_set():
        fill(mount, ballast)
        stop.wait(0.005)


def ended(run: Run) -> bool:
    return run.process.poll() is not None


@pytest.mark.slow
@pytest.mark.sim(events=80_000)
def test_disk_fills_up_at_random_moments(simulator: Any, pg_dsn: str, tmp_path: Path) -> None:
    """Five times: the disk fills at a random point of the run (a segment, a seal, or the
    checkpoint is being written); the run fails cleanly; space returns; it resumes."""
    rng = random.Random(77)
    failures = 0
    with small_filesystem(tmp_path / "mnt", "64m") as mount:
        data_dir = mount / "data"
        ballast = mount / "ballast"
        env = ingest_env(simulator, pg_dsn, data_dir, INGEST_PAGE_LIMIT=1000, INGEST_SEGMENT_MAX_ROWS=1500,
                         INGEST_PARTITIONS=2)
        for attempt in range(5):
            run = start_run(env, tmp_path / f"run{attempt}.log")
            try:
                target = fetched_rows(data_dir) + rng.randint(1000, 8000)
                wait_for(lambda r=run, t=target: fetched_rows(data_dir) >= t or ended(r), 120, "progress")
                if ended(run):
                    break
                # Another writer takes every byte freed (loaders delete what they loaded).
                stop = threading.Event()
                filler = threading.Thread(target=keep_full, args=(mount, ballast, stop), daemon=True)
                filler.start()
                try:
                    code = run.wait(120)
                finally:
                    stop.set()
                    filler.join(10)
            finally:
                run.kill_group()
            if code == 0:  # drained before the disk filled
                ballast.unlink()
                break
            assert_clean_failure(code, run.log, pg_dsn, data_dir)
            failures += 1
            ballast.unlink()
        code, log = run_to_end(env, tmp_path / "final.log", timeout=300)
    assert failures >= 3, f"only {failures} runs met a full disk"
    assert code == 0, log[-3000:]
    assert_exact(pg_dsn, simulator.truth())
    print(f"disk-full failures: {failures}; events checked: {len(simulator.truth().storable_ids)}")
