"""Progress for people and for machines.

On a terminal: a tqdm bar of events loaded against the API's `meta.total`. Otherwise: one
JSON stats line every `--stats-interval` seconds. Either way a summary line at the end.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import psutil
from loguru import logger
from tqdm import tqdm

from ingest.config import Config
from ingest.counters import SharedCounters
from ingest.sink.segments import SegmentStore
from ingest.source.checkpoint import Checkpoint


def eta_seconds(done: int, total: int | None, rate: float) -> float | None:
    if not total or rate <= 0 or done >= total:
        return None
    return (total - done) / rate


def tree_rss_bytes() -> int:
    """Resident memory of this process and its children."""
    me = psutil.Process()
    total = 0
    for proc in [me, *me.children(recursive=True)]:
        try:
            total += proc.memory_info().rss
        except psutil.Error:
            pass
    return total


def lag_figures(plan: Checkpoint) -> dict[str, float | None]:
    """How far the table is behind the source: the age of the newest loaded event against
    the newest the source reported at the last look (seconds of event time), and when the
    last top-up (or first load) finished (epoch seconds)."""
    behind = None
    if plan.newest_ms is not None and plan.loaded_newest_ms is not None:
        behind = max(0, plan.newest_ms - plan.loaded_newest_ms) / 1000
    return {"lag_seconds": behind, "last_topup_timestamp_seconds": plan.topped_up_at}


class Progress:
    def __init__(self, config: Config, plan: Checkpoint, counters: SharedCounters, store: SegmentStore) -> None:
        self.config = config
        self.total = plan.total
        self.lag = lag_figures(plan)
        self.counters = counters
        self.store = store
        self.started = time.monotonic()
        self.last_line = self.started
        self.bar: Any = None
        if sys.stderr.isatty() and config.log_format == "text":
            self.bar = tqdm(total=self.total, unit="ev", unit_scale=True, desc="loaded", dynamic_ncols=True)

    def snapshot(self) -> dict[str, Any]:
        elapsed = max(time.monotonic() - self.started, 1e-6)
        counters = self.counters.snapshot()
        loaded = counters["events_loaded"]
        rate = loaded / elapsed
        return {
            "elapsed_s": round(elapsed, 1),
            "events_fetched": counters["events_fetched"],
            "events_loaded": loaded,
            "duplicates": counters["duplicates"],
            "rejected": counters["rejected"],
            "segments_loaded": counters["segments_loaded"],
            "events_per_s": round(rate, 1),
            "total": self.total,
            "eta_s": None if (eta := eta_seconds(loaded, self.total, rate)) is None else round(eta),
            "requests": counters["requests"],
            "http_429": counters["http_429"],
            "http_5xx": counters["http_5xx"],
            "retries": counters["retries"],
            "token_refreshes": counters["token_refreshes"],
            "cursor_refreshes": counters["cursor_refreshes"],
            "restarts": counters["restarts"],
            "segments": self.store.counts(),
            "checkpoint_lag_rows": max(0, counters["events_fetched"] - loaded),
            "rss_mb": round(tree_rss_bytes() / 1e6, 1),
            **self.lag,
        }

    def follow(self, plan: Checkpoint) -> None:
        """A top-up was planned or finished: count its events on top of what is loaded."""
        if plan.total is not None:
            self.total = self.counters.snapshot()["events_loaded"] + plan.total
            if self.bar is not None:
                self.bar.total = self.total
        self.lag = lag_figures(plan)

    def update(self) -> None:
        now = time.monotonic()
        if self.bar is not None:
            self.bar.update(self.counters.snapshot()["events_loaded"] - self.bar.n)
            return
        if now - self.last_line >= self.config.stats_interval:
            self.last_line = now
            logger.bind(stats=self.snapshot()).info("progress")

    def close(self) -> dict[str, Any]:
        summary = self.snapshot()
        if self.bar is not None:
            self.bar.update(summary["events_loaded"] - self.bar.n)
            self.bar.close()
        logger.bind(summary=summary).info(
            "summary: {} events loaded in {}s ({} events/s), {} requests, {} 429s",
            summary["events_loaded"],
            summary["elapsed_s"],
            summary["events_per_s"],
            summary["requests"],
            summary["http_429"],
        )
        return summary
