"""A faithful, seeded, fast stand-in for the DataSync API (datasync-api.md), with a fault layer.

`start_simulator(cfg)` serves it from a thread of this process; `spawn_simulator(cfg)` from a
child process. Both return a handle with `base_url`, `api_key`, `truth()`, `stats()`,
`stop()`, usable as a context manager, and `freeze_arrivals()`/`resume_arrivals()` for a
live dataset (`arrival_rate`; what a truth snapshot guarantees is documented on `Simulator`).
"""

from ingest.simulator.bench import measure_throughput
from ingest.simulator.config import SimulatorConfig
from ingest.simulator.dataset import Truth
from ingest.simulator.process import SpawnedSimulator, spawn_simulator
from ingest.simulator.server import Simulator, start_simulator
from ingest.simulator.truth import read_truth_file

__all__ = [
    "Simulator",
    "SimulatorConfig",
    "SpawnedSimulator",
    "Truth",
    "measure_throughput",
    "read_truth_file",
    "spawn_simulator",
    "start_simulator",
]
