"""Splitting the event time range into fetch partitions. Pure functions, table-tested.

Events come newest first, so a partition is a window [lower_ms, upper_ms) walked from its
upper bound down. Partitions are contiguous and cover everything: the newest starts just
above the newest event, the oldest reaches down to 0, so an estimate of the oldest event
that is off only makes the last window bigger, never loses events. Each partition runs on
one lane (the feed or /events); windows are sized by the share of the request budget their
lane gives them, so all partitions finish at about the same time.
"""

from __future__ import annotations

from ingest.checkpoint import PartitionState
from ingest.cursors import decode_cursor

# A page takes about as long as the pause the budgets allow between two requests, so one
# sequential walker per lane would leave the budget idle while it waits for its page: these
# defaults keep about two requests in flight per lane's worth of budget.
NEVER = 2**62  # a span no partition has
SPLIT_MIN_PAGES = 4  # a split leaves a partial page behind: worth it only for more than this
DEFAULT_FEED_PARTITIONS = 6
DEFAULT_EVENTS_PARTITIONS = 2


def estimate_oldest(newest_ms: int, page_oldest_ms: int, page_events: int, total: int | None) -> int:
    """Extrapolate the oldest event's time from one page's event density and meta.total."""
    if not total or page_events < 2 or page_oldest_ms >= newest_ms or total <= page_events:
        return page_oldest_ms
    per_event = (newest_ms - page_oldest_ms) / (page_events - 1)
    return max(0, int(newest_ms - per_event * (total - 1)))


def choose_lanes(mode: str, partitions: int, feed_rate: float, events_rate: float) -> list[tuple[str, float]]:
    """(source, weight) per partition, newest first. `mode`: feed, events or mixed."""
    if mode == "events":
        count = partitions or DEFAULT_EVENTS_PARTITIONS
        return [("events", events_rate / count)] * count
    if mode == "feed":
        count = partitions or DEFAULT_FEED_PARTITIONS
        return [("feed", feed_rate / count)] * count
    if mode == "mixed":
        total = partitions or DEFAULT_FEED_PARTITIONS + DEFAULT_EVENTS_PARTITIONS
        if total < 2:
            return [("feed", feed_rate)]
        events = min(DEFAULT_EVENTS_PARTITIONS, total // 4) or 1
        feeds = total - events
        return [("feed", feed_rate / feeds)] * feeds + [("events", events_rate / events)] * events
    raise ValueError(f"unknown source mode {mode!r}")


def split_range(lower_ms: int, upper_ms: int, lanes: list[tuple[str, float]]) -> list[PartitionState]:
    """Contiguous windows over [lower_ms, upper_ms), sized by weight; the last one reaches 0."""
    if not lanes:
        raise ValueError("at least one lane is needed")
    span = max(upper_ms - lower_ms, len(lanes))
    total_weight = sum(weight for _, weight in lanes)
    parts: list[PartitionState] = []
    top = upper_ms
    for index, (source, weight) in enumerate(lanes):
        last = index == len(lanes) - 1
        bottom = 0 if last else max(0, top - max(1, round(span * weight / total_weight)))
        parts.append(PartitionState(index=index, source=source, lower_ms=bottom, upper_ms=top))
        top = bottom
    return parts


def walked_to(part: PartitionState) -> int:
    """The time a partition's walk has come down to (its committed cursor), else its top."""
    if part.cursor:
        try:
            return int(decode_cursor(part.cursor)["ts"])
        except (ValueError, KeyError, TypeError):
            pass
    return part.upper_ms


def choose_split(parts: list[PartitionState], min_span_ms: int, oldest_ms: int = 0) -> tuple[int, int] | None:
    """Work stealing: the unfinished partition with the most time left to walk, whatever
    its lane, and the time to cut it at (its lower half goes to the fetcher that asks, to
    walk on its own lane: the data is the same on both). Time below the oldest event holds
    nothing, so a bound under `oldest_ms` counts from there. None when no partition has at
    least `min_span_ms` left: too short to be worth a split."""
    best: tuple[int, int, int] | None = None  # (index, span left, effective lower bound)
    for part in parts:
        if part.done:
            continue
        lower = max(part.lower_ms, oldest_ms)
        span = walked_to(part) - lower
        if span >= max(2, min_span_ms) and (best is None or span > best[1]):
            best = (part.index, span, lower)
    if best is None:
        return None
    index, span, lower = best
    return index, lower + span // 2


def progress_unknown(parts: list[PartitionState]) -> bool:
    """Some unfinished partition has not committed a page yet: nothing to split by now,
    but soon there may be (a fetcher with no work should look again, not leave)."""
    return any(not p.done and (p.rows == 0 or not p.cursor) for p in parts)


def min_split_span(parts: list[PartitionState], page_limit: int) -> int:
    """Splitting pays only for a remainder of a few pages: SPLIT_MIN_PAGES pages' worth of time at the
    event density measured so far by the unfinished walks (nothing measured yet: never)."""
    walking = [p for p in parts if not p.done]
    walked_ms = sum(max(0, p.upper_ms - walked_to(p)) for p in walking)
    rows = sum(p.rows for p in walking)
    if rows <= 0 or walked_ms <= 0:
        return NEVER
    return max(1, int(SPLIT_MIN_PAGES * page_limit * walked_ms / rows))
