"""The command line as an operator meets it: a mistyped command, shell completion, the
grouped `run --help` with every default, the warnings of the configuration (in the log
format), and `status` for a person or a program."""

from __future__ import annotations

import os
import pty
import re
import socket
import subprocess
import sys
import time
from dataclasses import fields
from pathlib import Path
from typing import Any

import orjson
import pytest
from click.testing import CliRunner, Result

from ingest.cli import main
from ingest.config import GROUPS, Config, env_name, option_name
from ingest.source import checkpoint
from tests.e2e import PROGRAM

KEY = "ds_" + "0123456789abcdef" * 2
OWN = ("INGEST_", "DATASYNC_", "DATABASE_", "LOG_FORMAT", "LOG_LEVEL", "_DATASYNC_INGEST_COMPLETE", "COMP_")


def clean_env(**values: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(OWN)}
    env.update(values)
    return env


def invoke(args: list[str], tmp_path: Path, **env: str) -> Result:
    """The program in this process, in `tmp_path` (whose .env is empty), with only `env` of ours."""
    (tmp_path / ".env").touch()
    overrides: dict[str, str | None] = {k: None for k in os.environ if k.startswith(OWN)}
    overrides.update(env)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        return CliRunner().invoke(main, args, env=overrides)
    finally:
        os.chdir(cwd)


def program(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    (cwd / ".env").touch()
    return subprocess.run([*PROGRAM, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=120)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- commands ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["statsu"], "datasync-ingest: No such command 'statsu'. Did you mean 'status'?"),
        (["verfiy", "--sample", "3"], "datasync-ingest: No such command 'verfiy'. Did you mean 'verify'?"),
        (["frobnicate"], "datasync-ingest: No such command 'frobnicate'."),
        (["--workers", "0"], "datasync-ingest: configuration error: --workers: must be at least 1 and at most 64, got 0"),
        (["--wrkers", "4"], "datasync-ingest: No such option '--wrkers'. Did you mean '--workers'?"),
        (["run", "--log-level", "loud"],
         "datasync-ingest: configuration error: --log-level: must be one of debug, info, warning, error, got 'loud'"),
        (["status", "--format", "xml"],
         "datasync-ingest: Invalid value for '--format': 'xml' is not one of 'auto', 'text', 'json'."),
    ],
)
def test_a_mistake_exits_2_with_one_line(tmp_path: Path, args: list[str], line: str) -> None:
    result = program(args, tmp_path, clean_env(DATASYNC_API_URL="http://127.0.0.1:9/api/v1", DATASYNC_API_KEY=KEY))
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [line]
    assert result.stdout == ""


def test_no_command_means_run(tmp_path: Path) -> None:
    result = invoke([], tmp_path)
    assert result.exit_code == 2
    assert "--api-url (DATASYNC_API_URL) is required" in result.stderr


# --- shell completion -----------------------------------------------------------------------------


def complete(words: str, tmp_path: Path) -> list[tuple[str, str]]:
    """(type, value) of what bash completion offers for the last word of `words`."""
    parts = words.split(" ")
    result = invoke(
        [], tmp_path, _DATASYNC_INGEST_COMPLETE="bash_complete", COMP_WORDS=words, COMP_CWORD=str(len(parts) - 1)
    )
    assert result.exit_code == 0, result.output
    return [tuple(line.split(",", 1)) for line in result.output.splitlines()]  # type: ignore[misc]


def values(items: list[tuple[str, str]]) -> list[str]:
    return [value for _kind, value in items]


def test_completion_of_commands(tmp_path: Path) -> None:
    assert values(complete("datasync-ingest sta", tmp_path)) == ["status"]
    assert {"run", "status", "verify", "load", "simulate"} <= set(values(complete("datasync-ingest ", tmp_path)))


@pytest.mark.parametrize(
    ("words", "offered"),
    [
        ("datasync-ingest run --source ", ["auto", "feed", "events"]),
        ("datasync-ingest run --gzip o", ["on", "off"]),
        ("datasync-ingest run --log-format ", ["auto", "json", "text"]),
        ("datasync-ingest --workers 4 --log-level w", ["warning"]),
        ("datasync-ingest status --format ", ["auto", "text", "json"]),
    ],
)
def test_completion_of_choices(tmp_path: Path, words: str, offered: list[str]) -> None:
    assert values(complete(words, tmp_path)) == offered


def test_completion_of_options_and_files(tmp_path: Path) -> None:
    assert "--workers" in values(complete("datasync-ingest run --wor", tmp_path))
    assert values(complete("datasync-ingest --segment-max-r", tmp_path)) == ["--segment-max-rows"]
    assert complete("datasync-ingest run --api-key-file se", tmp_path) == [("file", "se")]


# --- run --help -----------------------------------------------------------------------------------


def help_sections(text: str) -> dict[str, str]:
    """Section title -> its body, whitespace collapsed (wrapping does not matter)."""
    sections: dict[str, str] = {}
    title = None
    for line in text.splitlines():
        if line and not line.startswith(" ") and line.endswith(":"):
            title = line[:-1]
            sections[title] = ""
        elif title is not None:
            sections[title] += " " + line.strip()
    return {k: " ".join(v.split()) for k, v in sections.items()}


def test_run_help_groups_the_options_with_metavars_and_every_default(tmp_path: Path) -> None:
    result = invoke(["run", "--help"], tmp_path)
    assert result.exit_code == 0
    sections = help_sections(result.output)
    assert list(sections) == [*GROUPS.values(), "Options"]
    for f in fields(Config):
        # the option, then its help up to its own [env: ...; default: ...], in its group's section
        entry = re.escape(option_name(f.name) + " ") + r"(?:(?!\[env: ).)*" + re.escape(f"[env: {env_name(f.name)}; default: ")
        assert re.search(entry, sections[GROUPS[f.metadata["group"]]]), f.name
    body = " ".join(sections.values())
    for option, metavar in [
        ("--api-url", "URL"), ("--api-key", "KEY"), ("--api-key-file", "PATH"), ("--database-url", "URL"),
        ("--data-dir", "PATH"), ("--workers", "N"), ("--rate-window", "SECONDS"), ("--segment-max-bytes", "BYTES"),
        ("--metrics-port", "PORT"), ("--source", "[auto|feed|events]"), ("--log-format", "[auto|json|text]"),
    ]:
        assert f"{option} {metavar} " in body, option
    assert "VALUE" not in body
    workers = Config().workers
    assert (
        f"--workers N loader processes [env: INGEST_WORKERS; default: auto (here: {workers}): the CPU count,"
        " kept between 2 and 4]" in body
    )
    assert "[env: INGEST_SEGMENT_MAX_ROWS; default: 50000]" in body
    assert "[env: INGEST_METRICS_PORT; default: off]" in body


# --- warnings of the configuration, in the log format ---------------------------------------------


def warnings_of(stderr: str) -> list[str]:
    """The WARNING records of a JSON log; every line must be JSON."""
    records = [orjson.loads(line) for line in stderr.splitlines() if line.strip()]
    return [r["message"] for r in records if r["level"] == "WARNING"]


def unreachable_db_env(tmp_path: Path, **values: str) -> dict[str, str]:
    return clean_env(
        DATASYNC_API_URL="http://127.0.0.1:9/api/v1", DATABASE_URL=f"postgresql://127.0.0.1:{closed_port()}/db",
        INGEST_DATA_DIR=str(tmp_path / "data"), INGEST_LOG_FORMAT="json", **values,
    )


def test_a_key_on_the_command_line_warns_that_ps_shows_it(tmp_path: Path) -> None:
    result = program(["run", "--api-key", KEY], tmp_path, unreachable_db_env(tmp_path))
    assert result.returncode == 1  # the database is unreachable: the run got as far as starting
    warnings = warnings_of(result.stderr)
    assert len(warnings) == 1 and "--api-key on the command line" in warnings[0] and "process list" in warnings[0]
    assert KEY not in result.stderr


def test_a_key_from_the_environment_or_a_file_does_not_warn(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text(KEY + "\n")
    for values in ({"DATASYNC_API_KEY": KEY}, {"DATASYNC_API_KEY_FILE": str(key_file)}):
        result = program(["run"], tmp_path, unreachable_db_env(tmp_path, **values))
        assert result.returncode == 1, result.stderr
        assert warnings_of(result.stderr) == []


def test_old_variable_names_still_work_and_warn_once_each(tmp_path: Path) -> None:
    env = unreachable_db_env(tmp_path, DATASYNC_API_KEY=KEY, INGEST_SEGMENT_ROWS="5", LOG_LEVEL="info")
    del env["INGEST_LOG_FORMAT"]
    env["LOG_FORMAT"] = "json"
    result = program(["run"], tmp_path, env)
    assert result.returncode == 1, result.stderr
    assert sorted(warnings_of(result.stderr)) == [
        "INGEST_SEGMENT_ROWS is deprecated: rename it INGEST_SEGMENT_MAX_ROWS",
        "LOG_FORMAT is deprecated: rename it INGEST_LOG_FORMAT",
        "LOG_LEVEL is deprecated: rename it INGEST_LOG_LEVEL",
    ]


# --- status ---------------------------------------------------------------------------------------


@pytest.fixture
def used_data_dir(tmp_path: Path) -> Path:
    """A data directory as a stopped run leaves it: a checkpoint, segments in two states."""
    data_dir = tmp_path / "data"
    segments = data_dir / "segments"
    for state in ("open", "ready", "loading", "loaded", "rejected"):
        (segments / state).mkdir(parents=True)
    for name in ("p00-00000003-ab12cd34.tsv", "p01-00000002-ab12cd34.tsv"):
        (segments / "ready" / name).write_text("")
    (segments / "loading" / "p00-00000002-ab12cd34.4242.tsv").write_text("")
    state = checkpoint.Checkpoint(
        generation="ab12cd34", mode="mixed", total=300_000, source_total=300_000, newest_ms=1_760_000_000_000,
        partitions=[
            checkpoint.PartitionState(index=0, lane="feed", lower_ms=0, upper_ms=1, done=True, rows=120_000,
                                      last_sealed="p00-00000003-ab12cd34"),
            checkpoint.PartitionState(index=1, lane="events", lower_ms=1, upper_ms=2, rows=1_234,
                                      last_sealed="p01-00000002-ab12cd34"),
        ],
    )
    checkpoint.write(data_dir / "ingestion.state", state)
    return data_dir


def status_env(data_dir: Path) -> dict[str, str]:
    return {"INGEST_DATA_DIR": str(data_dir), "DATABASE_URL": f"postgresql://127.0.0.1:{closed_port()}/db"}


def test_status_as_text_for_a_person(used_data_dir: Path, tmp_path: Path) -> None:
    result = invoke(["status", "--format", "text"], tmp_path, **status_env(used_data_dir))
    assert result.exit_code == 0, result.output
    text = result.output
    rows = [" ".join(line.split()) for line in text.splitlines()]
    assert "index lane done rows last sealed" in rows
    assert "0 feed yes 120,000 p00-00000003-ab12cd34" in rows
    assert "1 events no 1,234 p01-00000002-ab12cd34" in rows
    assert "segments open 0 · ready 2 · loading 1 · loaded 0 · rejected 0" in rows
    assert "total reported 300,000" in rows and "drained no" in rows
    assert any(row.startswith("updated at ") and row.endswith("ago)") for row in rows)
    assert any(row.startswith("database error connection to server at") for row in rows), "the database's error"
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(text)


def test_status_is_json_for_a_program(used_data_dir: Path, tmp_path: Path) -> None:
    result = invoke(["status"], tmp_path, **status_env(used_data_dir))  # stdout is a pipe here
    assert result.exit_code == 0, result.output
    report = orjson.loads(result.output)
    assert [p["lane"] for p in report["checkpoint"]["partitions"]] == ["feed", "events"]
    assert report["segments"]["ready"] == 2
    forced = orjson.loads(invoke(["status", "--format", "json"], tmp_path, **status_env(used_data_dir)).output)
    assert forced["checkpoint"] == report["checkpoint"]


def test_status_on_a_terminal_is_text(used_data_dir: Path, tmp_path: Path) -> None:
    env = clean_env(**status_env(used_data_dir), INGEST_LOG_FORMAT="json")
    primary, secondary = pty.openpty()
    process = subprocess.Popen([*PROGRAM, "status"], env=env, cwd=tmp_path, stdout=secondary, stderr=subprocess.PIPE)
    os.close(secondary)
    output = b""
    while True:
        try:
            chunk = os.read(primary, 65536)
        except OSError:  # EIO: the program closed the terminal
            break
        if not chunk:
            break
        output += chunk
    os.close(primary)
    assert process.wait(timeout=120) == 0, process.stderr.read() if process.stderr else ""
    rows = [" ".join(line.split()) for line in output.decode().splitlines()]
    assert "0 feed yes 120,000 p00-00000003-ab12cd34" in rows
    assert not rows[0].startswith("{")


def test_status_text_shows_what_a_newer_report_adds(
    used_data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ingest.ops import report

    collect = report.collect_status

    def with_lag(config: Config) -> dict[str, Any]:
        out = collect(config)
        out["checkpoint"].update(lag_seconds=300.0, last_topup_timestamp_seconds=time.time() - 7200,
                                 loaded_newest_ms=1_760_000_000_000)
        for part in out["checkpoint"]["partitions"]:
            part["behind_ms"] = 4_500
        return out

    monkeypatch.setattr(report, "collect_status", with_lag)
    result = invoke(["status", "--format", "text"], tmp_path, **status_env(used_data_dir))
    assert result.exit_code == 0, result.output
    rows = [" ".join(line.split()) for line in result.output.splitlines()]
    assert "lag seconds 5.0 min" in rows
    assert any(re.fullmatch(r"last topup timestamp seconds \d{4}-\d\d-\d\d .*\(2\.0 h ago\)", row) for row in rows)
    assert any(re.fullmatch(r"loaded newest ms 2025-10-\d\d .* ago\)", row) for row in rows)
    assert "index lane done rows last sealed behind ms" in rows
    assert "0 feed yes 120,000 p00-00000003-ab12cd34 4.5 s" in rows


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_status_masks_a_secret_whatever_reports_it(
    used_data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str
) -> None:
    from ingest.ops import report

    password = "pw-" + "9" * 16
    dsn_file = tmp_path / "dsn"
    dsn_file.write_text(f"postgresql://ingest:{password}@127.0.0.1:{closed_port()}/db\n")

    def quoting(config: Config) -> dict[str, Any]:
        return {"data_dir": str(config.data_dir), "database": {"error": f"refused {config.database_url}"}}

    monkeypatch.setattr(report, "collect_status", quoting)
    result = invoke(["status", "--format", fmt], tmp_path, INGEST_DATA_DIR=str(used_data_dir),
                    DATABASE_URL_FILE=str(dsn_file))
    assert result.exit_code == 0, result.output
    assert "refused postgresql://ingest:***@" in result.output
    assert password not in result.output + result.stderr


def test_the_simulator_is_imported_only_when_its_command_is_named() -> None:
    """Every run, and so the start-up CPU of every run, would pay for it otherwise."""
    probe = "import sys, ingest.cli; print(sorted(m for m in sys.modules if m.startswith('ingest.simulator')))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
    result = CliRunner().invoke(main, ["simulate", "--help"])
    assert result.exit_code == 0 and "simulator" in result.output
