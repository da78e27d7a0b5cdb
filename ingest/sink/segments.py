r"""The segment state machine: the folders are the state, each transition is one rename.

    open/ --seal--> ready/ --claim--> loading/ --retire--> loaded/ (or deleted)
                                         |  \--requeue--> ready/
                                         \--reject--> rejected/

A rename within one file system is atomic, so a crash leaves every segment in exactly
one folder, and two loaders renaming the same file cannot both succeed. Each rename is
followed by an fsync of the directories involved so the new state survives power loss.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal, NamedTuple, get_args

from ingest.durable import fsync_dir

State = Literal["open", "ready", "loading", "loaded", "rejected"]  # a folder of the store
STATES: tuple[State, ...] = get_args(State)
SUFFIX = ".tsv"
LINES_SUFFIX = ".lines.tsv"  # rejected/<id>.lines.tsv: single lines COPY refused (operators' copy)


def segment_id(partition: int, seq: int, generation: str) -> str:
    """`p00-00000001-3fa9c2d1`: sorts by partition then fetch order; no dots (see `id_of`)."""
    return f"p{partition:02d}-{seq:08d}-{generation}"


def id_of(path: Path) -> str:
    """The segment id of any file in the store (`<id>.tsv`, `<id>.<pid>.tsv`, `<id>.reason`)."""
    return path.name.split(".", 1)[0]


def _move(src: Path, dst: Path) -> None:
    """One transition: rename, then make both directory entries durable."""
    os.rename(src, dst)
    fsync_dir(dst.parent)
    if src.parent != dst.parent:
        fsync_dir(src.parent)


class SegmentStore:
    """`<data-dir>/segments/` and its five state folders."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.open = self.root / "open"
        self.ready = self.root / "ready"
        self.loading = self.root / "loading"
        self.loaded = self.root / "loaded"
        self.rejected = self.root / "rejected"

    def folder(self, state: State) -> Path:
        return self.root / state

    def ensure(self) -> None:
        for state in STATES:
            self.folder(state).mkdir(parents=True, exist_ok=True)

    def segments(self, state: State) -> list[Path]:
        """Segment files in a state, in name (fetch) order; side files excluded."""
        with os.scandir(self.folder(state)) as entries:
            names = sorted(e.name for e in entries if e.name.endswith(SUFFIX) and not e.name.endswith(LINES_SUFFIX))
        return [self.folder(state) / n for n in names]

    def ready_bytes(self) -> int:
        """Bytes waiting for loaders: what fetchers' back-pressure is measured in."""
        total = 0
        with os.scandir(self.ready) as entries:
            for entry in entries:
                try:
                    total += entry.stat().st_size
                except FileNotFoundError:  # claimed meanwhile
                    pass
        return total

    def counts(self) -> dict[str, int]:
        return {state: len(self.segments(state)) for state in STATES}


# ---------------------------------------------------------------------------------------
# Writing: open/ -> ready/


class RotationLimits(NamedTuple):
    max_rows: int
    max_bytes: int
    max_age: float


def rotation_due(rows: int, size: int, age: float, limits: RotationLimits) -> bool:
    """Seal when any limit is reached; an empty segment is never due."""
    return rows > 0 and (rows >= limits.max_rows or size >= limits.max_bytes or age >= limits.max_age)


class SegmentWriter:
    """Appends a partition's lines to `open/<id>.tsv` and seals it into ready/.

    The file is opened on the first append, so `seq` only advances for segments that
    hold rows and an idle fetcher leaves nothing behind.
    """

    def __init__(
        self,
        store: SegmentStore,
        partition: int,
        generation: str,
        next_seq: int,
        max_rows: int,
        max_bytes: int,
        max_age: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.partition = partition
        self.generation = generation
        self.next_seq = next_seq
        self.limits = RotationLimits(max_rows, max_bytes, max_age)
        self.clock = clock
        self.rows = 0
        self.size = 0
        self._file: BinaryIO | None = None
        self._started = 0.0

    @property
    def current_id(self) -> str:
        return segment_id(self.partition, self.next_seq, self.generation)

    @property
    def _open_path(self) -> Path:
        return self.store.open / f"{self.current_id}{SUFFIX}"

    def append(self, data: bytes, rows: int) -> None:
        if not data:
            return
        if self._file is None:
            self._file = open(self._open_path, "wb", buffering=1 << 20)  # noqa: SIM115 (lives until seal)
            self._started = self.clock()
        self._file.write(data)
        self.rows += rows
        self.size += len(data)

    def age(self) -> float:
        return self.clock() - self._started if self._file is not None else 0.0

    def due(self) -> bool:
        return rotation_due(self.rows, self.size, self.age(), self.limits)

    def seal(self) -> str | None:
        """Make the open segment durable and hand it to loaders; its id, or None if empty."""
        if self._file is None:
            return None
        sealed = self.current_id
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        _move(self._open_path, self.store.ready / f"{sealed}{SUFFIX}")
        self.next_seq += 1
        self.rows = self.size = 0
        return sealed

    def abort(self) -> None:
        """Drop the open segment; its events are fetched again from the checkpoint."""
        if self._file is None:
            return
        try:
            self._file.close()
        except OSError:  # a full disk cannot take the buffered rest: dropped with the file
            pass
        self._file = None
        self._open_path.unlink(missing_ok=True)
        self.rows = self.size = 0


# ---------------------------------------------------------------------------------------
# Loading side: ready/ -> loading/ -> loaded/ | deleted | rejected/


def claim(store: SegmentStore, pid: int) -> Path | None:
    """Take the first ready segment; losing a race to another loader means trying the next."""
    for path in store.segments("ready"):
        target = store.loading / f"{id_of(path)}.{pid}{SUFFIX}"
        try:
            _move(path, target)
        except FileNotFoundError:
            continue
        return target
    return None


def retire(store: SegmentStore, loading_path: Path, keep: bool) -> None:
    """After the ledger commit (from loading/, or ready/ at reconcile): keep the file in loaded/ (--keep-segments) or delete it."""
    if keep:
        _move(loading_path, store.loaded / f"{id_of(loading_path)}{SUFFIX}")
    else:
        loading_path.unlink()
        fsync_dir(loading_path.parent)


def requeue(store: SegmentStore, loading_path: Path) -> None:
    """A claimed segment that was not loaded goes back to ready/ (pid suffix dropped)."""
    _move(loading_path, store.ready / f"{id_of(loading_path)}{SUFFIX}")


def release(store: SegmentStore, pid: int) -> int:
    """Requeue what a dead loader had claimed (`loading/<id>.<pid>.tsv`); how many.

    Safe whatever the loader got to: its transaction either committed (the next claim
    finds the ledger row and only retires the file) or died with its connection.
    """
    released = 0
    for path in store.segments("loading"):
        if path.name.endswith(f".{pid}{SUFFIX}"):
            try:
                requeue(store, path)
            except FileNotFoundError:
                continue
            released += 1
    return released


def reject(store: SegmentStore, path: Path, reason: str) -> None:
    """A segment that cannot be loaded at all: the reason file first, then the rename."""
    seg = id_of(path)
    reason_path = store.rejected / f"{seg}.reason"
    with open(reason_path, "w", encoding="utf-8") as f:
        f.write(reason.rstrip("\n") + "\n")
        f.flush()
        os.fsync(f.fileno())
    _move(path, store.rejected / f"{seg}{SUFFIX}")


# ---------------------------------------------------------------------------------------
# Start-up reconciliation against the ledger

Reconcile = Literal["discard", "keep", "retire", "requeue"]

_RECONCILE: dict[tuple[State, bool], Reconcile] = {
    ("open", False): "discard",
    ("open", True): "discard",
    ("ready", False): "keep",
    ("ready", True): "retire",
    ("loading", False): "requeue",
    ("loading", True): "retire",
    ("loaded", False): "keep",
    ("loaded", True): "keep",
    ("rejected", False): "keep",
    ("rejected", True): "keep",
}


def reconcile_action(state: State, in_ledger: bool) -> Reconcile:
    """What start-up does with a segment: the ledger (committed with the rows) is the truth.

    open/ files are discarded even if a same-named segment was loaded: their events are
    fetched again from the checkpoint, which never points past an unsealed segment.
    """
    return _RECONCILE[(state, in_ledger)]


@dataclass
class ReconcileReport:
    retired: int = 0
    requeued: int = 0
    discarded: int = 0
    kept: int = 0


def reconcile(store: SegmentStore, ledger: set[str], keep: bool = False) -> ReconcileReport:
    """Heal what crashes left behind. Run only while no fetcher or loader is running."""
    store.ensure()
    report = ReconcileReport()
    unsettled: tuple[State, ...] = ("open", "ready", "loading")
    for state in unsettled:
        for path in store.segments(state):
            action = reconcile_action(state, id_of(path) in ledger)
            if action == "retire":
                retire(store, path, keep)
                report.retired += 1
            elif action == "requeue":
                requeue(store, path)
                report.requeued += 1
            elif action == "discard":
                path.unlink()
                fsync_dir(path.parent)
                report.discarded += 1
            else:
                report.kept += 1
    return report
