"""The Docker CLI for the tests in this folder: images, volumes and containers under names
of their own, removed whatever the test's outcome, and waits on conditions with deadlines.

Everything runs on the host network (`--network host`): the machines these tests run on
may have no bridge network at all, and the simulator listens on the host's loopback."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "docker" / "Dockerfile"


def docker(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout, check=False)
    if check and result.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} exited {result.returncode}: {result.stderr.strip()[-2000:]}")
    return result


def engine_missing() -> str | None:
    """Why the engine cannot be used, in one line; None when `docker info` answers."""
    if shutil.which("docker") is None:
        return "no Docker engine: the docker CLI is not installed"
    try:
        result = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"], capture_output=True,
                                text=True, timeout=30, check=False)
    except subprocess.TimeoutExpired:
        return "no Docker engine: `docker info` did not answer within 30 s"
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        return f"no Docker engine answers (`docker info`: {last})"
    return None


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def build(tag: str, context: Path = REPO) -> tuple[float, str]:
    """Build docker/Dockerfile (relative to `context`) under `tag`: seconds taken, output."""
    started = time.monotonic()
    result = docker("build", "--network", "host", "-f", str(context / "docker" / "Dockerfile"), "-t", tag, str(context),
                    timeout=1800)
    return time.monotonic() - started, result.stdout + result.stderr


def remove_image(tag: str) -> None:
    """The tag only: its layers stay as the build cache of the next run."""
    docker("rmi", "--no-prune", tag, check=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.1)


@dataclass
class Container:
    name: str
    metrics_port: int | None = None

    def inspect(self) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(docker("inspect", self.name).stdout)[0]
        return result

    @property
    def running(self) -> bool:
        return bool(self.inspect()["State"]["Running"])

    def wait(self, timeout: float = 300) -> int:
        return int(docker("wait", self.name, timeout=timeout).stdout.strip())

    def logs(self) -> str:
        result = docker("logs", self.name, check=False)
        return result.stdout + result.stderr

    def metric(self, name: str) -> float | None:
        """One sample of the run's /metrics, None while nothing answers."""
        try:
            text = requests.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).text
        except requests.RequestException:
            return None
        for line in text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        return None


@dataclass
class Containers:
    """Containers and volumes a test starts; `close` removes them all."""

    image: str
    names: list[str] = field(default_factory=list)
    volumes: list[str] = field(default_factory=list)

    def volume(self) -> str:
        name = unique("dsi-test-data")
        docker("volume", "create", name)
        self.volumes.append(name)
        return name

    def start(self, volume: str, env: dict[str, str], *args: str, docker_args: tuple[str, ...] = ()) -> Container:
        """`docker run -d` of the image (its own entrypoint and, without args, CMD ["run"])."""
        container = Container(unique("dsi-test"), int(env["INGEST_METRICS_PORT"]) if "INGEST_METRICS_PORT" in env else None)
        env_args = [a for k, v in env.items() for a in ("-e", f"{k}={v}")]
        docker("run", "-d", "--name", container.name, "--network", "host", "-v", f"{volume}:/data", *env_args,
               *docker_args, self.image, *args)
        self.names.append(container.name)
        return container

    def run(self, volume: str, env: dict[str, str], *args: str, timeout: float = 300) -> tuple[int, str]:
        """Run to the end: exit code and output."""
        container = self.start(volume, env, *args)
        code = container.wait(timeout)
        return code, container.logs()

    def close(self) -> None:
        for name in self.names:
            docker("rm", "-f", "-v", name, check=False)
        for name in self.volumes:
            docker("volume", "rm", "-f", name, check=False)


class MemoryPeak:
    """The container's memory from its cgroup, read on the host while it runs: the kernel's
    peak of usage (page cache included) and the sampled peak working set (usage less
    inactive file pages, what the kubelet counts). None where the cgroup is not found."""

    def __init__(self, container_id: str) -> None:
        candidates = [
            Path(f"/sys/fs/cgroup/memory/docker/{container_id}"),  # v1, cgroupfs
            Path(f"/sys/fs/cgroup/system.slice/docker-{container_id}.scope"),  # v2, systemd
            Path(f"/sys/fs/cgroup/docker/{container_id}"),  # v2, cgroupfs
        ]
        self.path = next((p for p in candidates if p.is_dir()), None)
        self.usage_peak = 0
        self.working_set_peak = 0

    def sample(self) -> None:
        if self.path is None:
            return
        try:
            if (self.path / "memory.max_usage_in_bytes").exists():  # v1
                usage = int((self.path / "memory.usage_in_bytes").read_text())
                peak = int((self.path / "memory.max_usage_in_bytes").read_text())
                inactive_key = "total_inactive_file"
            else:  # v2
                usage = int((self.path / "memory.current").read_text())
                peak_file = self.path / "memory.peak"
                peak = int(peak_file.read_text()) if peak_file.exists() else usage
                inactive_key = "inactive_file"
            stat = dict(line.split() for line in (self.path / "memory.stat").read_text().splitlines())
        except (OSError, ValueError):
            return  # the container is gone: keep what was seen
        self.usage_peak = max(self.usage_peak, peak)
        self.working_set_peak = max(self.working_set_peak, usage - int(stat.get(inactive_key, 0)))
