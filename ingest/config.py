"""The one typed configuration object, and where its values come from.

Every tunable lives in `Config`. Values are taken from the command line, else the
environment, else a `.env` file in the working directory, else the default. Parsing is a
function of those three mappings (and of the secret files they point to) so it can be
table-tested; bad values raise `ConfigError`, which the CLI turns into exit code 2 with one
line. Things worth telling that are no error (a deprecated variable name, a key on the
command line) go to a `warn` callback, which the CLI logs once logging is set up.

Variable names follow one rule (`env_name`): the API connection (`--api-*`) is
`DATASYNC_<OPTION>`, the database URL keeps the universal `DATABASE_URL`, every other option
is `INGEST_<OPTION>`. Names from before the rule are still read, with a warning.
"""

from __future__ import annotations

import io
import logging
import math
import os
import re
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import MISSING as MISSING_DEFAULT
from dataclasses import Field, dataclass, field, fields
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import urlsplit, urlunsplit

SOURCES = ("auto", "feed", "events")
LOG_FORMATS = ("json", "text")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
GZIP_MODES = ("auto", "on", "off")
PACING_MODES = ("on", "off")
AUTO = "auto"
# The sections of `run --help` (and the order of the README's table), with their titles.
GROUPS = {
    "source": "Source (the DataSync API and how it is paged)",
    "pacing": "Pacing (the API's request budgets)",
    "segments": "Segments (the files between fetchers and loaders)",
    "database": "Database (where the events go)",
    "operations": "Operations (state, repeated runs, supervision, logs)",
}
_TABLE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")

Warn = Callable[[str], None]


def ignore(message: str) -> None:
    """The `warn` of callers that have nowhere to show a warning (library use, tests)."""


class ConfigError(ValueError):
    """A bad option or environment value; the message names it in one line."""


def _default_workers() -> int:
    return max(2, min(4, os.cpu_count() or 2))


def _default_log_format() -> str:
    return "text" if sys.stdout.isatty() else "json"


@dataclass(frozen=True)
class Config:
    """Everything `run` needs.

    Field metadata: `help`, `group` (its section of `run --help`), and where they apply
    `metavar`, `choices` (offered by shell completion), `auto` (what the computed default
    is), `unset` (what no value means), `old_env` (names read with a deprecation warning)
    and `file_of` (this option names a file holding that secret option's value).
    """

    # --- source: the DataSync API and how it is paged
    api_url: str = field(
        default="",
        metadata={"group": "source", "metavar": "URL", "unset": "required",
                  "help": "API base URL ending in /api/v1"},
    )
    api_key: str = field(
        default="",
        repr=False,
        metadata={"group": "source", "metavar": "KEY", "unset": "required (or --api-key-file)",
                  "help": "API key (never logged; on the command line it shows in the process list)"},
    )
    api_key_file: Path | None = field(
        default=None,
        metadata={"group": "source", "metavar": "PATH", "unset": "none", "file_of": "api_key",
                  "help": "file holding the API key (a Docker/Kubernetes secret), instead of --api-key"},
    )
    source: str = field(
        default="auto",
        metadata={"group": "source", "choices": SOURCES,
                  "help": "auto (feed when a token can be had), feed, events"},
    )
    partitions: int = field(
        default=0,
        metadata={"group": "source", "metavar": "N", "help": "parallel fetch partitions (0: chosen from the source)"},
    )
    page_limit: int = field(
        default=20_000,
        metadata={"group": "source", "metavar": "N",
                  "help": "the most events a request asks for: the plan's probe asks once, and the walk uses the"
                  " largest page the server honours up to this, kept within memory (less with more walkers) and"
                  " well inside --request-timeout"},
    )
    gzip: str = field(
        default="auto",
        metadata={"group": "source", "choices": GZIP_MODES,
                  "help": "ask for gzip bodies: on, off, or auto (on unless the API is on this machine, where"
                  " compressing costs CPU and saves nothing)"},
    )
    request_timeout: float = field(
        default=60.0, metadata={"group": "source", "metavar": "SECONDS", "help": "seconds to wait for a response"}
    )
    max_attempts: int = field(
        default=12, metadata={"group": "source", "metavar": "N", "help": "tries per page before the run fails"}
    )
    # --- pacing: the API's request budgets
    feed_rate: float = field(
        default=39.5,
        metadata={"group": "pacing", "metavar": "N",
                  "help": "feed requests per window, shared by all fetchers (no headers)"},
    )
    events_rate: float | None = field(
        default=None,
        metadata={"group": "pacing", "metavar": "N", "auto": "the X-RateLimit-Limit the API reports (10 until then)",
                  "help": "/events requests per window; X-RateLimit headers refine it"},
    )
    query_rate: float = field(
        default=5.0,
        metadata={"group": "pacing", "metavar": "N",
                  "help": "/events requests per window with the key in the query string, a separate extra budget"
                  " (0: do not use it)"},
    )
    rate_window: float | None = field(
        default=None,
        metadata={"group": "pacing", "metavar": "SECONDS",
                  "auto": "60 s x the time unit the API reports (in its token and cursor lifetimes and its"
                  " rate-limit resets)",
                  "help": "seconds the API's rate limits count over"},
    )
    pacing: str = field(
        default="on",
        metadata={"group": "pacing", "choices": PACING_MODES,
                  "help": "on: stay inside the API's budgets; off: no pacing at all, for a source without rate limits"
                  " (a 429 is still waited out and retried)"},
    )
    # --- segments: the files between fetchers and loaders
    segment_max_rows: int = field(
        default=50_000,
        metadata={"group": "segments", "metavar": "N", "old_env": ("INGEST_SEGMENT_ROWS",),
                  "help": "rotate a segment after this many rows"},
    )
    segment_max_bytes: int = field(
        default=32 << 20,
        metadata={"group": "segments", "metavar": "BYTES", "old_env": ("INGEST_SEGMENT_BYTES",),
                  "help": "rotate a segment after this many bytes (32 MiB)"},
    )
    segment_max_age: float = field(
        default=2.0,
        metadata={"group": "segments", "metavar": "SECONDS", "old_env": ("INGEST_SEGMENT_AGE",),
                  "help": "rotate a segment after this many seconds (a rotation commits the walk's position,"
                  " which idle fetchers split by)"},
    )
    ready_max_bytes: int = field(
        default=512 << 20,
        metadata={"group": "segments", "metavar": "BYTES", "old_env": ("INGEST_READY_BYTES",),
                  "help": "fetchers pause while ready/ holds more bytes than this (512 MiB)"},
    )
    keep_segments: bool = field(
        default=False, metadata={"group": "segments", "help": "keep loaded segments in segments/loaded/"}
    )
    # --- database: where the events go
    database_url: str | None = field(
        default=None,
        repr=False,
        metadata={"group": "database", "metavar": "URL", "unset": "embedded PostgreSQL in <data-dir>/pg",
                  "help": "PostgreSQL URL or key=value DSN (a password in it is never logged)"},
    )
    database_url_file: Path | None = field(
        default=None,
        metadata={"group": "database", "metavar": "PATH", "unset": "none", "file_of": "database_url",
                  "help": "file holding the database URL (a Docker/Kubernetes secret), instead of --database-url"},
    )
    table: str = field(default="events", metadata={"group": "database", "metavar": "NAME", "help": "target table name"})
    workers: int = field(
        default_factory=_default_workers,
        metadata={"group": "database", "metavar": "N", "auto": "the CPU count, kept between 2 and 4",
                  "help": "loader processes"},
    )
    db_outage_limit: float = field(
        default=600.0,
        metadata={"group": "database", "metavar": "SECONDS",
                  "help": "seconds loaders retry an unavailable database before the run fails"},
    )
    # --- operations: state, repeated runs, supervision and what the run tells
    data_dir: Path = field(
        default=Path(".datasync"),
        metadata={"group": "operations", "metavar": "PATH", "help": "segments, checkpoint, embedded database"},
    )
    follow: bool = field(
        default=False,
        metadata={"group": "operations",
                  "help": "after the drain, keep topping up what the source gains until stopped"},
    )
    poll_interval: float = field(
        default=60.0,
        metadata={"group": "operations", "metavar": "SECONDS", "help": "with --follow: seconds between top-ups"},
    )
    max_restarts: int = field(
        default=3,
        metadata={"group": "operations", "metavar": "N", "help": "restarts of a crashed child before the run fails"},
    )
    log_format: str = field(
        default_factory=_default_log_format,
        metadata={"group": "operations", "choices": (AUTO, *LOG_FORMATS),
                  "auto": "text when stdout is a terminal, else json", "old_env": ("LOG_FORMAT",),
                  "help": "json (one object per line) or text"},
    )
    log_level: str = field(
        default="INFO",
        metadata={"group": "operations", "choices": LOG_LEVELS, "old_env": ("LOG_LEVEL",),
                  "help": "the least severe level logged"},
    )
    stats_interval: float = field(
        default=10.0,
        metadata={"group": "operations", "metavar": "SECONDS", "help": "seconds between JSON stats lines"},
    )
    metrics_port: int | None = field(
        default=None,
        metadata={"group": "operations", "metavar": "PORT", "unset": "off",
                  "help": "serve Prometheus /metrics and /health on this port"},
    )

    @property
    def segments_dir(self) -> Path:
        return self.data_dir / "segments"

    @property
    def state_path(self) -> Path:
        return self.data_dir / "ingestion.state"

    @property
    def pg_dir(self) -> Path:
        return self.data_dir / "pg"

    def secrets(self) -> list[str]:
        """Strings that must never appear in logs, state files or rejects."""
        found = [self.api_key] if self.api_key else []
        if self.database_url:
            password = urlsplit(self.database_url).password if "://" in self.database_url else None
            match = re.search(r"password\s*=\s*(\S+)", self.database_url)
            for candidate in (password, match.group(1) if match else None):
                if candidate:
                    found.append(candidate)
        return found

    def redacted(self) -> dict[str, Any]:
        """The config as printable data, with the key and any DSN password masked."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "api_key":
                value = mask(value)
            elif f.name == "database_url" and value:
                value = redact_dsn(value)
            elif isinstance(value, Path):
                value = str(value)
            out[f.name] = value
        return out


def mask(secret: str) -> str:
    return "***" if secret else ""


def redact_dsn(dsn: str) -> str:
    """Hide the password of a URL-style or key=value DSN."""
    if "://" in dsn:
        parts = urlsplit(dsn)
        if parts.password is None:
            return dsn
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return urlunsplit(parts._replace(netloc=netloc))
    return re.sub(r"(password\s*=\s*)\S+", r"\1***", dsn)


# ---------------------------------------------------------------------------------------
# Names: options and environment variables


def option_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def env_name(field_name: str) -> str:
    """The variable of an option, derived from its name so that the two cannot drift apart
    (they did: `--segment-max-rows` was read from INGEST_SEGMENT_ROWS). The rule: the API
    connection (`--api-*`) is DATASYNC_*, the database URL keeps the universal DATABASE_URL
    (and its _FILE), every other option is INGEST_ followed by the option's name."""
    name = field_name.upper()
    if field_name.startswith("api_"):
        return "DATASYNC_" + name
    if field_name.startswith("database_url"):
        return name
    return "INGEST_" + name


def old_env_names(f: Field[Any]) -> tuple[str, ...]:
    return tuple(f.metadata.get("old_env", ()))


def file_field_of(secret: str) -> Field[Any] | None:
    """The option naming a file that holds `secret` (`api_key` -> `api_key_file`)."""
    return next((f for f in fields(Config) if f.metadata.get("file_of") == secret), None)


# ---------------------------------------------------------------------------------------
# Parsing: strings from CLI / env / .env into typed values. Pure; table-tested.


def _parse_int(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise ValueError(f"expected a whole number, got {text!r}") from None
        if value < minimum or (maximum is not None and value > maximum):
            upper = f" and at most {maximum}" if maximum is not None else ""
            raise ValueError(f"must be at least {minimum}{upper}, got {value}")
        return value

    return parse


def _parse_float(minimum: float) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value):
            raise ValueError(f"expected a finite number, got {text!r}")
        if not value >= minimum:
            raise ValueError(f"must be at least {minimum}, got {text}")
        return value

    return parse


def _parse_choice(choices: tuple[str, ...]) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = text.strip().lower()
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}, got {text!r}")
        return value

    return parse


def _or_auto(compute: Callable[[], Any], parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """`auto` spells the computed default, so that it can be written down (in .env.example,
    or to undo a value set further down the precedence)."""

    def parse_or_auto(text: str) -> Any:
        return compute() if text.strip().lower() == AUTO else parse(text)

    return parse_or_auto


def _parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def _parse_gzip(text: str) -> str:
    """auto, on or off; a yes/no value (the option was once a flag) reads as on/off."""
    try:
        return "on" if _parse_bool(text) else "off"
    except ValueError:
        return _parse_choice(GZIP_MODES)(text)


def _parse_api_url(text: str) -> str:
    url = text.strip().rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"must be an http(s) URL, got {text!r}")
    if not parts.path.endswith("/api/v1"):
        raise ValueError(f"must end in /api/v1, got {text!r}")
    return url


def _parse_api_key(text: str) -> str:
    key = text.strip()
    if not key or any(c.isspace() for c in key):
        raise ValueError("must be a non-empty string without spaces")
    return key


def _parse_table(text: str) -> str:
    if not _TABLE_NAME.match(text):
        raise ValueError(f"must be a plain identifier (letters, digits, _), got {text!r}")
    return text


DSN_SCHEMES = ("postgresql", "postgres")


def _parse_dsn(text: str) -> str | None:
    """A PostgreSQL URL or key=value string, checked for syntax only (no connection). The
    message never quotes the value: it may hold a password."""
    text = text.strip()
    if not text:
        return None
    if "://" in text and urlsplit(text).scheme.lower() not in DSN_SCHEMES:
        raise ValueError("must be a postgresql:// URL or a key=value connection string")
    from psycopg2.extensions import parse_dsn  # libpq's own parser

    try:
        parse_dsn(text)
    except Exception:  # psycopg2.ProgrammingError; its text may quote the password
        raise ValueError("is not a valid PostgreSQL connection string (URL or key=value)") from None
    return text


def _parse_port(text: str) -> int | None:
    if text.strip() == "":
        return None
    return _parse_int(0, 65535)(text)


def _parse_level(text: str) -> str:
    return _parse_choice(tuple(level.lower() for level in LOG_LEVELS))(text).upper()


def _parse_optional_path(text: str) -> Path | None:
    return Path(text).expanduser() if text.strip() else None


PARSERS: dict[str, Callable[[str], Any]] = {
    "api_url": _parse_api_url,
    "api_key": _parse_api_key,
    "api_key_file": _parse_optional_path,
    "source": _parse_choice(SOURCES),
    "partitions": _parse_int(0, 64),
    "page_limit": _parse_int(1),
    "gzip": _parse_gzip,
    "request_timeout": _parse_float(0.1),
    "max_attempts": _parse_int(1),
    "feed_rate": _parse_float(0.1),
    "events_rate": _or_auto(lambda: None, _parse_float(0.1)),
    "query_rate": _parse_float(0.0),
    "rate_window": _or_auto(lambda: None, _parse_float(0.01)),
    "pacing": _parse_choice(PACING_MODES),
    "segment_max_rows": _parse_int(1),
    "segment_max_bytes": _parse_int(1024),
    "segment_max_age": _parse_float(0.01),
    "ready_max_bytes": _parse_int(1 << 20),
    "keep_segments": _parse_bool,
    "database_url": _parse_dsn,
    "database_url_file": _parse_optional_path,
    "table": _parse_table,
    "workers": _or_auto(_default_workers, _parse_int(1, 64)),
    "db_outage_limit": _parse_float(1.0),
    "data_dir": lambda text: Path(text).expanduser(),
    "follow": _parse_bool,
    "poll_interval": _parse_float(0.1),
    "max_restarts": _parse_int(0),
    "log_format": _or_auto(_default_log_format, _parse_choice(LOG_FORMATS)),
    "log_level": _parse_level,
    "stats_interval": _parse_float(0.1),
    "metrics_port": _parse_port,
}

REQUIRED_FOR_RUN = ("api_url", "api_key")


# ---------------------------------------------------------------------------------------
# Sources of values: the command line, the environment, .env, secret files


@contextmanager
def _relayed_dotenv_warnings(path: Path, warn: Warn) -> Iterator[None]:
    """python-dotenv reports a line it cannot parse on the `logging` module, which nothing
    here configures (it would print a bare line of its own): hand it to `warn` instead."""

    class Relay(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            warn(f"{path}: {record.getMessage()}; the line is ignored")

    dotenv_logger = logging.getLogger("dotenv.main")
    relay, propagate = Relay(), dotenv_logger.propagate
    dotenv_logger.addHandler(relay)
    dotenv_logger.propagate = False
    try:
        yield
    finally:
        dotenv_logger.removeHandler(relay)
        dotenv_logger.propagate = propagate


def read_dotenv(path: Path, warn: Warn = ignore) -> dict[str, str]:
    """The variables of a .env file as python-dotenv reads them (the rules of compose's env files):
    quotes, inline comments, `export`, `${VAR}` and `${VAR:-default}` from the file itself
    or the environment. Missing file: empty."""
    from dotenv import dotenv_values

    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: is not UTF-8 text") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    with _relayed_dotenv_warnings(path, warn):
        values = dotenv_values(stream=io.StringIO(text), interpolate=True)
    return {key: value for key, value in values.items() if value is not None}


class _Raw(NamedTuple):
    """A value as found, before parsing: `rank` 0 is the command line, then the
    environment, then .env; `origin` names it the way the user wrote it."""

    rank: int
    value: Any
    origin: str


def _from_variables(f: Field[Any], values: Mapping[str, str], where: str, warn: Warn) -> tuple[str, str] | None:
    name = env_name(f.name)
    old = [o for o in old_env_names(f) if o in values]
    for o in old:
        wins = f" ({name} is set too and wins)" if name in values else ""
        warn(f"{o}{where} is deprecated: rename it {name}{wins}")
    if name in values:
        return values[name], name + where
    if old:
        return values[old[0]], old[0] + where
    return None


def _find(f: Field[Any], cli: Mapping[str, Any], env: Mapping[str, str], dotenv: Mapping[str, str], warn: Warn) -> _Raw | None:
    if cli.get(f.name) is not None:
        return _Raw(0, cli[f.name], option_name(f.name))
    for rank, (values, where) in enumerate(((env, ""), (dotenv, " (in .env)")), start=1):
        found = _from_variables(f, values, where, warn)
        if found is not None:
            return _Raw(rank, *found)
    return None


def read_secret_file(path: Path, origin: str) -> str:
    """The secret a file holds (the Docker/Kubernetes secrets pattern): its content without
    the trailing newline. Messages name the file, never what is in it."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{origin}: {path} is not UTF-8 text") from None
    except OSError as exc:
        raise ConfigError(f"{origin}: cannot read {path} ({exc.strerror or exc})") from None
    text = text.rstrip("\r\n")
    if not text.strip():
        raise ConfigError(f"{origin}: {path} is empty")
    return text


def _given(raw: _Raw) -> bool:
    return raw.value is not None and raw.value != ""


def _secret_from_file(file_field: Field[Any], found: dict[str, _Raw]) -> None:
    """A secret and its file are one setting: the layer higher in the precedence decides,
    and one layer giving both is an error (which one was meant?)."""
    secret = file_field.metadata["file_of"]
    by_file, by_value = found.get(file_field.name), found.get(secret)
    if by_file is None:
        return
    if by_value is not None:
        same_layer = by_value.rank == by_file.rank
        if same_layer and _given(by_value) and _given(by_file):
            raise ConfigError(f"{by_value.origin} and {by_file.origin} are both given: give one of them")
        if by_value.rank < by_file.rank or (same_layer and not _given(by_file)):
            del found[file_field.name]
            return
    path = PARSERS[file_field.name](str(by_file.value))
    found.pop(secret, None)
    if path is not None:
        found[secret] = _Raw(by_file.rank, read_secret_file(path, by_file.origin), f"{by_file.origin} ({path})")


def _warn_secret_on_command_line(found: Mapping[str, _Raw], config: Config, warn: Warn) -> None:
    for f in fields(Config):
        if "file_of" not in f.metadata:
            continue
        secret: str = f.metadata["file_of"]
        raw = found.get(secret)
        on_command_line = raw is not None and raw.origin == option_name(secret)  # not read from its file
        if not on_command_line or not Config(**{secret: getattr(config, secret)}).secrets():
            continue
        warn(
            f"{option_name(secret)} on the command line is visible to every user of this machine in the process"
            f" list: use {option_name(f.name)} or {env_name(secret)} instead"
        )


def build_config(
    cli: Mapping[str, Any],
    env: Mapping[str, str],
    dotenv: Mapping[str, str],
    required: tuple[str, ...] = REQUIRED_FOR_RUN,
    warn: Warn = ignore,
) -> Config:
    """CLI > environment > .env > default. CLI values may already be typed (from click)."""
    found = {f.name: raw for f in fields(Config) if (raw := _find(f, cli, env, dotenv, warn)) is not None}
    for f in fields(Config):
        if "file_of" in f.metadata:
            _secret_from_file(f, found)
    values: dict[str, Any] = {}
    for name, raw in found.items():
        try:
            values[name] = PARSERS[name](raw.value if isinstance(raw.value, str) else str(raw.value))
        except ValueError as exc:
            raise ConfigError(f"{raw.origin}: {exc}") from None
    config = Config(**values)
    for name in required:
        if not getattr(config, name):
            raise ConfigError(f"{_spelled(name)} is required")
    _warn_secret_on_command_line(found, config, warn)
    return config


def _spelled(name: str) -> str:
    """Every way to give an option, for a message: `--api-key (DATASYNC_API_KEY) or ...`."""
    ways = [f"{option_name(name)} ({env_name(name)})"]
    file_field = file_field_of(name)
    if file_field is not None:
        ways.append(f"{option_name(file_field.name)} ({env_name(file_field.name)})")
    return " or ".join(ways)


def load_config(cli: Mapping[str, Any], required: tuple[str, ...] = REQUIRED_FOR_RUN, warn: Warn = ignore) -> Config:
    """The I/O shell around `build_config`: the real environment and ./.env."""
    return build_config(cli, os.environ, read_dotenv(Path.cwd() / ".env", warn), required, warn)


# ---------------------------------------------------------------------------------------
# Documentation: the README's table and the defaults `--help` shows


def default_text(f: Field[Any], here: bool = False) -> str:
    """A field's default in words. `here`: with the value a computed default takes on this
    machine (for `--help`; the README shows only the rule)."""
    if "auto" in f.metadata:
        computed = f" (here: {f.default_factory()})" if here and f.default_factory is not MISSING_DEFAULT else ""
        return f"{AUTO}{computed}: {f.metadata['auto']}"
    if f.default in (None, ""):
        return str(f.metadata.get("unset", "unset"))
    return str(f.default).lower() if isinstance(f.default, bool) else str(f.default)


def reference_table() -> str:
    """The README's configuration reference, generated so that it cannot drift."""
    lines = ["| option | environment | default | meaning |", "|---|---|---|---|"]
    for f in fields(Config):
        if "auto" in f.metadata:
            default = f"`{AUTO}`: {f.metadata['auto']}"
        elif f.default in (None, ""):
            default = default_text(f)
        else:
            default = f"`{default_text(f)}`"
        old = old_env_names(f)
        names = f"`{env_name(f.name)}`" + (f" (was `{'`, `'.join(old)}`)" if old else "")
        lines.append(f"| `{option_name(f.name)}` | {names} | {default} | {f.metadata['help']} |")
    return "\n".join(lines) + "\n"
