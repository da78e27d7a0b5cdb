"""The loader pool's loop: claim -> load -> retire, riding out database outages.

Each loader process runs `loader_loop` on its own connection. A transient database error
(the server restarting, a dropped connection) closes the connection and retries the same
claimed segment with backoff, for at most --db-outage-limit seconds; an error in the data
rejects the segment as a whole; anything else puts the claim back in ready/ and ends the
loader, which the supervisor may restart.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import psycopg2
import psycopg2.extensions
from loguru import logger

from ingest.config import Config
from ingest.sink import db
from ingest.sink.loader import TEMP_BUFFERS, LoadResult, load_segment
from ingest.sink.segments import SegmentStore, claim, id_of, reject, requeue, retire
from ingest.waits import backoff, wait_for

POLL_INTERVAL = 0.05  # seconds between looks at an empty ready/
RETRY_BASE_S, RETRY_CAP_S = 0.5, 30.0  # backoff for transient database errors


def _connect(dsn: str) -> psycopg2.extensions.connection:
    conn = db.connect(dsn, application_name="datasync-ingest-loader")
    conn.set_client_encoding("UTF8")
    with conn.cursor() as cur:
        cur.execute("SET temp_buffers = %s", (TEMP_BUFFERS,))
    conn.commit()
    return conn


def _close(conn: psycopg2.extensions.connection | None) -> None:
    if conn is not None:
        try:
            conn.close()
        except psycopg2.Error:  # already broken: nothing left to release
            logger.debug("closing a broken connection failed")


class DatabaseUnavailable(RuntimeError):
    """Transient errors went on for longer than --db-outage-limit: the run fails (exit 1)
    instead of waiting for ever; the next run resumes."""


class _Loader:
    """Connection state across segments; reconnects after transient errors."""

    def __init__(self, config: Config, dsn: str, store: SegmentStore, should_stop: Callable[[], bool]) -> None:
        self.config, self.dsn, self.store, self.should_stop = config, dsn, store, should_stop
        self.conn: psycopg2.extensions.connection | None = None

    def load(self, path: Path) -> LoadResult | None:
        """The claimed segment loaded (or skipped as already loaded); None if it was put back
        in ready/ (stopped while the database was unavailable, or rejected as a whole)."""
        seg = id_of(path)
        attempt = 0
        outage_started: float | None = None
        while True:
            try:
                if self.conn is None:
                    self.conn = _connect(self.dsn)
                return load_segment(self.conn, path, seg, self.config.table)
            except psycopg2.Error as exc:
                action = db.classify(exc)
                if action is db.Action.FAIL:
                    requeue(self.store, path)  # a restarted loader may try again
                    raise
                _close(self.conn)
                self.conn = None
                if action is db.Action.REJECT:
                    reason = f"cannot load segment: {db.describe_error(exc)}"
                    logger.error("segment {}: {}", seg, reason)
                    reject(self.store, path, reason)
                    return None
                outage_started = outage_started or time.monotonic()
                if time.monotonic() - outage_started > self.config.db_outage_limit:
                    requeue(self.store, path)
                    raise DatabaseUnavailable(
                        f"the database has been unavailable for over {self.config.db_outage_limit:.0f}s: "
                        f"{db.describe_error(exc)}"
                    ) from exc
                attempt += 1
                delay = backoff(attempt, RETRY_BASE_S, RETRY_CAP_S)
                logger.warning(
                    "segment {}: database error, retrying in {:.1f}s (attempt {}): {}",
                    seg, delay, attempt, db.describe_error(exc),
                )
                if wait_for(delay, self.should_stop):
                    requeue(self.store, path)
                    return None

    def close(self) -> None:
        _close(self.conn)
        self.conn = None


def loader_loop(
    config: Config,
    dsn: str,
    should_stop: Callable[[], bool],
    fetch_done: Callable[[], bool],
    on_loaded: Callable[[LoadResult], None] = lambda r: None,
    pid: int | None = None,
) -> None:
    """claim -> load -> retire -> on_loaded, until stopped, or until ready/ is empty after
    the fetchers are done. `fetch_done` is read BEFORE claiming: a segment sealed just
    before the fetchers finish is then always seen by the claim that follows."""
    store = SegmentStore(config.segments_dir)
    store.ensure()
    pid = pid if pid is not None else os.getpid()
    loader = _Loader(config, dsn, store, should_stop)
    try:
        while not should_stop():
            done = fetch_done()
            path = claim(store, pid)
            if path is None:
                if done:
                    return
                wait_for(POLL_INTERVAL, should_stop)
                continue
            result = loader.load(path)
            if result is None:
                continue
            retire(store, path, keep=config.keep_segments)
            logger.debug("loaded {}", asdict(result))
            on_loaded(result)
    finally:
        loader.close()


# The shared counters (`ingest.counters`) a load adds to; `load` reports these.
LOAD_COUNTERS = ("segments_loaded", "rows_loaded", "events_loaded", "duplicates", "rejected")


def counted(result: LoadResult) -> dict[str, int]:
    if result.skipped:  # already loaded by someone else: nothing new
        return {}
    return {"segments_loaded": 1, "rows_loaded": result.rows, "events_loaded": result.inserted,
            "duplicates": result.duplicates, "rejected": result.rejected}
