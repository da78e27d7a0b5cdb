"""A data directory as the operator's commands see it: who is working in it, what state it
holds, and the database a command may look at while a run may be using it.

`load` and `reset` change the state, so like a run they hold `run.lock` for as long as they
work, and, like a run, they do nothing while fetchers or loaders orphaned by a killed
supervisor still hold `workers.lock` (see `ingest.locks`). `check` only asks, and never
creates the lock file it asks about.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ingest import locks
from ingest.config import Config
from ingest.sink import db


class Busy(RuntimeError):
    """Someone else works in the data directory; the message is the one line to show."""


@contextmanager
def holding(data_dir: Path) -> Iterator[None]:
    """`run.lock` held for the duration, once no orphaned worker is left. The directory must
    exist (a command that may create it does so first)."""
    run_lock = locks.try_lock(data_dir / locks.RUN_LOCK, exclusive=True)
    if run_lock is None:
        raise Busy(f"a datasync-ingest run is using {data_dir}; stop it first")
    try:
        workers = locks.try_lock(data_dir / locks.WORKERS_LOCK, exclusive=True)
        if workers is None:
            raise Busy(f"processes of a previous run still work in {data_dir}; wait until they exit")
        workers.close()  # children we start take it shared; holding run.lock keeps runs out
        yield
    finally:
        run_lock.close()


def run_in_progress(data_dir: Path) -> bool:
    """Whether a run holds `run.lock` now. No lock file means no run ever held it here, and
    none is created: opening an existing file to try the lock writes nothing."""
    path = data_dir / locks.RUN_LOCK
    if not path.is_file():
        return False
    probe = locks.try_lock(path, exclusive=False)
    if probe is None:
        return True
    probe.close()
    return False


def embedded_initialised(config: Config) -> bool:
    """Whether `<data-dir>/pg` holds a PostgreSQL cluster (initdb writes PG_VERSION)."""
    return (config.pg_dir / "PG_VERSION").is_file()


@contextmanager
def database_to_read(config: Config) -> Iterator[str]:
    """The DSN for a command that only reads (status, verify): an embedded database that
    was never created is not created for a look at it."""
    if not config.database_url and not embedded_initialised(config):
        raise db.DatabaseError(f"no embedded database in {config.pg_dir}: nothing was loaded with this data directory")
    with db.database(config) as dsn:
        yield dsn
