"""Fetcher: walks one partition of the source into sealed segments.

Pages are normalised a page at a time and appended to the open segment. A segment is sealed
only at a page boundary, and the checkpoint (the cursor after that page) is written only
after the seal is durable, so a crash loses at most the open segment, which is fetched again.
The cursor after a page is the server's, or one forged from the last event held where the
server's paging breaks (`ingest.source.paging` decides which, or that the walk is stuck).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from loguru import logger

from ingest.config import Config
from ingest.source import checkpoint
from ingest.source.api import API_SUFFIX, FEED_PATH, ApiClient, FatalApiError, SourceUnavailable, Stopped
from ingest.source.checkpoint import PartitionState
from ingest.source.cursors import CURSOR_TTL_MS, FORGE_ID, position_cursor, refresh_cursor
from ingest.source.lanes import Lane, lane_rates
from ingest.source.normalise import normalise_page
from ingest.source.paging import Move, Paging, Position, Step, cursor_position, forged_cursor, read_page
from ingest.source.plan import plan_steal, progress_mark

BACKPRESSURE_POLL_S = 0.2
STEAL_RETRY_S = 0.2  # a walker with nothing to take looks again this often (and ends this soon after the last walk)...
STEAL_PATIENCE_S = 30.0  # ...until no walk has moved for this long (a segment seals within --segment-max-age)


def partition_finished(step: Step, lower_ms: int) -> bool:
    """No more pages, or (on /events, which ignores since/until) we went below the window."""
    return step.move is Move.END or step.position.ts < lower_ms


def endpoint(lane: Lane) -> str:
    """The path a stuck walk names. The feed's is the constant: stream-access has always
    named that one (datasync-api.md section 1)."""
    return FEED_PATH if lane == "feed" else API_SUFFIX + "/events"


def start_position(part: PartitionState, cursor: str | None) -> Position:
    """Where the walk stands before its first page: the cursor it resumes from or starts at,
    else the top of its window (the feed's first page in the window is its newest)."""
    return cursor_position(cursor) or Position(part.upper_ms + 1, FORGE_ID)


def request_window(part: PartitionState) -> tuple[int | None, int | None]:
    """since/until for the feed, widened by 1 ms each way: the API's bound semantics are
    uncertain, and rows outside [lower, upper) are filtered here anyway."""
    if part.lane != "feed":
        return None, None
    return max(0, part.lower_ms - 1), part.upper_ms + 1


def start_cursor(part: PartitionState, now_ms: int) -> str | None:
    if part.cursor:
        return refresh_cursor(part.cursor, now_ms, CURSOR_TTL_MS)
    if part.lane != "feed":  # /events ignores since/until: start at the window's top
        return position_cursor(part.upper_ms, now_ms, CURSOR_TTL_MS)
    return None  # the feed's first page in the window is its newest


class SegmentOutput(Protocol):
    """Where a walk's lines go: the sink's segment writer, which the run hands in (the
    source never imports the sink). Sealing is what makes a checkpoint safe to write."""

    next_seq: int

    def append(self, data: bytes, rows: int) -> None: ...

    def due(self) -> bool: ...

    def seal(self) -> str | None: ...

    def abort(self) -> None: ...


@dataclass
class FetchContext:
    config: Config
    client: ApiClient
    open_output: Callable[[int, int], SegmentOutput]  # (partition, next sequence number)
    backlog_bytes: Callable[[], int]  # sealed bytes no loader has taken yet (back-pressure)
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


def steal(state_path: Path, lane: Lane, page_limit: int, rates: Mapping[Lane, float]) -> PartitionState | None:
    """Take the lower part of the slowest unfinished partition (see `plan_steal`) as a new
    partition walked on this fetcher's `lane` (its own checkpoint entry). An
    estimate of the time range that was off, or a lane slower than planned, so never
    leaves a budget idle while another walk still has pages to go. Correct whatever the
    victim is doing: it reads its new lower bound after each page, and what it fetched
    below the cut before noticing is fetched again here, absorbed by the primary key."""
    with checkpoint.locked(state_path):
        state = checkpoint.read(state_path)
        choice = plan_steal(state, lane, page_limit, rates) if state is not None else None
        if state is None or choice is None:
            return None
        index, cut = choice
        victim = state.partitions[index]
        taken = PartitionState(index=len(state.partitions), lane=lane, lower_ms=victim.lower_ms, upper_ms=cut)
        victim.lower_ms = cut
        state.partitions.append(taken)
        checkpoint.write(state_path, state)
    logger.info("took [{}, {}) over from partition {}", taken.lower_ms, taken.upper_ms, index)
    return taken


def current_bounds(state_path: Path, part: PartitionState) -> tuple[int, bool]:
    """The partition's lower bound as the checkpoint has it now (a thief may have raised
    it), and whether some walk has finished: idle walkers are then looking for one to split."""
    try:
        state = checkpoint.read(state_path)
    except checkpoint.CheckpointError:
        return part.lower_ms, False
    if state is None:
        return part.lower_ms, False
    return state.partitions[part.index].lower_ms, any(p.done for p in state.partitions)


def fetch_partition(ctx: FetchContext, part: PartitionState) -> bool:
    """Walk `part` until drained (True) or stopped (False). Raises ApiError on failure, and
    FatalApiError when the server cannot be walked past an event (a restart would not help)."""
    config = ctx.config
    part = skip_sequence(config.state_path, part)
    writer = ctx.open_output(part.index, part.next_seq)
    cursor = start_cursor(part, int(time.time() * 1000))
    paging = Paging.starting_at(start_position(part, cursor))
    since, until = request_window(part)
    page_size = checkpoint.walk_page_size_at(config.state_path, config.page_limit)  # fixed for the plan's life
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
            while ctx.backlog_bytes() > config.ready_max_bytes:
                if ctx.wait(BACKPRESSURE_POLL_S):
                    raise Stopped()
            if ctx.should_stop():
                raise Stopped()
            page = ctx.client.fetch_page(part.lane, cursor, since=since, until=until, limit=page_size)
            # Split by another fetcher while the page was on its way? Then what the page holds
            # below the new bound is the thief's to store (twice stored, an unstorable event
            # could become two rejects: its timestamp's form follows its place in the page).
            lower, thieves_about = current_bounds(config.state_path, part)
            if lower != part.lower_ms:
                part.lower_ms = lower
                since, until = request_window(part)
            rows = normalise_page(page.events, window=(part.lower_ms, part.upper_ms))
            if rows.rows:
                writer.append(rows.data, rows.rows)
            paging, step = paging.after(read_page(page.events, page.has_more, page.next_cursor))
            if step.move is Move.STALLED:
                raise FatalApiError(f"{endpoint(part.lane)}: {step.reason}")
            if step.move is Move.FORGE:
                logger.warning("{}: {}; going on below {}", endpoint(part.lane), step.reason, step.position)
                cursor = forged_cursor(step.position, int(time.time() * 1000) + CURSOR_TTL_MS)
            else:
                cursor = page.next_cursor
            unsealed_rows += rows.rows
            unsealed_pages += 1
            ctx.on_page(rows.rows)
            if partition_finished(step, part.lower_ms):
                commit(done=True)
                return True
            # A thief cuts by the committed position: with walks finished, commit every page,
            # or a fast walk would be split above where it really is, and its pages fetched twice.
            if writer.due() or thieves_about:
                commit(done=False)
            # Not held while the next page is on its way: a walker waits on the network most
            # of the time, and a parsed page weighs about ten times its body.
            del page, rows
    except Stopped:
        commit(done=False)
        return False
    except BaseException:
        writer.abort()  # the open segment is re-fetched from the checkpoint
        raise


def walk(ctx: FetchContext, part: PartitionState) -> tuple[bool, Lane]:
    """`fetch_partition`, and the lane it ended on: a partition whose lane the API refuses
    (the optional query-string lane), or that a resumed run no longer gives a budget, goes
    on, durably, on /events with the key in the header; the data is the same."""
    if lane_rates(ctx.config).get(part.lane, 0) > 0:
        try:
            return fetch_partition(ctx, part), part.lane
        except SourceUnavailable as exc:
            logger.warning("{}; partition {} goes on with the key in the header", exc, part.index)

    def move(state: PartitionState) -> None:
        state.lane = "events"

    moved = checkpoint.update_partition(ctx.config.state_path, part.index, move).partitions[part.index]
    return fetch_partition(ctx, moved), moved.lane


def help_others(ctx: FetchContext, lane: Lane) -> None:
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


def walk_and_help(ctx: FetchContext, part: PartitionState) -> bool:
    """A walker's whole life: its own partition (unless a restart finds it done), then
    help with the others. False when it was stopped."""
    drained, lane = (True, part.lane) if part.done else walk(ctx, part)
    logger.info("partition {} {}", part.index, "drained" if drained else "stopped")
    if drained:
        help_others(ctx, lane)
    return drained
