"""Secrets: the API key, every stream token and the database password never reach a log
line, the state file, a segment (ready, loaded, rejected) or a reject row, whatever faults
the run met, and even when the server echoes them back in its error messages; read from
files, they stay out of the process list and `status` too.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psutil
import psycopg2
import psycopg2.extensions
import pytest
import responses

from ingest.config import Config
from ingest.simulator import SimulatorConfig, start_simulator
from ingest.source import checkpoint
from ingest.source.api import ApiClient, FatalApiError
from tests.e2e import PROGRAM, assert_exact, assert_no_secrets, ingest_env, run_to_end, start_run, wait_for

PASSWORD = "pw-" + secrets.token_hex(8)
SCALE = 100.0


@pytest.fixture
def dsn_with_password(pg_dsn: str) -> str:
    """A role with a password that owns the test database, as a postgresql:// URL. (The
    embedded server trusts local sockets: the password is accepted and never checked,
    which is all a leak test needs.)"""
    params = psycopg2.extensions.parse_dsn(pg_dsn)
    role = "ingest_" + secrets.token_hex(4)
    with psycopg2.connect(pg_dsn) as conn, conn.cursor() as cur:
        cur.execute(f"CREATE ROLE {role} LOGIN PASSWORD %s", (PASSWORD,))
        cur.execute(f'ALTER DATABASE "{params["dbname"]}" OWNER TO {role}')
    query = "&".join(f"{k}={quote(params[k], safe='/')}" for k in ("host", "port") if k in params)
    return f"postgresql://{role}:{PASSWORD}@/{params['dbname']}?{query}"


def test_no_secret_anywhere_after_a_run_full_of_faults(dsn_with_password: str, data_dir: Path) -> None:
    config = SimulatorConfig(
        events=10_000, seed=5, latency="none", rate_limits=True, chaos="heavy", chaos_seed=4, time_scale=SCALE,
        key_validity=1e9, token_ttl=20.0, p429=0.1, feed_limit=8, feed_retry_after=True, hostile_events=11,
        p_unstorable=0.003,
    )
    sim = start_simulator(config)
    try:
        env = ingest_env(
            sim, dsn_with_password, data_dir, INGEST_PAGE_LIMIT=500,
            INGEST_LOG_LEVEL="DEBUG", INGEST_KEEP_SEGMENTS="1", INGEST_SEGMENT_MAX_ROWS=2000,
        )
        code, log = run_to_end(env, data_dir / "run.log")
        assert code == 0, log[-3000:]
        assert_exact(dsn_with_password, sim.truth())
        status = subprocess.run([*PROGRAM, "status"], env=env, capture_output=True, text=True, timeout=120)
        assert status.returncode == 0, status.stderr
        tokens = sim.issued_tokens()
        stats = sim.stats()
        assert len(tokens) >= 3, "the run must have renewed stream tokens"
        assert sum(stats["faults"].values()) >= 5 and stats["rate_limited"] >= 1
        assert any(data_dir.glob("segments/loaded/*")), "segments are kept for the scan"
        with psycopg2.connect(dsn_with_password) as conn, conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM ingest_rejects")
            assert cur.fetchone()[0] >= 1, "rejects are part of the scan"
        assert_no_secrets(
            [sim.api_key, *tokens, PASSWORD], dsn_with_password, data_dir, log, status.stdout + status.stderr
        )
    finally:
        sim.stop()


def drained(data_dir: Path) -> bool:
    """The checkpoint says drained and no segment waits: a follower is idle between polls."""
    try:
        state = checkpoint.read(data_dir / "ingestion.state")
    except checkpoint.CheckpointError:
        return False
    waiting = any(any((data_dir / "segments" / s).glob("*.tsv")) for s in ("open", "ready", "loading"))
    return state is not None and state.drained and not waiting


def process_list(pid: int) -> list[str]:
    """What `ps` (and /proc) shows of a process and its children: command line and environment."""
    root = psutil.Process(pid)
    shown = []
    for process in [root, *root.children(recursive=True)]:
        try:
            shown.append(" ".join(process.cmdline()) + " " + " ".join(f"{k}={v}" for k, v in process.environ().items()))
        except (psutil.ZombieProcess, psutil.NoSuchProcess):  # a child that has finished its walk
            continue
    return shown


def test_secrets_from_files_stay_out_of_logs_state_status_and_the_process_list(
    dsn_with_password: str, data_dir: Path, tmp_path: Path
) -> None:
    sim = start_simulator(SimulatorConfig(events=5_000, seed=8, latency="none", rate_limits=False))
    try:
        key_file, dsn_file = tmp_path / "api_key", tmp_path / "database_url"
        key_file.write_text(sim.api_key + "\n")
        dsn_file.write_text(dsn_with_password + "\n")
        env = ingest_env(sim, dsn_with_password, data_dir, INGEST_LOG_LEVEL="DEBUG", INGEST_KEEP_SEGMENTS="1",
                         INGEST_FOLLOW="1", INGEST_PAGE_LIMIT=500)
        del env["DATASYNC_API_KEY"], env["DATABASE_URL"]
        env.update(DATASYNC_API_KEY_FILE=str(key_file), DATABASE_URL_FILE=str(dsn_file))
        run = start_run(env, data_dir / "run.log")
        try:
            # --follow keeps the processes up once everything is loaded: look at all of them
            wait_for(lambda: drained(data_dir) or run.process.poll() is not None, what="the drain")
            assert run.process.poll() is None, run.log[-3000:]
            shown = process_list(run.process.pid)
            assert shown, "the supervisor is in the process list"
            os.kill(run.process.pid, signal.SIGTERM)
            assert run.wait(timeout=120) == 143, run.log[-3000:]
        finally:
            run.kill_group()
        assert_exact(dsn_with_password, sim.truth())
        statuses = [subprocess.run([*PROGRAM, "status", "--format", fmt], env=env, capture_output=True, text=True,
                                   timeout=120) for fmt in ("text", "json")]
        assert all(status.returncode == 0 for status in statuses), statuses
        assert json.loads(statuses[1].stdout)["database"]["events"] == len(sim.truth().storable_ids)
        assert_no_secrets(
            [sim.api_key, PASSWORD], dsn_with_password, data_dir, run.log, *shown,
            *(status.stdout + status.stderr for status in statuses),
        )
    finally:
        sim.stop()


class EchoingApi(BaseHTTPRequestHandler):
    """A hostile API that quotes every secret it is sent in its error messages."""

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        told = f"key {self.headers.get('X-API-Key')} cookie {self.headers.get('Cookie')}"
        body = json.dumps({"error": "Unauthorized", "code": "UNAUTHORIZED", "message": f"refused: {told}"}).encode()
        self.send_response(401)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _answer

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def echoing_api() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), EchoingApi)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/api/v1"
    finally:
        server.shutdown()
        server.server_close()


def test_a_server_echoing_the_key_gets_it_masked(echoing_api: str, dsn_with_password: str, data_dir: Path) -> None:
    key = "ds_" + secrets.token_hex(16)
    env = ingest_env(_Sim(echoing_api, key), dsn_with_password, data_dir, INGEST_LOG_LEVEL="DEBUG")
    code, log = run_to_end(env, data_dir / "run.log", timeout=120)
    assert code == 1, log[-3000:]
    assert "refused: key ***" in log, "the server's message is quoted, masked"
    assert_no_secrets([key, PASSWORD], dsn_with_password, data_dir, log)


class _Sim:
    def __init__(self, base_url: str, api_key: str) -> None:
        self.base_url, self.api_key = base_url, api_key


HOST = "http://api.test"
FEED = HOST + "/api/v1/events/d4ta/x7k9/feed"
STREAM_ACCESS = HOST + "/internal/dashboard/stream-access"


def test_an_older_token_echoed_in_a_fatal_message_is_masked() -> None:
    """A fatal message goes from the fetcher to the supervisor, whose redactor never saw
    the fetcher's tokens: the client must mask every token it held, not only the current."""
    key, old, new = "ds_" + "c" * 32, secrets.token_hex(32), secrets.token_hex(32)
    config = Config(api_url=HOST + "/api/v1", api_key=key, page_limit=100, max_attempts=3, request_timeout=5)
    client = ApiClient(config)
    with responses.RequestsMock(assert_all_requests_are_fired=True) as mocked:
        for token in (old, new):
            mocked.post(STREAM_ACCESS, json={"streamAccess": {"token": token, "expiresIn": 300}})
        mocked.get(FEED, status=403, json={"code": "INVALID_STREAM_TOKEN", "message": "expired"})
        mocked.get(FEED, status=404, json={"code": "NOPE", "message": f"nothing here for {old} or {new} or {key}"})
        with pytest.raises(FatalApiError) as info:
            client.fetch_page("feed", None)
    message = str(info.value)
    assert "nothing here" in message
    assert old not in message and new not in message and key not in message, message
