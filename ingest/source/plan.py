"""Splitting the event time range into fetch partitions. Pure functions, table-tested.

Events come newest first, so a partition is a window [lower_ms, upper_ms) walked from its
upper bound down. Partitions are contiguous and cover everything: the newest starts just
above the newest event, the oldest reaches down to 0, so an estimate of the oldest event
that is off only makes the last window bigger, never loses events. Each partition runs on
one lane (the feed, /events, or /events with the key in the query string); windows are
sized by the share of the request budget their lane gives them, so all partitions finish
at about the same time.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import replace

from ingest.source.checkpoint import DOCUMENTED_PAGE_CAP, Checkpoint, PartitionState
from ingest.source.cursors import decode_cursor
from ingest.source.lanes import Lane, Mode

# The lanes a source mode walks, newest windows first: the fastest lane gets the oldest
# windows, the ones an estimate of the oldest event that is off makes emptier or fuller
# than planned (it has the most walkers to absorb that). Then the order in which walkers are
# given to lanes: one walker keeps about one page in flight (~4.5 s a page), so the feed's
# ~40 requests/min need three or more, /events' 10/min one, the query-string lane's 5/min
# one; the rest of the default eight are slack for slow pages. More partitions than that
# go to the lane with the largest budget.
MODE_LANES: dict[Mode, tuple[Lane, ...]] = {
    "feed": ("feed",),
    "events": ("events_query", "events"),
    "mixed": ("events_query", "events", "feed"),
}
WALKER_ORDER: tuple[Lane, ...] = ("feed", "events", "feed", "feed", "events_query", "feed", "events", "feed")
LANE_NEED: dict[Lane, int] = {"feed": 4, "events": 1, "events_query": 1}  # walkers that keep each budget busy
# A piece of k pages is cut a little short: the density varies along the way, and a piece
# that overflows its k pages by a few events costs a whole request more.
PIECE_FILL = 0.8
COMMIT_LAG_PAGES = 1  # pages a walk may be ahead of its committed cursor (it commits every page once a walk is done)
PROBE_DEPTH = 30  # the second probe looks this many first-probe spans below the newest event
FAST_SOURCE_EVENTS_PER_S = 20_000  # one request this fast: an API on this machine, not behind budgets
WALKERS_PER_CPU = 2  # walkers of a local source
# Page sizes: see `memory_bound` and `timeout_bound`.
PAGE_BYTES_PER_EVENT = 3_000
PAGE_MEMORY_BYTES = 192 << 20
TIMEOUT_SHARE = 0.25


def estimate_oldest(newest_ms: int, sample: tuple[int, int, int], total: int | None) -> int:
    """Extrapolate the oldest event's time from meta.total and the event density of a
    sample `(newest_ms, oldest_ms, events)` of consecutive events. The sample that counts is
    one from inside the data: near its newest end the density ramps down (sessions that
    started shortly before the newest event have not produced their events yet)."""
    top, bottom, events = sample
    if not total or events < 2 or bottom >= top or total <= events:
        return bottom
    per_event = (top - bottom) / (events - 1)
    return max(0, int(newest_ms - per_event * (total - 1)))


def probe_depth(newest_ms: int, first_probe_oldest_ms: int) -> int:
    """Where to take the density sample: PROBE_DEPTH first-probe spans below the newest
    event, clear of the ramp at the newest end."""
    return max(0, newest_ms - PROBE_DEPTH * max(1, newest_ms - first_probe_oldest_ms))


def partitions_for(requested: int, sample_events: int, sample_seconds: float | None, cpus: int) -> int:
    """The partitions a run walks (0: the lanes' default, see `choose_lanes`). A source
    that serves one request faster than FAST_SOURCE_EVENTS_PER_S is local: the run is bound
    by this machine's CPUs. Two walkers a core keep a page on its way from the source while
    another is parsed; more would only hold more pages."""
    if requested or not sample_seconds or sample_events / sample_seconds < FAST_SOURCE_EVENTS_PER_S:
        return requested
    return WALKERS_PER_CPU * max(1, cpus)


def honoured_page_size(asked: int, granted: int | None, returned: int, has_more: bool) -> int:
    """The largest page one answer to a request for `asked` events proves the server
    serves. `granted` is its `pagination.limit` (the limit after its cap); `returned` the
    events it held, which is the cap too when more are to come (pages never come back short
    before the last). An answer that shows neither (no limit given, and the data ended, or
    an empty page that claims more) proves only what it held: beyond that the documented
    cap is assumed."""
    shown = [granted] if granted is not None and granted >= 1 else []
    if (has_more and returned > 0) or returned >= asked:
        shown.append(returned)
    if not shown:
        return max(1, min(asked, max(returned, DOCUMENTED_PAGE_CAP)))
    return max(1, min(asked, *shown))


def memory_bound(walkers: int) -> int:
    """The largest page `walkers` walkers may each hold at once.

    A page held by a walker costs about 2.2 KB an event (measured on the simulator's
    events: a 350-byte body, 1.3 KB of decoded objects, 0.5 KB of rows), and decoding peaks
    for a moment at 5.5 KB an event (the parser's document beside the objects it builds);
    PAGE_BYTES_PER_EVENT, 3 KB, leaves room for the one or two pages being decoded at a time
    (CPU work: no more at once than the cores). Any walker may hold a page while the others
    do (walkers sharing a process switch threads mid-page), so the worst case is all of
    them, and PAGE_MEMORY_BYTES is what that worst case may take: with the default eight
    walkers about 8,400 events a page, with two (a source on this machine) about 33,500.
    Usually one or two pages are held at a time.
    """
    return PAGE_MEMORY_BYTES // (PAGE_BYTES_PER_EVENT * max(1, walkers))


def timeout_bound(sample_events: int, sample_seconds: float | None, timeout_s: float) -> int | None:
    """The largest page that stays well inside `--request-timeout` at the speed one page
    of `sample_events` was served (None: not measured). A page takes a share TIMEOUT_SHARE
    of the timeout at most: pages stretch when many are in flight on a server of limited
    capacity, and one that times out costs its request's budget and a retry. Counting the
    sample's fixed latency as per-event time errs towards smaller pages."""
    if sample_events < 1 or not sample_seconds or sample_seconds <= 0:
        return None
    return int(timeout_s * TIMEOUT_SHARE * sample_events / sample_seconds)


def choose_page_size(ceiling: int, honoured: int, walkers: int, sample_events: int, sample_seconds: float | None,
                     timeout_s: float) -> int:
    """Events per request for a plan's walks: the largest page the server honoured, within
    the user's ceiling. Memory and the timeout bound only what goes beyond the documented
    cap: pages that size are what every run has always walked with (a slow sample, say one
    delayed answer, must not shrink the whole run's pages)."""
    grow_to = memory_bound(walkers)
    by_time = timeout_bound(sample_events, sample_seconds, timeout_s)
    if by_time is not None:
        grow_to = min(grow_to, by_time)
    return max(1, min(ceiling, honoured, max(DOCUMENTED_PAGE_CAP, grow_to)))


def choose_lanes(mode: Mode, partitions: int, rates: Mapping[Lane, float]) -> list[tuple[Lane, float]]:
    """(lane, weight) per partition, newest first: `partitions` walkers (0: the default
    order's walkers) over the lanes of `mode` that have a budget (`rates`, requests per
    window), each weighted by its lane's budget per walker."""
    if mode not in MODE_LANES:
        raise ValueError(f"unknown source mode {mode!r}")
    usable = [lane for lane in MODE_LANES[mode] if rates.get(lane, 0) > 0]
    if not usable:
        raise ValueError(f"no lane of {mode!r} has a request budget")
    order = [lane for lane in WALKER_ORDER if lane in usable]
    count = partitions or len(order)
    fastest = max(usable, key=lambda lane: rates[lane])
    chosen = order[:count] + [fastest] * (count - len(order))
    walkers = {lane: chosen.count(lane) for lane in usable}
    return [(lane, rates[lane] / walkers[lane]) for lane in usable for _ in range(walkers[lane])]


def split_range(lower_ms: int, upper_ms: int, lanes: list[tuple[Lane, float]], floor_ms: int = 0,
                first_index: int = 0) -> list[PartitionState]:
    """Contiguous windows over [lower_ms, upper_ms), sized by weight; the last one reaches
    `floor_ms`: 0 for a first plan, whose `lower_ms` is only an estimate of the oldest event,
    the exact bottom for a top-up, whose range is known."""
    if not lanes:
        raise ValueError("at least one lane is needed")
    span = max(upper_ms - lower_ms, len(lanes))
    total_weight = sum(weight for _, weight in lanes)
    parts: list[PartitionState] = []
    top = upper_ms
    for index, (lane, weight) in enumerate(lanes):
        last = index == len(lanes) - 1
        bottom = floor_ms if last else max(floor_ms, top - max(1, round(span * weight / total_weight)))
        parts.append(PartitionState(index=first_index + index, lane=lane, lower_ms=bottom, upper_ms=top))
        top = bottom
    return parts


def plan_top(state: Checkpoint, newest_ms: int | None, source_total: int | None, page_limit: int,
             rates: Mapping[Lane, float], requested: int, generation: str) -> Checkpoint:
    """`state` with the events the source gained since its plan planned as more partitions.

    New events arrive at the newest end, so the top is [the plan's newest, the source's
    newest]: the plan's newest millisecond is walked again (events that arrived within it
    after the last look, if meta.total says any did), and the primary key absorbs what was
    already loaded. Walkers are
    sized by the growth of meta.total (a top-up of a few pages gets a partition or two, not
    the full plan), so its cost follows what is new. A drained state gets a new epoch; an
    unfinished one gets the top added to the walk under way. Either walks pages of the
    plan's size (`page_limit` is the user's ceiling over it)."""
    growth = source_total - state.source_total if source_total is not None and state.source_total is not None else None
    if newest_ms is None or state.newest_ms is None or newest_ms < state.newest_ms or (
        newest_ms == state.newest_ms and not growth
    ):
        return replace(state, source_total=source_total)  # nothing new (a resume after a kill, a quiet source)
    page_size = state.walk_page_size(page_limit)
    wanted = requested or max(1, min(len(WALKER_ORDER), math.ceil((growth or page_size) / page_size)))
    lanes = choose_lanes(state.mode, wanted, rates)
    bottom, top = state.newest_ms, newest_ms + 1
    if state.drained:
        return Checkpoint(generation=generation, mode=state.mode, total=growth, newest_ms=newest_ms, oldest_ms=bottom,
                          partitions=split_range(bottom, top, lanes, floor_ms=bottom), target=state.target,
                          source_total=source_total, rows_earlier=state.rows,
                          earlier_generations=[*state.earlier_generations, state.generation],
                          loaded_newest_ms=state.loaded_newest_ms, topped_up_at=state.topped_up_at,
                          page_size=state.page_size)
    more = split_range(bottom, top, lanes, floor_ms=bottom, first_index=len(state.partitions))
    total = None if state.total is None or growth is None else state.total + growth
    return replace(state, total=total, newest_ms=newest_ms, partitions=[*state.partitions, *more],
                   source_total=source_total)


def walked_to(part: PartitionState) -> int:
    """The time a partition's walk has come down to (its committed cursor), else its top."""
    if part.cursor:
        try:
            return int(decode_cursor(part.cursor)["ts"])
        except (ValueError, KeyError, TypeError):
            pass
    return part.upper_ms


def walkers_on(parts: list[PartitionState], lane: Lane) -> int:
    """The unfinished walks of `lane` (each has a fetcher)."""
    return sum(1 for p in parts if not p.done and p.lane == lane)


def walker_speed(parts: list[PartitionState], lane: Lane, rates: Mapping[Lane, float], joining: int = 0) -> float:
    """Requests per window one walker of `lane` gets: its budget shared by the lane's
    unfinished walks (plus `joining`), but never more than LANE_NEED walkers' share (one
    walker keeps only about one page in flight)."""
    walking = walkers_on(parts, lane) + joining
    return rates.get(lane, 0.0) / max(walking, LANE_NEED.get(lane, 1), 1)


def best_cut(pages_left: float, victim_speed: float, thief_speed: float, beside_next_page: bool = False) -> int | None:
    """How many pages of a remainder the thief should take so that the later of the two
    walks finishes soonest, counted in whole requests (each part ends with a partial page
    that costs a full request); None when no split finishes sooner than the victim alone.
    `beside_next_page`: the remainder lies below the victim's next page (a walk under way),
    so the thief may take all of it and leave the victim that one page: a slow lane's last
    partial page then costs a fast lane's request, not a slow lane's interval."""
    whole = math.ceil(pages_left - 1e-9)
    best, best_time = None, whole / victim_speed
    # The thief's time grows with its share and the victim's shrinks: the best whole number
    # of pages is next to where the two would be equal.
    even = int(pages_left * thief_speed / (thief_speed + victim_speed))
    most = whole if beside_next_page else whole - 1
    for taken in range(max(1, even - 1), min(most, even + 2) + 1):
        finish = max(taken / thief_speed, math.ceil(pages_left - taken - 1e-9) / victim_speed)
        if finish < best_time - 1e-9:
            best, best_time = taken, finish
    return best


def choose_split(
    parts: list[PartitionState],
    page_ms: int | None,
    oldest_ms: int = 0,
    thief: Lane | None = None,
    rates: Mapping[Lane, float] | None = None,
) -> tuple[int, int] | None:
    """Work stealing: the unfinished partition that will take longest to finish (the
    pages left to walk, `page_ms` of time each, over its walker's speed; whatever its
    lane), and the time to cut it at. Its lower part goes to the fetcher that asks, to
    walk on its own lane `thief` (the data is the same on both), sized by `best_cut`: a
    slow lane takes less, and a remainder no split would finish sooner is left alone.
    Without `rates` every walker counts as equally fast. Time below the oldest event holds
    nothing, so a bound under `oldest_ms` counts from there."""
    if not page_ms:
        return None

    def speed(lane: Lane, joining: int = 0) -> float:
        return max(walker_speed(parts, lane, rates, joining), 1e-9) if rates else 1.0

    def position(part: PartitionState) -> int:
        """Where the walk may be by now: its committed position lags behind by what its
        open segment holds. A cut above where it really is would have the thief fetch
        again what the victim has already stored."""
        return walked_to(part) - (COMMIT_LAG_PAGES * page_ms if part.cursor else 0)

    best: tuple[float, int, int, Lane] | None = None  # (time alone, index, lower bound, lane)
    for part in parts:
        if part.done:
            continue
        lower = max(part.lower_ms, oldest_ms)
        alone = math.ceil((position(part) - lower) / page_ms - 1e-9) / speed(part.lane)
        if alone > 0 and (best is None or alone > best[0]):
            best = (alone, part.index, lower, part.lane)
    if best is None:
        return None
    _, index, lower, lane = best
    victim = parts[index]
    pages_left = (position(victim) - lower) / page_ms
    under_way = bool(victim.cursor)  # as `position` has it
    taken = best_cut(pages_left, speed(lane), speed(thief, joining=1) if thief is not None else speed(lane), under_way)
    if taken is None:
        return None
    if taken >= pages_left:
        # All below the victim's next page, cut a little above where that page should end
        # (it may cover less time than a page's span): what both fetch, the key absorbs.
        return index, position(victim) + round(COMMIT_LAG_PAGES * page_ms * (1 - PIECE_FILL))
    return index, lower + int(taken * page_ms * PIECE_FILL)


def lane_needs_walker(parts: list[PartitionState], lane: Lane) -> bool:
    """Fewer unfinished partitions walk `lane` than keep its budget busy (LANE_NEED): a
    walker that joins it uses budget that would otherwise go idle. With enough walkers a
    split would only cost a partial page, so an idle fetcher waits instead."""
    return walkers_on(parts, lane) < LANE_NEED.get(lane, 1)


def progress_mark(parts: list[PartitionState]) -> tuple[tuple[int, str | None, int, bool], ...]:
    """Changes whenever any walk commits a page, finishes or is split: an idle fetcher
    that sees it unchanged for long knows the walks have stalled or lost their fetchers."""
    return tuple((p.index, p.cursor, p.lower_ms, p.done) for p in parts)


def measured_ms_per_event(parts: list[PartitionState], planned: float | None = None) -> float | None:
    """Time per event at the density the unfinished walks measured so far, or before
    anything is measured the plan's estimate `planned` (neither: None)."""
    walking = [p for p in parts if not p.done]
    walked_ms = sum(max(0, p.upper_ms - walked_to(p)) for p in walking)
    rows = sum(p.rows for p in walking)
    return walked_ms / rows if rows > 0 and walked_ms > 0 else planned


def revised_oldest(parts: list[PartitionState], total: int | None, oldest_ms: int, ms_per_event: float | None) -> int:
    """The plan's estimate of the oldest event, corrected once a walk has gone below it
    (the estimate was too new): from that walk down, room for the events the API reported
    that no walk has fetched yet and no other walk has still ahead of it."""
    walking = [p for p in parts if not p.done]
    below = [p for p in walking if walked_to(p) <= oldest_ms]
    if not total or not ms_per_event or not below:
        return oldest_ms
    bottom = min(below, key=walked_to)
    ahead = sum(max(0, walked_to(p) - max(p.lower_ms, oldest_ms)) for p in walking if p is not bottom) / ms_per_event
    left = max(0.0, total - sum(p.rows for p in parts) - ahead)
    return max(0, int(walked_to(bottom) - left * ms_per_event))


def plan_steal(state: Checkpoint, thief: Lane, page_limit: int, rates: Mapping[Lane, float]) -> tuple[int, int] | None:
    """What a fetcher of lane `thief` with no walk of its own should take over: `choose_split`
    with the densities and bounds known so far, in pages of the plan's size (within the
    ceiling `page_limit`), or None (its lane's budget is in use, or nothing is worth a split)."""
    parts = state.partitions
    if not lane_needs_walker(parts, thief):
        return None
    planned = planned_ms_per_event(state.total, state.newest_ms, state.oldest_ms)
    density = measured_ms_per_event(parts, planned)
    if not density:
        return None
    oldest = revised_oldest(parts, state.total, state.oldest_ms or 0, density)
    return choose_split(parts, max(1, int(state.walk_page_size(page_limit) * density)), oldest, thief, rates)


def planned_ms_per_event(total: int | None, newest_ms: int | None, oldest_ms: int | None) -> float | None:
    """The plan's density estimate: its time range over the events the API reported."""
    if not total or newest_ms is None or oldest_ms is None or newest_ms <= oldest_ms:
        return None
    return (newest_ms - oldest_ms) / total
