"""The `run` command: prepare, plan, start the fetchers and loaders, watch them, stop cleanly.

The supervisor owns no data path itself. It makes the schema, heals the segment folders
against the ledger, writes the partition plan into the checkpoint on the first run, and
then only watches: restarting a crashed child a bounded number of times, turning the
first SIGINT/SIGTERM into "stop fetching, seal, let the loaders drain", the second into
"stop now", and exiting with a code that says what happened.
"""

from __future__ import annotations

import enum
import multiprocessing as mp
import multiprocessing.connection
import os
import queue
import signal
import time
from dataclasses import dataclass, field, replace
from typing import Any, BinaryIO

from loguru import logger

from ingest import locks
from ingest.config import Config
from ingest.counters import SharedCounters
from ingest.run import children, fetching, loading
from ingest.run.children import Kind
from ingest.run.exits import EXIT_BY_SIGNAL, ChildExit, ExitCode
from ingest.run.metrics import MetricsServer, start_metrics_server
from ingest.run.progress import Progress, lag_figures
from ingest.run.target import target_change, target_of
from ingest.sink import db
from ingest.sink.segments import SegmentStore, release
from ingest.source import checkpoint
from ingest.source.api import ApiClient, ApiError, FatalApiError, Stopped, make_limiters
from ingest.source.checkpoint import Checkpoint
from ingest.source.lanes import lane_rates
from ingest.source.plan import plan_top
from ingest.source.probe import look, make_plan
from ingest.waits import wait_for

TICK_S = 0.2
DRAIN_GRACE_S = 30.0
ORPHAN_GRACE_S = 30.0  # on top of the request timeout: how long orphans of a killed run may take to exit


class Restart(enum.Enum):
    """What the supervisor does about a child that exited."""

    DONE = "done"  # it finished its job
    LET_GO = "let-go"  # the run is stopping anyway: no restart
    RESTART = "restart"
    FAIL = "fail"  # restarting cannot help (ChildExit.FATAL): fail the run with its reason
    GIVE_UP = "give-up"  # it failed once more than --max-restarts allows: fail the run
    NEXT_POLL = "next-poll"  # --follow: its walk waits for the next top-up instead


def restart_action(kind: Kind, code: int | None, restarts: int, max_restarts: int, fetch_done: bool,
                   stopping: bool, follow: bool = False) -> Restart:
    """A fetcher that exits 0 has drained (or was stopped); a loader that exits 0 before
    the fetchers are done was cut short, so it is restarted like a crashed one. A signal
    or a failure of the run means no child is restarted. Under --follow an API outage must
    not end the process: a fetcher out of restarts leaves its walk to the next poll."""
    if code == ChildExit.DONE and (kind == "fetcher" or fetch_done):
        return Restart.DONE
    if code == ChildExit.FATAL:
        return Restart.FAIL
    if stopping:
        return Restart.LET_GO
    if restarts >= max_restarts:
        return Restart.NEXT_POLL if follow and kind == "fetcher" else Restart.GIVE_UP
    return Restart.RESTART


class RunError(RuntimeError):
    """A fatal condition of the run; its message is the one line the user sees."""


class TargetChanged(RunError):
    """The data directory's state belongs to another target (exit 2: a usage error)."""


def guard_target(config: Config) -> None:
    """Refuse, before anything is written or started, a state recorded for another target."""
    try:
        state = checkpoint.read(config.state_path)
    except checkpoint.CheckpointError:
        return  # the plan step reports it
    change = target_change(state.target if state else None, target_of(config))
    if change:
        raise TargetChanged(f"{config.data_dir} holds the state of another target: {change}; use another"
                            " --data-dir for this one, or `datasync-ingest reset` to start over")


@dataclass
class Child:
    kind: Kind
    key: int  # fetcher or loader slot
    process: Any
    restarts: int = 0
    walks: tuple[int, ...] = ()  # a fetcher's partitions, a walker thread each


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
        self.plan: Checkpoint | None = None
        self.progress: Progress | None = None
        self.next_top_up: float | None = None  # --follow: when the next top-up is due (None: not scheduled)
        self.top_up_failures = 0  # in a row
        self.summary: dict[str, Any] = {}

    # -- children -------------------------------------------------------------------
    def _start(self, kind: Kind, key: int, restarts: int = 0, walks: tuple[int, ...] = ()) -> Child:
        common = (self.ctx, kind, key)
        if kind == "fetcher":
            assert self.plan is not None, "fetchers start after the plan is made"
            process = children.start(*common, fetching.fetcher, self.config, self.stop_fetch, self.counters,
                                     self.errors, walks, self.plan.generation, self.limiters)
        else:
            process = children.start(*common, loading.loader, self.config, self.stop_loaders, self.counters,
                                     self.errors, self.dsn, self.fetch_done)
        child = Child(kind, key, process, restarts, walks)
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
            action = restart_action(child.kind, code, child.restarts, self.config.max_restarts,
                                    self.fetch_done.is_set(), bool(self.signals or self.failure), self.config.follow)
            if action is Restart.DONE:
                continue
            self._drain_errors()
            if action is Restart.FAIL:
                self._fail(self.last_error or f"{child.kind} {child.key} failed")
            elif action is Restart.GIVE_UP:
                reason = self.last_error or f"exit code {code}"
                self._fail(f"{child.kind} {child.key} failed {child.restarts + 1} times; last: {reason}")
            elif action is Restart.NEXT_POLL:
                logger.warning("{} {} failed {} times ({}); its walk goes on at the next top-up", child.kind,
                               child.key, child.restarts + 1, self.last_error or f"exit code {code}")
            elif action is Restart.RESTART:
                logger.warning("{} {} exited with {}; restarting", child.kind, child.key, code)
                self.counters.add("restarts")
                self._start(child.kind, child.key, child.restarts + 1, child.walks)

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
        those, a bounded number of times; otherwise fetching is done (under --follow: done
        until the next top-up, and the loaders stay)."""
        state = checkpoint.read(self.config.state_path)
        undone = [p.index for p in state.partitions if not p.done] if state else []
        stopping = bool(self.signals or self.failure)
        if undone and not stopping and self.cover_rounds < self.config.max_restarts:
            self.cover_rounds += 1
            logger.warning("partitions {} have no fetcher; starting them again", undone)
            self._start_walks(undone)
            return
        if self.config.follow and not stopping:
            self._between_top_ups(state, undone)
            return
        self.fetch_done.set()

    def _start_fetchers(self, plan: Checkpoint) -> None:
        self.cover_rounds = 0
        self._start_walks([part.index for part in plan.partitions if not part.done])

    def _start_walks(self, indices: list[int]) -> None:
        processes = fetching.fetch_processes(len(indices), os.cpu_count() or 2)
        for slot, walks in enumerate(fetching.assign_walkers(indices, processes)):
            self._start("fetcher", slot, walks=walks)

    # -- top-ups ----------------------------------------------------------------------
    def _between_top_ups(self, state: Checkpoint | None, undone: list[int]) -> None:
        """--follow, with no fetcher running: once the last top-up is loaded, wait
        --poll-interval, then top up again (and give any walk left unfinished by an
        outage another go)."""
        now = time.monotonic()
        if self.next_top_up is None:
            counts = self.store.counts()
            if counts["ready"] + counts["loading"]:
                return  # the loaders are still at it
            if state is not None and not undone:
                self._mark_loaded()
            self.next_top_up = now + self.config.poll_interval
            return
        if now < self.next_top_up:
            return
        try:
            plan = self._top_up()
        except Stopped:
            return  # a signal came during the look: the next tick stops the run
        except ApiError as exc:  # an outage: ridden through, tried again at the next poll
            self.top_up_failures += 1
            self.next_top_up = now + self.config.poll_interval
            logger.warning("top-up failed ({} in a row): {}; next try in {:.0f}s", self.top_up_failures, exc,
                           self.config.poll_interval)
            return
        self.top_up_failures = 0
        self.next_top_up = None
        self._start_fetchers(plan)

    def _top_up(self) -> Checkpoint:
        """Plan what the source gained since the checkpoint's plan, durably: a kill at any
        moment leaves the old plan or the new one, never half of one."""
        path = self.config.state_path
        state = checkpoint.read(path)
        assert state is not None, "top-ups follow a plan"
        client = ApiClient(self.config, self.limiters, should_stop=lambda: bool(self.signals))
        try:
            if state.newest_ms is None:  # the source had no events at all when the plan was made
                fresh = make_plan(self.config, client)
                plan = replace(fresh, target=state.target, rows_earlier=state.rows,
                               earlier_generations=[*state.earlier_generations, state.generation])
            else:
                newest, total = look(client, state.mode)
                plan = plan_top(state, newest, total, self.config.page_limit, lane_rates(self.config),
                                self.config.partitions, checkpoint.new_generation())
        finally:
            client.close()
        with locks.locked(path):
            checkpoint.write(path, plan)
        added = [p for p in plan.partitions if p not in state.partitions]
        if added:
            logger.info("top-up: {} partition(s) over {} .. {} ({} events reported, {} new)", len(added),
                        added[-1].lower_ms, plan.newest_ms, plan.source_total, plan.total)
        self.plan = plan
        if self.progress is not None:
            self.progress.follow(plan)
        return plan

    def _mark_loaded(self) -> None:
        """Every event up to the plan's newest is in the table: what the lag is measured from."""
        path = self.config.state_path
        with locks.locked(path):
            state = checkpoint.read(path)
            if state is None:
                return
            state.loaded_newest_ms, state.topped_up_at = state.newest_ms, time.time()
            checkpoint.write(path, state)
        self.plan = state
        if self.progress is not None:
            self.progress.lag = lag_figures(state)

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
        in it (see `ingest.locks`): they finish their page or segment and exit."""
        data_dir = self.config.data_dir
        self.run_lock = locks.try_lock(data_dir / locks.RUN_LOCK, exclusive=True)
        if self.run_lock is None:
            raise RunError(f"another datasync-ingest run is using {data_dir}")
        deadline = time.monotonic() + self.config.request_timeout + ORPHAN_GRACE_S
        waiting = False
        while (workers := locks.try_lock(data_dir / locks.WORKERS_LOCK, exclusive=True)) is None:
            if time.monotonic() > deadline:
                raise RunError(f"processes of a previous run still work in {data_dir}; stop them and run again")
            if self.signals:
                raise RunError("stopped while waiting for the processes of a previous run to exit")
            if not waiting:
                logger.warning("waiting for the fetchers and loaders of a previous run to exit")
                waiting = True
            wait_for(0.1, lambda: bool(self.signals))
        workers.close()

    def _run(self) -> int:
        self._lock_data_dir()
        self.store.ensure()
        db.prepare_database(self.config, self.dsn, self.store)
        plan = self.plan = self._load_or_make_plan()
        progress = self.progress = Progress(self.config, plan, self.counters, self.store)
        metrics = self._start_metrics(progress)
        self._start_fetchers(plan)
        for slot in range(self.config.workers):
            self._start("loader", slot)
        fetchers = [c for c in self.children if c.kind == "fetcher"]
        logger.info("running: {} walkers in {} fetcher process(es), {} loaders",
                    sum(len(c.walks) for c in fetchers), len(fetchers), self.config.workers)
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
                # Woken by a child's exit as well as by the tick: a run's end is its last
                # walk's end, then its loaders', not up to a tick after each.
                mp.connection.wait([c.process.sentinel for c in self.children], timeout=TICK_S)
        finally:
            self.summary = progress.close()
            if metrics is not None:
                metrics.stop()
        return self._outcome()

    def health(self) -> str:
        if self.failure:
            return "failed"
        if not self.children:
            return "done" if self.plan is not None else "ready"
        if self.fetch_done.is_set() or self.stop_fetch.is_set():
            return "draining"
        if self.next_top_up is not None:
            return "degraded" if self.top_up_failures else "following"
        return "fetching"

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
            return ExitCode.FAILED
        if self.signals:
            logger.info("stopped by signal; state kept, the next run resumes")
            return EXIT_BY_SIGNAL.get(signal.Signals(self.signals[0]), ExitCode.FAILED)
        state = checkpoint.read(self.config.state_path)
        counts = self.store.counts()
        pending = counts.get("ready", 0) + counts.get("loading", 0)
        if state is None or not state.drained or pending:
            logger.error("children finished but the run is incomplete ({} segments pending)", pending)
            return ExitCode.FAILED
        self._mark_loaded()
        logger.info("drained: every event fetched and loaded")
        return ExitCode.OK

    def _load_or_make_plan(self) -> Checkpoint:
        try:
            existing = checkpoint.read(self.config.state_path)
        except checkpoint.CheckpointError as exc:
            raise RunError(f"{self.config.state_path}: {exc}; move it away to start over") from None
        try:
            if existing is not None:
                logger.info("{} from the checkpoint ({} rows fetched so far); looking for new events",
                            "topping up" if existing.drained else "resuming", existing.rows)
                if existing.target is None:  # a state from before targets were recorded: adopt it
                    with locks.locked(self.config.state_path):
                        existing.target = target_of(self.config)
                        checkpoint.write(self.config.state_path, existing)
                self.plan = existing
                try:
                    return self._top_up()
                except FatalApiError:
                    raise
                except ApiError as exc:
                    if existing.drained:
                        raise
                    logger.warning("cannot look for new events ({}); resuming the walk under way", exc)
                    return existing
            client = ApiClient(self.config, self.limiters, should_stop=lambda: bool(self.signals))
            try:
                plan = replace(make_plan(self.config, client), target=target_of(self.config))
            finally:
                client.close()
        except FatalApiError as exc:
            raise RunError(str(exc)) from None
        except ApiError as exc:
            raise RunError(f"cannot reach the API: {exc}") from None
        with locks.locked(self.config.state_path):
            checkpoint.write(self.config.state_path, plan)
        return plan


def run(config: Config) -> int:
    """Entry point of `datasync-ingest run`; returns the process exit code."""
    config.data_dir.mkdir(parents=True, exist_ok=True)
    logger.info("config: {}", config.redacted())
    try:
        guard_target(config)
        with db.database(config) as dsn:
            return Supervisor(config, dsn).run()
    except TargetChanged as exc:
        logger.error("{}", exc)
        return ExitCode.USAGE
    except (RunError, db.DatabaseError) as exc:
        logger.error("{}", exc)
        return ExitCode.FAILED
    except OSError as exc:  # the data directory itself: full, read-only, gone
        logger.error("cannot use the data directory {}: {}", config.data_dir, exc)
        return ExitCode.FAILED
    except KeyboardInterrupt:
        return EXIT_BY_SIGNAL[signal.SIGINT]

