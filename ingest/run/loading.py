"""The loader process: ready segments into the table until fetching is done, and the
`load` command's pool of them."""

from __future__ import annotations

import multiprocessing as mp
from typing import Any

from ingest.config import Config
from ingest.counters import SharedCounters
from ingest.run.children import Child, start
from ingest.run.exits import ChildExit
from ingest.sink import db
from ingest.sink.loader import LoadResult
from ingest.sink.pool import LOAD_COUNTERS, DatabaseUnavailable, counted, loader_loop


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
