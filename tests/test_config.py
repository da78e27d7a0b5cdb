"""Config: precedence, parsing, one-line errors, redaction."""

from __future__ import annotations

from pathlib import Path

import pytest

from ingest.config import Config, ConfigError, build_config, read_dotenv, redact_dsn

BASE = {"DATASYNC_API_URL": "http://h/api/v1", "DATASYNC_API_KEY": "ds_" + "a" * 32}


def test_precedence_cli_over_env_over_dotenv() -> None:
    config = build_config(
        {"workers": "7"},
        {**BASE, "INGEST_WORKERS": "5", "INGEST_TABLE": "from_env"},
        {"INGEST_WORKERS": "3", "INGEST_TABLE": "from_dotenv", "INGEST_SOURCE": "events"},
    )
    assert (config.workers, config.table, config.source) == (7, "from_env", "events")


@pytest.mark.parametrize(
    "cli, message",
    [
        ({"workers": "0"}, "--workers: must be at least 1"),
        ({"workers": "many"}, "--workers: expected a whole number"),
        ({"source": "ftp"}, "--source: must be one of auto, feed, events"),
        ({"api_url": "http://h/api"}, "--api-url: must end in /api/v1"),
        ({"api_url": "ftp://h/api/v1"}, "--api-url: must be an http(s) URL"),
        ({"table": "events; drop table x"}, "--table: must be a plain identifier"),
        ({"page_limit": "6000"}, "--page-limit: must be at least 1 and at most 5000"),
        ({"log_format": "xml"}, "--log-format: must be one of json, text"),
        ({"keep_segments": "maybe"}, "--keep-segments: expected true or false"),
        ({"gzip": "sometimes"}, "--gzip: must be one of auto, on, off"),
        ({"query_rate": "-5"}, "--query-rate: must be at least 0.0"),
        ({"feed_rate": "-1"}, "--feed-rate: must be at least 0.1"),
        ({"metrics_port": "70000"}, "--metrics-port: must be at least 0 and at most 65535"),
    ],
)
def test_bad_values_name_the_option(cli: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        build_config(cli, BASE, {})
    assert str(info.value).startswith(message)
    assert "\n" not in str(info.value)


def test_bad_env_value_names_the_variable() -> None:
    with pytest.raises(ConfigError, match=r"^INGEST_WORKERS: "):
        build_config({}, {**BASE, "INGEST_WORKERS": "x"}, {})
    with pytest.raises(ConfigError, match=r"^INGEST_WORKERS \(in \.env\): "):
        build_config({}, BASE, {"INGEST_WORKERS": "x"})


@pytest.mark.parametrize("missing", ["DATASYNC_API_URL", "DATASYNC_API_KEY"])
def test_required_values(missing: str) -> None:
    env = {k: v for k, v in BASE.items() if k != missing}
    with pytest.raises(ConfigError, match="is required"):
        build_config({}, env, {})


@pytest.mark.parametrize(
    ("text", "mode"), [("auto", "auto"), ("ON", "on"), ("off", "off"), ("true", "on"), ("0", "off"), ("yes", "on")]
)
def test_gzip_takes_a_mode_or_the_yes_no_of_the_old_flag(text: str, mode: str) -> None:
    assert build_config({"gzip": text}, BASE, {}).gzip == mode


def test_defaults() -> None:
    config = build_config({}, BASE, {})
    assert config.data_dir == Path(".datasync")
    assert config.table == "events" and config.source == "auto" and config.database_url is None
    assert config.api_url == "http://h/api/v1"
    assert config.state_path == Path(".datasync/ingestion.state")


def test_dotenv_parsing(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text(
        "# comment\nexport DATASYNC_API_KEY='ds_quoted'\nINGEST_WORKERS=3 # trailing\n\nBROKEN LINE\nEMPTY=\n"
    )
    assert read_dotenv(env_file) == {"DATASYNC_API_KEY": "ds_quoted", "INGEST_WORKERS": "3", "EMPTY": ""}
    assert read_dotenv(tmp_path / "absent") == {}


@pytest.mark.parametrize(
    "dsn, expected",
    [
        ("postgresql://u:s3cret@h:5432/db", "postgresql://u:***@h:5432/db"),
        ("postgresql://u@h/db", "postgresql://u@h/db"),
        ("host=h user=u password=s3cret dbname=db", "host=h user=u password=*** dbname=db"),
    ],
)
def test_redact_dsn(dsn: str, expected: str) -> None:
    assert redact_dsn(dsn) == expected


def test_redacted_config_hides_secrets() -> None:
    config = build_config({"database_url": "postgresql://u:s3cret@h/db"}, BASE, {})
    shown = repr(config) + str(config.redacted())
    assert BASE["DATASYNC_API_KEY"] not in shown and "s3cret" not in shown
    assert set(config.secrets()) == {BASE["DATASYNC_API_KEY"], "s3cret"}


def test_every_field_has_env_help_and_parser() -> None:
    from dataclasses import fields

    from ingest.config import PARSERS

    for f in fields(Config):
        assert f.metadata["env"] and f.metadata["help"], f.name
        assert f.name in PARSERS, f.name
