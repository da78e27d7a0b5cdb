"""The JSON checkpoint (`<data-dir>/ingestion.state`).

It records, per fetch partition, where fetching resumes: the cursor that follows the last
page of the last *sealed* segment. It is only ever replaced whole (temp file, fsync, rename,
directory fsync), so a crash leaves either the old or the new version, never a torn one.
Several fetcher processes update their own partition entries; a lock file serialises the
read-modify-write.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson

from ingest.durable import write_atomic
from ingest.locks import locked
from ingest.source.lanes import Lane, Mode

# 2: `mode` and `lane` (version 1 called both `source`). 3: the target, and what top-ups
# need (`source_total`, `rows_earlier`, `earlier_generations`, `loaded_newest_ms`, `topped_up_at`).
# 4: `page_size`. Older versions still resume: a version 2 state adopts the target of the
# first run that reads it; a state from before version 4 walks pages of DOCUMENTED_PAGE_CAP.
FORMAT_VERSION = 4
READABLE_VERSIONS = (1, 2, 3, 4)
# The page size the API documents as its cap (datasync-api.md section 3.1): what plans made
# before pages were sized by the probe walked with.
DOCUMENTED_PAGE_CAP = 5000


class CheckpointError(RuntimeError):
    """The state file exists but cannot be used (corrupt, or from another format)."""


@dataclass
class PartitionState:
    """One slice [lower_ms, upper_ms) of the event time range, walked newest to oldest."""

    index: int
    lane: Lane
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
    """The plan of the current epoch, and what earlier epochs leave behind.

    An epoch is a first load or a top-up: its partitions cover [oldest_ms, newest_ms]. A
    top-up of a drained state starts a new epoch (a new generation keeps segment ids unique,
    and the partition list stays short however many top-ups a data directory has seen); a
    top-up of an unfinished one adds its partitions to the epoch under way.
    """

    generation: str  # makes segment ids unique across epochs and data-dir resets
    mode: Mode
    total: int | None  # events the epoch's plan expects: meta.total, or its growth for a top-up
    newest_ms: int | None  # the newest event the plan covers (the top of its range)
    oldest_ms: int | None = None  # the plan's estimate of the oldest event (splits use it)
    partitions: list[PartitionState] = field(default_factory=list)
    target: dict[str, str] | None = None  # what the state belongs to (`Config.target`)
    source_total: int | None = None  # meta.total at the last look at the source
    rows_earlier: int = 0  # rows sealed by earlier epochs
    earlier_generations: list[str] = field(default_factory=list)  # theirs: `reset --drop-table` clears their ledger rows
    loaded_newest_ms: int | None = None  # every event up to this time is loaded
    topped_up_at: float | None = None  # when a top-up (or the first load) last finished
    page_size: int = DOCUMENTED_PAGE_CAP  # events a walk asks for per request: what the probe found the server serves
    version: int = FORMAT_VERSION
    updated_at: float = 0.0

    @property
    def drained(self) -> bool:
        return bool(self.partitions) and all(p.done for p in self.partitions)

    @property
    def rows(self) -> int:
        return self.rows_earlier + sum(p.rows for p in self.partitions)

    def walk_page_size(self, ceiling: int) -> int:
        """The page size walks ask for: the plan's, unless the user has lowered
        `--page-limit` since (it is a ceiling)."""
        return max(1, min(self.page_size, ceiling))

    def to_json(self) -> bytes:
        return orjson.dumps(asdict(self), option=orjson.OPT_INDENT_2)

    @classmethod
    def from_json(cls, data: bytes) -> Checkpoint:
        try:
            raw: dict[str, Any] = orjson.loads(data)
            if raw.get("version") not in READABLE_VERSIONS:
                raise CheckpointError(f"unsupported checkpoint format version {raw.get('version')!r}")
            if raw["version"] == 1:
                raw["mode"] = raw.pop("source")
                for part in raw["partitions"]:
                    part["lane"] = part.pop("source")
            if raw["version"] < 3:
                raw["source_total"] = raw["total"]
            raw["version"] = FORMAT_VERSION
            parts = [PartitionState(**p) for p in raw.pop("partitions")]
            return cls(partitions=parts, **raw)
        except (orjson.JSONDecodeError, TypeError, KeyError, AttributeError) as exc:
            raise CheckpointError(f"checkpoint is unreadable: {exc}") from None


def new_generation() -> str:
    return secrets.token_hex(4)


def read(path: Path) -> Checkpoint | None:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    return Checkpoint.from_json(data)


def write(path: Path, checkpoint: Checkpoint) -> None:
    checkpoint.updated_at = time.time()
    write_atomic(path, checkpoint.to_json())


def walk_page_size_at(path: Path, ceiling: int) -> int:
    """The page size of the plan at `path` (see `Checkpoint.walk_page_size`); a missing or
    unreadable state gives the documented cap, within the ceiling."""
    try:
        state = read(path)
    except CheckpointError:
        state = None
    return state.walk_page_size(ceiling) if state is not None else max(1, min(DOCUMENTED_PAGE_CAP, ceiling))


def update_partition(path: Path, index: int, change: Callable[[PartitionState], None]) -> Checkpoint:
    """Read, apply `change` to one partition, write back; under the lock."""
    with locked(path):
        checkpoint = read(path)
        if checkpoint is None:
            raise CheckpointError(f"{path} disappeared while fetching")
        change(checkpoint.partitions[index])
        write(path, checkpoint)
        return checkpoint
