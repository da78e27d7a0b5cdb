"""The simulator in a child process: its own interpreter and GIL, like a real remote service.

`spawn_simulator` runs `python -m ingest.simulator.cli` with the full config as a JSON file,
waits for the ready file, and offers the same handle as the in-process `Simulator`
(truth from the truth file, plus the live arrivals and their clock over HTTP from the hidden
`/_sim/arrivals`; stats from `/_sim/stats`).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Self

import requests

from ingest.simulator.config import SimulatorConfig
from ingest.simulator.dataset import Truth
from ingest.simulator.truth import read_truth_file, with_arrivals


class SpawnedSimulator:
    """A simulator in a child process; `truth()`, `freeze_arrivals()` and `resume_arrivals()`
    give exactly the guarantees documented on `Simulator` (the snapshot is taken in the child,
    at one instant while the request to it is served)."""

    def __init__(self, config: SimulatorConfig, host: str = "127.0.0.1", port: int = 0,
                 startup_timeout: float = 120.0) -> None:
        self.config = config
        self.api_key = config.api_keys[0]
        self._dir = Path(tempfile.mkdtemp(prefix="datasync-sim-"))
        (self._dir / "config.json").write_text(config.to_json())
        self._ready, self._truth_path = self._dir / "ready", self._dir / "truth.txt"
        self._log = open(self._dir / "simulator.log", "wb")  # noqa: SIM115 (lives as long as the child)
        self._truth: Truth | None = None
        self.process = subprocess.Popen(
            [sys.executable, "-m", "ingest.simulator.cli", "--config", str(self._dir / "config.json"),
             "--host", host, "--port", str(port), "--ready-file", str(self._ready),
             "--truth-file", str(self._truth_path)],
            stdout=subprocess.DEVNULL, stderr=self._log,
        )
        deadline = time.monotonic() + startup_timeout
        while not self._ready.exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"simulator did not start: {self.log_tail()}")
            time.sleep(0.05)
        self.base_url = self._ready.read_text().strip()
        self.root_url = self.base_url[: -len("/api/v1")]

    def log_tail(self) -> str:
        path = self._dir / "simulator.log"
        return path.read_text(errors="replace")[-2000:] if path.exists() else ""

    def truth(self) -> Truth:
        if not self.config.arrival_rate:
            return self._static_truth()
        return self._arrivals("GET", "")

    def freeze_arrivals(self) -> Truth:
        if not self.config.arrival_rate:
            return self._static_truth()
        return self._arrivals("POST", "/freeze")

    def resume_arrivals(self) -> None:
        if self.config.arrival_rate:
            requests.post(self.root_url + "/_sim/arrivals/resume", timeout=30).raise_for_status()

    def _static_truth(self) -> Truth:
        if self._truth is None:
            self._truth = read_truth_file(self._truth_path)
        return self._truth

    def _arrivals(self, method: str, action: str) -> Truth:
        response = requests.request(method, self.root_url + "/_sim/arrivals" + action, timeout=60)
        response.raise_for_status()
        return with_arrivals(self._static_truth(), response.text)

    def stats(self) -> dict[str, Any]:
        response = requests.get(self.root_url + "/_sim/stats", timeout=10)
        response.raise_for_status()
        result: dict[str, Any] = response.json()
        return result

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def spawn_simulator(config: SimulatorConfig | None = None, host: str = "127.0.0.1", port: int = 0) -> SpawnedSimulator:
    return SpawnedSimulator(config or SimulatorConfig(), host, port)
