"""Repeated runs on one data directory, as a batch host makes them: top-ups of what the
source gained, `run --follow`, and the guard against a changed target. The real program,
the simulator over loopback HTTP (live, with arrivals, where the case needs them) and a
real PostgreSQL."""

from __future__ import annotations

import random
import signal
import socket
import threading
import uuid
from pathlib import Path
from typing import Any

import orjson
import psycopg2
import pytest
import requests

from ingest.sink.db import dsn_for_database
from ingest.source import checkpoint
from tests.e2e import assert_exact, fetched_rows, ingest_env, run_to_end, start_run, table_ids, wait_for


def summary_of(log: str) -> dict[str, Any]:
    for line in reversed(log.splitlines()):
        if '"summary"' in line:
            return dict(orjson.loads(line)["summary"])
    raise AssertionError("no summary line in the log")


def error_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if '"ERROR"' in line or "| ERROR" in line]


def tables_in(dsn: str) -> set[str]:
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        return {row[0] for row in cur.fetchall()}


def requests_served(sim: Any) -> int:
    return sum(sim.stats()["requests"].values())


@pytest.mark.sim(events=5_000)
def test_a_second_run_on_a_drained_directory_costs_a_few_requests(
    simulator: Any, pg_dsn: str, data_dir: Path
) -> None:
    env = ingest_env(simulator, pg_dsn, data_dir, INGEST_PAGE_LIMIT=1000)
    code, log = run_to_end(env, data_dir / "run1.log")
    assert code == 0, log[-3000:]
    first = requests_served(simulator)
    code, log = run_to_end(env, data_dir / "run2.log")
    assert code == 0, log[-3000:]
    assert "drained" in log
    assert_exact(pg_dsn, simulator.truth())
    summary = summary_of(log)
    assert summary["events_loaded"] == 0, "nothing new: nothing loaded twice"
    assert summary["events_fetched"] == 0, "nothing new: no walk"
    assert requests_served(simulator) - first <= 2, "a look at the newest end, and a stream token"
    state = checkpoint.read(data_dir / "ingestion.state")
    assert state is not None and state.drained and state.loaded_newest_ms == state.newest_ms
    assert state.topped_up_at is not None


@pytest.mark.sim(events=5_000)
def test_a_changed_target_exits_2_with_one_line_and_writes_nothing(
    simulator: Any, sim_factory: Any, pg_dsn: str, pg_server_dsn: str, data_dir: Path
) -> None:
    env = ingest_env(simulator, pg_dsn, data_dir)
    code, log = run_to_end(env, data_dir / "run.log")
    assert code == 0, log[-3000:]
    state_before = (data_dir / "ingestion.state").read_bytes()
    tables_before = tables_in(pg_dsn)
    other_sim = sim_factory(events=100)
    other_db = "t_" + uuid.uuid4().hex[:12]
    admin = psycopg2.connect(pg_server_dsn)
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{other_db}"')
    other_dsn = dsn_for_database(pg_server_dsn, other_db)
    try:
        changes = {
            "--table": {"INGEST_TABLE": "other_events"},
            "--database-url": {"DATABASE_URL": other_dsn},
            "--api-url": {"DATASYNC_API_URL": other_sim.base_url, "DATASYNC_API_KEY": other_sim.api_key},
            "--source": {"INGEST_SOURCE": "events"},
        }
        for flag, change in changes.items():
            code, log = run_to_end({**env, **change}, data_dir / f"changed{flag}.log")
            assert code == 2, (flag, log[-2000:])
            [line] = error_lines(log)
            assert "another target" in line and flag in line and "reset" in line and "--data-dir" in line
        assert (data_dir / "ingestion.state").read_bytes() == state_before
        assert tables_in(pg_dsn) == tables_before and "other_events" not in tables_in(pg_dsn)
        assert tables_in(other_dsn) == set(), "nothing created in the other database"
        assert requests_served(other_sim) == 0, "not a request to the other API"
    finally:
        with admin.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{other_db}" WITH (FORCE)')
        admin.close()
    code, log = run_to_end(env, data_dir / "same.log")
    assert code == 0, "the original target still runs"


# ---------------------------------------------------------------------------------------
# A live source: events keep arriving at the newest end (the simulator's `arrival_rate`)


def fetched_in(log: str) -> int:
    return int(summary_of(log)["events_fetched"])


@pytest.mark.sim(events=20_000, arrival_rate=40.0, time_scale=20.0)
def test_top_ups_load_what_arrived_exactly_once_and_fetch_little_twice(
    simulator: Any, pg_dsn: str, data_dir: Path
) -> None:
    env = ingest_env(simulator, pg_dsn, data_dir, INGEST_PAGE_LIMIT=1000)
    code, log = run_to_end(env, data_dir / "run1.log")
    assert code == 0, log[-3000:]
    loaded_first = len(table_ids(pg_dsn))
    after_first = simulator.truth()
    wait_for(lambda: simulator.truth().arrived >= after_first.arrived + 3000, what="3,000 more arrivals")
    at_second = simulator.truth()
    code, log = run_to_end(env, data_dir / "run2.log")
    assert code == 0, log[-3000:]
    ids = table_ids(pg_dsn)
    assert len(ids) == len(set(ids)), "each once"
    assert at_second.storable_ids <= set(ids), "every event that existed when the second run started"
    # What the top-up fetched beyond the ids it added was fetched twice: the plan's newest
    # millisecond, and pages a split of its walk repeats.
    assert fetched_in(log) - (len(ids) - loaded_first) <= 2 * 1000
    assert fetched_in(log) < len(ids) / 2, "a top-up costs what is new, not the dataset"
    # Events that arrived during the second run are in the table after the next one.
    final = simulator.freeze_arrivals()
    code, log = run_to_end(env, data_dir / "run3.log")
    assert code == 0, log[-3000:]
    assert_exact(pg_dsn, final)


@pytest.mark.sim(events=20_000, arrival_rate=40.0, time_scale=20.0)
def test_sigkill_at_random_moments_of_top_ups_then_a_final_run_is_exact(
    simulator: Any, pg_dsn: str, data_dir: Path
) -> None:
    rng = random.Random(20261204)
    env = ingest_env(simulator, pg_dsn, data_dir, INGEST_PAGE_LIMIT=500, INGEST_SEGMENT_MAX_ROWS=1000,
                     INGEST_MAX_RESTARTS=100)
    code, log = run_to_end(env, data_dir / "first.log")
    assert code == 0, log[-3000:]
    kills = 0
    for attempt in range(6):
        base = simulator.truth().arrived
        wait_for(lambda b=base: simulator.truth().arrived >= b + 1500, what="arrivals")
        run = start_run(env, data_dir / f"kill{attempt}.log")
        try:
            # Anywhere from the look at the source (before the top is planned) to its last pages.
            rows = fetched_rows(data_dir)
            target = rows + rng.choice([0, 0, rng.randint(1, 1500)])
            wait_for(lambda r=run, t=target: fetched_rows(data_dir) >= t or r.process.poll() is not None,
                     what="top-up progress")
            if run.process.poll() is None:
                run.kill_group()
                kills += 1
            run.wait(60)
        finally:
            run.kill_group()
        assert (data_dir / "ingestion.state").exists()
        assert checkpoint.read(data_dir / "ingestion.state") is not None, "the checkpoint is never torn"
    assert kills >= 3, "too few kills landed mid top-up"
    final = simulator.freeze_arrivals()
    code, log = run_to_end(env, data_dir / "final.log")
    assert code == 0, log[-3000:]
    assert_exact(pg_dsn, final)


# ---------------------------------------------------------------------------------------
# run --follow


class Outage:
    """A loopback TCP relay in front of the simulator that can go dark: while down, every
    connection is accepted and closed at once (the client sees resets), as an API behind a
    failing load balancer would look."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream = upstream_port
        self.down = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.down.is_set():
                client.close()
                continue
            threading.Thread(target=self._relay, args=(client,), daemon=True).start()

    def _relay(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(("127.0.0.1", self.upstream))
        except OSError:
            client.close()
            return

        def pump(src: socket.socket, dst: socket.socket) -> None:
            try:
                while not self.down.is_set() and (chunk := src.recv(65536)):
                    dst.sendall(chunk)
            except OSError:
                pass
            finally:
                for sock in (src, dst):
                    try:
                        sock.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                    sock.close()

        threading.Thread(target=pump, args=(upstream, client), daemon=True).start()
        pump(client, upstream)

    def close(self) -> None:
        self.listener.close()


def scrape(port: int) -> dict[str, float]:
    body = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return {line.split(" ")[0]: float(line.split(" ")[1]) for line in body.splitlines()
            if line and not line.startswith("#") and "{" not in line}


def health(port: int) -> str:
    """The state /health reports ("" while nothing answers yet)."""
    try:
        return str(requests.get(f"http://127.0.0.1:{port}/health", timeout=10).json()["status"])
    except (requests.RequestException, ValueError, KeyError):
        return ""


def free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as sock:
        return int(sock.getsockname()[1])


def top_ups_in(log: str) -> int:
    return log.count("top-up: ")


@pytest.mark.sim(events=10_000, arrival_rate=20.0, time_scale=20.0)
def test_follow_tops_up_reports_the_lag_rides_out_an_outage_and_stops_on_sigterm(
    simulator: Any, pg_dsn: str, data_dir: Path
) -> None:
    outage = Outage(int(simulator.base_url.split(":")[2].split("/")[0]))
    port = free_port()
    env = ingest_env(simulator, pg_dsn, data_dir, DATASYNC_API_URL=f"http://127.0.0.1:{outage.port}/api/v1",
                     INGEST_FOLLOW="true", INGEST_POLL_INTERVAL="1", INGEST_METRICS_PORT=port,
                     INGEST_MAX_ATTEMPTS=3, INGEST_PAGE_LIMIT=1000)
    run = start_run(env, data_dir / "follow.log")
    try:
        wait_for(lambda: health(port) == "following" or run.process.poll() is not None, what="the first drain")
        assert run.process.poll() is None, run.log[-3000:]
        # Arrivals are picked up within two polls: at most two top-ups start after the
        # snapshot before every event in it is in the table.
        snapshot = simulator.truth()
        started_before = top_ups_in(run.log)
        wait_for(lambda: snapshot.storable_ids <= set(table_ids(pg_dsn)), what="the snapshot's events in the table")
        assert top_ups_in(run.log) - started_before <= 2
        metrics = scrape(port)
        assert metrics["datasync_lag_seconds"] >= 0
        assert metrics["datasync_last_topup_timestamp_seconds"] > 1.7e9
        # An outage of several polls: the follower keeps running, says so, and catches up.
        outage.down.set()
        wait_for(lambda: run.log.count("top-up failed") >= 3 or run.process.poll() is not None,
                 what="three failed polls")
        assert run.process.poll() is None, run.log[-3000:]
        assert health(port) == "degraded"
        outage.down.clear()
        after = simulator.truth()
        wait_for(lambda: after.storable_ids <= set(table_ids(pg_dsn)), what="catching up after the outage")
        wait_for(lambda: health(port) == "following", what="following again")
        run.kill_group(signal.SIGTERM)
        assert run.wait(120) == 143, run.log[-3000:]
        state = checkpoint.read(data_dir / "ingestion.state")
        assert state is not None and state.target is not None
        loaded = table_ids(pg_dsn)
        assert len(loaded) == len(set(loaded))
        # The state is intact: a batch run afterwards (same target: through the relay) completes it exactly.
        final = simulator.freeze_arrivals()
        code, log = run_to_end({**env, "INGEST_FOLLOW": "false", "INGEST_METRICS_PORT": ""}, data_dir / "after.log")
        assert code == 0, log[-3000:]
        assert_exact(pg_dsn, final)
    finally:
        run.kill_group()
        outage.close()
