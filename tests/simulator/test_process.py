"""The simulator as a separate process: `spawn_simulator` and the `simulate` command."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import requests

from ingest.simulator import SimulatorConfig, read_truth_file, spawn_simulator
from ingest.simulator.dataset import Dataset
from tests.conftest import SIM_KEY
from tests.simulator.helpers import (
    crawl,
    feed_url,
    session,
    storable,
    token,
    wait_until,
)


def test_spawned_simulator_serves_a_crawl_that_matches_its_truth_file() -> None:
    config = SimulatorConfig(events=100_000, seed=8, latency="none", rate_limits=False, chaos="mild",
                             api_keys=(SIM_KEY,), slow_delay=0.2)
    with spawn_simulator(config) as sim:
        assert re.match(r"^http://127\.0\.0\.1:\d+/api/v1$", sim.base_url) and sim.api_key == SIM_KEY
        truth = sim.truth()
        assert truth.total == 100_000 and truth.unstorable == 20
        assert truth == Dataset.build(config).truth()  # the file holds exactly the in-process truth
        with session(SIM_KEY) as http:
            http.headers["X-Stream-Token"] = token(http, sim.base_url)
            items = crawl(http, feed_url(sim.base_url), limit=5000)
        assert {e["id"] for e in items if storable(e)} == truth.storable_ids
        stats = sim.stats()
        assert stats["requests"]["feed"] >= 20 and stats["events_served"] >= 95_000
        process = sim.process
    assert process.poll() is not None


def test_simulate_command_prints_url_and_demo_key_and_stops_on_sigint(tmp_path) -> None:
    ready, truth_file = tmp_path / "ready", tmp_path / "truth.txt"
    child = subprocess.Popen(
        [sys.executable, "-m", "ingest.simulator.cli", "--events", "3000", "--latency", "none", "--chaos", "none",
         "--ready-file", str(ready), "--truth-file", str(truth_file), "--set", "cursor_ttl=60"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "DATASYNC_SIM_FEED_LIMIT": "7"},
    )
    try:
        line = child.stdout.readline() if child.stdout else ""
        match = re.search(r"(http://127\.0\.0\.1:\d+/api/v1)\S*.*(ds_[0-9a-f]{32})", line)
        assert match, line
        base_url, key = match.groups()
        wait_until(ready.exists, timeout=30)
        assert ready.read_text().strip() == base_url
        body = requests.get(base_url + "/events", headers={"X-API-Key": key}, timeout=10).json()
        assert body["meta"]["total"] == 3000 and 55 <= body["pagination"]["cursorExpiresIn"] <= 60
        truth = read_truth_file(truth_file)
        assert truth.total == 3000 and truth.unstorable == 0 and body["data"][0]["id"] in truth.storable_ids
    finally:
        child.send_signal(signal.SIGINT)
        _, err = child.communicate(timeout=20)
    assert child.returncode == 0
    assert '"feed_limit": 7' in err and '"cursor_ttl": 60' in err  # the tunables are echoed
