"""verify's crawl: every id the source holds, walked the way `run` walks it.

One stream of pages takes about an hour for 3,000,000 events; a run takes 12-20 minutes,
because it cuts the source into partitions over three lanes with budgets of their own and
keeps every budget busy. The crawl uses that machinery itself, not a copy of it: the plan
(`make_plan`), the shared pacers (`make_limiters`), the walk and its work stealing
(`walk`, `help_others`), which keeps its positions in a checkpoint of its own in a scratch
folder. Only what the walk writes into differs: instead of segments, an `IdOutput` keeps
the id of each event row, reject rows whole, and whole the rare row PostgreSQL may refuse.

The walkers are threads of this process: like fetchers they spend nearly all their time
waiting on the API, and nothing they write has to survive a crash (verify starts over).
"""

from __future__ import annotations

import multiprocessing as mp
import re
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

from loguru import logger

from ingest import locks
from ingest.config import Config
from ingest.source import checkpoint
from ingest.source.api import ApiClient, ApiError, make_limiters
from ingest.source.checkpoint import PartitionState
from ingest.source.fetcher import FetchContext, walk_and_help
from ingest.source.normalise import deep_stack_thread
from ingest.source.probe import make_plan
from ingest.tsv import EVENT_LINE_END

EVENT_ROW_TAIL = EVENT_LINE_END[:-1]  # how an event row ends, once split at newlines
IDS, REJECTS, DOUBTFUL = ".ids", ".rejects", ".doubtful"
# Whether PostgreSQL stores an event row is PostgreSQL's to say: the normaliser lets
# through numbers beyond what jsonb's numeric takes (an exponent or a run of digits in the
# tens of thousands), and the loader rejects those lines when COPY refuses them. A row
# with a JSON number anywhere near that (a false alarm only costs a look) is kept whole for
# `report` to ask; every number orjson writes is far below it.
MAYBE_TOO_BIG = re.compile(rb"[:,\[]-?[0-9.]*(?:[eE][+-]?[0-9]{5}|[0-9]{10000})")
STOP_GRACE_S = 2.0  # after a failure or ^C: how long a walker mid-request is waited for


class CrawlFailed(RuntimeError):
    """The crawl could not see the whole source; the message is the one line to show."""


def sort_lines(data: bytes) -> tuple[bytes, bytes, bytes]:
    """Segment lines -> (the id field of each event row, one a line, still in COPY text
    form so that COPY reads back exactly the id the table got; every reject row whole;
    every event row PostgreSQL may refuse, whole)."""
    ids, rejects, doubtful = [], [], []
    suspect = MAYBE_TOO_BIG.search(data) is not None  # one scan of the page settles most
    for line in data.split(b"\n")[:-1]:
        if not line.endswith(EVENT_ROW_TAIL):
            rejects.append(line + b"\n")
        elif suspect and MAYBE_TOO_BIG.search(line):
            doubtful.append(line + b"\n")
        else:
            ids.append(line[: line.index(b"\t")] + b"\n")
    return b"".join(ids), b"".join(rejects), b"".join(doubtful)


class IdOutput:
    """A `SegmentOutput` for one walk: what verify needs of its lines (`sort_lines`).
    Lines reach the files at a seal (the page boundary the checkpoint then moves past); an
    abort drops what came after the last one, as it would an open segment."""

    def __init__(self, folder: Path, partition: int, next_seq: int) -> None:
        self.next_seq = next_seq
        self._files = [folder / f"{partition:03d}{suffix}" for suffix in (IDS, REJECTS, DOUBTFUL)]
        self._pending: list[bytes] = []

    def append(self, data: bytes, rows: int) -> None:
        self._pending.append(data)

    def due(self) -> bool:
        """Every page: the position other walkers split by is then always the latest."""
        return True

    def seal(self) -> str | None:
        sorted_lines = sort_lines(b"".join(self._pending))
        self._pending.clear()
        for path, data in zip(self._files, sorted_lines, strict=True):
            if data:
                with path.open("ab") as fh:
                    fh.write(data)
        return None

    def abort(self) -> None:
        self._pending.clear()


@dataclass
class Crawl:
    folder: Path
    pages: int
    walks: int  # partitions walked, the ones split off by work stealing included

    def files(self, suffix: str) -> list[Path]:
        return sorted(self.folder.glob(f"*{suffix}"))


class Tally:
    """Pages and rows of every walker, for the progress line and the report."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.pages = self.rows = 0

    def page(self, rows: int) -> None:
        with self._lock:
            self.pages += 1
            self.rows += rows


def crawl_source(config: Config, folder: Path) -> Crawl:
    """Walk the whole source into `folder` (empty, scratch) with the plan, lanes and
    pacing of a run; CrawlFailed when any walk fails (the others are stopped)."""
    walking = replace(config, data_dir=folder)
    limiters = make_limiters(config, mp.get_context("spawn"))
    planner = ApiClient(walking, limiters)
    try:
        plan = make_plan(walking, planner)
    except ApiError as exc:
        raise CrawlFailed(f"cannot plan the crawl: {exc}") from None
    finally:
        planner.close()
    with locks.locked(walking.state_path):
        checkpoint.write(walking.state_path, plan)
    stop = threading.Event()
    tally = Tally()
    failures: list[str] = []

    def walker(part: PartitionState) -> None:
        client = ApiClient(walking, limiters, should_stop=stop.is_set)
        ctx = FetchContext(walking, client, lambda index, seq: IdOutput(folder, index, seq), lambda: 0,
                           stop.is_set, stop.wait, tally.page)
        finished = False
        try:
            walk_and_help(ctx, part)
            finished = True
        except (ApiError, OSError) as exc:
            failures.append(f"partition {part.index}: {exc}")
        finally:
            client.close()
            if not finished:
                stop.set()  # the crawl cannot be complete: the other walkers stop too

    threads = [deep_stack_thread(walker, part, name=f"verify-walk-{part.index}")
               for part in plan.partitions if not part.done]
    logger.info("verify: crawling {} partitions ({} events reported)", len(threads), plan.total)
    for thread in threads:
        thread.start()
    try:
        next_line = time.monotonic() + config.stats_interval
        while alive := [t for t in threads if t.is_alive()]:
            alive[0].join(max(0.0, next_line - time.monotonic()))
            if time.monotonic() >= next_line:
                logger.info("verify: {} rows from {} pages so far", tally.rows, tally.pages)
                next_line += config.stats_interval
    finally:
        stop.set()
        for thread in threads:
            thread.join(STOP_GRACE_S)
    if failures:
        raise CrawlFailed(failures[0])
    state = checkpoint.read(walking.state_path)
    if state is None or not state.drained:
        undone = [p.index for p in state.partitions if not p.done] if state else []
        raise CrawlFailed(f"the crawl ended before the source was drained (partitions {undone} unfinished)")
    return Crawl(folder, tally.pages, len(state.partitions))
