"""Fetcher: walks one partition of the source into sealed segments.

Pages are normalised a page at a time and appended to the open segment. A segment is sealed
only at a page boundary, and the checkpoint (the cursor after that page) is written only
after the seal is durable, so a crash loses at most the open segment, which is fetched again.
"""

from __future__ import annotations

import errno
import multiprocessing as mp
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loguru import logger

from ingest.config import Config
from ingest.counters import ClientStatsPublisher, SharedCounters
from ingest.logs import configure_logging
from ingest.sink.segments import SegmentStore, SegmentWriter
from ingest.source import checkpoint
from ingest.source.api import ApiClient, ApiError, FatalApiError, Page, SourceUnavailable, Stopped, lane_rates
from ingest.source.checkpoint import PartitionState
from ingest.source.cursors import CURSOR_TTL_MS, decode_cursor, position_cursor, refresh_cursor
from ingest.source.normalise import normalise_page
from ingest.source.pacing import SharedRateLimiter
from ingest.source.plan import plan_steal, progress_mark

# Exit codes a fetcher process reports to the supervisor.
EXIT_DRAINED = 0  # the partition is done
EXIT_STOPPED = 0  # stopped on request; the checkpoint says where to resume
EXIT_FATAL = 3  # a terminal error (bad key...): restarting cannot help
EXIT_RETRYABLE = 4  # retries exhausted on a transient fault: a restart may help

# Out of space (or over a file-size limit): restarting cannot help until space returns.
DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
BACKPRESSURE_POLL_S = 0.2
STEAL_RETRY_S = 1.0  # a fetcher with nothing to take looks again this often...
STEAL_PATIENCE_S = 30.0  # ...until no walk has moved for this long (a segment seals within --segment-max-age)


def partition_finished(page: Page, lower_ms: int) -> bool:
    """No more pages, or (on /events, which ignores since/until) we went below the window."""
    if not page.has_more or not page.next_cursor:
        return True
    try:
        return int(decode_cursor(page.next_cursor)["ts"]) < lower_ms
    except (ValueError, KeyError, TypeError):
        return False


def describe_os_error(exc: OSError, data_dir: Path) -> str:
    """One line for the user: what failed, and where."""
    what = "no space left in the data directory" if exc.errno in DISK_FULL else "cannot write to the data directory"
    return f"{what} {data_dir}: {exc.strerror or exc}" + (f" ({exc.filename})" if exc.filename else "")


def request_window(part: PartitionState) -> tuple[int | None, int | None]:
    """since/until for the feed, widened by 1 ms each way: the API's bound semantics are
    uncertain, and rows outside [lower, upper) are filtered here anyway."""
    if part.source != "feed":
        return None, None
    return max(0, part.lower_ms - 1), part.upper_ms + 1


def start_cursor(part: PartitionState, now_ms: int) -> str | None:
    if part.cursor:
        return refresh_cursor(part.cursor, now_ms, CURSOR_TTL_MS)
    if part.source != "feed":  # /events ignores since/until: start at the window's top
        return position_cursor(part.upper_ms, now_ms, CURSOR_TTL_MS)
    return None  # the feed's first page in the window is its newest


@dataclass
class FetchContext:
    config: Config
    generation: str
    client: ApiClient
    store: SegmentStore
    should_stop: Callable[[], bool]
    wait: Callable[[float], bool]  # sleeps; True when a stop was requested
    on_page: Callable[[int], None] = lambda rows: None


def skip_sequence(state_path: Path, part: PartitionState) -> PartitionState:
    """Never reuse the sequence number a previous fetcher may have sealed.

    A crash between a seal and its checkpoint leaves a sealed (maybe already loaded) segment
    under `next_seq`. The pages after the checkpoint are fetched again, but may be cut into
    segments differently (age-based rotation, a changing source); under the same id the
    ledger would skip the new segment as loaded, and the extra events would be lost. So
    every fetcher start moves `next_seq` on by one, durably, before writing anything.
    """

    def skip(state: PartitionState) -> None:
        state.next_seq += 1

    return checkpoint.update_partition(state_path, part.index, skip).partitions[part.index]


def steal(state_path: Path, source: str, page_limit: int, rates: dict[str, float]) -> PartitionState | None:
    """Take the lower part of the slowest unfinished partition (see `plan_steal`) as a new
    partition walked on this fetcher's lane, `source` (its own checkpoint entry). An
    estimate of the time range that was off, or a lane slower than planned, so never
    leaves a budget idle while another walk still has pages to go. Correct whatever the
    victim is doing: it reads its new lower bound after each page, and what it fetched
    below the cut before noticing is fetched again here, absorbed by the primary key."""
    with checkpoint.locked(state_path):
        state = checkpoint.read(state_path)
        choice = plan_steal(state, source, page_limit, rates) if state is not None else None
        if state is None or choice is None:
            return None
        index, cut = choice
        victim = state.partitions[index]
        taken = PartitionState(index=len(state.partitions), source=source, lower_ms=victim.lower_ms, upper_ms=cut)
        victim.lower_ms = cut
        state.partitions.append(taken)
        checkpoint.write(state_path, state)
    logger.info("took [{}, {}) over from partition {}", taken.lower_ms, taken.upper_ms, index)
    return taken


def current_lower(state_path: Path, part: PartitionState) -> int:
    """The partition's lower bound as the checkpoint has it now (a thief may have raised it)."""
    try:
        state = checkpoint.read(state_path)
    except checkpoint.CheckpointError:
        return part.lower_ms
    return state.partitions[part.index].lower_ms if state else part.lower_ms


def fetch_partition(ctx: FetchContext, part: PartitionState) -> bool:
    """Walk `part` until drained (True) or stopped (False). Raises ApiError on failure."""
    config = ctx.config
    part = skip_sequence(config.state_path, part)
    writer = SegmentWriter(
        ctx.store,
        part.index,
        ctx.generation,
        part.next_seq,
        config.segment_max_rows,
        config.segment_max_bytes,
        config.segment_max_age,
    )
    cursor = start_cursor(part, int(time.time() * 1000))
    since, until = request_window(part)
    unsealed_rows = unsealed_pages = 0

    def commit(done: bool) -> None:
        nonlocal unsealed_rows, unsealed_pages
        sealed = writer.seal()
        rows, pages = unsealed_rows, unsealed_pages

        def change(state: PartitionState) -> None:
            state.cursor = cursor
            state.next_seq = writer.next_seq
            state.done = done
            state.rows += rows
            state.pages += pages
            if sealed:
                state.last_sealed = sealed

        checkpoint.update_partition(config.state_path, part.index, change)
        unsealed_rows = unsealed_pages = 0
        if sealed:
            logger.debug("sealed {} ({} rows)", sealed, rows)

    try:
        while True:
            while ctx.store.ready_bytes() > config.ready_max_bytes:
                if ctx.wait(BACKPRESSURE_POLL_S):
                    raise Stopped()
            if ctx.should_stop():
                raise Stopped()
            page = ctx.client.fetch_page(part.source, cursor, since=since, until=until, limit=config.page_limit)
            # Split by another fetcher while the page was on its way? Then what the page holds
            # below the new bound is the thief's to store (twice stored, an unstorable event
            # could become two rejects: its timestamp's form follows its place in the page).
            lower = current_lower(config.state_path, part)
            if lower != part.lower_ms:
                part.lower_ms = lower
                since, until = request_window(part)
            rows = normalise_page(page.events, window=(part.lower_ms, part.upper_ms))
            if rows.rows:
                writer.append(rows.data, rows.rows)
            cursor = page.next_cursor
            unsealed_rows += rows.rows
            unsealed_pages += 1
            ctx.on_page(rows.rows)
            if partition_finished(page, part.lower_ms):
                commit(done=True)
                return True
            if writer.due():
                commit(done=False)
    except Stopped:
        commit(done=False)
        return False
    except BaseException:
        writer.abort()  # the open segment is re-fetched from the checkpoint
        raise


def walk(ctx: FetchContext, part: PartitionState) -> tuple[bool, str]:
    """`fetch_partition`, and the lane it ended on: a partition whose lane the API refuses
    (the optional query-string lane), or that a resumed run no longer gives a budget, goes
    on, durably, on /events with the key in the header; the data is the same."""
    if lane_rates(ctx.config).get(part.source, 0) > 0:
        try:
            return fetch_partition(ctx, part), part.source
        except SourceUnavailable as exc:
            logger.warning("{}; partition {} goes on with the key in the header", exc, part.index)

    def move(state: PartitionState) -> None:
        state.source = "events"

    moved = checkpoint.update_partition(ctx.config.state_path, part.index, move).partitions[part.index]
    return fetch_partition(ctx, moved), moved.source


def help_others(ctx: FetchContext, lane: str) -> None:
    """After its own walk: take over part of another whenever this fetcher's lane has budget
    no walker uses, until every walk is finished. Gives up when no walk has moved for
    STEAL_PATIENCE_S (a walk without a fetcher: the supervisor restarts those)."""
    state_path, page_limit, rates = ctx.config.state_path, ctx.config.page_limit, lane_rates(ctx.config)
    mark: Any = None
    moved_at = time.monotonic()
    while not ctx.should_stop():
        state = checkpoint.read(state_path)
        if state is None or all(p.done for p in state.partitions):
            return
        if (now_mark := progress_mark(state.partitions)) != mark:
            mark, moved_at = now_mark, time.monotonic()
        taken = steal(state_path, lane, page_limit, rates)
        if taken is not None:
            drained, lane = walk(ctx, taken)
            if not drained:
                return  # stopped
            continue
        if time.monotonic() - moved_at > STEAL_PATIENCE_S or ctx.wait(STEAL_RETRY_S):
            return


def fetcher_process(
    config: Config,
    index: int,
    generation: str,
    limiters: dict[str, SharedRateLimiter],
    stop_event: Any,
    errors: Any,
    counters: SharedCounters,
) -> None:
    """Process entry point (spawn-safe). The supervisor coordinates shutdown through
    `stop_event`; signals meant for the process group are ignored here."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    configure_logging(config.log_format, config.log_level, config.secrets(), process=f"fetcher-{index}")
    # The pid the parent had when it started us (os.getppid() now could already be init's).
    spawner = mp.parent_process()
    parent = spawner.pid if spawner is not None and spawner.pid is not None else os.getppid()
    checkpoint.hold_worker_lock(config.data_dir)  # a new supervisor waits until we are gone
    if os.getppid() != parent:
        sys.exit(EXIT_STOPPED)  # orphaned before we began: leave everything to the next run

    def should_stop() -> bool:
        return stop_event.is_set() or os.getppid() != parent

    def wait(seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while not should_stop():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            stop_event.wait(min(left, 0.5))
        return True

    state = checkpoint.read(config.state_path)
    assert state is not None, "the supervisor writes the checkpoint before starting fetchers"
    part = state.partitions[index]
    client = ApiClient(config, limiters, should_stop=should_stop)
    publisher = ClientStatsPublisher(counters)

    def on_page(rows: int) -> None:
        counters.add_many({"fetched": rows, "pages": 1})
        publisher.publish(client.stats)

    ctx = FetchContext(config, generation, client, SegmentStore(config.segments_dir), should_stop, wait, on_page)
    code = EXIT_DRAINED
    try:
        # A restarted fetcher may find its own partition done: it goes straight to helping.
        drained, lane = (True, part.source) if part.done else walk(ctx, part)
        logger.info("partition {} {}", index, "drained" if drained else "stopped")
        if drained:
            help_others(ctx, lane)
    except FatalApiError as exc:
        errors.put(f"partition {index}: {exc}")
        code = EXIT_FATAL
    except ApiError as exc:
        errors.put(f"partition {index}: {exc}")
        code = EXIT_RETRYABLE
    except OSError as exc:
        errors.put(f"partition {index}: {describe_os_error(exc, config.data_dir)}")
        code = EXIT_FATAL if exc.errno in DISK_FULL else EXIT_RETRYABLE
    finally:
        publisher.publish(client.stats)
    sys.exit(code)
