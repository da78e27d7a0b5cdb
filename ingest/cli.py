"""The command line: `run` (the default), `simulate`, `status`, `verify`, `load`.

Options are generated from the `Config` dataclass, so the CLI, the environment variables,
`.env` and the README's reference table can never disagree. Bad configuration exits 2 with
one line that names the option.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import MISSING, fields
from typing import Any

import click
import orjson

from ingest.config import Config, ConfigError, load_config, option_name
from ingest.logs import configure_logging
from ingest.run.exits import ExitCode

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 110}


def _default_text(f: Any) -> str:
    if f.default is not MISSING and f.default not in (None, ""):
        return f"; default {f.default}"
    return ""


def config_options(names: tuple[str, ...] | None = None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorate a command with one option per Config field (all of them by default)."""

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        for f in reversed(fields(Config)):
            if names is not None and f.name not in names:
                continue
            help_text = f"{f.metadata['help']} [env {f.metadata['env']}{_default_text(f)}]"
            if f.type in (bool, "bool"):
                opt = click.option(
                    option_name(f.name) + "/--no-" + option_name(f.name)[2:], f.name, default=None, help=help_text
                )
            else:
                opt = click.option(option_name(f.name), f.name, default=None, help=help_text, metavar="VALUE")
            func = opt(func)
        return func

    return decorate


def config_or_exit(cli_values: dict[str, Any], required: tuple[str, ...] = ("api_url", "api_key")) -> Config:
    try:
        return load_config(cli_values, required)
    except ConfigError as exc:
        click.echo(f"datasync-ingest: configuration error: {exc}", err=True)
        sys.exit(ExitCode.USAGE)


class DefaultRunGroup(click.Group):
    """`datasync-ingest --workers 4` means `datasync-ingest run --workers 4`.

    Usage errors (an unknown option, a missing value, an extra argument) exit 2 with one
    line, like configuration errors, instead of click's usage block.
    """

    def main(self, *args: Any, **kwargs: Any) -> Any:
        kwargs["standalone_mode"] = False
        try:
            code = super().main(*args, **kwargs)
        except click.ClickException as exc:
            click.echo(f"datasync-ingest: {exc.format_message()}", err=True)
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("datasync-ingest: aborted", err=True)
            sys.exit(ExitCode.SIGINT)
        sys.exit(code if isinstance(code, int) else 0)

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if not args or (args[0] not in self.commands and args[0] not in ("-h", "--help", "--version")):
            args = ["run", *args]
        return super().parse_args(ctx, args)


@click.group(cls=DefaultRunGroup, context_settings=CONTEXT)
@click.version_option(package_name="datasync-ingest")
def main() -> None:
    """Copy every event of a DataSync API into PostgreSQL, exactly once.

    Without a command, `run` is meant. Every option can also be set by the environment
    variable named in its help, or in a .env file in the working directory.
    """


@main.command(context_settings=CONTEXT)
@config_options()
def run(**cli_values: Any) -> None:
    """Ingest until the source is drained; resumes from the checkpoint.

    Exit codes: 0 drained and loaded; 1 fatal error (state kept); 2 bad configuration;
    130/143 stopped by SIGINT/SIGTERM (state kept, the next run resumes).
    """
    config = config_or_exit(cli_values)
    usable_data_dir_or_exit(config)
    configure_logging(config.log_format, config.log_level, config.secrets(), process="supervisor")
    from ingest.run.supervisor import run as run_ingestion

    sys.exit(run_ingestion(config))


def usable_data_dir_or_exit(config: Config) -> None:
    """The data directory must exist or be creatable, and be a writable directory."""
    path = config.data_dir
    try:
        if path.exists() and not path.is_dir():
            raise NotADirectoryError(20, "not a directory")
        path.mkdir(parents=True, exist_ok=True)
        problem = None if os.access(path, os.W_OK | os.X_OK) else "is not writable"
    except OSError as exc:
        problem = f"cannot be created ({exc.strerror or exc})"
    if problem:
        click.echo(f"datasync-ingest: configuration error: --data-dir (INGEST_DATA_DIR) {path} {problem}", err=True)
        sys.exit(ExitCode.USAGE)


LOCAL_FIELDS = ("database_url", "data_dir", "table", "log_format", "log_level", "workers", "keep_segments")


@main.command(context_settings=CONTEXT)
@config_options(LOCAL_FIELDS)
def status(**cli_values: Any) -> None:
    """Checkpoint, segments per state, ledger totals and rejects, as JSON."""
    config = config_or_exit(cli_values, required=())
    configure_logging(config.log_format, "WARNING", config.secrets(), process="status")
    from ingest.ops.report import collect_status

    click.echo(orjson.dumps(collect_status(config), option=orjson.OPT_INDENT_2).decode())


@main.command(context_settings=CONTEXT)
@config_options()
@click.option("--sample", default=10, show_default=True, help="missing/extra ids to list")
def verify(sample: int, **cli_values: Any) -> None:
    """Page the source's ids and compare them with the table. Exit 0 only on a match."""
    config = config_or_exit(cli_values)
    configure_logging(config.log_format, config.log_level, config.secrets(), process="verify")
    from ingest.ops.report import run_verify

    report = run_verify(config, sample)
    click.echo(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode())
    sys.exit(ExitCode.OK if report.get("match") else ExitCode.FAILED)


@main.command(context_settings=CONTEXT)
@config_options(LOCAL_FIELDS)
def load(**cli_values: Any) -> None:
    """Load whatever is in segments/ready with --workers loaders, then exit."""
    config = config_or_exit(cli_values, required=())
    configure_logging(config.log_format, config.log_level, config.secrets(), process="load")
    from ingest.ops.report import run_load

    click.echo(orjson.dumps(run_load(config)).decode())


def _register_simulator() -> None:
    from ingest.simulator.cli import simulate

    main.add_command(simulate)


_register_simulator()


if __name__ == "__main__":
    main()
