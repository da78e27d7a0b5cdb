"""The `run` command: prepare, plan, start the fetchers and loaders, watch them, stop cleanly.

The supervisor owns no data path itself. It makes the schema, heals the segment folders
against the ledger, writes the partition plan into the checkpoint on the first run, and
then only watches: restarting a crashed child a bounded number of times, turning the
first SIGINT/SIGTERM into "stop fetching, seal, let the loaders drain", the second into
"stop now", and exiting with a code that says what happened.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import psycopg2
from loguru import logger

from ingest.config import Config
from ingest.counters import SharedCounters
from ingest.run.metrics import MetricsServer, start_metrics_server
from ingest.run.progress import Progress
from ingest.sink import db
from ingest.sink.loader import EXIT_FATAL as LOADER_FATAL
from ingest.sink.loader import loader_process
from ingest.sink.segments import SegmentStore, reconcile, release
from ingest.source import checkpoint
from ingest.source.api import ApiClient, ApiError, FatalApiError, Page, SourceUnavailable, lane_rates, make_limiters
from ingest.source.checkpoint import Checkpoint, PartitionState
from ingest.source.cursors import decode_cursor
from ingest.source.fetcher import EXIT_FATAL as FETCHER_FATAL
from ingest.source.fetcher import fetcher_process, request_window, start_cursor
from ingest.source.normalise import parse_timestamp
from ingest.source.plan import choose_lanes, estimate_oldest, partitions_for, probe_depth, split_range

EXIT_OK = 0
EXIT_FATAL = 1
EXIT_BY_SIGNAL = {signal.SIGINT: 130, signal.SIGTERM: 143}
TICK_S = 0.2
DRAIN_GRACE_S = 30.0
FATAL_EXIT = {"fetcher": FETCHER_FATAL, "loader": LOADER_FATAL}  # exit codes that no restart can help
# Events in the first planning probe (quick to serve: it only finds the newest event and
# how far to look for the second) and in the density sample (a full page: sessions cluster
# events, so a small sample can be off by half; 5,000 events by about a tenth).
PROBE_LIMIT = 1000
SAMPLE_LIMIT = 5000
ORPHAN_GRACE_S = 30.0  # on top of the request timeout: how long orphans of a killed run may take to exit


class RunError(RuntimeError):
    """A fatal condition of the run; its message is the one line the user sees."""


@contextmanager
def database(config: Config) -> Iterator[str]:
    """The DSN to load into: DATABASE_URL, or the embedded server in <data-dir>/pg."""
    if config.database_url:
        yield config.database_url
        return
    try:
        server = db.EmbeddedPostgres.start(config.pg_dir)
    except Exception as exc:  # the library raises assorted errors; the log holds details
        raise RunError(f"cannot start the embedded PostgreSQL in {config.pg_dir}: {exc}") from None
    try:
        yield server.dsn
    finally:
        server.stop()


def prepare_database(config: Config, dsn: str, store: SegmentStore) -> None:
    """Schema, then reconcile the segment folders against the ledger (DESIGN.md section 2)."""
    try:
        conn = db.connect(dsn)
    except Exception as exc:
        raise RunError(f"cannot connect to the database: {db.describe_error(exc)}") from None
    try:
        db.ensure_schema(conn, config.table)
        ledger = db.ledger_ids(conn)
    except psycopg2.Error as exc:  # read-only, no privilege, cancelled...: one line, no traceback
        raise RunError(f"cannot prepare the database: {db.describe_error(exc)}") from None
    finally:
        conn.close()
    report = reconcile(store, ledger, keep=config.keep_segments)
    logger.info("reconciled segments: {}", report)


def newest_timestamp_ms(events: list[Any]) -> int | None:
    stamps = [parse_timestamp(e.get("timestamp")) for e in events if isinstance(e, dict)]
    valid = [s for s in stamps if s is not None]
    return max(valid) // 1000 if valid else None


def sample_of(page: Page) -> tuple[int, int, int] | None:
    """(newest, oldest, events) of a page, or None when it holds too little to measure."""
    top = newest_timestamp_ms(page.events)
    if top is None or len(page.events) < 2 or not page.next_cursor:
        return None
    return top, int(decode_cursor(page.next_cursor)["ts"]), len(page.events)


def estimate_from_samples(client: ApiClient, mode: str, newest: int, probe: Page, limit: int) -> tuple[int, Page]:
    """The oldest event's time, from a second page (`limit` events) taken well inside the
    data (see `estimate_oldest`; positioned by `until` on the feed, by a forged cursor on
    /events), and the page the estimate rests on. A plan from a wrong estimate still covers
    everything, but leaves lanes idle or overloaded until work stealing evens them out."""
    first = sample_of(probe)
    if first is None:  # one page holds everything (or nothing measurable): no need to guess
        return newest, probe
    # Asked for as the first page of a walk down from the depth, on the lane the probe used.
    below = PartitionState(index=0, source="events" if mode == "events" else "feed", lower_ms=0,
                           upper_ms=probe_depth(newest, first[1]))
    since, until = request_window(below)
    page = client.fetch_page(below.source, start_cursor(below, int(time.time() * 1000)), since, until, limit)
    inside = sample_of(page)
    if inside is None:  # the data ends above the depth: the first sample is all we have
        return max(below.upper_ms, estimate_oldest(newest, first, probe.total)), probe
    return estimate_oldest(newest, inside, probe.total), page


def make_plan(config: Config, client: ApiClient) -> Checkpoint:
    """Probe the source once, then split its time range into partitions."""
    mode = {"auto": "mixed", "feed": "feed", "events": "events"}[config.source]
    limit = min(config.page_limit, PROBE_LIMIT)
    if mode == "events":
        probe = client.fetch_page("events", None, limit=limit)
    else:
        try:
            probe = client.fetch_page("feed", None, limit=limit)
        except SourceUnavailable as exc:
            if config.source == "feed":
                raise RunError(f"the feed is unavailable: {exc}") from None
            logger.warning("no stream token ({}); using /api/v1/events only", exc)
            mode = "events"
            probe = client.fetch_page("events", None, limit=limit)
    newest = newest_timestamp_ms(probe.events)
    generation = checkpoint.new_generation()
    if newest is None:
        logger.warning("the source returned no events with a timestamp; nothing to fetch")
        plan = Checkpoint(generation=generation, source=mode, total=probe.total, newest_ms=None)
        plan.partitions = split_range(0, 1, [("events", 1.0)])
        for part in plan.partitions:
            part.done = not probe.events
        return plan
    oldest, sample = estimate_from_samples(client, mode, newest, probe, min(config.page_limit, SAMPLE_LIMIT))
    partitions = partitions_for(config.partitions, len(sample.events), sample.seconds, os.cpu_count() or 2)
    lanes = choose_lanes(mode, partitions, lane_rates(config))
    plan = Checkpoint(generation=generation, source=mode, total=probe.total, newest_ms=newest, oldest_ms=oldest)
    plan.partitions = split_range(oldest, newest + 1, lanes)
    logger.info(
        "plan: {} partitions over {} .. {} ({} events reported; {} events in {:.2f}s a request)",
        len(plan.partitions),
        oldest,
        newest,
        probe.total,
        len(sample.events),
        sample.seconds,
    )
    return plan


@dataclass
class Child:
    kind: str  # "fetcher" or "loader"
    key: int  # partition index or loader slot
    process: Any
    restarts: int = 0


@dataclass
class Supervisor:
    config: Config
    dsn: str
    ctx: Any = field(default_factory=lambda: mp.get_context("spawn"))

    def __post_init__(self) -> None:
        self.store = SegmentStore(self.config.segments_dir)
        self.stop_fetch = self.ctx.Event()
        self.fetch_done = self.ctx.Event()
        self.stop_loaders = self.ctx.Event()
        self.errors = self.ctx.Queue()
        self.counters = SharedCounters(self.ctx)
        self.limiters = make_limiters(self.config, self.ctx)
        self.children: list[Child] = []
        self.signals: list[int] = []
        self.failure: str | None = None
        self.last_error: str | None = None
        self.cover_rounds = 0
        self.run_lock: BinaryIO | None = None
        self.summary: dict[str, Any] = {}

    # -- children -------------------------------------------------------------------
    def _start(self, kind: str, key: int, restarts: int = 0) -> Child:
        if kind == "fetcher":
            args: tuple[Any, ...] = (
                self.config,
                key,
                self.plan.generation,
                self.limiters,
                self.stop_fetch,
                self.errors,
                self.counters.for_child(),
            )
            process = self.ctx.Process(target=fetcher_process, args=args, name=f"fetcher-{key}")
        else:
            args = (self.config, self.dsn, self.fetch_done, self.stop_loaders, self.counters.for_child(), self.errors)
            process = self.ctx.Process(target=loader_process, args=args, name=f"loader-{key}")
        process.start()
        child = Child(kind, key, process, restarts)
        self.children.append(child)
        return child

    def _reap(self) -> None:
        """Handle children that exited: done, restart, or fail the run."""
        for child in [c for c in self.children if not c.process.is_alive()]:
            self.children.remove(child)
            code = child.process.exitcode
            if child.kind == "loader":
                # A killed loader's claim would otherwise stay in loading/ until the next run.
                released = release(self.store, child.process.pid)
                if released:
                    logger.warning("loader {} exited with {}; {} claimed segment(s) back to ready/",
                                   child.key, code, released)
            if code == 0 and (child.kind == "fetcher" or self.fetch_done.is_set()):
                continue
            self._drain_errors()
            if code == FATAL_EXIT[child.kind]:
                self._fail(self.last_error or f"{child.kind} {child.key} failed")
                continue
            if self.signals or self.failure:
                continue
            if child.restarts >= self.config.max_restarts:
                reason = self.last_error or f"exit code {code}"
                self._fail(f"{child.kind} {child.key} failed {child.restarts + 1} times; last: {reason}")
                continue
            logger.warning("{} {} exited with {}; restarting", child.kind, child.key, code)
            self.counters.add("restarts")
            self._start(child.kind, child.key, child.restarts + 1)

    def _drain_errors(self) -> None:
        """Log what children reported before exiting; keep the latest for the final message."""
        while True:
            try:
                self.last_error = self.errors.get_nowait()
            except queue.Empty:
                return
            logger.error(self.last_error)

    def _fail(self, message: str) -> None:
        if self.failure is None:
            self.failure = message
            logger.error("run failed: {}", message)
        self.stop_fetch.set()
        self.fetch_done.set()

    def _cover_or_finish_fetching(self) -> None:
        """Every fetcher has exited. A partition can still be unfinished without one (its
        walker was restarted onto another partition after a split): start fetchers for
        those, a bounded number of times; otherwise fetching is done."""
        state = checkpoint.read(self.config.state_path)
        undone = [p.index for p in state.partitions if not p.done] if state else []
        if undone and not self.signals and not self.failure and self.cover_rounds < self.config.max_restarts:
            self.cover_rounds += 1
            logger.warning("partitions {} have no fetcher; starting them again", undone)
            for index in undone:
                self._start("fetcher", index)
            return
        self.fetch_done.set()

    def _kill_all(self) -> None:
        for child in self.children:
            if child.process.is_alive():
                child.process.kill()
        for child in self.children:
            child.process.join(5)

    # -- signals --------------------------------------------------------------------
    def _on_signal(self, signum: int, _frame: Any) -> None:
        self.signals.append(signum)
        if len(self.signals) == 1:
            self.stop_fetch.set()
        else:
            self.stop_loaders.set()

    # -- the run --------------------------------------------------------------------
    def run(self) -> int:
        previous = {s: signal.signal(s, self._on_signal) for s in EXIT_BY_SIGNAL}
        try:
            return self._run()
        finally:
            if self.run_lock is not None:
                self.run_lock.close()
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _lock_data_dir(self) -> None:
        """One run per data directory, and none while orphans of a killed run still work
        in it (see `checkpoint.try_lock`): they finish their page or segment and exit."""
        data_dir = self.config.data_dir
        self.run_lock = checkpoint.try_lock(data_dir / checkpoint.RUN_LOCK, exclusive=True)
        if self.run_lock is None:
            raise RunError(f"another datasync-ingest run is using {data_dir}")
        deadline = time.monotonic() + self.config.request_timeout + ORPHAN_GRACE_S
        waiting = False
        while (workers := checkpoint.try_lock(data_dir / checkpoint.WORKERS_LOCK, exclusive=True)) is None:
            if time.monotonic() > deadline:
                raise RunError(f"processes of a previous run still work in {data_dir}; stop them and run again")
            if self.signals:
                raise RunError("stopped while waiting for the processes of a previous run to exit")
            if not waiting:
                logger.warning("waiting for the fetchers and loaders of a previous run to exit")
                waiting = True
            time.sleep(0.1)
        workers.close()

    def _run(self) -> int:
        self._lock_data_dir()
        self.store.ensure()
        prepare_database(self.config, self.dsn, self.store)
        self.plan = self._load_or_make_plan()
        progress = Progress(self.config, self.plan, self.counters, self.store)
        metrics = self._start_metrics(progress)
        for part in self.plan.partitions:
            if not part.done:
                self._start("fetcher", part.index)
        for slot in range(self.config.workers):
            self._start("loader", slot)
        logger.info(
            "running: {} fetchers, {} loaders",
            sum(c.kind == "fetcher" for c in self.children),
            self.config.workers,
        )
        drain_deadline: float | None = None
        try:
            while self.children:
                self._reap()
                if not any(c.kind == "fetcher" for c in self.children) and not self.fetch_done.is_set():
                    self._cover_or_finish_fetching()
                if len(self.signals) >= 2:
                    logger.warning("second signal: stopping now")
                    self._kill_all()
                    break
                if self.failure and drain_deadline is None:
                    drain_deadline = time.monotonic() + DRAIN_GRACE_S
                if drain_deadline is not None and time.monotonic() > drain_deadline:
                    self._kill_all()
                    break
                progress.update()
                self.stop_loaders.wait(TICK_S)
        finally:
            self.summary = progress.close()
            if metrics is not None:
                metrics.stop()
        return self._outcome()

    def health(self) -> str:
        if self.failure:
            return "failed"
        if not self.children:
            return "done" if hasattr(self, "plan") else "ready"
        return "draining" if self.fetch_done.is_set() or self.stop_fetch.is_set() else "fetching"

    def _start_metrics(self, progress: Progress) -> MetricsServer | None:
        if self.config.metrics_port is None:
            return None
        try:
            server = start_metrics_server("0.0.0.0", self.config.metrics_port, progress.snapshot, self.health)
        except OSError as exc:
            raise RunError(f"--metrics-port {self.config.metrics_port}: {exc.strerror or exc}") from None
        logger.info("metrics on port {}", server.port)
        return server

    def _outcome(self) -> int:
        if self.failure:
            logger.error("stopped after a failure: {}", self.failure)
            return EXIT_FATAL
        if self.signals:
            logger.info("stopped by signal; state kept, the next run resumes")
            return EXIT_BY_SIGNAL.get(signal.Signals(self.signals[0]), 1)
        state = checkpoint.read(self.config.state_path)
        counts = self.store.counts()
        pending = counts.get("ready", 0) + counts.get("loading", 0)
        if state is None or not state.drained or pending:
            logger.error("children finished but the run is incomplete ({} segments pending)", pending)
            return EXIT_FATAL
        logger.info("drained: every event fetched and loaded")
        return EXIT_OK

    def _load_or_make_plan(self) -> Checkpoint:
        try:
            existing = checkpoint.read(self.config.state_path)
        except checkpoint.CheckpointError as exc:
            raise RunError(f"{self.config.state_path}: {exc}; move it away to start over") from None
        if existing is not None:
            logger.info("resuming from the checkpoint ({} rows fetched so far)", existing.rows)
            return existing
        client = ApiClient(self.config, self.limiters, should_stop=lambda: bool(self.signals))
        try:
            plan = make_plan(self.config, client)
        except FatalApiError as exc:
            raise RunError(str(exc)) from None
        except ApiError as exc:
            raise RunError(f"cannot reach the API: {exc}") from None
        finally:
            client.close()
        with checkpoint.locked(self.config.state_path):
            checkpoint.write(self.config.state_path, plan)
        return plan


def run(config: Config) -> int:
    """Entry point of `datasync-ingest run`; returns the process exit code."""
    config.data_dir.mkdir(parents=True, exist_ok=True)
    logger.info("config: {}", config.redacted())
    try:
        with database(config) as dsn:
            return Supervisor(config, dsn).run()
    except RunError as exc:
        logger.error("{}", exc)
        return EXIT_FATAL
    except OSError as exc:  # the data directory itself: full, read-only, gone
        logger.error("cannot use the data directory {}: {}", config.data_dir, exc)
        return EXIT_FATAL
    except KeyboardInterrupt:
        return EXIT_BY_SIGNAL[signal.SIGINT]

