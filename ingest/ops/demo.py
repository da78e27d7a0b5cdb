"""`make demo`: the whole product on one machine, with nothing to configure.

Starts the bundled simulator in its own process (no latency, rate limits off, mild chaos so
that retries and rejects show), ingests it into the embedded PostgreSQL under
`.datasync/demo`, then runs `verify` and prints its report. Exit code: 0 only when the run
drained and verify found every storable event exactly once.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import click
import orjson

from ingest.config import load_config
from ingest.logs import configure_logging
from ingest.ops.report import Unchecked, run_verify
from ingest.run.exits import ExitCode
from ingest.run.supervisor import run
from ingest.simulator import SimulatorConfig, spawn_simulator


@click.command()
@click.option("--events", default=300_000, show_default=True, help="events the simulator serves")
@click.option("--workers", default=2, show_default=True, help="loader processes")
@click.option("--chaos", default="mild", show_default=True, type=click.Choice(["none", "mild", "heavy"]))
@click.option("--data-dir", default=".datasync/demo", show_default=True, type=click.Path(path_type=Path))
def main(events: int, workers: int, chaos: str, data_dir: Path) -> None:
    """Simulator -> run -> verify, in the embedded database."""
    shutil.rmtree(data_dir, ignore_errors=True)  # a demo always starts from nothing
    with spawn_simulator(SimulatorConfig(events=events, latency="none", rate_limits=False, chaos=chaos)) as sim:
        config = load_config(
            {
                "api_url": sim.base_url,
                "api_key": sim.api_key,
                "data_dir": str(data_dir),
                "workers": str(workers),
                "database_url": "",  # always the embedded server, whatever DATABASE_URL says
                "pacing": "off",  # the simulator is unthrottled: a source without limits
                "log_level": "WARNING",
            }
        )
        configure_logging(config.log_format, "INFO", config.secrets(), process="demo")
        click.echo(f"demo: ingesting {events:,} events from {sim.base_url} into {data_dir}/pg", err=True)
        code = run(config)
        if code != 0:
            sys.exit(code)
        try:
            report = run_verify(config, sample=5)
        except Unchecked as exc:
            click.echo(f"demo: verify could not check: {exc}", err=True)
            sys.exit(ExitCode.UNCHECKED)
    click.echo(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode())
    sys.exit(ExitCode.OK if report["match"] else ExitCode.FAILED)


if __name__ == "__main__":
    main()
