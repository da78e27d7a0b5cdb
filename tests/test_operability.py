"""What an operator sees of a run: the bar on a terminal, JSON stats when piped, the
metrics endpoint moving, status and verify."""

from __future__ import annotations

import json
import re
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import psycopg2
import pytest
import requests

from ingest import locks
from ingest.simulator import SimulatorConfig, start_simulator
from ingest.sink import db
from ingest.sink.db import EmbeddedPostgres
from tests.e2e import PROGRAM, ingest_env, on_a_terminal, run_to_end, start_run, wait_for


@pytest.fixture
def slow_simulator() -> Iterator[Any]:
    """Paced by rate limits, so a run lasts long enough to be watched."""
    sim = start_simulator(
        SimulatorConfig(events=30_000, latency="realistic", rate_limits=True, chaos="none", time_scale=60.0)
    )
    try:
        yield sim
    finally:
        sim.stop()


def paced_env(sim: Any, dsn: str, data_dir: Path, **extra: Any) -> dict[str, str]:
    return ingest_env(sim, dsn, data_dir, INGEST_PAGE_LIMIT=1000, **extra)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def metric(text: str, name: str) -> float:
    match = re.search(rf"^{name} ([0-9.e+]+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def test_metrics_move_during_a_run(slow_simulator: Any, pg_dsn: str, data_dir: Path) -> None:
    port = free_port()
    run = start_run(paced_env(slow_simulator, pg_dsn, data_dir, INGEST_METRICS_PORT=port), data_dir / "run.log")
    url = f"http://127.0.0.1:{port}"
    seen: list[float] = []
    states: set[str] = set()

    def scrape() -> bool:
        try:
            text = requests.get(f"{url}/metrics", timeout=5).text
            states.add(requests.get(f"{url}/health", timeout=5).json()["status"])
        except requests.RequestException:
            return run.process.poll() is not None
        value = metric(text, "datasync_events_fetched_total")
        if not seen or value > seen[-1]:
            seen.append(value)
        return len(seen) >= 3 or run.process.poll() is not None

    try:
        wait_for(scrape, timeout=180, what="the fetched counter to move")
        assert run.wait(180) == 0, run.log[-2000:]
    finally:
        run.kill_group()
    assert len(seen) >= 3 and seen[-1] > seen[0] >= 0
    assert "fetching" in states


def test_json_stats_lines_when_piped(slow_simulator: Any, pg_dsn: str, data_dir: Path) -> None:
    code, log = run_to_end(paced_env(slow_simulator, pg_dsn, data_dir, INGEST_STATS_INTERVAL=0.5), data_dir / "r.log")
    assert code == 0, log[-2000:]
    records = [orjson.loads(line) for line in log.splitlines() if line.startswith("{")]
    stats = [r["stats"] for r in records if "stats" in r]
    assert stats, "no stats line"
    for key in ("events_fetched", "events_loaded", "events_per_s", "requests", "http_429", "segments", "rss_mb"):
        assert key in stats[-1], key
    summary = next(r["summary"] for r in records if "summary" in r)
    assert summary["events_loaded"] == 30_000


def test_progress_bar_on_a_terminal(slow_simulator: Any, pg_dsn: str, data_dir: Path) -> None:
    env = paced_env(slow_simulator, pg_dsn, data_dir)
    env["INGEST_LOG_FORMAT"] = "text"
    code, text = on_a_terminal(PROGRAM, env)  # 120 columns
    assert code == 0, text[-2000:]
    assert "loaded:" in text and "ev/s" in text and "30.0k/30.0k" in text, text[-3000:]


def test_status_and_verify_after_a_run(pg_dsn: str, data_dir: Path) -> None:
    sim = start_simulator(SimulatorConfig(events=8_000, latency="none", rate_limits=False, chaos="none"))
    try:
        env = ingest_env(sim, pg_dsn, data_dir)
        code, log = run_to_end(env, data_dir / "run.log")
        assert code == 0, log[-2000:]
        status = subprocess.run([*PROGRAM, "status"], env=env, capture_output=True, check=True)
        report = json.loads(status.stdout)
        assert report["checkpoint"]["drained"] is True
        assert report["database"]["events"] == 8_000 and report["segments"]["ready"] == 0
        verify = subprocess.run([*PROGRAM, "verify"], env=env, capture_output=True)
        assert verify.returncode == 0, verify.stderr[-2000:]
        assert json.loads(verify.stdout)["match"] is True
        with psycopg2.connect(pg_dsn) as conn, conn.cursor() as cur:
            cur.execute("DELETE FROM events WHERE id IN (SELECT id FROM events LIMIT 3)")
        verify = subprocess.run([*PROGRAM, "verify"], env=env, capture_output=True)
        assert verify.returncode == 1
        result = json.loads(verify.stdout)
        assert result["match"] is False and result["missing"] == 3 and len(result["missing_sample"]) == 3
    finally:
        sim.stop()


def test_status_and_verify_leave_the_embedded_database_of_a_run_running(data_dir: Path) -> None:
    """While a run holds the lock, the server in <data-dir>/pg is the run's: status and
    verify attach to it and must not stop it when they are done, as a command that started
    the server itself does."""
    server = EmbeddedPostgres.start(data_dir / "pg")  # as the run started it
    held = locks.try_lock(data_dir / locks.RUN_LOCK, exclusive=True)  # as the run holds it
    sim = start_simulator(SimulatorConfig(events=3_000, latency="none", rate_limits=False, chaos="none"))
    try:
        assert held is not None
        with psycopg2.connect(server.dsn) as conn:
            db.ensure_schema(conn, "events")
        env = ingest_env(sim, "", data_dir)
        status = subprocess.run([*PROGRAM, "status", "--format", "json"], env=env, capture_output=True)
        assert status.returncode == 0 and "error" not in json.loads(status.stdout)["database"], status.stdout
        with psycopg2.connect(server.dsn):
            pass  # still up
        verify = subprocess.run([*PROGRAM, "verify"], env=env, capture_output=True)
        assert verify.returncode == 1 and json.loads(verify.stdout)["missing"] == 3_000, verify.stderr[-2000:]
        with psycopg2.connect(server.dsn):
            pass
    finally:
        sim.stop()
        if held is not None:
            held.close()
        server.stop()
