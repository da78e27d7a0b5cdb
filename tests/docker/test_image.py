"""The image on a real engine: it builds (a .py edit reuses the dependency layer), a batch
run in a container against the simulator on the host is exact with its state on a named
volume, `docker stop` drains and exits 143 and a new container resumes, `verify` runs in a
container, the HEALTHCHECK follows the run, and every process is uid 10001 under tini."""

from __future__ import annotations

import json
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from ingest.simulator import SimulatorConfig
from ingest.simulator.process import SpawnedSimulator, spawn_simulator
from tests.docker.engine import (
    REPO,
    Container,
    Containers,
    MemoryPeak,
    build,
    docker,
    free_port,
    remove_image,
    unique,
    wait_for,
)

pytestmark = pytest.mark.docker

KUBERNETES = REPO / "docker" / "kubernetes"


def simulator(events: int, **tunables: Any) -> SpawnedSimulator:
    return spawn_simulator(SimulatorConfig(events=events, latency="none", rate_limits=False, chaos="none", seed=9,
                                           **tunables))


@pytest.fixture
def fast_sim() -> Iterator[SpawnedSimulator]:
    sim = simulator(20_000)
    try:
        yield sim
    finally:
        sim.stop()


@pytest.fixture
def slow_sim() -> Iterator[SpawnedSimulator]:
    """Every page takes 0.2-0.6 s: a run of 80 pages on two partitions lasts some 15 s, long
    enough to act on it mid-run, whatever the machine's load."""
    sim = simulator(20_000, p_slow=1.0, slow_delay=0.4)
    try:
        yield sim
    finally:
        sim.stop()


def run_env(sim: SpawnedSimulator, **extra: Any) -> dict[str, str]:
    """The container's settings beyond the image's defaults. Unthrottled simulators: the
    user's flag for a source without rate limits."""
    env = {
        "DATASYNC_API_URL": sim.base_url,
        "DATASYNC_API_KEY": sim.api_key,
        "INGEST_PACING": "off",
        "INGEST_WORKERS": "2",
        "INGEST_METRICS_PORT": str(free_port()),
    }
    env.update({k: str(v) for k, v in extra.items()})
    return env


def slow_env(sim: SpawnedSimulator, **extra: Any) -> dict[str, str]:
    return run_env(sim, INGEST_PAGE_LIMIT=250, INGEST_SEGMENT_MAX_ROWS=1000, INGEST_PARTITIONS=2, **extra)


def verify(containers: Containers, volume: str, sim: SpawnedSimulator) -> dict[str, Any]:
    """`verify` in a container of its own, on the run's volume (its embedded database)."""
    code, output = containers.run(volume, run_env(sim), "verify")
    assert code == 0, output[-3000:]
    report: dict[str, Any] = json.JSONDecoder().raw_decode(output, output.index("{\n"))[0]
    return report


def assert_exact(report: dict[str, Any], sim: SpawnedSimulator) -> None:
    assert report["match"] is True, report
    assert report["table_rows"] == len(sim.truth().storable_ids), report


def memory_request_bytes() -> int:
    job = yaml.safe_load((KUBERNETES / "job-first-load.yaml").read_text())
    request = job["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"]["memory"]
    match = re.fullmatch(r"(\d+)(Mi|Gi)", request)
    assert match, request
    return int(match.group(1)) << (20 if match.group(2) == "Mi" else 30)


def test_a_py_edit_rebuilds_on_the_cached_dependency_layer(built_image: tuple[str, float, str], tmp_path: Path) -> None:
    """The build context copied with one .py changed: the dependency install is a cache hit
    (the layer cache keys on content, so the copy shares the checkout's cache)."""
    tag, seconds, _ = built_image
    context = tmp_path / "context"
    context.mkdir()
    for name in ("setup.cfg", "setup.py", "README.md", ".dockerignore"):
        shutil.copy2(REPO / name, context / name)
    shutil.copytree(REPO / "ingest", context / "ingest", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "docker", context / "docker")
    with open(context / "ingest" / "waits.py", "a") as f:
        f.write(f"\n# {unique('edit')}\n")
    edited = "datasync-ingest:" + unique("edited")
    try:
        rebuild_seconds, output = build(edited, context)
    finally:
        remove_image(edited)
    steps = re.split(r"\nStep \d+/\d+ : |\n#\d+ \[", output)
    deps = [s for s in steps if "-r /requirements.txt" in s.splitlines()[0]]
    code = [s for s in steps if "COPY ingest/" in s.splitlines()[0]]
    assert deps and all("Using cache" in s or "CACHED" in s for s in deps), output[-3000:]
    assert code and not any("Using cache" in s or "CACHED" in s for s in code), "the edit did not reach the image"
    print(f"\nimage {tag}: first build {seconds:.1f} s; rebuild after a .py edit {rebuild_seconds:.1f} s")


def test_the_image_holds_the_runtime_only(image: str) -> None:
    """No pip, build or test tools, no apt lists or caches, and a size within budget (the
    growth above the base: what this Dockerfile adds)."""
    probe = "import importlib.util as u; print([m for m in ('pip', 'setuptools', 'pytest', 'ingest') if u.find_spec(m)])"
    assert docker("run", "--rm", "--network", "host", "--entrypoint", "python", image, "-c", probe).stdout.strip() == "['ingest']"
    leftovers = docker("run", "--rm", "--network", "host", "--entrypoint", "find", image,
                       "/var/lib/apt/lists", "/var/cache/apt", "-type", "f", "-size", "+0", check=False)
    assert leftovers.stdout.strip() == "", leftovers.stdout
    size = int(docker("image", "inspect", "--format", "{{.Size}}", image).stdout)
    base = int(docker("image", "inspect", "--format", "{{.Size}}", "python:3.11-slim-bookworm").stdout)
    print(f"\nimage {image}: {size / 1e6:.0f} MB, {(size - base) / 1e6:.0f} MB above its base")
    assert size - base < 120e6


def test_batch_run_in_a_container_is_exact_and_verify_agrees(
    containers: Containers, fast_sim: SpawnedSimulator
) -> None:
    volume = containers.volume()
    container = containers.start(volume, run_env(fast_sim))
    memory = MemoryPeak(container.inspect()["Id"])
    while container.running:
        memory.sample()
        time.sleep(0.1)
    code = container.wait()
    log = container.logs()
    assert code == 0, log[-3000:]
    assert "drained: every event fetched and loaded" in log
    assert_exact(verify(containers, volume, fast_sim), fast_sim)
    if memory.path is not None:
        print(f"\nbatch run of 20,000 events: peak memory {memory.usage_peak / 2**20:.0f} MiB with page cache,"
              f" peak working set {memory.working_set_peak / 2**20:.0f} MiB")
        assert memory.working_set_peak < memory_request_bytes(), "the Kubernetes memory request is too small"


def _wait_loading(container: Container) -> None:
    wait_for(lambda: (container.metric("datasync_events_loaded_total") or 0) > 0 or not container.running, 120,
             "the first loaded events")
    assert container.running, container.logs()[-3000:]


def test_docker_stop_drains_exits_143_and_a_new_container_resumes_exactly(
    containers: Containers, slow_sim: SpawnedSimulator
) -> None:
    volume = containers.volume()
    env = slow_env(slow_sim)
    first = containers.start(volume, env)
    _wait_loading(first)
    # Under tini, as uid 10001: every process of the container (docker top reads the host's view).
    assert docker("exec", first.name, "cat", "/proc/1/comm").stdout.strip() == "tini"
    top = docker("top", first.name, "-eo", "uid,pid,comm").stdout.split("\n")[1:]
    uids = {line.split()[0] for line in top if line.strip()}
    assert uids == {"10001"}, top
    assert len(top) > 3, "the supervisor, fetchers, loaders and the embedded PostgreSQL"

    docker("stop", "--time", "120", first.name, timeout=180)
    state = first.inspect()["State"]
    assert state["ExitCode"] == 143, first.logs()[-3000:]
    assert "stopped by signal; state kept" in first.logs()

    code, log = containers.run(volume, env)
    assert code == 0, log[-3000:]
    assert "resuming from the checkpoint" in log
    assert_exact(verify(containers, volume, slow_sim), slow_sim)


def test_healthcheck_is_healthy_during_a_run_and_unhealthy_after_a_failure(
    containers: Containers, slow_sim: SpawnedSimulator
) -> None:
    """The image's own HEALTHCHECK command, probed every second instead of every 15 s."""
    volume = containers.volume()
    env = slow_env(slow_sim, INGEST_MAX_ATTEMPTS=1, INGEST_MAX_RESTARTS=0)
    container = containers.start(volume, env, docker_args=("--health-interval", "1s", "--health-retries", "1"))
    wait_for(lambda: container.inspect()["State"]["Health"]["Status"] == "healthy" or not container.running, 120,
             "a healthy container")
    assert container.running, container.logs()[-3000:]

    slow_sim.stop()  # the API goes away: the page fails with no attempt or restart left
    assert container.wait(180) == 1, container.logs()[-3000:]
    health = container.inspect()["State"]["Health"]
    assert health["Status"] == "unhealthy"
    assert any(probe["ExitCode"] == 0 for probe in health["Log"]), "the check passed while the run worked"
    assert "run failed" in container.logs()
