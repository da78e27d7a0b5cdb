"""The compose stack as a user runs it, with the host-network override this machine needs:
PostgreSQL, the simulator and the ingestion come up, the ingestion drains and exits 0,
`docker compose run ingestion verify` matches, and the follow variant keeps the service
up, healthy, after the drain."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import requests

from ingest.ops.check_compose import compose_command
from tests.docker.engine import REPO, free_port, unique, wait_for

pytestmark = pytest.mark.docker

FILES = [REPO / "docker" / "docker-compose.yml", REPO / "docker" / "docker-compose.host-network.yml"]
EVENTS = 20_000


@dataclass
class Stack:
    project: str
    env: dict[str, str]

    def compose(self, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess[str]:
        files = [a for f in FILES for a in ("-f", str(f))]
        command = [*compose_command(), "-p", self.project, *files, *args]
        result = subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=timeout, check=False)
        if check and result.returncode != 0:
            raise AssertionError(f"compose {' '.join(args)} exited {result.returncode}: {result.stderr[-3000:]}")
        return result

    def state(self, service: str) -> dict[str, str]:
        lines = self.compose("ps", "--all", "--format", "json", service).stdout.splitlines()
        states = [json.loads(line) for line in lines if line.strip()]
        return states[0] if states else {}

    def logs(self, service: str) -> str:
        return self.compose("logs", "--no-color", service, check=False).stdout


@pytest.fixture
def stack(image: str) -> Iterator[Stack]:
    """A project of its own (containers, volumes), on free ports, with the session's image."""
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("INGEST_", "DATASYNC_", "COMPOSE_"))},
        "INGEST_IMAGE": image,
        "POSTGRES_PORT": str(free_port()),
        "SIMULATOR_PORT": str(free_port()),
        "METRICS_PORT": str(free_port()),
        "SIMULATOR_EVENTS": str(EVENTS),
    }
    made = Stack(unique("dsi-test"), env)
    try:
        yield made
    finally:
        made.compose("--profile", "*", "down", "--volumes", "--remove-orphans", "--timeout", "30", check=False)


def health(stack: Stack) -> str | None:
    try:
        return str(requests.get(f"http://127.0.0.1:{stack.env['METRICS_PORT']}/health", timeout=5).json()["status"])
    except (requests.RequestException, ValueError, KeyError):
        return None


def test_stack_ingests_to_drained_and_verify_matches(stack: Stack) -> None:
    stack.compose("up", "--detach", "--no-build", timeout=600)
    wait_for(lambda: stack.state("ingestion").get("State") == "exited", 300, "the ingestion to exit")
    log = stack.logs("ingestion")
    assert stack.state("ingestion")["ExitCode"] == 0, log[-3000:]
    assert "drained: every event fetched and loaded" in log

    result = stack.compose("run", "--rm", "--no-deps", "ingestion", "verify", check=False)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    report = json.JSONDecoder().raw_decode(result.stdout, result.stdout.index("{\n"))[0]
    # The compose simulator keeps its default (mild) chaos: a few events cannot be stored.
    assert report["match"] is True and report["table_rows"] == report["source_events"] > EVENTS * 0.99, report

    # The same data directory, kept running: it drains what is left (nothing) and follows.
    stack.compose("--profile", "follow", "up", "--detach", "--no-build", "ingestion-follow", timeout=300)
    wait_for(lambda: health(stack) == "following", 120, "the follow variant to report following")
    assert stack.state("ingestion-follow")["State"] == "running"
