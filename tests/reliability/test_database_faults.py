"""PostgreSQL misbehaving under a running ingestion: the server stopped and started again
(fast and immediate shutdown), loader sessions killed with pg_terminate_backend, a
statement timeout. The run rides through (or exits 1 with one clear line), the next run
completes, and the table matches the simulator's truth exactly."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import psycopg2
import pytest

from ingest.sink import db
from ingest.sink.db import dsn_for_database
from tests.e2e import Run, assert_exact, ingest_env, loaded_segments, run_to_end, start_run, wait_for
from tests.reliability.helpers import (
    assert_checkpoint_intact,
    dbname_of,
    own_postgres,
    restart_postgres,
    server_accepts,
    set_statement_timeout,
    start_postgres,
    stop_postgres,
    terminate_loader_backends,
)

SIM_DEFAULTS = {"events": 30_000, "seed": 9}  # for the `simulator` fixture (conftest)


def fault_env(sim: Any, dsn: str, data_dir: Path, **extra: Any) -> dict[str, str]:
    values: dict[str, Any] = {"INGEST_PAGE_LIMIT": 1000, "INGEST_SEGMENT_MAX_ROWS": 1000, "INGEST_PARTITIONS": 2, **extra}
    return ingest_env(sim, dsn, data_dir, **values)


def create_database(server_dsn: str, name: str) -> str:
    admin = psycopg2.connect(server_dsn)
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    admin.close()
    return dsn_for_database(server_dsn, name)


def ended(run: Run) -> bool:
    return run.process.poll() is not None


def finish(run: Run, env: dict[str, str], data_dir: Path, timeout: float = 180) -> tuple[int, str]:
    """The faulted run's end (0, or 1 with a clear last line), then, if it failed, the
    next run, which must complete."""
    try:
        code = run.wait(timeout)
    finally:
        run.kill_group()
    if code == 0:
        return code, run.log
    assert code == 1, run.log[-3000:]
    last_error = [line for line in run.log.splitlines() if '"ERROR"' in line][-1]
    assert "Traceback" not in run.log, run.log[-3000:]
    assert len(last_error) < 1000, last_error
    assert_checkpoint_intact(data_dir)
    return run_to_end(env, data_dir / "next.log", timeout=timeout)


def load_progress(dsn: str, after: int, run: Run, timeout: float = 90) -> int:
    """Wait until the ledger holds more than `after` segments (or the run ended)."""
    wait_for(lambda: loaded_segments(dsn) > after or ended(run), timeout, f"more than {after} loaded segments")
    return loaded_segments(dsn)


# ---------------------------------------------------------------------------------------
# Connections killed with pg_terminate_backend


def test_loader_sessions_terminated_again_and_again(
    simulator: Any, pg_server_dsn: str, pg_dsn: str, data_dir: Path
) -> None:
    env = fault_env(simulator, pg_dsn, data_dir)
    run = start_run(env, data_dir / "run.log")
    killed = rounds = 0
    try:
        seen = load_progress(pg_dsn, 0, run)
        while not ended(run) and rounds < 12:
            killed += terminate_loader_backends(pg_server_dsn, dbname_of(pg_dsn))
            rounds += 1
            seen = load_progress(pg_dsn, seen, run)  # the loaders reconnect and go on
        code, log = finish(run, env, data_dir)
    finally:
        run.kill_group()
    assert killed >= 3, f"only {killed} loader sessions were terminated"
    assert code == 0, log[-3000:]
    assert "database error, retrying" in run.log
    assert_exact(pg_dsn, simulator.truth())
    print(f"pg_terminate_backend: {killed} sessions in {rounds} rounds; {len(simulator.truth().storable_ids)} events")


# ---------------------------------------------------------------------------------------
# A statement timeout


def test_a_statement_timeout_on_the_database_does_not_stop_loading(
    simulator: Any, pg_server_dsn: str, pg_dsn: str, data_dir: Path
) -> None:
    """`ALTER DATABASE ... SET statement_timeout = '1ms'` for the whole run (a DBA's guard
    for interactive users): every COPY would be cancelled again on every retry, for ever.
    Our sessions turn the timeout off, so the run completes."""
    dbname = dbname_of(pg_dsn)
    env = fault_env(simulator, pg_dsn, data_dir)
    set_statement_timeout(pg_server_dsn, dbname, "1ms")
    try:
        probe = psycopg2.connect(pg_dsn)
        with probe.cursor() as cur:
            cur.execute("SHOW statement_timeout")
            assert cur.fetchone()[0] == "1ms"
        probe.close()
        run = start_run(env, data_dir / "run.log")
        try:
            code = run.wait(120)
        finally:
            run.kill_group()
    finally:
        set_statement_timeout(pg_server_dsn, dbname, None)
    assert code == 0, run.log[-3000:]
    assert "statement timeout" not in run.log
    assert_exact(pg_dsn, simulator.truth())


# ---------------------------------------------------------------------------------------
# The server stopped and started again mid-load (a server of the test's own)


def restarts_during_a_run(sim: Any, data_dir: Path, modes: list[str]) -> dict[str, int]:
    with own_postgres() as server:
        dsn = create_database(server.dsn, "ingest")
        env = fault_env(sim, dsn, data_dir)
        run = start_run(env, data_dir / "run.log")
        done = 0
        try:
            seen = load_progress(dsn, 0, run)
            for mode in modes:
                if ended(run):
                    break
                restart_postgres(server, mode)
                done += 1
                assert server_accepts(dsn)
                seen = load_progress(dsn, seen, run)
            code, log = finish(run, env, data_dir, timeout=240)
        finally:
            run.kill_group()
        assert done == len(modes), f"the run ended after {done} of {len(modes)} restarts: {run.log[-2000:]}"
        assert code == 0, log[-3000:]
        assert "database error, retrying" in run.log, "no loader met the restart"
        assert_exact(dsn, sim.truth())
        with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM events")
            return {"restarts": done, "events": int(cur.fetchone()[0]),
                    "retries": run.log.count("database error, retrying")}


def test_server_immediate_shutdown_and_start_mid_load(simulator: Any, data_dir: Path) -> None:
    started = time.monotonic()
    result = restarts_during_a_run(simulator, data_dir, ["immediate"])
    print(f"server restarts: {result} in {time.monotonic() - started:.1f}s")


@pytest.mark.slow
@pytest.mark.sim(events=80_000)
def test_server_restarted_repeatedly_fast_and_immediate(simulator: Any, data_dir: Path) -> None:
    result = restarts_during_a_run(simulator, data_dir, ["fast", "immediate"] * 3)
    print(f"server restarts: {result}")


@pytest.mark.slow
@pytest.mark.sim(events=80_000)
def test_many_terminations_and_timeouts_together(
    simulator: Any, pg_server_dsn: str, pg_dsn: str, data_dir: Path
) -> None:
    dbname = dbname_of(pg_dsn)
    env = fault_env(simulator, pg_dsn, data_dir, INGEST_WORKERS=3, INGEST_SEGMENT_MAX_ROWS=2000)
    run = start_run(env, data_dir / "run.log")
    killed = timeouts = 0
    try:
        seen = load_progress(pg_dsn, 0, run)
        for round_ in range(30):
            if ended(run):
                break
            if round_ % 5 == 4:  # a statement timeout comes or goes (new sessions see it)
                timeouts += 1
                set_statement_timeout(pg_server_dsn, dbname, "1ms" if timeouts % 2 else None)
            killed += terminate_loader_backends(pg_server_dsn, dbname)
            seen = load_progress(pg_dsn, seen, run)
        code, log = finish(run, env, data_dir)
    finally:
        set_statement_timeout(pg_server_dsn, dbname, None)
        run.kill_group()
    assert code == 0, log[-3000:]
    assert_exact(pg_dsn, simulator.truth())
    print(f"terminated sessions: {killed}; timeout switches: {timeouts}")


# ---------------------------------------------------------------------------------------
# Errors a retry gets past, and errors it cannot


def test_a_lost_deadlock_is_retried_not_fatal(pg_dsn: str) -> None:
    """Two loaders inserting overlapping ids in another order can deadlock; PostgreSQL
    aborts one of them (40P01). That loader must retry, not crash and count a restart."""
    setup = psycopg2.connect(pg_dsn)
    with setup, setup.cursor() as cur:
        cur.execute("CREATE TABLE t (id int PRIMARY KEY, v int)")
        cur.execute("INSERT INTO t VALUES (1, 0), (2, 0)")
    setup.close()
    a, b = psycopg2.connect(pg_dsn), psycopg2.connect(pg_dsn)
    errors: list[BaseException] = []
    try:
        with a.cursor() as ca, b.cursor() as cb:
            ca.execute("UPDATE t SET v = 1 WHERE id = 1")
            cb.execute("UPDATE t SET v = 2 WHERE id = 2")

            def second() -> None:
                try:
                    cb.execute("UPDATE t SET v = 2 WHERE id = 1")
                except psycopg2.Error as exc:
                    errors.append(exc)

            waiter = threading.Thread(target=second)
            waiter.start()
            wait_for(lambda: blocked(pg_dsn), 30, "the second session to wait for the first")
            try:
                ca.execute("UPDATE t SET v = 1 WHERE id = 2")
            except psycopg2.Error as exc:
                errors.append(exc)
            a.rollback()  # lets the other session go on, whichever of the two lost
            waiter.join(30)
            b.rollback()
    finally:
        a.close()
        b.close()
    [deadlock] = [e for e in errors if getattr(e, "pgcode", None) == "40P01"]
    assert db.classify(deadlock) is db.Action.RETRY


def blocked(dsn: str) -> bool:
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = current_database()")
        return int(cur.fetchone()[0]) > 0


def test_a_fault_no_retry_can_fix_exits_1_naming_it(simulator: Any, pg_dsn: str, data_dir: Path) -> None:
    """The table renamed away mid-run: loaders fail on every restart; the run exits 1 with
    the server's reason, keeps its state, and completes once the table is back."""
    env = fault_env(simulator, pg_dsn, data_dir, INGEST_MAX_RESTARTS=1)
    run = start_run(env, data_dir / "run.log")
    try:
        load_progress(pg_dsn, 0, run)
        with psycopg2.connect(pg_dsn) as conn, conn.cursor() as cur:
            cur.execute("ALTER TABLE events RENAME TO events_away")
        code = run.wait(120)
    finally:
        run.kill_group()
    if code == 0:
        pytest.skip("the run finished loading before the table went away")
    assert code == 1, run.log[-3000:]
    last = [line for line in run.log.splitlines() if '"ERROR"' in line][-1]
    assert 'relation \\"events\\" does not exist' in last, last
    assert_checkpoint_intact(data_dir)
    with psycopg2.connect(pg_dsn) as conn, conn.cursor() as cur:
        cur.execute("ALTER TABLE events_away RENAME TO events")
    code, log = run_to_end(env, data_dir / "next.log", timeout=180)
    assert code == 0, log[-3000:]
    assert_exact(pg_dsn, simulator.truth())


def test_a_read_only_database_at_start_exits_1_with_one_line(
    simulator: Any, pg_server_dsn: str, pg_dsn: str, data_dir: Path
) -> None:
    dbname = dbname_of(pg_dsn)
    env = fault_env(simulator, pg_dsn, data_dir)
    admin = psycopg2.connect(pg_server_dsn)
    admin.autocommit = True
    try:
        with admin.cursor() as cur:
            cur.execute(f'ALTER DATABASE "{dbname}" SET default_transaction_read_only = on')
        code, log = run_to_end(env, data_dir / "run.log", timeout=60)
    finally:
        with admin.cursor() as cur:
            cur.execute(f'ALTER DATABASE "{dbname}" RESET default_transaction_read_only')
        admin.close()
    assert code == 1, log[-3000:]
    assert "Traceback" not in log, log[-3000:]
    last = [line for line in log.splitlines() if '"ERROR"' in line][-1]
    assert "cannot prepare the database" in last and "read-only transaction" in last, last
    code, log = run_to_end(env, data_dir / "next.log", timeout=120)
    assert code == 0, log[-3000:]
    assert_exact(pg_dsn, simulator.truth())


def test_a_database_that_stays_down_fails_the_run_instead_of_hanging(simulator: Any, data_dir: Path) -> None:
    with own_postgres() as server:
        dsn = create_database(server.dsn, "ingest")
        env = fault_env(simulator, dsn, data_dir, INGEST_DB_OUTAGE_LIMIT=2)
        run = start_run(env, data_dir / "run.log")
        try:
            load_progress(dsn, 0, run)
            stop_postgres(server, "fast")
            code = run.wait(120)
        finally:
            run.kill_group()
        assert code == 1, run.log[-3000:]
        last_error = [line for line in run.log.splitlines() if '"ERROR"' in line][-1]
        assert "unavailable for over 2s" in last_error and "Traceback" not in run.log
        assert_checkpoint_intact(data_dir)
        start_postgres(server)
        code, log = run_to_end(env, data_dir / "next.log")
        assert code == 0, log[-3000:]
        assert_exact(dsn, simulator.truth())
