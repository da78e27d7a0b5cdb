"""The JSON checkpoint (`<data-dir>/ingestion.state`).

It records, per fetch partition, where fetching resumes: the cursor that follows the last
page of the last *sealed* segment. It is only ever replaced whole (temp file, fsync, rename,
directory fsync), so a crash leaves either the old or the new version, never a torn one.
Several fetcher processes update their own partition entries; a lock file serialises the
read-modify-write.
"""

from __future__ import annotations

import fcntl
import os
import secrets
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import orjson

FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """The state file exists but cannot be used (corrupt, or from another format)."""


@dataclass
class PartitionState:
    """One slice [lower_ms, upper_ms) of the event time range, walked newest to oldest."""

    index: int
    source: str  # the lane: "feed", "events" or "events_query"
    lower_ms: int
    upper_ms: int
    cursor: str | None = None  # the API cursor after the last sealed page; None: start at upper_ms
    done: bool = False
    next_seq: int = 1
    last_sealed: str | None = None
    rows: int = 0  # rows sealed into segments (events and rejects)
    pages: int = 0


@dataclass
class Checkpoint:
    generation: str  # makes segment ids unique across data-dir resets
    source: str  # the source mode the plan was made for: feed, events or mixed
    total: int | None  # meta.total reported by the API
    newest_ms: int | None
    oldest_ms: int | None = None  # the plan's estimate of the oldest event (splits use it)
    partitions: list[PartitionState] = field(default_factory=list)
    version: int = FORMAT_VERSION
    updated_at: float = 0.0

    @property
    def drained(self) -> bool:
        return bool(self.partitions) and all(p.done for p in self.partitions)

    @property
    def rows(self) -> int:
        return sum(p.rows for p in self.partitions)

    def to_json(self) -> bytes:
        return orjson.dumps(asdict(self), option=orjson.OPT_INDENT_2)

    @classmethod
    def from_json(cls, data: bytes) -> Checkpoint:
        try:
            raw: dict[str, Any] = orjson.loads(data)
            if raw.get("version") != FORMAT_VERSION:
                raise CheckpointError(f"unsupported checkpoint format version {raw.get('version')!r}")
            parts = [PartitionState(**p) for p in raw.pop("partitions")]
            return cls(partitions=parts, **raw)
        except (orjson.JSONDecodeError, TypeError, KeyError, AttributeError) as exc:
            raise CheckpointError(f"checkpoint is unreadable: {exc}") from None


def new_generation() -> str:
    return secrets.token_hex(4)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """temp file + fsync + rename + directory fsync. On failure (a full disk) the old file
    stays as it was and no half-written temp file is left behind."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def read(path: Path) -> Checkpoint | None:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    return Checkpoint.from_json(data)


def write(path: Path, checkpoint: Checkpoint) -> None:
    checkpoint.updated_at = time.time()
    write_atomic(path, checkpoint.to_json())


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """Exclusive lock shared by every process that rewrites the checkpoint."""
    with open(path.with_name(path.name + ".lock"), "a+b") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


# ---------------------------------------------------------------------------------------
# One run per data directory
#
# The supervisor holds `run.lock` exclusively for its whole life. Every fetcher and loader
# holds `workers.lock` shared for its whole life. A new supervisor takes `workers.lock`
# exclusively (then lets it go) before it touches segments or the checkpoint, so children
# orphaned by a killed supervisor have all exited before anything is reconciled or
# fetched again. flock locks vanish with their process, so nothing is ever left stale.

RUN_LOCK = "run.lock"
WORKERS_LOCK = "workers.lock"


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


def update_partition(path: Path, index: int, change: Callable[[PartitionState], None]) -> Checkpoint:
    """Read, apply `change` to one partition, write back; under the lock."""
    with locked(path):
        checkpoint = read(path)
        if checkpoint is None:
            raise CheckpointError(f"{path} disappeared while fetching")
        change(checkpoint.partitions[index])
        write(path, checkpoint)
        return checkpoint
