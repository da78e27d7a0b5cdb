"""The one typed configuration object, and where its values come from.

Every tunable lives in `Config`. Values are taken from the command line, else the
environment, else a `.env` file in the working directory, else the default. Parsing is a
pure function of those three mappings so it can be table-tested; bad values raise
`ConfigError`, which the CLI turns into exit code 2 with one line.
"""

from __future__ import annotations

import math
import os
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import MISSING as MISSING_DEFAULT
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

SOURCES = ("auto", "feed", "events")
LOG_FORMATS = ("json", "text")
GZIP_MODES = ("auto", "on", "off")
_TABLE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


class ConfigError(ValueError):
    """A bad option or environment value; the message names it in one line."""


def _default_workers() -> int:
    return max(2, min(4, os.cpu_count() or 2))


def _default_log_format() -> str:
    return "text" if sys.stdout.isatty() else "json"


@dataclass(frozen=True)
class Config:
    """Everything `run` needs. Field metadata: env var, help text and parser."""

    api_url: str = field(
        default="", metadata={"env": "DATASYNC_API_URL", "help": "API base URL ending in /api/v1 (required)"}
    )
    api_key: str = field(
        default="", repr=False, metadata={"env": "DATASYNC_API_KEY", "help": "API key (required; never logged)"}
    )
    database_url: str | None = field(
        default=None,
        repr=False,
        metadata={"env": "DATABASE_URL", "help": "PostgreSQL DSN; unset: embedded PostgreSQL in <data-dir>/pg"},
    )
    data_dir: Path = field(
        default=Path(".datasync"), metadata={"env": "INGEST_DATA_DIR", "help": "segments, checkpoint, embedded database"}
    )
    workers: int = field(
        default_factory=_default_workers, metadata={"env": "INGEST_WORKERS", "help": "loader processes"}
    )
    source: str = field(
        default="auto", metadata={"env": "INGEST_SOURCE", "help": "auto (feed when a token can be had), feed, events"}
    )
    table: str = field(default="events", metadata={"env": "INGEST_TABLE", "help": "target table name"})
    log_format: str = field(
        default_factory=_default_log_format,
        metadata={"env": "LOG_FORMAT", "help": "json, or text (default: text on a terminal, else json)"},
    )
    log_level: str = field(default="INFO", metadata={"env": "LOG_LEVEL", "help": "DEBUG, INFO, WARNING, ERROR"})
    partitions: int = field(
        default=0, metadata={"env": "INGEST_PARTITIONS", "help": "parallel fetch partitions (0: chosen from the source)"}
    )
    page_limit: int = field(default=5000, metadata={"env": "INGEST_PAGE_LIMIT", "help": "events per page (max 5000)"})
    feed_rate: float = field(
        default=39.0,
        metadata={"env": "INGEST_FEED_RATE", "help": "feed requests per window, shared by all fetchers (no headers)"},
    )
    events_rate: float = field(
        default=10.0,
        metadata={"env": "INGEST_EVENTS_RATE", "help": "/events requests per window; X-RateLimit headers refine it"},
    )
    query_rate: float = field(
        default=5.0,
        metadata={
            "env": "INGEST_QUERY_RATE",
            "help": "/events requests per window with the key in the query string, a separate extra budget"
            " (0: do not use it)",
        },
    )
    rate_window: float = field(
        default=60.0, metadata={"env": "INGEST_RATE_WINDOW", "help": "seconds the API's rate limits count over"}
    )
    gzip: str = field(
        default="auto",
        metadata={
            "env": "INGEST_GZIP",
            "help": "ask for gzip bodies: on, off, or auto (on unless the API is on this machine, where"
            " compressing costs CPU and saves nothing)",
        },
    )
    request_timeout: float = field(
        default=60.0, metadata={"env": "INGEST_REQUEST_TIMEOUT", "help": "seconds to wait for a response"}
    )
    max_attempts: int = field(
        default=12, metadata={"env": "INGEST_MAX_ATTEMPTS", "help": "tries per page before the run fails"}
    )
    segment_max_rows: int = field(
        default=50_000, metadata={"env": "INGEST_SEGMENT_ROWS", "help": "rotate a segment after this many rows"}
    )
    segment_max_bytes: int = field(
        default=32 << 20, metadata={"env": "INGEST_SEGMENT_BYTES", "help": "rotate a segment after this many bytes"}
    )
    segment_max_age: float = field(
        default=2.0,
        metadata={
            "env": "INGEST_SEGMENT_AGE",
            "help": "rotate a segment after this many seconds (a rotation commits the walk's position,"
            " which idle fetchers split by)",
        },
    )
    ready_max_bytes: int = field(
        default=512 << 20, metadata={"env": "INGEST_READY_BYTES", "help": "fetchers pause while ready/ holds more"}
    )
    keep_segments: bool = field(
        default=False, metadata={"env": "INGEST_KEEP_SEGMENTS", "help": "keep loaded segments in segments/loaded/"}
    )
    stats_interval: float = field(
        default=10.0, metadata={"env": "INGEST_STATS_INTERVAL", "help": "seconds between JSON stats lines"}
    )
    metrics_port: int | None = field(
        default=None, metadata={"env": "INGEST_METRICS_PORT", "help": "serve Prometheus /metrics and /health here"}
    )
    db_outage_limit: float = field(
        default=600.0,
        metadata={"env": "INGEST_DB_OUTAGE_LIMIT", "help": "seconds loaders retry an unavailable database before the run fails"},
    )
    max_restarts: int = field(
        default=3, metadata={"env": "INGEST_MAX_RESTARTS", "help": "restarts of a crashed child before the run fails"}
    )
    follow: bool = field(
        default=False,
        metadata={"env": "INGEST_FOLLOW", "help": "after the drain, keep topping up what the source gains until stopped"},
    )
    poll_interval: float = field(
        default=60.0, metadata={"env": "INGEST_POLL_INTERVAL", "help": "with --follow: seconds between top-ups"}
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
    return _parse_choice(("debug", "info", "warning", "error"))(text).upper()


PARSERS: dict[str, Callable[[str], Any]] = {
    "api_url": _parse_api_url,
    "api_key": _parse_api_key,
    "database_url": _parse_dsn,
    "data_dir": lambda text: Path(text).expanduser(),
    "workers": _parse_int(1, 64),
    "source": _parse_choice(SOURCES),
    "table": _parse_table,
    "log_format": _parse_choice(LOG_FORMATS),
    "log_level": _parse_level,
    "partitions": _parse_int(0, 64),
    "page_limit": _parse_int(1, 5000),
    "feed_rate": _parse_float(0.1),
    "events_rate": _parse_float(0.1),
    "query_rate": _parse_float(0.0),
    "rate_window": _parse_float(0.01),
    "gzip": _parse_gzip,
    "request_timeout": _parse_float(0.1),
    "max_attempts": _parse_int(1),
    "segment_max_rows": _parse_int(1),
    "segment_max_bytes": _parse_int(1024),
    "segment_max_age": _parse_float(0.01),
    "ready_max_bytes": _parse_int(1 << 20),
    "keep_segments": _parse_bool,
    "stats_interval": _parse_float(0.1),
    "metrics_port": _parse_port,
    "db_outage_limit": _parse_float(1.0),
    "max_restarts": _parse_int(0),
    "follow": _parse_bool,
    "poll_interval": _parse_float(0.1),
}

REQUIRED_FOR_RUN = ("api_url", "api_key")


def option_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def read_dotenv(path: Path) -> dict[str, str]:
    """KEY=VALUE lines, optional `export`, quotes and comments. Missing file: empty."""
    values: dict[str, str] = {}
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return values
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.removeprefix("export ").partition("=")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        else:
            value = value.split(" #", 1)[0].strip()
        values[key.strip()] = value
    return values


def build_config(
    cli: Mapping[str, Any],
    env: Mapping[str, str],
    dotenv: Mapping[str, str],
    required: tuple[str, ...] = REQUIRED_FOR_RUN,
) -> Config:
    """CLI > environment > .env > default. CLI values may already be typed (from click)."""
    values: dict[str, Any] = {}
    for f in fields(Config):
        env_name = f.metadata["env"]
        raw: Any = cli.get(f.name)
        origin = option_name(f.name)
        if raw is None:
            raw, origin = env.get(env_name), env_name
        if raw is None:
            raw, origin = dotenv.get(env_name), f"{env_name} (in .env)"
        if raw is None:
            continue
        try:
            values[f.name] = PARSERS[f.name](raw if isinstance(raw, str) else str(raw))
        except ValueError as exc:
            raise ConfigError(f"{origin}: {exc}") from None
    config = Config(**values)
    for name in required:
        if not getattr(config, name):
            f = next(f for f in fields(Config) if f.name == name)
            raise ConfigError(f"{option_name(name)} (or {f.metadata['env']}) is required")
    return config


def load_config(cli: Mapping[str, Any], required: tuple[str, ...] = REQUIRED_FOR_RUN) -> Config:
    """The I/O shell around `build_config`: the real environment and ./.env."""
    return build_config(cli, os.environ, read_dotenv(Path.cwd() / ".env"), required)


def reference_table() -> str:
    """The README's configuration reference, generated so that it cannot drift."""
    lines = ["| option | environment | default | meaning |", "|---|---|---|---|"]
    for f in fields(Config):
        if f.default is not MISSING_DEFAULT:
            default = "unset" if f.default in (None, "") else f"`{f.default}`"
        else:
            default = {"workers": "2-4 (CPU count)", "log_format": "`text` on a terminal, else `json`"}[f.name]
        lines.append(f"| `{option_name(f.name)}` | `{f.metadata['env']}` | {default} | {f.metadata['help']} |")
    return "\n".join(lines) + "\n"
