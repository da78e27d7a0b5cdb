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

# 2: `mode` and `lane` (version 1 called both `source`); version 1 still resumes.
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)


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
    generation: str  # makes segment ids unique across data-dir resets
    mode: Mode
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
            if raw.get("version") not in READABLE_VERSIONS:
                raise CheckpointError(f"unsupported checkpoint format version {raw.get('version')!r}")
            if raw["version"] == 1:
                raw["mode"] = raw.pop("source")
                for part in raw["partitions"]:
                    part["lane"] = part.pop("source")
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


def update_partition(path: Path, index: int, change: Callable[[PartitionState], None]) -> Checkpoint:
    """Read, apply `change` to one partition, write back; under the lock."""
    with locked(path):
        checkpoint = read(path)
        if checkpoint is None:
            raise CheckpointError(f"{path} disappeared while fetching")
        change(checkpoint.partitions[index])
        write(path, checkpoint)
        return checkpoint
