"""The planning probes against the simulator: the oldest-event estimate that sizes the
partitions, for every source mode."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ingest.config import Config
from ingest.simulator import SimulatorConfig, spawn_simulator, start_simulator
from ingest.source.api import ApiClient
from ingest.source.plan import WALKERS_PER_CPU
from ingest.source.probe import make_plan

TIME_START = 1766946793000  # the simulator's oldest event


def pages_asked(client: ApiClient) -> int:
    return client.stats["requests"] - client.stats["token_refreshes"]


@pytest.fixture(scope="module")
def sim() -> Iterator[Any]:
    # Enough events that the first probe (1,000 events) sits inside the ramp at the newest end.
    with spawn_simulator(SimulatorConfig(events=600_000, latency="none", rate_limits=False, chaos="none")) as simulator:
        yield simulator


@pytest.mark.parametrize("source", ["auto", "events"])
def test_the_plan_estimates_the_oldest_event_from_inside_the_data(sim: Any, data_dir: Path, source: str) -> None:
    config = Config(api_url=sim.base_url, api_key=sim.api_key, data_dir=data_dir, source=source, pacing="off")
    client = ApiClient(config)
    try:
        plan = make_plan(config, client)
    finally:
        client.close()
    assert plan.newest_ms is not None and plan.oldest_ms is not None
    span = plan.newest_ms - TIME_START
    assert abs(plan.oldest_ms - TIME_START) < 0.12 * span, "within 12% of the real time range (one small probe: 56% off)"
    assert pages_asked(client) == 2, "two small probes"
    assert plan.partitions[0].upper_ms == plan.newest_ms + 1 and plan.partitions[-1].lower_ms == 0
    # a simulator without latency on this machine: bound by the CPUs, a fetcher per core
    assert len(plan.partitions) == WALKERS_PER_CPU * (os.cpu_count() or 1)


def test_a_source_that_fits_in_one_probe_needs_no_second(data_dir: Path) -> None:
    small = start_simulator(SimulatorConfig(events=500, latency="none", rate_limits=False, chaos="none"))
    try:
        config = Config(api_url=small.base_url, api_key=small.api_key, data_dir=data_dir, pacing="off")
        client = ApiClient(config)
        plan = make_plan(config, client)
        assert pages_asked(client) == 1
        assert plan.partitions[-1].lower_ms == 0 and plan.partitions[0].upper_ms == plan.newest_ms + 1
    finally:
        small.stop()
