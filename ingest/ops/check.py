"""`check`: could a run start here, now, and what would it do?

It asks every question a run meets in its first minute, without doing any of it: the key,
the lanes (a stream token; the key in the query string), the database's rights, the data
directory, the lock and the checkpoint; then it makes the plan a run would make and says
what it costs at the API's budgets. It writes nothing: the tables are created and a row is
COPYed inside a transaction that is rolled back; an embedded database that does not exist
yet is only reported (creating it is a run's first write; an existing one is started for
the look and stopped again); the lock is only tried on a lock file that already exists.

The verdicts are pure functions and tables; `run_check` is the shell that asks.
"""

from __future__ import annotations

import io
import os
import shutil
import uuid
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

import psycopg2
import psycopg2.extensions
from psycopg2 import sql

from ingest.config import SOURCES, Config, redact_dsn
from ingest.ops.datadir import embedded_initialised, run_in_progress
from ingest.run.target import target_change, target_of
from ingest.sink import db
from ingest.sink.loader import COPY_DIRECT, STAGING_DDL
from ingest.source import checkpoint
from ingest.source.api import ApiClient, ApiError, FatalApiError, SourceUnavailable
from ingest.source.checkpoint import Checkpoint
from ingest.source.lanes import LANES, Lane, lane_rates
from ingest.source.plan import plan_top, planned_ms_per_event, walked_to
from ingest.source.probe import look, make_plan
from ingest.tsv import encode_row

# Tries per probe: enough to ride out a transient fault, few enough to answer in seconds.
CHECK_ATTEMPTS = 3
# Disk a run needs per event (measured on 50,000 simulator events): a segment line, and the
# table with its primary key in PostgreSQL (the embedded database lives in the data dir).
SEGMENT_BYTES_PER_EVENT = 540
TABLE_BYTES_PER_EVENT = 700
LOCK_TIMEOUT = "5s"  # the rights check never waits long behind another session's lock


@dataclass(frozen=True)
class Finding:
    subject: str
    text: str
    problem: bool = False

    def line(self) -> str:
        return f"{self.subject}: {self.text}"


@dataclass
class Report:
    findings: list[Finding] = field(default_factory=list)
    plan: list[str] = field(default_factory=list)

    @property
    def problems(self) -> list[Finding]:
        return [f for f in self.findings if f.problem]


# ---------------------------------------------------------------------------------------
# Verdicts: pure


# (lane, what its probe raised) -> what a run does about it, and the --source choices for
# which that stops a run. Looked up along the exception's MRO; lanes without a row of their
# own fall back to the `None` rows.
LANE_VERDICTS: dict[tuple[Lane | None, type[ApiError] | None], tuple[str, tuple[str, ...]]] = {
    ("feed", None): ("open (a stream token was issued)", ()),
    ("feed", SourceUnavailable): ("unavailable ({reason}); a run walks /api/v1/events only", ("feed",)),
    ("events_query", SourceUnavailable): (
        "refused ({reason}); its windows go to /api/v1/events with the key in the header", ()),
    (None, None): ("open", ()),
    (None, FatalApiError): ("refused: {reason}", SOURCES),
    (None, ApiError): ("cannot be reached: {reason}", SOURCES),
}


def lane_finding(lane: Lane, failure: ApiError | None, source: str) -> Finding:
    """What the probe of `lane` means for a run with `--source source`."""
    kinds: list[type[ApiError] | None] = [None] if failure is None else list(type(failure).__mro__)
    for key in [(lane, kind) for kind in kinds] + [(None, kind) for kind in kinds]:
        if key in LANE_VERDICTS:
            text, fatal_for = LANE_VERDICTS[key]
            return Finding(f"lane {lane}", text.format(reason=failure), problem=source in fatal_for)
    raise AssertionError("the (None, ApiError) row matches every failure")


def lane_unused(lane: Lane, config: Config) -> str | None:
    """Why a run would not walk `lane` at all (then it is not probed), else None."""
    if lane == "feed" and config.source == "events":
        return "not used (--source events)"
    if lane == "events_query" and config.source == "feed":
        return "not used (--source feed)"
    if lane == "events_query" and config.query_rate <= 0:
        return "off (--query-rate 0)"
    return None


def budget_lane(lane: Lane, rates: Mapping[Lane, float]) -> Lane:
    """The lane a window is walked on: one without a budget any more goes on /events."""
    return lane if rates.get(lane, 0) > 0 else "events"


def lane_pages(plan: Checkpoint, page_size: int, rates: Mapping[Lane, float]) -> dict[Lane, float]:
    """Requests each lane has left: its unfinished windows' share of the events the plan
    expects (spread evenly over the plan's range), a page per `page_size` events, and the
    partial page that ends each window."""
    per_event = planned_ms_per_event(plan.total, plan.newest_ms, plan.oldest_ms)
    undone = [p for p in plan.partitions if not p.done]
    pages: dict[Lane, float] = {}
    for part in undone:
        events: float
        if per_event:
            events = max(0, walked_to(part) - max(part.lower_ms, plan.oldest_ms or 0)) / per_event
        else:
            events = (plan.total or 0) / len(undone)
        lane = budget_lane(part.lane, rates)
        pages[lane] = pages.get(lane, 0.0) + events / page_size + 1
    return pages


def expected_seconds(pages: Mapping[Lane, float], rates: Mapping[Lane, float], window_s: float) -> float:
    """The slowest lane's requests at its budget: windows are sized so that the lanes finish
    together, and work stealing evens out what the estimate got wrong."""
    return max((count / rates[lane] * window_s for lane, count in pages.items()), default=0.0)


def bytes_needed(events: int, keep_segments: bool, ready_max_bytes: int, embedded: bool) -> int:
    """Disk a run needs in the data directory: the segments waiting for loaders (fetchers
    pause at --ready-max-bytes; all of them with --keep-segments), and the table itself
    when the database is the embedded one."""
    segments = events * SEGMENT_BYTES_PER_EVENT
    if not keep_segments:
        segments = min(segments, ready_max_bytes)
    return segments + (events * TABLE_BYTES_PER_EVENT if embedded else 0)


@dataclass(frozen=True)
class DirState:
    """What the file system says about the data directory."""

    path: Path
    exists: bool
    is_dir: bool
    writable: bool  # the directory, or the nearest existing parent when it does not exist yet
    parent: Path  # that nearest existing directory
    free: int  # bytes free there


def data_dir_finding(state: DirState, needed: int) -> Finding:
    subject = f"data directory {state.path}"
    if state.exists and not state.is_dir:
        return Finding(subject, "is not a directory", problem=True)
    if not state.writable:
        what = "is not writable" if state.exists else f"cannot be created: {state.parent} is not writable"
        return Finding(subject, what, problem=True)
    where = "writable" if state.exists else f"would be created in {state.parent}"
    space = f"{size_text(state.free)} free, a run needs about {size_text(needed)}"
    return Finding(subject, f"{where}; {space}", problem=state.free < needed)


def checkpoint_finding(state: Checkpoint | None, error: str | None, change: str | None) -> Finding:
    subject = "checkpoint"
    if error is not None:
        return Finding(subject, f"{error}; a run would stop (`datasync-ingest reset` starts over)", problem=True)
    if change is not None:
        return Finding(subject, f"holds the state of another target: {change}; use another --data-dir,"
                       " or `datasync-ingest reset` to start over", problem=True)
    if state is None:
        return Finding(subject, "none: a run plans from the start")
    if state.drained:
        return Finding(subject, f"drained ({state.rows} rows fetched): a run tops up what the source gained since")
    undone = sum(1 for p in state.partitions if not p.done)
    return Finding(subject, f"a run resumes it: {undone} of {len(state.partitions)} partitions unfinished,"
                   f" {state.rows} rows fetched")


def size_text(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def counted(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def duration_text(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def time_text(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S")


def plan_lines(plan: Checkpoint, config: Config, reported: int | None, window_s: float) -> list[str]:
    """The plan for people: lanes, partitions, events, pages, and the time at the budgets
    (per `window_s`: the user's `--rate-window`, else the window the API's answers showed,
    else the real service's 60 s). With `--pacing off` the run goes as fast as the source
    answers, which the budgets do not tell."""
    rates = lane_rates(config)
    undone = [p for p in plan.partitions if not p.done]
    if not undone:
        return ["nothing to fetch: the source has no events the state does not already cover"]
    lanes = Counter(budget_lane(p.lane, rates) for p in undone)
    page_size = plan.walk_page_size(config.page_limit)
    pages = lane_pages(plan, page_size, rates)
    if config.pacing == "off":
        cost = "; ".join(f"{lane} {pages[lane]:.0f} pages" for lane in pages)
        timing = f"pacing off: as fast as the source answers ({cost} of {page_size} events)"
    else:
        cost = "; ".join(f"{lane} {pages[lane]:.0f} pages at {rates[lane]:g}/{window_s:.3g}s" for lane in pages)
        timing = (f"about {duration_text(expected_seconds(pages, rates, window_s))} at the API's budgets"
                  f" ({cost}; {page_size} events a page)")
    lines = [
        f"{counted(len(undone), 'partition')} on {counted(len(lanes), 'lane')}"
        f" ({', '.join(f'{k} {v}' for k, v in lanes.items())});"
        f" {reported if reported is not None else 'unknown'} events reported",
        timing,
    ]
    oldest = plan.oldest_ms or 0
    for part in undone:
        lines.append(f"partition {part.index:>2} {budget_lane(part.lane, rates):<12}"
                     f" {time_text(max(part.lower_ms, oldest))} .. {time_text(walked_to(part))}")
    return lines


# ---------------------------------------------------------------------------------------
# The shell


def rights_problem(conn: psycopg2.extensions.connection, table: str) -> str | None:
    """What a run may not do on this connection, found out by doing it in a transaction
    that is rolled back: create the tables (when they do not exist yet) and a staging
    table, COPY a row into the table, write a ledger row. Rejects take their ids from a
    sequence, which no rollback rewinds, so for them the privilege functions answer."""
    check_id = f"datasync-ingest-check-{uuid.uuid4().hex}"
    stamp = "1970-01-01 00:00:00+00"
    row = encode_row((check_id, stamp, None, None, None, None, "{}", stamp))
    try:
        with conn.cursor() as cur:
            cur.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
            cur.execute(db.schema_statement(table))
            cur.execute(STAGING_DDL)
            cur.copy_expert(COPY_DIRECT.format(table=sql.Identifier(table)).as_string(cur), io.BytesIO(row))
            cur.execute("INSERT INTO ingest_segments (segment_id) VALUES (%s)", (check_id,))
            cur.execute("SELECT has_table_privilege('ingest_rejects', 'INSERT'),"
                        " has_sequence_privilege(pg_get_serial_sequence('ingest_rejects', 'id'), 'USAGE')")
            rejects, sequence = cur.fetchone()
    except psycopg2.Error as exc:
        return db.describe_error(exc)
    finally:
        conn.rollback()
    if not rejects:
        return "permission denied for table ingest_rejects (INSERT)"
    return None if sequence else "permission denied for the sequence of ingest_rejects.id (USAGE)"


def database_finding(config: Config, running: bool) -> Finding:
    if config.database_url:
        return dsn_finding(f"database {redact_dsn(config.database_url)}", config.database_url, config.table)
    subject = f"embedded database {config.pg_dir}"
    if not embedded_initialised(config):
        return Finding(subject, "none yet: a run creates it")
    if running:
        return Finding(subject, "in use by the run under way")
    try:
        with db.database(config) as dsn:
            return dsn_finding(subject, dsn, config.table)
    except db.DatabaseError as exc:
        return Finding(subject, str(exc), problem=True)


def dsn_finding(subject: str, dsn: str, table: str) -> Finding:
    try:
        conn = db.connect(dsn)
    except psycopg2.Error as exc:
        return Finding(subject, f"cannot connect: {db.describe_error(exc)}", problem=True)
    try:
        problem = rights_problem(conn, table)
    finally:
        conn.close()
    if problem:
        return Finding(subject, f"reachable, but a run could not load: {problem}", problem=True)
    return Finding(subject, f"reachable; a run may create the tables and COPY into {table}")


def dir_state(path: Path) -> DirState:
    parent = path
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    exists = path.exists()
    usable = path if exists and path.is_dir() else parent
    try:
        free = shutil.disk_usage(usable).free
    except OSError:
        free = 0
    return DirState(path, exists, path.is_dir(), os.access(usable, os.W_OK | os.X_OK), parent, free)


def read_checkpoint(config: Config) -> tuple[Checkpoint | None, Finding]:
    if not config.data_dir.is_dir():  # the data directory's own finding says why
        return None, checkpoint_finding(None, None, None)
    try:
        state = checkpoint.read(config.state_path)
    except checkpoint.CheckpointError as exc:
        return None, checkpoint_finding(None, f"{config.state_path}: {exc}", None)
    change = target_change(state.target if state else None, target_of(config))
    return (None if change else state), checkpoint_finding(state, None, change)


def probe_lanes(client: ApiClient, config: Config) -> tuple[list[Finding], set[Lane]]:
    """A one-event page on each lane a run would walk: findings, and the lanes that work."""
    findings, open_lanes = [], set()
    for lane in LANES:
        unused = lane_unused(lane, config)
        if unused:
            findings.append(Finding(f"lane {lane}", unused))
            continue
        failure: ApiError | None = None
        try:
            client.fetch_page(lane, None, limit=1)
            open_lanes.add(lane)
        except ApiError as exc:
            failure = exc
        findings.append(lane_finding(lane, failure, config.source))
    return findings, open_lanes


def run_check(config: Config) -> Report:
    report = Report()
    running = run_in_progress(config.data_dir)
    if running:
        report.findings.append(Finding("lock", f"a run is using {config.data_dir} now; another would be refused",
                                       problem=True))
    state, found = read_checkpoint(config)
    report.findings.append(found)
    probing = replace(config, max_attempts=min(config.max_attempts, CHECK_ATTEMPTS))
    client = ApiClient(probing)
    reported: int | None = None
    try:
        # The key first, on the documented endpoint: it also says how many events there are.
        try:
            reported = client.fetch_page("events", None, limit=1).total
        except ApiError as exc:
            report.findings.append(Finding("api", f"{config.api_url}: {exc}", problem=True))
        else:
            report.findings.append(Finding("api", f"{config.api_url}: the key is accepted; {reported} events reported"))
            lanes, open_lanes = probe_lanes(client, probing)
            report.findings.extend(lanes)
            if not any(f.problem for f in lanes) and not found.problem:
                try:
                    plan = planned(client, probing, state, open_lanes)
                    report.plan = plan_lines(plan, config, reported, client.rate_window)
                except ApiError as exc:
                    report.findings.append(Finding("plan", f"cannot be made: {exc}", problem=True))
    finally:
        client.close()
    report.findings.append(database_finding(config, running))
    needed = bytes_needed(reported or 0, config.keep_segments, config.ready_max_bytes, not config.database_url)
    report.findings.append(data_dir_finding(dir_state(config.data_dir), needed))
    return report


def planned(client: ApiClient, config: Config, state: Checkpoint | None, open_lanes: set[Lane]) -> Checkpoint:
    """The plan a run would make now: a first plan, or the top-up of the checkpoint's."""
    if "feed" not in open_lanes and config.source == "auto":
        config = replace(config, source="events")  # what a run falls back to, without asking again
    if state is None:
        return make_plan(config, client)
    newest, total = look(client, state.mode)
    return plan_top(state, newest, total, config.page_limit, lane_rates(config), config.partitions,
                    checkpoint.new_generation())
