"""The truth file: what a correct client must end with, written by `simulate --truth-file`.

Format (text, UTF-8): the first line is a JSON header
`{"format": "datasync-simulator-truth/1", "total": N, "unstorable": K, "storable": M}`,
then the M storable event ids, one per line. Plain lines keep it streamable at 3,000,000
ids and easy to diff against `SELECT id FROM events`.

The file holds the static dataset, written before serving starts. Live arrivals cross
processes as text of the same shape, served by the child at `/_sim/arrivals` (header
`{"format": "datasync-simulator-arrivals/1", "arrived": A, "unstorable": K, "storable": M,
"clock": T}`, then the arrivals' storable ids): the handle adds them to the file's truth.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ingest.simulator.arrivals import Snapshot
from ingest.simulator.dataset import Dataset, Truth

TRUTH_FORMAT = "datasync-simulator-truth/1"
ARRIVALS_FORMAT = "datasync-simulator-arrivals/1"


def write_truth_file(path: str | os.PathLike[str], dataset: Dataset) -> None:
    """Write atomically (temp file + rename), so a reader never sees half a file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    storable = len(dataset) - len(dataset.unstorable)
    header = {"format": TRUTH_FORMAT, "total": len(dataset), "unstorable": len(dataset.unstorable),
              "storable": storable}
    with open(tmp, "w", encoding="utf-8") as out:
        out.write(json.dumps(header) + "\n")
        batch: list[str] = []
        for event_id in dataset.storable_id_iter():
            batch.append(event_id)
            if len(batch) >= 100_000:
                out.write("\n".join(batch) + "\n")
                batch.clear()
        if batch:
            out.write("\n".join(batch) + "\n")
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)


def read_truth_file(path: str | os.PathLike[str]) -> Truth:
    with open(path, encoding="utf-8") as src:
        header = json.loads(src.readline())
        if header.get("format") != TRUTH_FORMAT:
            raise ValueError(f"{path}: not a simulator truth file")
        ids = frozenset(line.rstrip("\n") for line in src if line.strip())
    if len(ids) != header["storable"]:
        raise ValueError(f"{path}: expected {header['storable']} ids, found {len(ids)}")
    return Truth(ids, int(header["unstorable"]), int(header["total"]))


def arrivals_text(snapshot: Snapshot | None) -> bytes:
    """The arrivals of a snapshot (None: a static dataset, nothing arrives) as sent by the child."""
    ids = list(snapshot.arrival_ids()) if snapshot else []
    header = {"format": ARRIVALS_FORMAT, "arrived": snapshot.count if snapshot else 0,
              "unstorable": snapshot.arrivals_unstorable if snapshot else 0, "storable": len(ids),
              "clock": snapshot.clock if snapshot else None}
    return (json.dumps(header) + "\n" + "".join(event_id + "\n" for event_id in ids)).encode()


def with_arrivals(base: Truth, text: str) -> Truth:
    """The static truth `base` (from the truth file) plus the arrivals in `text`."""
    lines = text.splitlines()
    header = json.loads(lines[0])
    if header.get("format") != ARRIVALS_FORMAT:
        raise ValueError("not a simulator arrivals snapshot")
    ids = frozenset(line for line in lines[1:] if line)
    if len(ids) != header["storable"]:
        raise ValueError(f"arrivals: expected {header['storable']} ids, found {len(ids)}")
    return Truth(base.storable_ids | ids, base.unstorable + int(header["unstorable"]),
                 base.total + int(header["arrived"]), int(header["arrived"]), header["clock"])
