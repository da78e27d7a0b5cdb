"""Files that survive a crash or a power cut: the two primitives every state change uses.

A state change is durable when the renamed file's data and the directory entry that names
it are both on disk. The checkpoint (a whole-file replace) and the segment folders (one
rename per transition) are built on these two functions and nothing else.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Make the directory's entries (a rename into or out of it) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """temp file + fsync + rename + directory fsync. On failure (a full disk) the old file
    stays as it was and no half-written temp file is left behind."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
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
