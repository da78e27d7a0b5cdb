"""Logging setup, the same for every process (supervisor, fetchers, loaders, simulator).

Compact JSON lines when stdout is not a terminal, readable text otherwise. Every
record passes through a redactor so that a secret handed to `configure_logging` can never
reach the output, whichever code path formats it into a message.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

import orjson
from loguru import logger

_secrets: list[str] = []
_pending_warnings: list[str] = []


def redact(text: str) -> str:
    """`text` with every registered secret (key, DSN password, every stream token this
    process ever held) masked: for messages that leave the process (error queues)."""
    return _redact(text)


def _redact(text: str) -> str:
    for secret in _secrets:
        if secret and secret in text:
            text = text.replace(secret, "***")
    return text


def _patch(record: Any) -> None:
    record["message"] = _redact(record["message"])
    for key, value in list(record["extra"].items()):
        if isinstance(value, str):
            record["extra"][key] = _redact(value)
    if record["exception"] is not None:
        exc = record["exception"]
        if exc.value is not None:
            exc.value.args = tuple(_redact(a) if isinstance(a, str) else a for a in exc.value.args)


def _json_line(message: Any) -> None:
    """One compact JSON object per line: what a log shipper wants, nothing it doesn't."""
    record = message.record
    line: dict[str, Any] = {
        "time": record["time"].isoformat(timespec="milliseconds"),
        "level": record["level"].name,
        "process": record["extra"].get("process"),
        "pid": record["process"].id,
        "message": record["message"],
    }
    line.update({k: v for k, v in record["extra"].items() if k != "process"})
    if record["exception"] is not None and record["exception"].value is not None:
        line["error"] = _redact(repr(record["exception"].value))
    sys.stderr.write(orjson.dumps(line, default=str).decode() + "\n")
    sys.stderr.flush()


def add_secrets(secrets: Iterable[str]) -> None:
    """Register more strings to mask, e.g. a stream token once it is issued."""
    for secret in secrets:
        if secret and len(secret) >= 4 and secret not in _secrets:
            _secrets.append(secret)


def warn_when_configured(message: str) -> None:
    """Log a warning once `configure_logging` has set the format: the configuration warns
    (a deprecated variable, a key on the command line) before it knows the log format, and
    a line in another format would break a log shipper's JSON."""
    _pending_warnings.append(message)


def configure_logging(fmt: str = "text", level: str = "INFO", secrets: Iterable[str] = (), process: str = "main") -> None:
    """Replace loguru's default sink, then log the warnings waiting for it. Safe to call
    again in a child process."""
    add_secrets(secrets)
    logger.remove()
    logger.configure(patcher=_patch, extra={"process": process})
    if fmt == "json":
        logger.add(_json_line, level=level, backtrace=False, diagnose=False)
    else:
        logger.add(
            sys.stderr,
            level=level,
            format="<green>{time:HH:mm:ss.SSS}</green> <level>{level: <7}</level> "
            "<cyan>{extra[process]}</cyan> {message}",
            backtrace=False,
            diagnose=False,
            colorize=sys.stderr.isatty(),
        )
    while _pending_warnings:
        logger.warning(_pending_warnings.pop(0))
