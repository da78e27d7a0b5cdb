"""The plan of a first run: probe the source twice, then cut its time range into partitions.

The first probe (a small page) finds the newest event and how far below it to look; the
second (a full page, well inside the data) measures the density of events over time, from
which the oldest event is estimated. Sessions cluster events, so a small sample near the
newest end can be off by half; a full page deeper down by about a tenth, and work stealing
corrects the rest. The second asks for as many events as the user's `--page-limit` allows,
so its answer also shows the largest page the server serves, and how fast: the plan's page
size. The arithmetic is in `plan`; this module only asks the API.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any

from loguru import logger

from ingest.config import Config
from ingest.source import checkpoint
from ingest.source.api import ApiClient, FatalApiError, Page, SourceUnavailable
from ingest.source.checkpoint import DOCUMENTED_PAGE_CAP, Checkpoint, PartitionState
from ingest.source.cursors import CURSOR_TTL_MS, decode_cursor, position_cursor
from ingest.source.fetcher import request_window, start_cursor
from ingest.source.lanes import Lane, Mode, lane_rates
from ingest.source.normalise import parse_timestamp
from ingest.source.plan import (
    choose_lanes,
    choose_page_size,
    estimate_oldest,
    honoured_page_size,
    memory_bound,
    partitions_for,
    probe_depth,
    split_range,
)

# Events in the first planning probe (quick to serve: it only finds the newest event and
# how far to look for the second). The density sample is a full page: sessions cluster
# events, so a small sample can be off by half; 5,000 events by about a tenth.
PROBE_LIMIT = 1000
LOOK_LIMIT = 100  # a top-up's look at the newest end: a few events, in case the newest is unreadable
# A position above any event (the year 2286): a look asks for the page below it, with a fresh
# `exp`, because /events answers a request it saw within 30 s from its cache, and a top-up
# must not plan from a page that old.
ABOVE_ALL_MS = 9_999_999_999_999
# The lanes each `--source` choice plans for.
MODE_OF_CHOICE: dict[str, Mode] = {"auto": "mixed", "feed": "feed", "events": "events"}


def newest_timestamp_ms(events: Sequence[Any]) -> int | None:
    stamps = [parse_timestamp(e.get("timestamp")) for e in events if isinstance(e, dict)]
    valid = [s for s in stamps if s is not None]
    return max(valid) // 1000 if valid else None


def sample_of(page: Page) -> tuple[int, int, int] | None:
    """(newest, oldest, events) of a page, or None when it holds too little to measure."""
    top = newest_timestamp_ms(page.events)
    if top is None or len(page.events) < 2 or not page.next_cursor:
        return None
    return top, int(decode_cursor(page.next_cursor)["ts"]), len(page.events)


def estimate_from_samples(client: ApiClient, mode: Mode, newest: int, probe: Page,
                          limit: int) -> tuple[int, Page, Page | None]:
    """The oldest event's time, from a second page (`limit` events) taken well inside the
    data (see `estimate_oldest`; positioned by `until` on the feed, by a forged cursor on
    /events), the page the estimate rests on, and the second page (None when the first held
    everything). A plan from a wrong estimate still covers everything, but leaves lanes
    idle or overloaded until work stealing evens them out."""
    first = sample_of(probe)
    if first is None:  # one page holds everything (or nothing measurable): no need to guess
        return newest, probe, None
    # Asked for as the first page of a walk down from the depth, on the lane the probe used.
    below = PartitionState(index=0, lane="events" if mode == "events" else "feed", lower_ms=0,
                           upper_ms=probe_depth(newest, first[1]))
    since, until = request_window(below)
    page = client.fetch_page(below.lane, start_cursor(below, int(time.time() * 1000)), since, until, limit)
    inside = sample_of(page)
    if inside is None:  # the data ends above the depth: the first sample is all we have
        return max(below.upper_ms, estimate_oldest(newest, first, probe.total)), probe, page
    return estimate_oldest(newest, inside, probe.total), page, page


def page_size_of(config: Config, answer: Page | None, asked: int, walkers: int) -> int:
    """The plan's page size, from the answer to a request for `asked` events (see
    `choose_page_size`). Without one (the first probe held everything) nothing was
    measured: the documented cap, within the ceiling."""
    if answer is None:
        return max(1, min(config.page_limit, DOCUMENTED_PAGE_CAP))
    honoured = honoured_page_size(asked, answer.limit, len(answer.events), answer.has_more)
    return choose_page_size(config.page_limit, honoured, walkers, len(answer.events), answer.seconds,
                            config.request_timeout)


def make_plan(config: Config, client: ApiClient) -> Checkpoint:
    """Probe the source once, then split its time range into partitions."""
    mode = MODE_OF_CHOICE[config.source]
    limit = min(config.page_limit, PROBE_LIMIT)
    if mode == "events":
        probe = client.fetch_page("events", None, limit=limit)
    else:
        try:
            probe = client.fetch_page("feed", None, limit=limit)
        except SourceUnavailable as exc:
            if config.source == "feed":
                raise FatalApiError(f"the feed is unavailable: {exc}") from None
            logger.warning("no stream token ({}); using /api/v1/events only", exc)
            mode = "events"
            probe = client.fetch_page("events", None, limit=limit)
    newest = newest_timestamp_ms(probe.events)
    generation = checkpoint.new_generation()
    if newest is None:
        logger.warning("the source returned no events with a timestamp; nothing to fetch")
        plan = Checkpoint(generation=generation, mode=mode, total=probe.total, newest_ms=None)
        plan.partitions = split_range(0, 1, [("events", 1.0)])
        for part in plan.partitions:
            part.done = not probe.events
        return plan
    # No bigger than one walker alone could hold: a page the walk could never use is not worth its wait.
    asked = min(config.page_limit, memory_bound(1))
    oldest, sample, sized = estimate_from_samples(client, mode, newest, probe, asked)
    partitions = partitions_for(config.partitions, len(sample.events), sample.seconds, os.cpu_count() or 2)
    lanes = choose_lanes(mode, partitions, lane_rates(config))
    plan = Checkpoint(generation=generation, mode=mode, total=probe.total, newest_ms=newest, oldest_ms=oldest,
                      page_size=page_size_of(config, sized, asked, len(lanes)))
    plan.partitions = split_range(oldest, newest + 1, lanes)
    logger.info(
        "plan: {} partitions over {} .. {} ({} events reported; {} events in {:.2f}s a request; pages of {})",
        len(plan.partitions),
        oldest,
        newest,
        probe.total,
        len(sample.events),
        sample.seconds,
        plan.page_size,
    )
    return plan


def look(client: ApiClient, mode: Mode) -> tuple[int | None, int | None]:
    """The newest event's time and meta.total, from one small page at the newest end: all
    a top-up needs to plan (one request, and a stream token on the feed)."""
    lane: Lane = "events" if mode == "events" else "feed"
    top = position_cursor(ABOVE_ALL_MS, int(time.time() * 1000), CURSOR_TTL_MS)
    try:
        page = client.fetch_page(lane, top, limit=LOOK_LIMIT)
    except SourceUnavailable:
        if mode == "feed":
            raise
        page = client.fetch_page("events", top, limit=LOOK_LIMIT)
    return newest_timestamp_ms(page.events), page.total

