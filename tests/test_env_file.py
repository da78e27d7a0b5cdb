""".env and .env.example: the file is read as python-dotenv (and docker compose) read it,
through the real program; the example lists every variable of the config with its real
default, so that copying it changes nothing until a line is edited."""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import Field, fields
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from ingest.config import PARSERS, REQUIRED_FOR_RUN, Config, env_name
from tests.e2e import PROGRAM, REPO

ENV_EXAMPLE = REPO / ".env.example"
COMPOSE_ONLY = "# --- docker compose only"


def example_lines() -> dict[str, tuple[bool, str]]:
    """Variable -> (commented out, value), for the program's part of .env.example."""
    text = ENV_EXAMPLE.read_text().split(COMPOSE_ONLY, 1)[0]
    return {name: (bool(hash_), value) for hash_, name, value in re.findall(r"^(#?)\s*([A-Z][A-Z0-9_]+)=(.*)$", text, re.M)}


def test_env_example_lists_exactly_the_config_variables() -> None:
    assert sorted(example_lines()) == sorted(env_name(f.name) for f in fields(Config))


OPTIONAL = [f for f in fields(Config) if f.name not in REQUIRED_FOR_RUN]


@pytest.mark.parametrize("f", OPTIONAL, ids=[f.name for f in OPTIONAL])
def test_env_example_shows_the_real_default(f: Field[Any]) -> None:
    commented, value = example_lines()[env_name(f.name)]
    assert commented, f"{env_name(f.name)} is optional: it stays commented out"
    assert PARSERS[f.name](value) == getattr(Config(), f.name), f"{env_name(f.name)}={value} is not the default"


# --- .env through the program -------------------------------------------------------------------


def clean_env(**values: str) -> dict[str, str]:
    own = ("INGEST_", "DATASYNC_", "DATABASE_", "LOG_FORMAT", "LOG_LEVEL")
    env = {k: v for k, v in os.environ.items() if not k.startswith(own)}
    env.update(values)
    return env


def test_dotenv_quotes_comments_export_and_interpolation_reach_the_program(tmp_path: Path) -> None:
    """The table name is quoted back in its error message, so the one line shows what the
    program made of the file: the old reader gave `"${PREFIX} x"` with quotes and all."""
    (tmp_path / ".env").write_text(
        "export PREFIX=evt\n"
        'INGEST_TABLE="${PREFIX} x" # the target table\n'
        "DATASYNC_API_URL='http://127.0.0.1:9/api/v1'\n"
        "DATASYNC_API_KEY=ds_0123 # a comment, not part of the key\n"
    )
    result = subprocess.run(
        [*PROGRAM, "run"], env=clean_env(INGEST_DATA_DIR=str(tmp_path / "data")), cwd=tmp_path,
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        "datasync-ingest: configuration error: INGEST_TABLE (in .env): must be a plain identifier"
        " (letters, digits, _), got 'evt x'"
    ]


class KeyRecorder(BaseHTTPRequestHandler):
    """An API that refuses every key, and remembers the keys it was sent."""

    keys: list[str] = []

    def do_GET(self) -> None:
        self.keys.append(self.headers.get("X-API-Key") or "")
        body = b'{"error": "Unauthorized", "code": "UNAUTHORIZED", "message": "bad key"}'
        self.send_response(401)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_POST = do_GET

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def key_recorder() -> Iterator[tuple[str, list[str]]]:
    keys: list[str] = []
    handler = type("Recorder", (KeyRecorder,), {"keys": keys})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/api/v1", keys
    finally:
        server.shutdown()
        server.server_close()


def test_a_quoted_key_with_a_comment_in_dotenv_reaches_the_api_bare(
    key_recorder: tuple[str, list[str]], pg_dsn: str, tmp_path: Path
) -> None:
    url, keys = key_recorder
    key = "ds_" + secrets.token_hex(16)
    (tmp_path / ".env").write_text(f'export DATASYNC_API_KEY="{key}" # from the dashboard\n')
    env = clean_env(
        DATASYNC_API_URL=url, DATABASE_URL=pg_dsn, INGEST_DATA_DIR=str(tmp_path / "data"), INGEST_SOURCE="events",
        INGEST_MAX_ATTEMPTS="1", INGEST_LOG_FORMAT="json",
    )
    result = subprocess.run([*PROGRAM, "run"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr[-2000:]  # the recorder refuses every key
    assert keys and set(keys) == {key}
    assert key not in result.stderr + result.stdout
