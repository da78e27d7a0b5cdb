"""Helpers for end-to-end tests: run the real program against the simulator and a real
PostgreSQL, wait on conditions, and compare the final table with the simulator's truth."""

from __future__ import annotations

import fcntl
import os
import pty
import signal
import struct
import subprocess
import termios
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg2

from ingest.source import checkpoint

REPO = Path(__file__).resolve().parents[1]
PROGRAM = [str(REPO / "bin" / "datasync-ingest")]


def ingest_env(sim: Any, dsn: str, data_dir: Path, **extra: Any) -> dict[str, str]:
    """Environment for one `datasync-ingest` run against `sim`, loading into `dsn`. A
    simulator without rate limits is a source without limits, and gets the user's flag for
    one (`--pacing off`); one with limits gets no pacing flag at all: the run learns its
    window from the API, at whatever time scale."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("INGEST_", "DATASYNC_", "DATABASE_URL_FILE"))}
    env.update(
        DATASYNC_API_URL=sim.base_url,
        DATASYNC_API_KEY=sim.api_key,
        DATABASE_URL=dsn,
        INGEST_DATA_DIR=str(data_dir),
        INGEST_LOG_FORMAT="json",
        INGEST_WORKERS="2",
        INGEST_STATS_INTERVAL="1",
    )
    if not getattr(getattr(sim, "config", None), "rate_limits", True):
        env["INGEST_PACING"] = "off"
    env.update({k: str(v) for k, v in extra.items()})
    return env


@dataclass
class Run:
    process: subprocess.Popen[bytes]
    log_path: Path

    def wait(self, timeout: float = 300) -> int:
        return self.process.wait(timeout)

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill_group(self, signum: int = signal.SIGKILL) -> None:
        try:
            os.killpg(self.process.pid, signum)
        except ProcessLookupError:
            pass


def start_run(env: dict[str, str], log_path: Path, *args: str) -> Run:
    """Start the program in its own process group (so a test can kill the whole group)."""
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            [*PROGRAM, *args], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    return Run(process, log_path)


def run_to_end(env: dict[str, str], log_path: Path, *args: str, timeout: float = 300) -> tuple[int, str]:
    run = start_run(env, log_path, *args)
    try:
        code = run.wait(timeout)
    finally:
        run.kill_group()
    return code, run.log


def wait_for(condition: Callable[[], bool], timeout: float = 120, what: str = "condition") -> None:
    """Poll a condition; the poll interval is short, the deadline generous (loaded CI)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def loaded_segments(dsn: str) -> int:
    try:
        with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM ingest_segments")
            return int(cur.fetchone()[0])
    except psycopg2.Error:
        return 0


def fetched_rows(data_dir: Path) -> int:
    try:
        state = checkpoint.read(data_dir / "ingestion.state")
    except checkpoint.CheckpointError:
        return 0
    return state.rows if state else 0


def table_ids(dsn: str, table: str = "events") -> list[str]:
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute(f'SELECT id FROM "{table}"')
        return [row[0] for row in cur.fetchall()]


def reject_count(dsn: str) -> int:
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM ingest_rejects")
        return int(cur.fetchone()[0])


def assert_exact(dsn: str, truth: Any, table: str = "events") -> None:
    """Every storable id exactly once, nothing else (the primary key forbids repeats, so
    equal counts and equal sets prove it)."""
    ids = table_ids(dsn, table)
    assert len(ids) == len(set(ids))
    missing = truth.storable_ids - set(ids)
    extra = set(ids) - truth.storable_ids
    assert not missing and not extra, f"{len(missing)} missing (e.g. {sorted(missing)[:3]}), {len(extra)} extra"
    assert len(ids) == len(truth.storable_ids)


def files_under(path: Path) -> Iterator[Path]:
    for item in path.rglob("*"):
        if item.is_file() and "pg" not in item.relative_to(path).parts[:1]:
            yield item


def assert_no_secrets(secrets: list[str], dsn: str, data_dir: Path, *logs: str) -> None:
    """No log, state file, segment or reject holds a secret."""
    for secret in secrets:
        for text in logs:
            assert secret not in text, "a secret appears in the log"
        for item in files_under(data_dir):
            assert secret.encode() not in item.read_bytes(), f"a secret appears in {item}"
        with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM ingest_rejects WHERE raw LIKE %s OR reason LIKE %s", (f"%{secret}%",) * 2)
            assert cur.fetchone()[0] == 0, "a secret appears in ingest_rejects"


class NoApi:
    """Stands in for a simulator where the API is unreachable: nothing listens there."""

    base_url = "http://127.0.0.1:9/api/v1"
    api_key = "ds_" + "1" * 32


def command(env: dict[str, str], name: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """One `datasync-ingest NAME ...` without a terminal, as a script or cron would run it."""
    return subprocess.run([*PROGRAM, name, *args], env=env, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=timeout)


def problem_lines(result: subprocess.CompletedProcess[str]) -> list[str]:
    """stderr without log records (JSON lines): the one line per problem, nothing else."""
    return [line for line in result.stderr.splitlines() if not line.startswith("{")]


def on_a_terminal(argv: list[str], env: dict[str, str], answers: dict[bytes, bytes] | None = None,
                  columns: int = 120) -> tuple[int, str]:
    """Run `argv` on a pseudo-terminal, typing each answer once its prompt shows; the exit
    code and everything the terminal showed."""
    primary, secondary = pty.openpty()
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
    process = subprocess.Popen(argv, env=env, stdin=secondary, stdout=secondary, stderr=secondary)
    os.close(secondary)
    output = bytearray()
    pending = dict(answers or {})
    while True:
        try:
            chunk = os.read(primary, 65536)
        except OSError:  # the terminal closed: the program exited
            break
        if not chunk:
            break
        output.extend(chunk)
        for prompt in [p for p in pending if p in output]:
            os.write(primary, pending.pop(prompt))
    os.close(primary)
    return process.wait(60), output.decode(errors="replace")
