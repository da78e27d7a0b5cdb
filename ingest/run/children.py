"""The child processes of a run: one start-up for every kind; the bodies are in
`fetching` and `loading`.

Start-up is where exactly-once meets process life. A child ignores the signals meant for
its process group (the supervisor turns them into stop requests), holds `workers.lock`
shared until it is gone (a new supervisor waits for orphans of a killed one), and treats a
parent that died as a stop request. Written once here, so a fetcher and a loader can never
disagree about it. This module imports neither the source nor the sink: a spawned child
imports only its own body's side (a loader has no HTTP stack, a fetcher no database
driver), which is a fifth of each process's memory.
"""

from __future__ import annotations

import ctypes
import multiprocessing as mp
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from loguru import logger

from ingest.config import Config
from ingest.counters import SharedCounters
from ingest.locks import hold_worker_lock
from ingest.logs import configure_logging
from ingest.run.exits import ChildExit
from ingest.waits import wait_for

Kind = Literal["fetcher", "loader"]

@dataclass
class Child:
    """What a body gets from start-up: how to know it should stop, how to wait, where
    its counts and its one-line fatal reason go."""

    config: Config
    should_stop: Callable[[], bool]
    wait: Callable[[float], bool]  # True when a stop was requested meanwhile
    counters: SharedCounters
    errors: Any  # a queue the supervisor reads for its final message

    def report(self, reason: str) -> None:
        logger.error(reason)
        self.errors.put(reason)


Body = Callable[..., ChildExit]

# glibc's malloc, tuned for a process that allocates and frees megabyte pages from several
# threads: by default each thread gets an arena of its own that keeps what it once held,
# and after the first large free, blocks of a page's size come from those arenas instead of
# their own mappings, so a fetcher's footprint only grows. Two arenas, and every block of
# MMAP_THRESHOLD_BYTES or more in a mapping of its own, returned to the system when freed.
M_ARENA_MAX, M_MMAP_THRESHOLD = -8, -3
ARENAS = 2
MMAP_THRESHOLD_BYTES = 256 << 10


def tune_malloc() -> bool:
    """True when the C library took the settings (glibc); elsewhere nothing changes."""
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_ARENA_MAX, ARENAS)) and bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))


def child_main(kind: Kind, key: int, body: Body, config: Config, stop_event: Any, counters: SharedCounters,
               errors: Any, *args: Any) -> None:
    """Every child's process entry point (spawn-safe): start-up, then `body(child, *args)`,
    whose ChildExit becomes the exit code."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    tune_malloc()  # before any thread or page exists
    configure_logging(config.log_format, config.log_level, config.secrets(), process=f"{kind}-{key}")
    # The pid the parent had when it started us (os.getppid() now could already be init's).
    spawner = mp.parent_process()
    parent = spawner.pid if spawner is not None and spawner.pid is not None else os.getppid()
    hold_worker_lock(config.data_dir)  # a new supervisor waits until we are gone
    if os.getppid() != parent:
        sys.exit(ChildExit.DONE)  # orphaned before we began: leave everything to the next run

    def should_stop() -> bool:
        return bool(stop_event.is_set()) or os.getppid() != parent

    def wait(seconds: float) -> bool:
        return wait_for(seconds, should_stop, nap=stop_event.wait)

    sys.exit(body(Child(config, should_stop, wait, counters, errors), *args))


def start(ctx: Any, kind: Kind, key: int, body: Body, config: Config, stop_event: Any, counters: SharedCounters,
          errors: Any, *args: Any) -> Any:
    """A started child process; `counters` gets a row of its own."""
    process = ctx.Process(
        target=child_main,
        args=(kind, key, body, config, stop_event, counters.for_child(), errors, *args),
        name=f"{kind}-{key}",
    )
    process.start()
    return process
