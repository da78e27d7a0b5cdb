"""`datasync-ingest simulate`: serve the simulator until SIGINT/SIGTERM.

Settings are layered: defaults < `--config FILE` (JSON object of tunables) < environment
`DATASYNC_SIM_<NAME>` < `--set NAME=VALUE` < the named options. Every applied tunable is
echoed to stderr at start-up, so a run's model is always on record.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

import click

from ingest.simulator.config import (
    CHAOS_MODES,
    LATENCY_MODES,
    PROTOCOL_FAULTS,
    SimulatorConfig,
    parse_setting,
)
from ingest.simulator.dataset import Dataset
from ingest.simulator.server import start_simulator
from ingest.simulator.truth import write_truth_file

ENV_PREFIX = "DATASYNC_SIM_"


def build_simulator_config(
    file_values: Mapping[str, Any], env: Mapping[str, str], settings: list[str], options: Mapping[str, Any]
) -> SimulatorConfig:
    """Pure layering of the setting sources (see the module docstring); raises ValueError."""
    config = SimulatorConfig.from_mapping(file_values)
    changes: dict[str, Any] = {}
    for f in fields(SimulatorConfig):
        text = env.get(ENV_PREFIX + f.name.upper())
        if text is not None and f.name != "api_keys":
            changes[f.name] = parse_setting(config, f.name, text)
    for item in settings:
        name, sep, text = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects NAME=VALUE, got {item!r}")
        changes[name.strip()] = parse_setting(config, name.strip(), text)
    changes.update({name: value for name, value in options.items() if value is not None})
    return SimulatorConfig.from_mapping(changes, base=config)


def write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


@click.command("simulate")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=0, show_default=True, type=int, help="Port; 0 picks a free one.")
@click.option("--events", type=click.IntRange(min=1), help="Events in the dataset [default: 3000000].")
@click.option("--seed", type=int, help="Dataset seed [default: 42].")
@click.option("--api-key", "api_keys", multiple=True, help="Accepted key (repeatable); none: a demo key is printed.")
@click.option("--latency", type=click.Choice(LATENCY_MODES), help="Latency model [default: realistic].")
@click.option("--time-scale", type=click.FloatRange(min=1.0), help="Divide every duration by this [default: 1].")
@click.option("--arrival-rate", type=click.FloatRange(min=0.0), metavar="R",
              help="Go live: append R new events per model second at the newest end while serving, timestamped "
                   "at arrival on the data's own clock (from the newest event on); scaled by --time-scale like "
                   "every duration, so R x scale events per wall second [default: 0, a static dataset].")
@click.option("--rate-limits", type=click.Choice(["on", "off"]), help="Enforce rate limits [default: on].")
@click.option("--chaos", type=click.Choice(CHAOS_MODES), help="Fault preset [default: mild].")
@click.option("--chaos-seed", type=int, help="Seed of the fault layer [default: 7].")
@click.option("--protocol-fault", type=click.Choice(PROTOCOL_FAULTS),
              help="Paging that breaks in well-formed 200s: hasMore without nextCursor, a nextCursor back to the "
                   "page just served, or empty pages that claim more [default: none].")
@click.option("--protocol-fault-rate", type=click.FloatRange(0.0, 1.0), metavar="P",
              help="Share of page positions served with --protocol-fault on their first request [default: 0].")
@click.option("--protocol-fault-from", type=click.IntRange(min=0), metavar="N",
              help="From position N of the order on, every page has --protocol-fault and the server never gets "
                   "past N [default: never].")
@click.option("--ready-file", type=click.Path(dir_okay=False, path_type=Path),
              help="Written (atomically) with the base URL once listening.")
@click.option("--truth-file", type=click.Path(dir_okay=False, path_type=Path),
              help="Written at start: JSON header line, then the storable ids one per line (the static "
                   "dataset: later arrivals are served at /_sim/arrivals).")
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="JSON object of tunables (datasync-api.md section 9, snake_case names).")
@click.option("--set", "settings", multiple=True, metavar="NAME=VALUE", help="Set any tunable (repeatable).")
def simulate(
    host: str, port: int, events: int | None, seed: int | None, api_keys: tuple[str, ...], latency: str | None,
    time_scale: float | None, arrival_rate: float | None, rate_limits: str | None, chaos: str | None,
    chaos_seed: int | None, protocol_fault: str | None, protocol_fault_rate: float | None,
    protocol_fault_from: int | None, ready_file: Path | None, truth_file: Path | None, config_file: Path | None,
    settings: tuple[str, ...],
) -> None:
    """Serve the bundled DataSync API simulator."""
    options = {
        "events": events, "seed": seed, "api_keys": api_keys or None, "latency": latency,
        "time_scale": time_scale, "arrival_rate": arrival_rate,
        "rate_limits": None if rate_limits is None else rate_limits == "on", "chaos": chaos, "chaos_seed": chaos_seed,
        "protocol_fault": protocol_fault, "protocol_fault_rate": protocol_fault_rate,
        "protocol_fault_from": protocol_fault_from,
    }
    try:
        file_values = json.loads(config_file.read_text()) if config_file else {}
        config = build_simulator_config(file_values, os.environ, list(settings), options)
    except (ValueError, TypeError) as exc:
        raise click.UsageError(str(exc)) from None
    click.echo("simulator settings: " + json.dumps(config.effective(), ensure_ascii=False), err=True)
    started = time.monotonic()
    dataset = Dataset.build(config)
    if truth_file:
        write_truth_file(truth_file, dataset)
    sim = start_simulator(config, host, port, dataset=dataset)
    click.echo(f"dataset of {len(dataset)} events ready in {time.monotonic() - started:.1f} s", err=True)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    if ready_file:
        write_atomically(ready_file, sim.base_url + "\n")
    click.echo(f"DataSync simulator at {sim.base_url} with X-API-Key: {sim.api_key}")
    sys.stdout.flush()
    while not stop.wait(0.5):
        pass
    sim.stop()
    click.echo("simulator stopped", err=True)


if __name__ == "__main__":
    simulate()
