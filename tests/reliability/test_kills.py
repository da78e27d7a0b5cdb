"""SIGKILL at random moments: the whole group, one loader, one fetcher, the supervisor
alone (orphaning its children). Nothing may be lost or duplicated, no claim may outlive
its loader, and orphans must exit by themselves before a new run touches the data dir."""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson
import psycopg2
import pytest

from ingest.config import Config
from ingest.run.fetching import fetch_context
from ingest.simulator import SimulatorConfig
from ingest.sink.segments import SegmentStore, SegmentWriter, id_of
from ingest.source import checkpoint
from ingest.source.api import ApiClient
from ingest.source.checkpoint import Checkpoint, PartitionState
from ingest.source.fetcher import fetch_partition
from tests.e2e import Run, assert_exact, fetched_rows, ingest_env, loaded_segments, run_to_end, start_run, wait_for
from tests.reliability.helpers import (
    alive,
    assert_checkpoint_intact,
    children,
    claims,
    group_pids,
    kill_pids,
    lock_holders,
    wait_until_gone,
)

ORPHAN_EXIT_S = 30.0  # orphans finish their page or segment, then exit


SIM_DEFAULTS = {"events": 30_000, "seed": 5}  # for the `simulator` fixture (conftest)


def kill_env(sim: Any, dsn: str, data_dir: Path, **extra: Any) -> dict[str, str]:
    values: dict[str, Any] = {
        "INGEST_PAGE_LIMIT": 1000,
        "INGEST_SEGMENT_MAX_ROWS": 2000,
        "INGEST_PARTITIONS": 2,
        "INGEST_MAX_RESTARTS": 100,
        "INGEST_LOG_LEVEL": "DEBUG",  # fetchers and loaders then log lines with their pid
        **extra,
    }
    return ingest_env(sim, dsn, data_dir, **values)


def roles(run: Run) -> dict[str, list[int]]:
    """Live fetcher and loader pids of a run, from the pid on each child's log lines."""
    kinds: dict[int, str] = {}
    for line in run.log.splitlines():
        if line.startswith("{") and '"process"' in line:
            try:
                record = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue  # a line being written
            name = str(record.get("process") or "")
            if name.startswith(("fetcher-", "loader-")):
                kinds[int(record["pid"])] = name.split("-")[0]
    live = {p.pid for p in children(run)}
    out: dict[str, list[int]] = {"fetcher": [], "loader": []}
    for pid, kind in kinds.items():
        if pid in live:
            out[kind].append(pid)
    return out


def poll(condition: Any, timeout: float, interval: float = 0.005) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


def ended(run: Run) -> bool:
    return run.process.poll() is not None


# ---------------------------------------------------------------------------------------
# Fast cases (make test)


def test_killed_loaders_claims_are_requeued_in_the_same_run(simulator: Any, pg_dsn: str, data_dir: Path) -> None:
    """A loader killed while it holds a segment: the same run still ends 0 and exact."""
    env = kill_env(simulator, pg_dsn, data_dir, INGEST_SEGMENT_MAX_ROWS=1000, INGEST_PARTITIONS=1)
    run = start_run(env, data_dir / "run.log")
    killed = 0
    try:
        for _ in range(3):
            if not poll(lambda: bool(claims(data_dir)) or ended(run), 60):
                break
            holders = [pid for pid in claims(data_dir) if alive(pid)]
            if not holders or ended(run):
                break
            kill_pids(holders[:1])
            killed += 1
        assert killed >= 1, "no loader was ever caught holding a segment"
        code = run.wait(120)
    finally:
        run.kill_group()
    assert code == 0, run.log[-3000:]
    assert "claimed segment(s) back to ready/" in run.log
    assert not claims(data_dir), "a claim outlived its loader"
    assert_exact(pg_dsn, simulator.truth())


@pytest.mark.sim(events=6000, p_slow=1.0, slow_delay=1.5)
def test_orphans_of_a_killed_supervisor_exit_before_the_next_run_starts(
    simulator: Any, pg_dsn: str, data_dir: Path
) -> None:
    """SIGKILL of the supervisor alone; a new run is started at once. It must not fetch or
    load while an orphan still works in the data directory, and orphans must exit."""
    # A stalling API (0.75-2.25 s a page) keeps the orphaned fetchers inside a request.
    env = kill_env(simulator, pg_dsn, data_dir, INGEST_SEGMENT_MAX_ROWS=1000)
    run = start_run(env, data_dir / "run1.log")
    wait_for(lambda: loaded_segments(pg_dsn) >= 1 or ended(run), 120, "progress")
    assert not ended(run), run.log[-3000:]
    orphans = [p.pid for p in children(run)]
    assert orphans, "the run has children"
    os.kill(run.process.pid, signal.SIGKILL)
    run.wait(30)
    # Those already at work; one still starting up exits as soon as it sees its parent gone.
    working = [pid for pid in orphans if pid in lock_holders(data_dir / "workers.lock")]
    assert working, "no orphan was at work"

    second = start_run(env, data_dir / "run2.log")
    overlap: list[tuple[int, int]] = []
    stop = threading.Event()

    def watch() -> None:  # both generations working at once would be the bug
        while not stop.is_set():
            new = [p.pid for p in children(second)]
            old = [pid for pid in working if alive(pid)]
            if new and old:
                overlap.append((new[0], old[0]))
            time.sleep(0.005)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        survivors = wait_until_gone(orphans, ORPHAN_EXIT_S)
        assert not survivors, f"orphans still alive after {ORPHAN_EXIT_S}s: {survivors}"
        code = second.wait(180)
    finally:
        stop.set()
        watcher.join(5)
        second.kill_group()
        run.kill_group()
    assert not overlap, f"new children ran beside orphans of the killed run: {overlap[:3]}"
    assert code == 0, second.log[-3000:]
    assert_exact(pg_dsn, simulator.truth())


def test_a_second_run_on_the_same_data_dir_is_refused(simulator: Any, pg_dsn: str, data_dir: Path) -> None:
    env = kill_env(simulator, pg_dsn, data_dir)
    first = start_run(env, data_dir / "run1.log")
    try:
        wait_for(lambda: fetched_rows(data_dir) > 0 or ended(first), 60, "the first run to start fetching")
        code, log = run_to_end(env, data_dir / "run2.log", timeout=60)
        assert code == 1
        assert f"another datasync-ingest run is using {data_dir}" in log
        assert first.wait(120) == 0, first.log[-3000:]
    finally:
        first.kill_group()
    assert_exact(pg_dsn, simulator.truth())


def test_a_sequence_number_sealed_before_a_crash_is_never_reused(
    simulator: Any, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed between a seal and its checkpoint, after a loader took the segment: the pages
    are fetched again and may be cut differently (age-based rotation); under the same id
    the ledger would skip the new segment as already loaded and lose its extra events."""
    config = Config(api_url=simulator.base_url, api_key=simulator.api_key, data_dir=data_dir, page_limit=1000,
                    segment_max_rows=2000, pacing="off", source="events")
    store = SegmentStore(config.segments_dir)
    store.ensure()
    upper = SimulatorConfig().time_end + 1
    plan = Checkpoint(generation="abcd1234", mode="events", total=None, newest_ms=None,
                      partitions=[PartitionState(index=0, lane="events", lower_ms=0, upper_ms=upper)])
    checkpoint.write(config.state_path, plan)

    def fetch(config: Config) -> None:
        client = ApiClient(config, None, should_stop=lambda: False)
        state = checkpoint.read(config.state_path)
        assert state is not None
        ctx = fetch_context(config, state.generation, client, lambda: False, lambda s: False)
        try:
            fetch_partition(ctx, state.partitions[0])
        finally:
            client.close()

    real_seal = SegmentWriter.seal

    def seal_then_die(self: SegmentWriter) -> str | None:
        real_seal(self)
        raise SystemExit("SIGKILL between the seal and the checkpoint")

    monkeypatch.setattr(SegmentWriter, "seal", seal_then_die)
    with pytest.raises(SystemExit):
        fetch(config)
    monkeypatch.setattr(SegmentWriter, "seal", real_seal)
    [sealed] = store.segments("ready")
    loaded = id_of(sealed)
    sealed.unlink()  # a loader committed it (ledger row written) and retired the file
    # The restarted fetcher cuts its first segment later (as another rotation moment would).
    fetch(replace(config, segment_max_rows=3000))
    again = [id_of(p) for p in store.segments("ready")]
    assert loaded not in again, f"{loaded} was sealed twice with different content; the ledger would skip it"
    rows = sum(p.read_bytes().count(b"\n") for p in store.segments("ready"))
    assert rows == 30_000  # every event sealed again after the checkpoint (the first 2,000 twice is fine)


def find_victims(run: Run, kind: str, data_dir: Path, timeout: float = 60) -> list[int]:
    """Pids of `kind` to kill: for loaders, preferably those holding a claim right now."""
    deadline = time.monotonic() + timeout
    while not ended(run) and time.monotonic() < deadline:
        if kind == "loader":
            pids = [pid for pid in claims(data_dir) if alive(pid)] or roles(run)["loader"]
        else:
            pids = roles(run)["fetcher"]
        if pids:
            return pids
        time.sleep(0.01)
    return []


def _die_updating_the_counters(counters: Any) -> None:
    counters.add_many({"events_fetched": 5})
    os.kill(os.getpid(), signal.SIGKILL)


def test_a_child_killed_while_updating_the_counters_does_not_freeze_the_run() -> None:
    import multiprocessing as mp

    from ingest.counters import SharedCounters

    ctx = mp.get_context("spawn")
    counters = SharedCounters(ctx)
    child = ctx.Process(target=_die_updating_the_counters, args=(counters.for_child(),))
    child.start()
    child.join(60)
    assert child.exitcode == -signal.SIGKILL
    reader = threading.Thread(target=counters.snapshot, daemon=True)  # what the supervisor does every tick
    reader.start()
    reader.join(2)
    assert not reader.is_alive(), "the supervisor's progress tick blocks for ever on a dead process's lock"
    assert counters.snapshot()["events_fetched"] == 5, "what the dead child counted stays counted"


# ---------------------------------------------------------------------------------------
# The long case (make test-all): 20 kills of every kind during one ingestion


KINDS = ["group"] * 5 + ["loader"] * 5 + ["fetcher"] * 5 + ["supervisor"] * 5


@pytest.mark.slow
@pytest.mark.sim(events=300_000)  # enough that twenty kills land before a run drains it all
def test_twenty_random_sigkills_then_an_exact_table(simulator: Any, pg_dsn: str, data_dir: Path) -> None:
    rng = random.Random(20261128)
    plan = KINDS[:]
    rng.shuffle(plan)
    env = kill_env(simulator, pg_dsn, data_dir, INGEST_SEGMENT_MAX_ROWS=1500, INGEST_PARTITIONS=2)
    survived: dict[str, int] = dict.fromkeys(KINDS, 0)
    attempt = 0
    run = start_run(env, data_dir / "run0.log")
    orphans: list[int] = []
    try:
        for kind in plan:
            if ended(run):  # drained early, or the previous kill took the group: next run
                attempt += 1
                run = start_run(env, data_dir / f"run{attempt}.log")
            target = fetched_rows(data_dir) + rng.randint(500, 2500)
            wait_for(lambda r=run, t=target: fetched_rows(data_dir) >= t or ended(r), 120, "fetch progress")
            if ended(run):
                continue
            if kind == "group":
                run.kill_group()
                run.wait(30)
            elif kind == "supervisor":
                orphans += [p.pid for p in children(run)]
                os.kill(run.process.pid, signal.SIGKILL)
                run.wait(30)
            else:
                victims = find_victims(run, kind, data_dir)
                if not victims or ended(run):
                    continue
                kill_pids([rng.choice(victims)])
            survived[kind] += 1
        assert sum(survived.values()) >= 16, f"too few kills landed: {survived}"
        if not ended(run):
            assert run.wait(300) in (0, 1), run.log[-3000:]
        assert not wait_until_gone(orphans, ORPHAN_EXIT_S), "orphans outlived the kill test"
        assert_checkpoint_intact(data_dir)
        code, log = run_to_end(env, data_dir / "final.log", timeout=300)
    finally:
        run.kill_group()
        kill_pids(group_pids(run.process.pid))
    assert code == 0, log[-3000:]
    assert not claims(data_dir)
    assert_exact(pg_dsn, simulator.truth())
    with psycopg2.connect(pg_dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM events")
        print(f"kills survived: {survived}; events checked: {cur.fetchone()[0]}")
