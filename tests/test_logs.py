"""Logging: one JSON object per line, and secrets masked in every output."""

from __future__ import annotations

import orjson
import pytest
from loguru import logger

from ingest.logs import add_secrets, configure_logging

SECRET = "ds_" + "5" * 32


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_secrets_are_masked_in_messages_and_extras(fmt: str, capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging(fmt, "INFO", [SECRET], process="test")
    add_secrets(["tok" + "e" * 61])
    logger.bind(url=f"http://h/?api_key={SECRET}").info("key {} token {}", SECRET, "tok" + "e" * 61)
    err = capsys.readouterr().err
    assert SECRET not in err and "e" * 61 not in err
    assert "***" in err


def test_json_lines_are_compact_objects(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("json", "INFO", [], process="unit")
    logger.bind(stats={"events_loaded": 5}).info("progress")
    logger.debug("not shown at INFO")
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1
    record = orjson.loads(lines[0])
    assert record["message"] == "progress" and record["level"] == "INFO" and record["process"] == "unit"
    assert record["stats"] == {"events_loaded": 5}
