"""The child processes of a run: one start-up for every kind, then the body of each.

Start-up is where exactly-once meets process life. A child ignores the signals meant for
its process group (the supervisor turns them into stop requests), holds `workers.lock`
shared until it is gone (a new supervisor waits for orphans of a killed one), and treats a
parent that died as a stop request. Written once here, so a fetcher and a loader can never
disagree about it. The bodies are the only place where the source (pages) and the sink
(segments, the database) meet: the source's walk writes into the sink's segment writer.
"""

from __future__ import annotations

import errno
import multiprocessing as mp
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from loguru import logger

from ingest.config import Config
from ingest.counters import ClientStatsPublisher, SharedCounters
from ingest.locks import hold_worker_lock
from ingest.logs import configure_logging
from ingest.run.exits import ChildExit
from ingest.sink import db
from ingest.sink.loader import LoadResult
from ingest.sink.pool import LOAD_COUNTERS, DatabaseUnavailable, counted, loader_loop
from ingest.sink.segments import SegmentStore, SegmentWriter
from ingest.source import checkpoint
from ingest.source.api import ApiClient, ApiError, FatalApiError
from ingest.source.fetcher import FetchContext, help_others, walk
from ingest.source.lanes import Lane
from ingest.source.pacing import SharedRateLimiter
from ingest.waits import wait_for

Kind = Literal["fetcher", "loader"]

# Out of space (or over a file-size limit): restarting cannot help until space returns.
DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


@dataclass
class Child:
    """What a body gets from start-up: how to know it should stop, how to wait, where
    its counts and its one-line fatal reason go."""

    config: Config
    should_stop: Callable[[], bool]
    wait: Callable[[float], bool]  # True when a stop was requested meanwhile
    counters: SharedCounters
    errors: Any  # a queue the supervisor reads for its final message

    def report(self, reason: str) -> None:
        logger.error(reason)
        self.errors.put(reason)


Body = Callable[..., ChildExit]


def child_main(kind: Kind, key: int, body: Body, config: Config, stop_event: Any, counters: SharedCounters,
               errors: Any, *args: Any) -> None:
    """Every child's process entry point (spawn-safe): start-up, then `body(child, *args)`,
    whose ChildExit becomes the exit code."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    configure_logging(config.log_format, config.log_level, config.secrets(), process=f"{kind}-{key}")
    # The pid the parent had when it started us (os.getppid() now could already be init's).
    spawner = mp.parent_process()
    parent = spawner.pid if spawner is not None and spawner.pid is not None else os.getppid()
    hold_worker_lock(config.data_dir)  # a new supervisor waits until we are gone
    if os.getppid() != parent:
        sys.exit(ChildExit.DONE)  # orphaned before we began: leave everything to the next run

    def should_stop() -> bool:
        return bool(stop_event.is_set()) or os.getppid() != parent

    def wait(seconds: float) -> bool:
        return wait_for(seconds, should_stop, nap=stop_event.wait)

    sys.exit(body(Child(config, should_stop, wait, counters, errors), *args))


def start(ctx: Any, kind: Kind, key: int, body: Body, config: Config, stop_event: Any, counters: SharedCounters,
          errors: Any, *args: Any) -> Any:
    """A started child process; `counters` gets a row of its own."""
    process = ctx.Process(
        target=child_main,
        args=(kind, key, body, config, stop_event, counters.for_child(), errors, *args),
        name=f"{kind}-{key}",
    )
    process.start()
    return process


# ---------------------------------------------------------------------------------------
# Fetchers


def describe_os_error(exc: OSError, data_dir: Path) -> str:
    """One line for the user: what failed, and where."""
    what = "no space left in the data directory" if exc.errno in DISK_FULL else "cannot write to the data directory"
    return f"{what} {data_dir}: {exc.strerror or exc}" + (f" ({exc.filename})" if exc.filename else "")


def fetch_context(config: Config, generation: str, client: ApiClient, should_stop: Callable[[], bool],
                  wait: Callable[[float], bool], on_page: Callable[[int], None] = lambda rows: None) -> FetchContext:
    """A walk of the source that writes into this data directory's segments."""
    store = SegmentStore(config.segments_dir)

    def open_output(partition: int, next_seq: int) -> SegmentWriter:
        return SegmentWriter(store, partition, generation, next_seq,
                             config.segment_max_rows, config.segment_max_bytes, config.segment_max_age)

    return FetchContext(config, client, open_output, store.ready_bytes, should_stop, wait, on_page)


def fetcher(child: Child, index: int, generation: str, limiters: dict[Lane, SharedRateLimiter]) -> ChildExit:
    """Walk partition `index`, then help walk the others."""
    config = child.config
    state = checkpoint.read(config.state_path)
    assert state is not None, "the supervisor writes the checkpoint before starting fetchers"
    part = state.partitions[index]
    client = ApiClient(config, limiters, should_stop=child.should_stop)
    publisher = ClientStatsPublisher(child.counters)

    def on_page(rows: int) -> None:
        child.counters.add_many({"events_fetched": rows, "pages": 1})
        publisher.publish(client.stats)

    ctx = fetch_context(config, generation, client, child.should_stop, child.wait, on_page)
    try:
        # A restarted fetcher may find its own partition done: it goes straight to helping.
        drained, lane = (True, part.lane) if part.done else walk(ctx, part)
        logger.info("partition {} {}", index, "drained" if drained else "stopped")
        if drained:
            help_others(ctx, lane)
    except FatalApiError as exc:
        child.report(f"partition {index}: {exc}")
        return ChildExit.FATAL
    except ApiError as exc:
        child.report(f"partition {index}: {exc}")
        return ChildExit.RETRYABLE
    except OSError as exc:
        child.report(f"partition {index}: {describe_os_error(exc, config.data_dir)}")
        return ChildExit.FATAL if exc.errno in DISK_FULL else ChildExit.RETRYABLE
    finally:
        publisher.publish(client.stats)
    return ChildExit.DONE


# ---------------------------------------------------------------------------------------
# Loaders


def loader(child: Child, dsn: str, fetch_done: Any) -> ChildExit:
    """Load ready segments until stopped, or until ready/ is empty once `fetch_done` is set."""

    def on_loaded(result: LoadResult) -> None:
        child.counters.add_many(counted(result))

    try:
        loader_loop(child.config, dsn, child.should_stop, fetch_done.is_set, on_loaded)
    except Exception as exc:
        child.report(f"loader failed: {db.describe_error(exc)}")
        return ChildExit.FATAL if isinstance(exc, DatabaseUnavailable) else ChildExit.CRASHED
    return ChildExit.DONE


class LoadFailed(RuntimeError):
    """`load_ready` could not load everything; the message is the one line to show."""


def load_ready(config: Config, dsn: str, workers: int) -> dict[str, int]:
    """Load everything in ready/ with `workers` loader processes and wait for them: the
    `load` command. Reconcile first if a crash may have left segments in loading/."""
    ctx = mp.get_context("spawn")
    fetch_done, stop, errors = ctx.Event(), ctx.Event(), ctx.Queue()
    fetch_done.set()
    counters = SharedCounters(ctx)
    procs = [start(ctx, "loader", i, loader, config, stop, counters, errors, dsn, fetch_done) for i in range(workers)]
    try:
        for p in procs:
            p.join()
    finally:
        stop.set()
        for p in procs:
            p.join()
    failed = [p.exitcode for p in procs if p.exitcode != ChildExit.DONE]
    if failed:
        reason = errors.get(timeout=1) if not errors.empty() else f"exit codes {failed}"
        raise LoadFailed(f"{len(failed)} loader(s) failed: {reason}")
    snapshot = counters.snapshot()
    return {name: snapshot[name] for name in LOAD_COUNTERS}
