"""Bad configuration: `bin/datasync-ingest run` as a user runs it.

Every wrong option or environment value (a secret file included) exits 2 with exactly one
line on stderr that names it. An unreachable database or API exits 1 with the reason in one clear line, no traceback
and no password.
"""

from __future__ import annotations

import os
import socket
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.e2e import PROGRAM

KEY = "ds_" + "0123456789abcdef" * 2
PASSWORD = "s3cret-Pa55word"
GOOD = {"DATASYNC_API_URL": "http://127.0.0.1:9/api/v1", "DATASYNC_API_KEY": KEY, "INGEST_LOG_FORMAT": "json"}

# (option, bad value, text the one line must contain). The option form and the environment
# form of each are both tried.
BAD_VALUES: list[tuple[str, str, str]] = [
    ("--api-url", "ftp://h/api/v1", "http(s) URL"),
    ("--api-url", "http://h/api/v2", "/api/v1"),
    ("--api-key", "two words", "without spaces"),
    ("--database-url", f"mysql://u:{PASSWORD}@h/db", "postgresql://"),
    ("--database-url", f"host=h password={PASSWORD} port", "connection string"),
    ("--workers", "0", "at least 1"),
    ("--workers", "lots", "whole number"),
    ("--source", "ftp", "auto, feed, events"),
    ("--table", "events; drop table x", "identifier"),
    ("--log-format", "xml", "json, text"),
    ("--log-level", "verbose", "debug"),
    ("--partitions", "-1", "at least 0"),
    ("--page-limit", "0", "at least 1"),
    ("--pacing", "sometimes", "on, off"),
    ("--feed-rate", "0", "at least"),
    ("--feed-rate", "inf", "finite"),
    ("--events-rate", "nan", "finite"),
    ("--rate-window", "-5", "at least"),
    ("--request-timeout", "0", "at least"),
    ("--max-attempts", "0", "at least 1"),
    ("--segment-max-rows", "0", "at least 1"),
    ("--segment-max-bytes", "10", "at least 1024"),
    ("--segment-max-age", "soon", "a number"),
    ("--ready-max-bytes", "1", "at least"),
    ("--keep-segments", "maybe", "true or false"),
    ("--stats-interval", "0", "at least"),
    ("--metrics-port", "70000", "at most 65535"),
    ("--max-restarts", "-1", "at least 0"),
]
ENV_NAMES = {
    "--api-url": "DATASYNC_API_URL", "--api-key": "DATASYNC_API_KEY", "--database-url": "DATABASE_URL",
    "--workers": "INGEST_WORKERS", "--source": "INGEST_SOURCE", "--table": "INGEST_TABLE",
    "--log-format": "INGEST_LOG_FORMAT", "--log-level": "INGEST_LOG_LEVEL", "--partitions": "INGEST_PARTITIONS",
    "--page-limit": "INGEST_PAGE_LIMIT", "--feed-rate": "INGEST_FEED_RATE", "--events-rate": "INGEST_EVENTS_RATE",
    "--rate-window": "INGEST_RATE_WINDOW", "--pacing": "INGEST_PACING", "--request-timeout": "INGEST_REQUEST_TIMEOUT",
    "--max-attempts": "INGEST_MAX_ATTEMPTS", "--segment-max-rows": "INGEST_SEGMENT_MAX_ROWS",
    "--segment-max-bytes": "INGEST_SEGMENT_MAX_BYTES", "--segment-max-age": "INGEST_SEGMENT_MAX_AGE",
    "--ready-max-bytes": "INGEST_READY_MAX_BYTES", "--keep-segments": "INGEST_KEEP_SEGMENTS",
    "--stats-interval": "INGEST_STATS_INTERVAL", "--metrics-port": "INGEST_METRICS_PORT",
    "--max-restarts": "INGEST_MAX_RESTARTS",
}


def clean_env(tmp: Path, **values: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("INGEST_", "DATASYNC_", "DATABASE_", "LOG_"))}
    env.update(GOOD, INGEST_DATA_DIR=str(tmp / "data"), **values)
    return env


def invoke(args: list[str], env: dict[str, str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*PROGRAM, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{stderr}"
    return lines[0]


def secret_file_cases(tmp: Path) -> list[tuple[str, list[str], dict[str, str], str, str]]:
    """Secrets from files: the message names the file, never its content."""
    (tmp / "empty").write_text("\n")
    (tmp / "key").write_text(KEY + "\n")
    (tmp / "dsn").write_text(f"postgresql://u:{PASSWORD}@h/db\n")
    (tmp / "bad-dsn").write_text(f"mysql://u:{PASSWORD}@h/db\n")
    no_key = clean_env(tmp)
    del no_key["DATASYNC_API_KEY"]
    return [
        ("key file missing", ["run", "--api-key-file", str(tmp / "absent")], no_key, "--api-key-file", "cannot read"),
        ("key file empty", ["run"], {**no_key, "DATASYNC_API_KEY_FILE": str(tmp / "empty")}, str(tmp / "empty"),
         "is empty"),
        ("key file a directory", ["run"], {**no_key, "DATASYNC_API_KEY_FILE": str(tmp)}, "DATASYNC_API_KEY_FILE",
         "cannot read"),
        ("key and key file", ["run", "--api-key", KEY, "--api-key-file", str(tmp / "key")], no_key,
         "--api-key and --api-key-file", "both given"),
        ("key and key file in the environment", ["run"], clean_env(tmp, DATASYNC_API_KEY_FILE=str(tmp / "key")),
         "DATASYNC_API_KEY and DATASYNC_API_KEY_FILE", "both given"),
        ("url and url file", ["run"], clean_env(tmp, DATABASE_URL=f"postgresql://u:{PASSWORD}@h/db",
                                              DATABASE_URL_FILE=str(tmp / "dsn")), "DATABASE_URL_FILE", "both given"),
        ("bad url in its file", ["run", "--database-url-file", str(tmp / "bad-dsn")], clean_env(tmp),
         str(tmp / "bad-dsn"), "postgresql://"),
    ]


def cases(tmp: Path) -> list[tuple[str, list[str], dict[str, str], str, str]]:
    """(label, argv, env, name the line must contain, text it must contain)."""
    out = []
    for option, value, text in BAD_VALUES:
        if option == "--keep-segments":  # a flag on the command line; a value only in the environment
            out.append((f"{option} flag value", ["run", option, value], clean_env(tmp), "extra argument", value))
        else:
            out.append((f"{option}={value}", ["run", option, value], clean_env(tmp), option, text))
        env_name = ENV_NAMES[option]
        out.append((f"{env_name}={value}", ["run"], clean_env(tmp, **{env_name: value}), env_name, text))
    missing_key = clean_env(tmp)
    del missing_key["DATASYNC_API_KEY"]
    out.append(("no api key", ["run"], missing_key, "--api-key", "required"))
    out.append(("unknown option", ["run", "--no-such-thing", "1"], clean_env(tmp), "--no-such-thing", "No such option"))
    out.append(("unknown command", ["frobnicate"], clean_env(tmp), "frobnicate", "No such command"))
    out.append(("mistyped command", ["statsu"], clean_env(tmp), "statsu", "Did you mean 'status'?"))
    out += secret_file_cases(tmp)
    out.append(("bad value under an old name", ["run"], clean_env(tmp, INGEST_SEGMENT_ROWS="0"), "INGEST_SEGMENT_ROWS",
                "at least 1"))
    out.append(("missing value", ["run", "--workers"], clean_env(tmp), "--workers", "requires an argument"))
    (tmp / "a-file").write_text("not a directory")
    out.append(("data dir is a file", ["run", "--data-dir", str(tmp / "a-file")], clean_env(tmp), "--data-dir",
                "not a directory"))
    return out


def test_each_bad_value_exits_2_with_one_line_naming_it(tmp_path: Path) -> None:
    work = tmp_path / "cwd"
    work.mkdir()
    (work / ".env").write_text("")  # an empty .env here, never the developer's
    todo = cases(tmp_path)
    # Each case is its own process; four at a time keeps this to seconds on two cores.
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda case: invoke(case[1], case[2], work), todo))
    failures = []
    for (label, _argv, _env, name, text), result in zip(todo, results, strict=True):
        try:
            assert result.returncode == 2, f"exit {result.returncode}"
            line = one_line(result.stderr)
            assert name in line and text in line, line
            assert "Traceback" not in result.stderr and PASSWORD not in result.stderr + result.stdout
        except AssertionError as exc:
            failures.append(f"{label}: {exc}")
    assert not failures, "\n".join(failures)
    assert len(todo) >= 2 * len(BAD_VALUES)


def test_bad_value_in_dotenv_names_the_file(tmp_path: Path) -> None:
    work = tmp_path / "cwd"
    work.mkdir()
    (work / ".env").write_text("INGEST_WORKERS=zero\n")
    result = invoke(["run"], clean_env(tmp_path), work)
    assert result.returncode == 2
    line = one_line(result.stderr)
    assert "INGEST_WORKERS (in .env)" in line


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])  # closed again when the block ends


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if '"level":"ERROR"' in line or line.startswith("datasync-ingest")]


def test_unreachable_database_exits_1_with_one_clear_line(tmp_path: Path) -> None:
    dsn = f"postgresql://ingest:{PASSWORD}@127.0.0.1:{closed_port()}/db"
    result = invoke(["run"], clean_env(tmp_path, DATABASE_URL=dsn), tmp_path)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert PASSWORD not in result.stderr + result.stdout
    errors = error_lines(result.stderr)
    assert len(errors) == 1, result.stderr[-2000:]
    assert "cannot connect to the database" in errors[0] and "refused" in errors[0].lower()


@pytest.mark.parametrize("source", ["events", pytest.param("auto", marks=pytest.mark.slow)])
def test_unreachable_api_exits_1_with_one_clear_line(tmp_path: Path, pg_dsn: str, source: str) -> None:
    env = clean_env(
        tmp_path, DATASYNC_API_URL=f"http://127.0.0.1:{closed_port()}/api/v1", DATABASE_URL=pg_dsn,
        INGEST_SOURCE=source, INGEST_MAX_ATTEMPTS="1",
    )
    result = invoke(["run"], env, tmp_path, timeout=300)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and KEY not in result.stderr
    errors = error_lines(result.stderr)
    assert len(errors) == 1, "\n".join(errors)
    assert "cannot reach the API" in errors[0] and "ConnectionError" in errors[0]
