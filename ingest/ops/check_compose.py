"""`python -m ingest.ops.check_compose FILE`: catch compose mistakes before `docker compose up`.

No Docker engine is needed (CI and this project's machines have none), so the check is
structural: known keys, a valid restart policy, healthcheck shape, declared volumes and
networks, existing Dockerfiles and env files. Above all, every option in the `command:` of
a service that runs `datasync-ingest` must be a real option of that CLI command, found by
introspecting the click commands: a typo such as `--wrkers` would otherwise only show as a
container that exits 2 in a restart loop. Exit 1 with one line per problem, 0 when fine.
"""

from __future__ import annotations

import difflib
import re
import shlex
import sys
from collections.abc import Iterable, Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

import click
import yaml

PROGRAM = "datasync-ingest"
DEFAULT_COMMAND = "run"  # `datasync-ingest --workers 4` means `datasync-ingest run --workers 4`

TOP_LEVEL_KEYS = frozenset({"version", "name", "services", "networks", "volumes", "secrets", "configs", "include", "models"})
SERVICE_KEYS = frozenset(
    {
        "annotations", "attach", "blkio_config", "build", "cap_add", "cap_drop", "cgroup",
        "cgroup_parent", "command", "configs", "container_name", "cpu_count", "cpu_percent",
        "cpu_period", "cpu_quota", "cpu_rt_period", "cpu_rt_runtime", "cpu_shares", "cpus", "cpuset",
        "credential_spec", "depends_on", "deploy", "develop", "device_cgroup_rules", "devices", "dns",
        "dns_opt", "dns_search", "domainname", "driver_opts", "entrypoint", "env_file", "environment",
        "expose", "extends", "external_links", "extra_hosts", "gpus", "group_add", "healthcheck",
        "hostname", "image", "init", "ipc", "isolation", "labels", "label_file", "links", "logging",
        "mac_address", "mem_limit", "mem_reservation", "mem_swappiness", "memswap_limit", "models",
        "network_mode", "networks", "oom_kill_disable", "oom_score_adj", "pid", "pids_limit",
        "platform", "ports", "post_start", "pre_stop", "privileged", "profiles", "provider",
        "pull_policy", "read_only", "restart", "runtime", "scale", "secrets", "security_opt",
        "shm_size", "stdin_open", "stop_grace_period", "stop_signal", "storage_opt", "sysctls",
        "tmpfs", "tty", "ulimits", "use_api_socket", "user", "userns_mode", "uts", "volumes",
        "volumes_from", "working_dir",
    }
)
BUILD_KEYS = frozenset(
    {
        "context", "dockerfile", "dockerfile_inline", "args", "ssh", "cache_from", "cache_to",
        "additional_contexts", "extra_hosts", "isolation", "privileged", "labels", "no_cache", "pull",
        "network", "shm_size", "target", "secrets", "tags", "ulimits", "platforms", "entitlements",
        "provenance", "sbom",
    }
)
HEALTHCHECK_KEYS = frozenset({"test", "interval", "timeout", "retries", "start_period", "start_interval", "disable"})
HEALTHCHECK_DURATIONS = ("interval", "timeout", "start_period", "start_interval")
DEPENDS_CONDITIONS = frozenset({"service_started", "service_healthy", "service_completed_successfully"})
# A service can become healthy with a healthcheck of its own or one from a Dockerfile we build.
HEALTHY_CAPABLE = frozenset({"healthcheck", "build"})
DEPENDS_KEYS = frozenset({"condition", "restart", "required"})
RESTART_POLICY = re.compile(r"^(no|always|unless-stopped|on-failure(:\d+)?)$")
DURATION = re.compile(r"^(\d+(\.\d+)?(us|ms|s|m|h))+$")
PORT = re.compile(
    r"^((\d{1,3}(\.\d{1,3}){3}|\[[0-9a-fA-F:]+\]):)?(\d+(-\d+)?:)?\d+(-\d+)?(/(tcp|udp|sctp))?$"
)
# Environment names this program reads come with these prefixes (or are listed in Config):
# an unknown one is a typo that would be silently ignored.
OWN_ENV_PREFIXES = ("INGEST_", "DATASYNC_")


def is_extension(key: Any) -> bool:
    return isinstance(key, str) and key.startswith("x-")


def interpolated(value: str) -> bool:
    """Compose substitutes `${VAR:-default}` at `up` time; such values are not ours to judge."""
    return "$" in value


def suggest(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, sorted(choices), n=1)
    return f" (did you mean {close[0]}?)" if close else ""


# ---------------------------------------------------------------------------------------
# The CLI as click sees it


def cli_commands() -> dict[str, click.Command]:
    """The real commands of `datasync-ingest` (imported, so the check follows the code)."""
    from ingest.cli import main

    if not isinstance(main, click.Group):
        raise TypeError("ingest.cli.main is not a click group")
    return dict(main.commands)


def config_parsers() -> dict[str, Any]:
    """Option and env var -> the Config parser of its value, to check literal values too."""
    from ingest.config import PARSERS, Config, option_name

    by_option: dict[str, Any] = {}
    by_env: dict[str, Any] = {}
    for f in fields(Config):
        by_option[option_name(f.name)] = PARSERS[f.name]
        by_env[f.metadata["env"]] = PARSERS[f.name]
    return {"options": by_option, "env": by_env}


def _options_of(command: click.Command) -> dict[str, click.Option]:
    ctx = click.Context(command, info_name=command.name)
    found: dict[str, click.Option] = {}
    for param in command.get_params(ctx):
        if isinstance(param, click.Option):
            for opt in [*param.opts, *param.secondary_opts]:
                found[opt] = param
    return found


def _takes_value(option: click.Option) -> bool:
    return not (option.is_flag or option.count)


def check_cli_args(
    args: list[str], commands: Mapping[str, click.Command], value_parsers: Mapping[str, Any] | None = None
) -> list[str]:
    """Problems with one invocation of the CLI (arguments after the program name)."""
    value_parsers = value_parsers or {}
    if args and args[0] in ("--help", "-h", "--version"):
        return []
    name = DEFAULT_COMMAND
    rest = args
    if args and not args[0].startswith("-"):
        name, rest = args[0], args[1:]
        if name not in commands:
            return [f"unknown command {name!r} of {PROGRAM}{suggest(name, commands)}"]
    if name not in commands:
        return [f"{PROGRAM} has no {name!r} command to run by default"]
    command = commands[name]
    options = _options_of(command)
    takes_arguments = any(isinstance(p, click.Argument) for p in command.params)
    where = f"`{PROGRAM} {name}`"
    problems: list[str] = []
    i = 0
    while i < len(rest):
        token = rest[i]
        i += 1
        if token == "--":
            break
        if not token.startswith("-") or token == "-":
            if not takes_arguments:
                problems.append(f"unexpected argument {token!r} for {where}")
            continue
        opt, has_inline, inline = token.partition("=")
        option = options.get(opt)
        if option is None:
            problems.append(f"unknown option {opt} for {where}{suggest(opt, options)}")
            # Its value, most likely: one mistake, one line.
            if not has_inline and i < len(rest) and not rest[i].startswith("-"):
                i += 1
            continue
        if not _takes_value(option):
            if has_inline:
                problems.append(f"option {opt} of {where} is a flag and takes no value")
            continue
        if has_inline:
            value = inline
        elif i < len(rest):
            value, i = rest[i], i + 1
        else:
            problems.append(f"option {opt} of {where} needs a value")
            continue
        problem = _check_value(command, option, opt, value, value_parsers)
        if problem:
            problems.append(f"{problem} for {where}")
    return problems


def _check_value(
    command: click.Command, option: click.Option, opt: str, value: str, value_parsers: Mapping[str, Any]
) -> str | None:
    if interpolated(value):
        return None
    try:
        option.type.convert(value, option, click.Context(command, info_name=command.name))
    except click.BadParameter as exc:
        return f"bad value {value!r} for {opt}: {exc.message}"
    parser = value_parsers.get(opt)
    if parser is not None:
        try:
            parser(value)
        except ValueError as exc:
            return f"bad value {value!r} for {opt}: {exc}"
    return None


# ---------------------------------------------------------------------------------------
# The compose file


def as_words(value: Any) -> list[str] | None:
    """`command:`/`entrypoint:` as a list of words (compose splits strings shell-like)."""
    if value is None:
        return None
    if isinstance(value, str):
        return shlex.split(value)
    if isinstance(value, list) and all(isinstance(w, (str, int, float)) and not isinstance(w, bool) for w in value):
        return [str(w) for w in value]
    return None


def _names_program(word: str) -> bool:
    return Path(word).name == PROGRAM


def _program_prefix(words: list[str]) -> int | None:
    """How many leading words start the program: `datasync-ingest`, `bin/...`, `python -m ingest`."""
    if words and _names_program(words[0]):
        return 1
    if len(words) >= 3 and Path(words[0]).name.startswith("python") and words[1:3] == ["-m", "ingest"]:
        return 3
    return None


def dockerfile_of(service: Mapping[str, Any], base: Path) -> Path | None:
    build = service.get("build")
    if isinstance(build, str):
        return base / build / "Dockerfile"
    if isinstance(build, Mapping):
        context = base / str(build.get("context", "."))
        return context / str(build.get("dockerfile", "Dockerfile"))
    return None


def image_runs_program(service: Mapping[str, Any], base: Path) -> bool:
    """Whether the service's image has our program as its ENTRYPOINT."""
    image = service.get("image")
    if isinstance(image, str) and Path(image.split(":")[0]).name == PROGRAM:
        return True
    dockerfile = dockerfile_of(service, base)
    if dockerfile is None or not dockerfile.is_file():
        return False
    entrypoints = [line for line in dockerfile.read_text().splitlines() if line.strip().upper().startswith("ENTRYPOINT")]
    return bool(entrypoints) and PROGRAM in entrypoints[-1]


def program_args(service: Mapping[str, Any], base: Path) -> list[str] | None:
    """The arguments `datasync-ingest` receives in this service, or None if it runs something else."""
    entrypoint = as_words(service.get("entrypoint"))
    command = as_words(service.get("command")) or []
    if entrypoint is not None:
        skip = _program_prefix(entrypoint)
        return None if skip is None else [*entrypoint[skip:], *command]
    skip = _program_prefix(command)
    if skip is not None:
        return command[skip:]
    if image_runs_program(service, base):
        return command
    return None


def check_compose(
    doc: Any, base: Path, commands: Mapping[str, click.Command], parsers: Mapping[str, Mapping[str, Any]]
) -> list[str]:
    """Every problem of a parsed compose document; `base` is the folder paths are relative to."""
    if not isinstance(doc, Mapping):
        return ["the file is not a mapping of top-level keys"]
    problems: list[str] = []
    for key in doc:
        if key not in TOP_LEVEL_KEYS and not is_extension(key):
            problems.append(f"unknown top-level key {key!r}{suggest(str(key), TOP_LEVEL_KEYS)}")
    services = doc.get("services")
    if not isinstance(services, Mapping) or not services:
        problems.append("services: missing or empty")
        return problems
    declared: dict[str, set[str]] = {}
    for kind in ("volumes", "networks"):
        section = doc.get(kind) or {}
        if not isinstance(section, Mapping):
            problems.append(f"{kind}: must be a mapping")
            section = {}
        declared[kind] = {str(k) for k in section}
    for name, service in services.items():
        where = f"services.{name}"
        if not isinstance(service, Mapping):
            problems.append(f"{where}: must be a mapping")
            continue
        problems += [f"{where}.{p}" for p in check_service(service, services, declared, base)]
        args = program_args(service, base)
        if args is not None:
            problems += [f"{where}.command: {p}" for p in check_cli_args(args, commands, parsers["options"])]
            problems += [f"{where}.environment: {p}" for p in check_own_environment(service, parsers["env"])]
    return problems


def check_service(
    service: Mapping[str, Any], services: Mapping[str, Any], declared: Mapping[str, set[str]], base: Path
) -> list[str]:
    """Problems of one service, each starting with the key it concerns."""
    problems: list[str] = []
    for key in service:
        if key not in SERVICE_KEYS and not is_extension(key):
            problems.append(f"{key}: unknown service key{suggest(str(key), SERVICE_KEYS)}")
    if "image" not in service and "build" not in service:
        problems.append("image: a service needs an image or a build")
    problems += _check_build(service, base)
    for key in ("command", "entrypoint"):
        if key in service and as_words(service[key]) is None:
            problems.append(f"{key}: must be a string or a list of strings")
    if "restart" in service:
        restart = service["restart"]
        if restart is False:
            problems.append("restart: YAML reads an unquoted no as false; write \"no\"")
        elif not isinstance(restart, str) or not RESTART_POLICY.match(restart):
            problems.append(f"restart: {restart!r} is not no, always, unless-stopped or on-failure[:N]")
    if "healthcheck" in service:
        problems += [f"healthcheck{p}" for p in _check_healthcheck(service["healthcheck"])]
    problems += _check_depends_on(service.get("depends_on"), services)
    problems += _check_volumes(service.get("volumes"), declared["volumes"])
    problems += _check_networks(service.get("networks"), declared["networks"])
    problems += _check_ports(service.get("ports"))
    problems += _check_environment(service.get("environment"))
    problems += _check_env_file(service.get("env_file"), base)
    return problems


def _check_build(service: Mapping[str, Any], base: Path) -> list[str]:
    build = service.get("build")
    if build is None:
        return []
    if isinstance(build, Mapping):
        unknown = [k for k in build if k not in BUILD_KEYS and not is_extension(k)]
        if unknown:
            return [f"build.{k}: unknown build key{suggest(str(k), BUILD_KEYS)}" for k in unknown]
        if "dockerfile_inline" in build:
            return []
    elif not isinstance(build, str):
        return ["build: must be a path or a mapping"]
    dockerfile = dockerfile_of(service, base)
    if dockerfile is not None and not dockerfile.is_file():
        return [f"build: no Dockerfile at {dockerfile} (context is relative to the compose file)"]
    return []


def _check_healthcheck(check: Any) -> list[str]:
    if not isinstance(check, Mapping):
        return [": must be a mapping"]
    problems = [f".{k}: unknown healthcheck key" for k in check if k not in HEALTHCHECK_KEYS]
    if check.get("disable") is True:
        return problems
    test = check.get("test")
    if test is None:
        problems.append(".test: missing")
    elif isinstance(test, list):
        if not test or test[0] not in ("NONE", "CMD", "CMD-SHELL"):
            problems.append(".test: a list must start with CMD, CMD-SHELL or NONE")
        elif test[0] != "NONE" and len(test) < 2:
            problems.append(".test: nothing to run after " + str(test[0]))
        elif not all(isinstance(w, str) for w in test):
            problems.append(".test: every word must be a string")
    elif not isinstance(test, str):
        problems.append(".test: must be a string or a list")
    for key in HEALTHCHECK_DURATIONS:
        if key in check and not (isinstance(check[key], str) and DURATION.match(check[key])):
            problems.append(f".{key}: {check[key]!r} is not a duration such as 10s or 1m30s")
    if "retries" in check and (isinstance(check["retries"], bool) or not isinstance(check["retries"], int)):
        problems.append(f".retries: {check['retries']!r} is not a whole number")
    return problems


def _check_depends_on(depends: Any, services: Mapping[str, Any]) -> list[str]:
    if depends is None:
        return []
    if isinstance(depends, list):
        entries: dict[Any, Any] = {name: {} for name in depends}
    elif isinstance(depends, Mapping):
        entries = dict(depends)
    else:
        return ["depends_on: must be a list or a mapping"]
    problems: list[str] = []
    for name, spec in entries.items():
        if name not in services:
            problems.append(f"depends_on.{name}: no such service{suggest(str(name), map(str, services))}")
            continue
        spec = spec or {}
        if not isinstance(spec, Mapping):
            problems.append(f"depends_on.{name}: must be a mapping")
            continue
        problems += [f"depends_on.{name}.{k}: unknown key" for k in spec if k not in DEPENDS_KEYS]
        condition = spec.get("condition", "service_started")
        if condition not in DEPENDS_CONDITIONS:
            problems.append(f"depends_on.{name}.condition: {condition!r} is not one of {', '.join(sorted(DEPENDS_CONDITIONS))}")
        target = services[name]
        if condition == "service_healthy" and isinstance(target, Mapping) and not HEALTHY_CAPABLE & set(target):
            problems.append(f"depends_on.{name}: waits for healthy, but {name} has no healthcheck")
    return problems


def _named_source(source: str) -> bool:
    return bool(source) and not source.startswith(("/", ".", "~", "$"))


def _check_volumes(volumes: Any, declared: set[str]) -> list[str]:
    if volumes is None:
        return []
    if not isinstance(volumes, list):
        return ["volumes: must be a list"]
    problems: list[str] = []
    for entry in volumes:
        if isinstance(entry, str):
            parts = entry.split(":")
            if len(parts) > 3 or not all(parts[:2]):
                problems.append(f"volumes: {entry!r} is not SOURCE:TARGET[:MODE]")
                continue
            source = parts[0] if len(parts) > 1 else ""
            if len(parts) > 1 and not parts[1].startswith("/"):
                problems.append(f"volumes: target of {entry!r} must be an absolute path")
        elif isinstance(entry, Mapping):
            if "target" not in entry:
                problems.append(f"volumes: {dict(entry)!r} has no target")
            source = str(entry.get("source", "")) if entry.get("type", "volume") == "volume" else ""
        else:
            problems.append(f"volumes: {entry!r} is neither a string nor a mapping")
            continue
        if _named_source(source) and source not in declared:
            problems.append(f"volumes: named volume {source!r} is not declared under top-level volumes")
    return problems


def _check_networks(networks: Any, declared: set[str]) -> list[str]:
    if networks is None:
        return []
    if not isinstance(networks, (list, Mapping)):
        return ["networks: must be a list or a mapping"]
    names = [str(n) for n in networks]
    return [f"networks: {n!r} is not declared under top-level networks" for n in names if n != "default" and n not in declared]


def _check_ports(ports: Any) -> list[str]:
    if ports is None:
        return []
    if not isinstance(ports, list):
        return ["ports: must be a list"]
    problems: list[str] = []
    for entry in ports:
        if isinstance(entry, Mapping):
            if "target" not in entry:
                problems.append(f"ports: {dict(entry)!r} has no target")
        elif isinstance(entry, int) and not isinstance(entry, bool):
            continue
        elif not isinstance(entry, str):
            problems.append(f"ports: {entry!r} must be a string (quote it: YAML reads 80:80 as a number)")
        elif not interpolated(entry) and not PORT.match(entry):
            problems.append(f"ports: {entry!r} is not [HOST_IP:][HOST_PORT:]CONTAINER_PORT[/PROTOCOL]")
    return problems


def environment_of(service: Mapping[str, Any]) -> dict[str, Any]:
    env = service.get("environment")
    if isinstance(env, Mapping):
        return {str(k): v for k, v in env.items()}
    if isinstance(env, list):
        pairs = [str(item).partition("=") for item in env]
        return {k: (v if sep else None) for k, sep, v in pairs}
    return {}


def _check_environment(env: Any) -> list[str]:
    if env is None:
        return []
    if isinstance(env, list):
        return [f"environment: {item!r} is not NAME=VALUE" for item in env if not isinstance(item, str) or not item]
    if not isinstance(env, Mapping):
        return ["environment: must be a mapping or a list"]
    return [
        f"environment.{k}: {v!r} must be a string, number or null (quote booleans)"
        for k, v in env.items()
        if isinstance(v, (bool, list, dict))
    ]


def check_own_environment(service: Mapping[str, Any], env_parsers: Mapping[str, Any]) -> list[str]:
    """Our variables in a service that runs the program: known names, parseable literal values."""
    problems: list[str] = []
    for name, value in environment_of(service).items():
        parser = env_parsers.get(name)
        if parser is None:
            if name.startswith(OWN_ENV_PREFIXES):
                problems.append(f"{name}: not a variable {PROGRAM} reads{suggest(name, env_parsers)}")
            continue
        if value is None or isinstance(value, (bool, list, dict)) or interpolated(str(value)):
            continue
        try:
            parser(str(value))
        except ValueError as exc:
            problems.append(f"{name}: {exc}")
    return problems


def _check_env_file(env_file: Any, base: Path) -> list[str]:
    if env_file is None:
        return []
    entries = env_file if isinstance(env_file, list) else [env_file]
    problems: list[str] = []
    for entry in entries:
        if isinstance(entry, str):
            path, required = entry, True
        elif isinstance(entry, Mapping) and isinstance(entry.get("path"), str):
            path, required = entry["path"], entry.get("required", True)
        else:
            problems.append(f"env_file: {entry!r} is neither a path nor a mapping with a path")
            continue
        if required is True and not interpolated(path) and not (base / path).is_file():
            problems.append(f"env_file: {path} does not exist (mark it `required: false` if optional)")
    return problems


def check_file(path: Path) -> list[str]:
    """Every problem of the compose file at `path`, each as `FILE: where: what`."""
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        return [f"{path}: cannot read: {exc.strerror}"]
    except yaml.YAMLError as exc:
        return [f"{path}: not valid YAML: {' '.join(str(exc).split())}"]
    try:
        commands = cli_commands()
        parsers = config_parsers()
    except Exception as exc:
        return [f"{path}: cannot introspect the {PROGRAM} CLI: {type(exc).__name__}: {exc}"]
    return [f"{path}: {p}" for p in check_compose(doc, path.resolve().parent, commands, parsers)]


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0] in ("-h", "--help"):
        print("usage: python -m ingest.ops.check_compose COMPOSE_FILE", file=sys.stderr)
        return 2
    problems = check_file(Path(args[0]))
    for problem in problems:
        print(problem)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
