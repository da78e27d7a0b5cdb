"""flock locks of a data directory: who may change what, and when.

- `<state>.lock` (exclusive, held briefly): every read-modify-write of the checkpoint.
- `run.lock` (exclusive, for the supervisor's whole life): one run per data directory;
  `load`, `reset` and every other command that changes the state take it too.
- `workers.lock` (shared, for every fetcher's and loader's whole life): a new supervisor
  takes it exclusively (then lets it go) before it touches segments or the checkpoint, so
  children orphaned by a killed supervisor have all exited before anything is reconciled
  or fetched again.

flock locks vanish with their process, so nothing is ever left stale.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

RUN_LOCK = "run.lock"
WORKERS_LOCK = "workers.lock"


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """Exclusive lock beside `path`, shared by every process that rewrites it."""
    with open(path.with_name(path.name + ".lock"), "a+b") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def try_lock(path: Path, exclusive: bool, wait: bool = False) -> BinaryIO | None:
    """An open lock file holding the flock, or None when it is held elsewhere (and not
    `wait`). Closing the file (or exiting) releases the lock."""
    fh = open(path, "a+b")  # noqa: SIM115 (held until the caller closes it)
    flags = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | (0 if wait else fcntl.LOCK_NB)
    try:
        fcntl.flock(fh.fileno(), flags)
    except BlockingIOError:
        fh.close()
        return None
    except BaseException:
        fh.close()
        raise
    return fh


def hold_worker_lock(data_dir: Path) -> None:
    """Called first thing by a fetcher or loader process: holds `workers.lock` (shared)
    until the process is gone, so the lock can never be released while it still works.
    A bare descriptor, never closed: a Python file object would be closed (and the lock
    released) while the interpreter is still finalising, with the process still alive."""
    data_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(data_dir / WORKERS_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_SH)
