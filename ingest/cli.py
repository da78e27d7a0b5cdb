"""The command line: `run` (the default), `check`, `status`, `verify`, `load`, `reset`, `simulate`.

Options are generated from the `Config` dataclass, so the CLI, the environment variables,
`.env` and the README's reference table can never disagree. Bad configuration exits 2 with
one line that names the option.
"""

from __future__ import annotations

import importlib
import os
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import Field, fields
from typing import Any

import click
import orjson

from ingest.config import GROUPS, Config, ConfigError, default_text, env_name, load_config, option_name
from ingest.logs import configure_logging, redact, warn_when_configured
from ingest.run.exits import ExitCode

PROGRAM = "datasync-ingest"
DEFAULT_COMMAND = "run"
CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 110}


class ConfigOption(click.Option):
    """An option made from a Config field; it knows its section of `--help`."""

    def __init__(self, *args: Any, group: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.group = group


class ChoiceValue(click.Choice):
    """The choices, for `--help` and shell completion; the value itself is judged by the
    Config parser, so that a bad one gets the same one line from the command line as from
    the environment."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        return value


class PathValue(click.Path):
    """A path, completed as a file name by the shell; judged by the Config parser too."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        return value


def _option(f: Field[Any]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    meta = f.metadata
    help_text = f"{meta['help']} [env: {env_name(f.name)}; default: {default_text(f, here=True)}]"
    common: dict[str, Any] = {"default": None, "help": help_text, "cls": ConfigOption, "group": meta["group"]}
    if f.type in (bool, "bool"):
        return click.option(f"{option_name(f.name)}/--no-{option_name(f.name)[2:]}", f.name, **common)
    if "choices" in meta:
        kind: click.ParamType = ChoiceValue(meta["choices"], case_sensitive=False)
    elif meta.get("metavar") == "PATH":
        kind = PathValue()
    else:
        kind = click.STRING
    return click.option(option_name(f.name), f.name, type=kind, metavar=meta.get("metavar"), **common)


def config_options(names: tuple[str, ...] | None = None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorate a command with one option per Config field (all of them by default)."""

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        for f in reversed(fields(Config)):
            if names is None or f.name in names:
                func = _option(f)(func)
        return func

    return decorate


def config_or_exit(cli_values: dict[str, Any], required: tuple[str, ...] = ("api_url", "api_key")) -> Config:
    """The config, or exit 2 with one line; its warnings are logged by the command's
    `configure_logging`, in the log format the config chose."""
    try:
        return load_config(cli_values, required, warn=warn_when_configured)
    except ConfigError as exc:
        click.echo(f"{PROGRAM}: configuration error: {exc}", err=True)
        sys.exit(ExitCode.USAGE)


class ConfigCommand(click.Command):
    """`--help` with the Config options in their sections (source, pacing, segments,
    database, operations), then the command's own options: forty options in one list
    hide the few an operator looks for."""

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        sections: dict[str, list[tuple[str, str]]] = {title: [] for title in GROUPS.values()}
        own: list[tuple[str, str]] = []
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is None:
                continue
            if isinstance(param, ConfigOption):
                sections[GROUPS[param.group]].append(record)
            else:
                own.append(record)
        for title, records in [*sections.items(), ("Options", own)]:
            if records:
                with formatter.section(title):
                    formatter.write_dl(records)


class DefaultRunGroup(click.Group):
    """`datasync-ingest --workers 4` means `datasync-ingest run --workers 4`, while
    `datasync-ingest statsu` is a mistyped command ("No such command", with the closest).

    Usage errors (an unknown option, a missing value, an extra argument) exit 2 with one
    line, like configuration errors, instead of click's usage block.
    """

    command_class = ConfigCommand
    OWN_OPTIONS = ("-h", "--help", "--version")
    # Commands imported only when named: the simulator's import would cost every run
    # (and every child it spawns) a tenth of a second of start-up.
    LAZY = {"simulate": ("ingest.simulator.cli", "simulate")}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.LAZY})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.LAZY and cmd_name not in self.commands:
            module, name = self.LAZY[cmd_name]
            self.add_command(getattr(importlib.import_module(module), name), cmd_name)
        return super().get_command(ctx, cmd_name)

    def resolve_command(self, ctx: click.Context, args: list[str]) -> tuple[str | None, click.Command | None, list[str]]:
        try:
            return super().resolve_command(ctx, args)
        except click.exceptions.NoSuchCommand as exc:  # suggest the lazy commands too
            raise click.exceptions.NoSuchCommand(exc.command_name, possibilities=self.list_commands(ctx), ctx=ctx) from None

    def main(self, *args: Any, **kwargs: Any) -> Any:
        kwargs["standalone_mode"] = False
        try:
            code = super().main(*args, **kwargs)
        except click.ClickException as exc:
            click.echo(f"{PROGRAM}: {exc.format_message()}", err=True)
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo(f"{PROGRAM}: aborted", err=True)
            sys.exit(ExitCode.SIGINT)
        sys.exit(code if isinstance(code, int) else 0)

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        # An option first means `run`'s options; a word first names a command. Completing
        # the first word (resilient parsing, no words yet) completes the command names.
        bare = not args and not ctx.resilient_parsing
        if bare or (args and args[0].startswith("-") and args[0] not in self.OWN_OPTIONS):
            args = [DEFAULT_COMMAND, *args]
        return super().parse_args(ctx, args)

    def shell_complete(self, ctx: click.Context, incomplete: str) -> list[Any]:
        """Command names, and for an option the default command's options too (the group
        has only --help and --version of its own)."""
        items = super().shell_complete(ctx, incomplete)
        if incomplete.startswith("-"):
            command = self.commands[DEFAULT_COMMAND]
            with command.make_context(DEFAULT_COMMAND, [], parent=ctx, resilient_parsing=True) as run_ctx:
                known = {item.value for item in items}
                items += [item for item in command.shell_complete(run_ctx, incomplete) if item.value not in known]
        return items


@click.group(name=PROGRAM, cls=DefaultRunGroup, context_settings=CONTEXT)
@click.version_option(package_name="datasync-ingest")
def main() -> None:
    """Copy every event of a DataSync API into PostgreSQL, exactly once.

    Without a command, `run` is meant. Every option can also be set by the environment
    variable named in its help, or in a .env file in the working directory. Shell
    completion: eval "$(_DATASYNC_INGEST_COMPLETE=bash_source datasync-ingest)" (or
    zsh_source, fish_source).
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
        where = f"{option_name('data_dir')} ({env_name('data_dir')})"
        click.echo(f"{PROGRAM}: configuration error: {where} {path} {problem}", err=True)
        sys.exit(ExitCode.USAGE)


LOCAL_FIELDS = (
    "database_url", "database_url_file", "data_dir", "table", "log_format", "log_level", "workers", "keep_segments",
)


@main.command(context_settings=CONTEXT)
@config_options(LOCAL_FIELDS)
@click.option(
    "--format", "output_format", type=click.Choice(["auto", "text", "json"]), default="auto", show_default=True,
    help="text for a person, JSON for a program; auto: text when stdout is a terminal, else JSON",
)
def status(output_format: str, **cli_values: Any) -> None:
    """Where a data directory stands: each partition, segments per state, ledger totals,
    rejects (and lag, when the checkpoint records it)."""
    config = config_or_exit(cli_values, required=())
    configure_logging(config.log_format, "WARNING", config.secrets(), process="status")
    from ingest.ops.report import collect_status

    report = collect_status(config)
    if output_format == "auto":
        output_format = "text" if sys.stdout.isatty() else "json"
    text = status_text(report) if output_format == "text" else orjson.dumps(report, option=orjson.OPT_INDENT_2).decode()
    click.echo(redact(text))


def status_text(report: Mapping[str, Any]) -> str:
    """`status` for a person. Generic on purpose: every key of the report is a label, a
    list of records is a table, a value is shown in the unit its key names (`_at` and
    `timestamp` an epoch, `_seconds` a duration, `_ms` either in milliseconds, `bytes`), so
    that what a newer checkpoint records (lag, say) shows up without a change here."""
    return "\n".join(_described(report, depth=0))


def _described(mapping: Mapping[str, Any], depth: int) -> list[str]:
    indent = "  " * depth
    width = max((len(_label(key)) for key in mapping), default=0)
    lines: list[str] = []
    for key, value in mapping.items():
        label = f"{indent}{_label(key):<{width}}"
        if isinstance(value, Mapping) and value:
            inline = " · ".join(f"{_label(k)} {_shown(k, v)}" for k, v in value.items())
            scalars = not any(isinstance(v, (Mapping, list)) for v in value.values())
            if scalars and len(label) + len(inline) < 100:
                lines.append(f"{label}  {inline}")
            else:
                lines += [label.rstrip(), *_described(value, depth + 1)]
        elif isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value):
            lines += [label.rstrip(), *_table(value, depth + 1)]
        else:
            lines.append(f"{label}  {_shown(key, value)}")
    return lines


def _table(records: list[Mapping[str, Any]], depth: int) -> list[str]:
    columns = list(dict.fromkeys(key for record in records for key in record))
    rows = [[_label(c) for c in columns], *([_shown(c, record.get(c)) for c in columns] for record in records)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(columns))]
    return ["  " * depth + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]


def _label(key: str) -> str:
    return key.replace("_", " ")


def _shown(key: str, value: Any) -> str:
    """A value in the unit its key names."""
    if value is None or value == {}:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):
        return ", ".join(_shown(key, v) for v in value) or "-"
    if not isinstance(value, (int, float)):
        return str(value)
    seconds = value / 1000 if key.endswith("_ms") else float(value)
    if key.endswith("_at") or "timestamp" in key:
        return _moment(seconds)
    if key.endswith("_ms"):
        # a lag or an age is a duration; an event time is epoch milliseconds (past 1973)
        return _moment(seconds) if value > 1e11 else _duration(seconds)
    if key.endswith(("_s", "_seconds")):
        return _duration(float(value))
    if "bytes" in key and isinstance(value, int):
        return f"{value / (1 << 20):,.1f} MiB"
    return f"{value:,}" if isinstance(value, int) else f"{value:,.6g}"


def _moment(epoch: float) -> str:
    local = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(epoch))
    ago = time.time() - epoch
    return f"{local} ({_duration(ago)} ago)" if ago >= 0 else local


def _duration(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if abs(seconds) >= 2 * size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.1f} s"


@main.command(context_settings=CONTEXT)
@config_options()
@click.option("--sample", default=10, show_default=True, type=click.IntRange(min=0), help="missing/extra ids to list")
def verify(sample: int, **cli_values: Any) -> None:
    """Crawl the source's ids with the plan, lanes and pacing of a run (so it takes about
    as long as one) and compare them with the table.

    Exit codes: 0 a match; 1 a mismatch (the report says what); 2 bad configuration;
    3 could not check (the source, the database or the scratch space failed: one line).
    """
    config = config_or_exit(cli_values)
    configure_logging(config.log_format, config.log_level, config.secrets(), process="verify")
    from ingest.ops.report import Unchecked, run_verify

    try:
        report = run_verify(config, sample)
    except Unchecked as exc:
        click.echo(redact(f"{PROGRAM}: verify: could not check: {exc}"), err=True)
        sys.exit(ExitCode.UNCHECKED)
    click.echo(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode())
    sys.exit(ExitCode.OK if report.get("match") else ExitCode.FAILED)


@main.command(context_settings=CONTEXT)
@config_options(LOCAL_FIELDS)
def load(**cli_values: Any) -> None:
    """Load whatever is in segments/ready with --workers loaders, then exit. Refused while
    a run works in the data directory.

    Exit codes: 0 loaded; 1 refused, or a load failed (one line; what was loaded stays
    loaded, the rest stays in ready/); 2 bad configuration.
    """
    config = config_or_exit(cli_values, required=())
    configure_logging(config.log_format, config.log_level, config.secrets(), process="load")
    from ingest.ops.datadir import Busy
    from ingest.ops.report import run_load
    from ingest.run.loading import LoadFailed
    from ingest.sink.db import DatabaseError

    try:
        loaded = run_load(config)
    except (Busy, LoadFailed, DatabaseError) as exc:
        click.echo(redact(f"{PROGRAM}: load: {exc}"), err=True)
        sys.exit(ExitCode.FAILED)
    except OSError as exc:
        click.echo(f"{PROGRAM}: load: cannot use the data directory {config.data_dir}: {exc.strerror or exc}", err=True)
        sys.exit(ExitCode.FAILED)
    click.echo(orjson.dumps(loaded).decode())


@main.command(context_settings=CONTEXT)
@config_options()
def check(**cli_values: Any) -> None:
    """Could a run start? Tests the key, the lanes (stream token, key in the query string),
    the database's rights, the data directory and the checkpoint, and prints the plan a
    run would make with its time at the API's budgets. Writes nothing.

    Exit codes: 0 a run could start; 1 it could not (one line per problem, on stderr);
    2 bad configuration.
    """
    config = config_or_exit(cli_values)
    configure_logging(config.log_format, "WARNING", config.secrets(), process="check")
    from ingest.ops.check import run_check

    report = run_check(config)
    for finding in report.findings:
        if finding.problem:
            click.echo(redact(f"{PROGRAM}: check: {finding.line()}"), err=True)
        else:
            click.echo(redact(finding.line()))
    for line in report.plan:
        click.echo(f"plan: {line}")
    if report.problems:
        sys.exit(ExitCode.FAILED)
    click.echo("a run can start")


RESET_FIELDS = tuple(name for name in LOCAL_FIELDS if name not in ("workers", "keep_segments"))


@main.command(context_settings=CONTEXT)
@config_options(RESET_FIELDS)
@click.option("--yes", "-y", is_flag=True, help="remove without asking (needed where no terminal can ask)")
@click.option("--drop-table", is_flag=True,
              help="also drop the table (--table), and the ledger rows and rejects of this data directory")
def reset(yes: bool, drop_table: bool, **cli_values: Any) -> None:
    """Remove the checkpoint and the segment folders of a data directory, to start over.
    The table and the embedded database (<data-dir>/pg) are kept; --drop-table drops the
    table (in whichever database) with this data directory's ledger rows and rejects.

    Exit codes: 0 removed, or nothing to remove; 1 refused, nothing removed (a run works in
    the data directory, the answer was no, or the database failed); 2 bad usage, or
    neither a terminal to ask on nor --yes.
    """
    config = config_or_exit(cli_values, required=())
    configure_logging(config.log_format, "WARNING", config.secrets(), process="reset")
    from ingest.ops.datadir import Busy
    from ingest.ops.reset import ResetFailed, confirmation, run_reset

    decision = confirmation(yes, sys.stdin.isatty())
    if decision == "refuse":
        click.echo(f"{PROGRAM}: reset: no terminal to confirm on; pass --yes to remove without asking", err=True)
        sys.exit(ExitCode.USAGE)

    def confirm(wanted: list[str]) -> bool:
        if decision == "go":
            return True
        click.echo("reset would remove:\n" + "\n".join(f"  {item}" for item in wanted))
        return click.confirm("remove them?", default=False)

    try:
        lines = run_reset(config, drop_table, confirm)
    except (Busy, ResetFailed) as exc:
        click.echo(redact(f"{PROGRAM}: reset: {exc}"), err=True)
        sys.exit(ExitCode.FAILED)
    click.echo(redact("\n".join(lines)))


if __name__ == "__main__":
    main()
